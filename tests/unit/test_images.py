"""The images of images/build.sh and every place that names them agree: the chart (image.repository and
appVersion), the spec defaults (cluster.runtimeImage, cluster.vllmImage), the example manifests, the
publish workflow and the kind script; the Containerfile builds every target as a non-root user, with
CI's pins, from the local Debian base and with the CA only as a build secret."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wrpo.pipeline.spec import ClusterSpec

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
CHART = ROOT / "charts" / "wrpo-operator"
TARGETS = ("operator", "runtime", "runtime-cpu", "vllm-cpu", "vllm")


def build_list(**env) -> dict[str, str]:
    out = subprocess.run(["bash", str(IMAGES / "build.sh"), "--list"], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin", **env}).stdout
    return dict(line.split() for line in out.splitlines())


@pytest.fixture(scope="module")
def names() -> dict[str, str]:
    return build_list()


def chart_version() -> str:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def test_build_lists_every_target_tagged_with_the_chart_app_version(names):
    assert tuple(names) == TARGETS
    version = chart_version()
    for target, name in names.items():
        repo, tag = name.rsplit(":", 1)
        assert tag == (f"{version}-cpu" if target.endswith("-cpu") else version), name
        assert repo.startswith("ghcr.io/wrpo/wrpo-"), name
    # the registry and version can be changed for forks, and nothing else moves
    other = build_list(WRPO_IMAGE_REGISTRY="registry.example/me", WRPO_IMAGE_VERSION="9.9.9")
    assert other["vllm-cpu"] == "registry.example/me/wrpo-vllm:9.9.9-cpu"


def test_chart_values_name_the_operator_image(names):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert f"{values['image']['repository']}:{values['image']['tag'] or chart_version()}" == names["operator"]


def test_spec_defaults_name_the_gpu_images(names):
    fields = ClusterSpec.model_fields
    assert fields["runtime_image"].default == names["runtime"]
    assert fields["vllm_image"].default == names["vllm"]


@pytest.mark.parametrize("example,suffix", [("tiny-cpu.yaml", "-cpu"), ("paper-llama3-8b.yaml", "")])
def test_examples_name_the_built_images(names, example, suffix):
    cluster = yaml.safe_load((ROOT / "manifests" / "examples" / example).read_text())["spec"]["cluster"]
    assert cluster["runtimeImage"] == names[f"runtime{suffix}"]
    assert cluster["vllmImage"] == names[f"vllm{suffix}"]


def containerfile_stages() -> dict[str, str]:
    text = (IMAGES / "Containerfile").read_text()
    parts = re.split(r"^FROM ", text, flags=re.M)[1:]
    return {re.match(r"\S+ AS (\S+)", p).group(1): p for p in parts}


def test_containerfile_builds_every_target_as_a_non_root_user():
    stages = containerfile_stages()
    for target in TARGETS:
        body = stages[target]
        chain = [body]  # USER is inherited from the stage it is built on
        while "USER " not in chain[-1] and (parent := re.match(r"(\S+) AS", chain[-1]).group(1)) in stages:
            chain.append(stages[parent])
        assert "USER 1000:1000" in chain[-1], target


def test_containerfile_pins_and_base():
    text = (IMAGES / "Containerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms[0] == "${BASE_IMAGE}" and all(f == "${BASE_IMAGE}" or f in containerfile_stages() for f in froms)
    # every pip install of a dependency goes through CI's constraints (or torch's pin from it)
    for line in re.findall(r"pip install [^\n]*", text):
        assert "constraints.txt" in line or "TORCH_VERSION" in line or "--no-deps" in line or "pip>=" in line, line
    # the CA bundle only as a build secret: never copied, never an ENV
    assert "COPY" not in " ".join(line for line in text.splitlines() if "cert" in line.lower())
    assert not re.search(r"^ENV[^\n]*(PIP_CERT|REQUESTS_CA_BUNDLE|SSL_CERT)", text, re.M)
    assert text.count("--mount=type=secret,id=ca") == text.count("PIP_CERT=/run/secrets/ca")
    build = (IMAGES / "build.sh").read_text()
    assert '--secret "id=ca,src=${ca}"' in build and "org.opencontainers.image.revision" in build


def test_versions_come_from_ci_pins():
    """build.sh reads torch's pin from the constraints file and vLLM's from setup-vllm-env.sh (the
    vLLM the tests run), and hands both to the Containerfile."""
    build = (IMAGES / "build.sh").read_text()
    assert "sed -n 's/^torch==//p' \"${ROOT}/requirements/constraints.txt\"" in build
    assert "scripts/setup-vllm-env.sh" in build
    assert '--build-arg "TORCH_VERSION=${TORCH_VERSION}"' in build
    assert '--build-arg "VLLM_VERSION=${VLLM_VERSION}"' in build
    assert any(line.startswith("torch==") for line in (ROOT / "requirements/constraints.txt").read_text().splitlines())
    assert re.search(r'^VLLM_VERSION="\$\{WRPO_VLLM_VERSION:-0\.32\.\d+\}"$',
                     (ROOT / "scripts" / "setup-vllm-env.sh").read_text(), re.M)


def test_requirements_helper_expands_extras():
    sys.path.insert(0, str(IMAGES))
    try:
        from requirements import requirements
    finally:
        sys.path.remove(str(IMAGES))
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    operator = requirements(pyproject, ["operator"])
    assert not any(r.startswith("torch") for r in operator) and any(r.startswith("kopf") for r in operator)
    everything = requirements(pyproject, ["all"])
    opt = pyproject["project"]["optional-dependencies"]
    expected = set(pyproject["project"]["dependencies"]) | set(opt["operator"] + opt["train"] + opt["dev"])
    assert set(everything) == expected
    with pytest.raises(SystemExit, match="no extra 'gpu'"):
        requirements(pyproject, ["gpu"])


def test_workflow_builds_smoke_tests_and_pushes_the_listed_images():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "images.yml").read_text())
    text = (ROOT / ".github" / "workflows" / "images.yml").read_text()
    steps = [s for job in wf["jobs"].values() for s in job["steps"]]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert "bash images/build.sh --all --no-archive" in runs  # builds and smoke-tests all five
    assert "images/build.sh --list" in runs and "podman push" in runs
    # tags come from the chart, never from the workflow
    assert not re.search(r"wrpo-(operator|runtime|vllm):\d", text)
    assert "charts/wrpo-operator/Chart.yaml" in runs or "appVersion" in runs


def test_build_script_rejects_unknown_arguments():
    for bad in (["--bogus"], ["gpu-runtime"]):
        r = subprocess.run(["bash", str(IMAGES / "build.sh"), *bad, "--list"], capture_output=True, text=True)
        assert r.returncode != 0 and ("unknown" in r.stderr), r.stderr


def test_an_archive_is_known_by_its_images_not_its_mtime(tmp_path):
    """The real node imports an archive again only when its images changed (k8s_node.archive_digest):
    the same images saved again (a new file, a new mtime) have the same digest; other images do not."""
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    try:
        import k8s_node
    finally:
        sys.path.remove(str(ROOT / "tests" / "cluster"))
    import os

    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF one")
    first = k8s_node.pause_archive(binary, tmp_path / "a.tar")
    again = k8s_node.pause_archive(binary, tmp_path / "b.tar")
    os.utime(again, (1, 1))
    assert k8s_node.archive_digest(first) == k8s_node.archive_digest(again)
    binary.write_bytes(b"\x7fELF two")
    other = k8s_node.pause_archive(binary, tmp_path / "c.tar")
    assert k8s_node.archive_digest(other) != k8s_node.archive_digest(first)
    assert k8s_node.archive_tags(other) == {k8s_node.PAUSE_IMAGE}


def test_build_leaves_an_unchanged_archive_alone():
    """build.sh compares the images' IDs with those the archive was saved from before saving it again."""
    build = (IMAGES / "build.sh").read_text()
    save = build.index("podman save --quiet --multi-image-archive")
    check = build.index('"$(cat "${archive}.ids")" == "${ids}"')
    assert check < save and "{{.Id}}" in build[:check]
