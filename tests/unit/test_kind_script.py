"""tests/kind/e2e.sh without Docker: its arguments, its file checks, and everything it would apply
(`--render`): the FusionRun is tiny-cpu.yaml with the built images and validates as a FusionSpec, its
S3 endpoint and Secret are the ones the script creates, the upload Job puts every input the FusionRun
names into the bucket, and `helm template` renders the chart with the operator image of images/build.sh.
Needs the helm binary of tests/cluster/build-binaries.sh (skips without it, fails with
WRPO_REQUIRE_CLUSTER=1 and in CI: tests/binaries.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from binaries import missing

from wrpo.models.tiny import MODEL_NAMES
from wrpo.pipeline.spec import FusionSpec

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "kind" / "e2e.sh"
# helm comes from tests/cluster/build-binaries.sh: scripts/test.sh runs these in its cluster tier, after the build
uses_k8s_bin = pytest.mark.cluster


@pytest.fixture(scope="module")
def helm_path() -> Path:
    configured = os.environ.get("WRPO_K8S_BIN")
    cache = Path(os.environ.get("WRPO_CACHE") or Path.home() / ".cache" / "wrpo")
    bin_dir = Path(configured) if configured else cache / "k8s-bin" / "current"
    helm = bin_dir / "helm"
    if not helm.is_file():
        missing(f"no helm in {bin_dir} (tests/cluster/build-binaries.sh)", "WRPO_REQUIRE_CLUSTER")
    return helm


def run_script(*args: str, helm: Path | None = None, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    path = f"{helm.parent}:/usr/bin:/bin" if helm else "/usr/bin:/bin"
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp")})


@pytest.fixture(scope="module")
def rendered(helm_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kind-render")
    result = run_script("--render", str(out), helm=helm_path)
    assert result.returncode == 0, result.stderr
    return out


def build_names() -> dict[str, str]:
    out = subprocess.run(["bash", str(ROOT / "images" / "build.sh"), "--list"], capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split() for line in out.splitlines())


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_bad_arguments_print_the_usage_and_exit_2():
    for args in (["--bogus"], ["--render"], ["extra"]):
        result = run_script(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "tests/kind/e2e.sh --render DIR" in result.stderr


@uses_k8s_bin
def test_missing_files_and_tools_are_named(tmp_path, helm_path):
    # a checkout without the example manifest
    copy = tmp_path / "repo"
    for rel in ("tests/kind/e2e.sh", "images/build.sh", "charts/wrpo-operator/Chart.yaml",
                "examples/tiny/prompts.jsonl"):
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, copy / rel)
    result = run_script("--render", str(tmp_path / "out"), helm=helm_path, script=copy / "tests/kind/e2e.sh")
    assert result.returncode == 1 and "missing manifests/examples/tiny-cpu.yaml" in result.stderr
    # without Docker the real run stops before anything is created
    result = run_script(helm=helm_path)
    assert result.returncode == 1 and "'docker' is required" in result.stderr


@uses_k8s_bin
def test_the_fusionrun_is_the_tiny_example_with_the_built_images(rendered):
    names = build_names()
    run = yaml.safe_load((rendered / "fusionrun.yaml").read_text())
    example = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())
    spec = FusionSpec.model_validate(run["spec"])  # the CRD's schema is this model's
    assert spec.cluster.runtime_image == names["runtime-cpu"] and spec.cluster.vllm_image == names["vllm-cpu"]
    assert spec.cluster.image_pull_policy == "Never"
    # nothing else changed
    run["spec"]["cluster"].pop("imagePullPolicy")
    assert run == example


@uses_k8s_bin
def test_s3_endpoint_secret_and_uploads_match_the_fusionrun(rendered):
    spec = yaml.safe_load((rendered / "fusionrun.yaml").read_text())["spec"]
    objects = load_all(rendered / "seaweedfs.yaml")
    service = next(o for o in objects if o["kind"] == "Service")
    endpoint = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{service['spec']['ports'][0]['port']}"
    assert spec["storage"]["s3Endpoint"] == endpoint
    identity = json.loads(next(o for o in objects if o["kind"] == "ConfigMap")["data"]["s3.json"])
    creds = identity["identities"][0]["credentials"][0]
    secret = json.loads((rendered / "secret.json").read_text())
    assert secret["metadata"]["name"] == spec["storage"]["credentialsSecret"]
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": creds["accessKey"],
                                    "AWS_SECRET_ACCESS_KEY": creds["secretKey"]}
    job = load_all(rendered / "upload.yaml")[0]
    assert job["metadata"]["namespace"] == secret["metadata"]["namespace"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == build_names()["runtime-cpu"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AWS_ENDPOINT_URL_S3"] == endpoint
    script = container["command"][2]
    # every s3:// input of the FusionRun is something the Job writes
    inputs = [spec["target"]["model"], spec["reward"]["model"], spec["dataset"]["uri"],
              *(s["model"] for s in spec["sources"])]
    bucket = spec["storage"]["runUri"].split("/")[2]
    for uri in inputs:
        b, key = re.match(r"s3://([^/]+)/(.+)", uri).groups()
        assert b == bucket
        if key.startswith("models/"):
            assert key.split("/")[1] in MODEL_NAMES and 'f"models/{model.name}/' in script, key
        else:
            assert f'"{key}"' in script, key
    prompts = json.loads((rendered / "prompts.json").read_text())["data"]["prompts.jsonl"]
    assert prompts == (ROOT / "examples" / "tiny" / "prompts.jsonl").read_text()


@uses_k8s_bin
def test_helm_template_renders_the_operator_image_never_pulled(rendered):
    deployment = next(o for o in load_all(rendered / "chart.yaml") if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == build_names()["operator"]
    assert container["imagePullPolicy"] == "Never"
