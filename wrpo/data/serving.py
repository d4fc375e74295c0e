"""Serving a model locally with vLLM's OpenAI-compatible server, as a subprocess on 127.0.0.1.

vLLM usually lives in its own virtual environment (its CPU wheel pins its own torch build): the python
that runs it is `$WRPO_VLLM_PYTHON`, or this interpreter if it can import vllm. `VLLMServer` starts the
server on a free port, waits for `/health`, and stops it by PID (TERM, then KILL) on exit.

The server gets an explicit environment (`server_environment`): what Python, the accelerators, vLLM and
the Hugging Face libraries read, and nothing else, so API keys of external sources and S3 credentials
in our environment never reach it (docs/spec.md, "Secrets"). `WRPO_VLLM_ENV_PASS` names extra variables
to pass (comma-separated). Each server also gets a private temporary folder (`TMPDIR`, `VLLM_RPC_BASE_PATH`)
that is removed when it stops: vLLM binds its ZMQ sockets and torch.distributed file stores there and does
not always remove them, and they used to pile up in /tmp. The compile cache stays where it was
(`TORCHINDUCTOR_CACHE_DIR`), so a second server does not compile again.

`serve(ctx, server)` is how a stage gets the servers of its plan row (`wrpo.pipeline.plan.servers`): the URL
of a running one given to it (the operator's Services), else local replicas started here. The command line
comes from `wrpo.pipeline.servers.vllm_options`, the same function the operator's Deployments use.
"""

from __future__ import annotations

import contextlib
import getpass
import importlib.util
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wrpo.errors import WrpoError
from wrpo.pipeline.servers import HEALTH_PATH, Server, vllm_options
from wrpo.storage import S3Options

if TYPE_CHECKING:
    from wrpo.pipeline.context import StageContext

log = logging.getLogger(__name__)
HOST = "127.0.0.1"


class ServingError(WrpoError):
    """The vLLM server could not be started; the message ends with the tail of its log."""


def vllm_python() -> str | None:
    """The interpreter that can run vLLM: $WRPO_VLLM_PYTHON, else this one if vllm imports, else None."""
    env = os.environ.get("WRPO_VLLM_PYTHON")
    if env:
        return env if Path(env).exists() else None
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


_HANDED_OUT: set[int] = set()
_PORT_LOCK = threading.Lock()
_PORT_DRAWS = random.SystemRandom()  # not the global generator: a seeded run must not draw its peers' ports


PORT_RANGE_ENV = "WRPO_PORT_RANGE"


def _configured_range() -> tuple[int, int] | None:
    """$WRPO_PORT_RANGE (`LOW-HIGH`): the ports this process and its children draw from, so that processes
    started side by side (scripts/test.sh's four pytest runs) take disjoint ports."""
    text = os.environ.get(PORT_RANGE_ENV, "").strip()
    if not text:
        return None
    low, sep, high = text.partition("-")
    try:
        span = int(low), int(high)
    except ValueError:
        span = None
    if not sep or span is None or not 1024 <= span[0] <= span[1] <= 65535:
        raise WrpoError(f"{PORT_RANGE_ENV}={text!r}: expected LOW-HIGH with 1024 <= LOW <= HIGH <= 65535")
    return span


def _listening_range() -> tuple[int, int] | None:
    """Ports outside the kernel's ephemeral range, from which no outgoing connection takes its local port:
    below the range when it starts above 11024 (Linux's default 32768-60999 leaves 10000-32767), else above
    it; None when the range covers nearly everything (or cannot be read: then the kernel chooses)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return None
    if low > 11024:
        return 10000, low - 1
    if high < 64511:
        return high + 1, 65535
    return None


def free_port(host: str = HOST) -> int:
    """A TCP port on `host` for a server that binds it a moment later (docs/cluster-harness.md, "Ports").

    Binding port 0 and closing leaves a race: the kernel hands the same ephemeral port to the next outgoing
    connection (any client of this machine) or to the next caller, and the server then fails to bind, or a
    health check reaches a stranger. So the port is drawn at random outside the ephemeral range (or from
    $WRPO_PORT_RANGE when set), checked free by binding it, and never handed out twice by this process."""
    configured = _configured_range()
    span = configured or _listening_range()

    def take(port: int) -> bool:
        if port in _HANDED_OUT:
            return False
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
        _HANDED_OUT.add(port)
        return True

    with _PORT_LOCK:
        for _ in range(256 if span else 0):
            port = _PORT_DRAWS.randint(*span)
            if take(port):
                return port
        if configured:  # a small configured range: every port of it, then a clear error
            port = next((p for p in range(span[0], span[1] + 1) if take(p)), None)
            if port is None:
                raise WrpoError(f"{PORT_RANGE_ENV}={span[0]}-{span[1]}: no free port left in that range")
            return port
        while True:  # no usable range (or 256 busy draws): the kernel's choice, still never twice
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port


def on_gpu() -> bool:
    """Whether a CUDA device is visible (without importing torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/version").exists()


#: Variables a local vLLM server may see: by exact name, and by prefix.
PASSED_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "PWD",
    "LD_LIBRARY_PATH", "LD_PRELOAD", "VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH", "PYTHONHASHSEED", "PYTHONUNBUFFERED",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",  # downloading the (gated) model the server serves
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM",
})
PASSED_PREFIXES = ("LC_", "VLLM_", "CUDA_", "NVIDIA_", "NCCL_", "ROCR_", "HIP_", "TORCH", "PYTORCH_", "OMP_",
                   "KMP_", "MKL_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "XDG_", "TRITON_")


def server_environment(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The part of `env` a vLLM subprocess may see (PASSED_NAMES, PASSED_PREFIXES and `WRPO_VLLM_ENV_PASS`)."""
    extra = {n.strip() for n in env.get("WRPO_VLLM_ENV_PASS", "").split(",") if n.strip()}
    return {k: v for k, v in env.items() if k in PASSED_NAMES or k in extra or k.startswith(PASSED_PREFIXES)}


def private_temp_environment(folder: str | Path) -> dict[str, str]:
    """The variables that make a vLLM process keep its runtime files in `folder`: `TMPDIR` (torch.distributed's
    file store) and `VLLM_RPC_BASE_PATH` (its ZMQ sockets), unless the caller set the latter. Torch's compile
    cache would follow `TMPDIR`; it is pinned to where torch would have put it (its own naming), so it stays
    warm across servers."""
    env = {"TMPDIR": str(folder)}
    if "VLLM_RPC_BASE_PATH" not in os.environ:
        env["VLLM_RPC_BASE_PATH"] = str(folder)
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # an arbitrary container UID without a passwd entry: torch's fallback
            user = f"uid_{os.getuid()}"
        user = re.sub(r'[\\/:*?"<>|]', "_", user)
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"torchinductor_{user}")
    return env


class VLLMServer:
    """`with VLLMServer(model, name) as srv:` -> an OpenAI-compatible server at `srv.base_url` (…/v1).

    `runner="pooling"` serves a reward model whose `/pooling` endpoint returns raw logits."""

    def __init__(self, model: str, served_name: str, runner: str = "generate", python: str | None = None,
                 extra_args: Sequence[str] = (), max_model_len: int | None = None,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
                 startup_timeout_s: float = 600.0, log_path: str | Path | None = None,
                 aliases: Sequence[str] = (), extra_env: dict[str, str] | None = None, seed: int | None = None):
        self.server = Server(served_name, served_name, model, runner, tensor_parallel_size,  # type: ignore[arg-type]
                             max_model_len, gpu_memory_utilization, tuple(extra_args), aliases=tuple(aliases),
                             seed=seed)
        self.python = python or vllm_python()
        if self.python is None:
            raise ServingError("vLLM is not available: set WRPO_VLLM_PYTHON (scripts/setup-vllm-env.sh) "
                               "or install vllm in this environment")
        self.startup_timeout_s = startup_timeout_s
        self.extra_env = dict(extra_env or {})  # e.g. CUDA_VISIBLE_DEVICES of one replica
        # without one, a fresh folder is made at launch (a server built and never started leaves nothing)
        self.log_path: Path | None = Path(log_path) if log_path is not None else None
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.runtime_dir: Path | None = None  # private TMPDIR of the running process (private_temp_environment)

    @classmethod
    def of(cls, server: Server, model_path: str, extra_env: dict[str, str] | None = None,
           **options: Any) -> VLLMServer:
        """A local process for the plan's `server`, its weights at `model_path` (`options`: python,
        log_path, startup_timeout_s)."""
        srv = cls(model_path, server.served_name, extra_env=extra_env, **options)
        srv.server = replace(server, model=model_path)
        return srv

    @property
    def served_name(self) -> str:
        return self.server.served_name

    @property
    def root_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def command(self) -> list[str]:
        """The server's command line: `wrpo.pipeline.servers.vllm_options`, as on a cluster."""
        return [self.python or "python", "-m", "vllm.entrypoints.openai.api_server", "--model", self.server.model,
                *vllm_options(self.server, HOST, self.port, on_gpu())]

    def environment(self) -> dict[str, str]:
        env = server_environment(os.environ)
        env.setdefault("VLLM_HOST_IP", HOST)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        if self.runtime_dir is not None:
            env.update(private_temp_environment(self.runtime_dir))
        env.update(self.extra_env)
        return env

    def start(self) -> VLLMServer:
        """Launch and wait until healthy."""
        self.launch()
        self.wait_healthy()
        return self

    def launch(self) -> VLLMServer:
        """Start the process without waiting (to start several servers side by side)."""
        self.port = free_port()
        if self.log_path is None:
            self.log_path = Path(tempfile.mkdtemp(prefix="wrpo-vllm-")) / "vllm.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_runtime_dir()  # a server launched again starts with an empty one
        # short, under the system's temporary folder: a Unix socket path has at most 107 bytes
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="wrpo-vllm-run-"))
        log.info("starting vLLM for %s on port %d (log %s)", self.served_name, self.port, self.log_path)
        try:
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT,
                                             env=self.environment(), start_new_session=True)
        except BaseException:
            self._remove_runtime_dir()
            raise
        return self

    def wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServingError(f"vLLM for '{self.served_name}' exited with code {self.proc.returncode}\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.root_url}{HEALTH_PATH}", timeout=2.0).status_code == 200:
                    return
            time.sleep(1.0)
        self.stop()
        raise ServingError(f"vLLM for '{self.served_name}' not healthy after {self.startup_timeout_s:.0f}s\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None:
            return "(no log)"
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        """TERM the server's process group (it spawns engine workers), then KILL if it lingers; then remove
        its private temporary folder (kept only while a process outlives the KILL)."""
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.proc is None or self.proc.poll() is not None:
            self._remove_runtime_dir()

    def _remove_runtime_dir(self) -> None:
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            self.runtime_dir = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------- a stage's servers


def given_endpoint(ctx: StageContext, server: Server) -> str | None:
    """The URL of an already-running server for `server` (the operator's Service), if one was given."""
    o = ctx.options
    if server.source is not None:
        return o.endpoints.get(server.source)
    return {"target": o.target_endpoint, "reward": o.reward_endpoint}.get(server.key)


def replica_devices(server: Server, replica: int) -> dict[str, str]:
    """The GPUs of one local replica: replica r gets GPUs [r·tp, (r+1)·tp) of those visible."""
    if server.replicas == 1 or not on_gpu():
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(server.replicas * server.tensor_parallel_size)]
    tp = server.tensor_parallel_size
    mine = ids[replica * tp:(replica + 1) * tp]
    if len(mine) < tp:
        raise WrpoError(f"{server.served_name}: {server.replicas} replicas × tensor-parallel {tp} need "
                        f"{server.replicas * tp} GPUs; {len(ids)} are visible")
    return {"CUDA_VISIBLE_DEVICES": ",".join(mine)}


@contextmanager
def serve(ctx: StageContext, server: Server, model_dir: str | None = None) -> Iterator[list[str] | None]:
    """The root URLs of `server`'s replicas: a given endpoint, or local vLLM servers started from the
    plan's description (stopped on exit); None when vLLM is not available here. A server that plays
    several roles (`Server.roles`) is started once per stage invocation and kept until the stage ends."""
    if server.roles:
        yield ctx.shared(f"server:{server.key}", lambda: _serve(ctx, server, model_dir))
        return
    with _serve(ctx, server, model_dir) as urls:
        yield urls


@contextmanager
def _serve(ctx: StageContext, server: Server, model_dir: str | None) -> Iterator[list[str] | None]:
    endpoint = given_endpoint(ctx, server)
    if endpoint:
        yield [endpoint.removesuffix("/").removesuffix("/v1")]
        return
    if not vllm_python():
        yield None
        return
    path = model_dir or ctx.work.model(server.model, S3Options.from_spec(ctx.spec.storage))
    with ExitStack() as stack:
        replicas = [VLLMServer.of(server, str(path), replica_devices(server, r)) for r in range(server.replicas)]
        for srv in replicas:  # start side by side, then wait for all
            stack.callback(srv.stop)
            srv.launch()
        for srv in replicas:
            srv.wait_healthy()
        yield [srv.root_url for srv in replicas]
