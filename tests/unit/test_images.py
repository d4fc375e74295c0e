"""The images of images/build.sh and every place that names them agree: the chart (image.repository and
appVersion), the spec defaults (cluster.runtimeImage, cluster.vllmImage), the example manifests, the
publish workflow and the kind script; the Containerfile builds every target as a non-root user, with
CI's pins, from the local Debian base and with the CA only as a build secret."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import binaries
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
    # every pip install is of a hash-checked lock, exactly its set (--no-deps), or of the package itself
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    installs = re.findall(r"pip install [^\n]*", code.replace("\\\n", " "))  # continued lines joined
    assert installs
    for line in installs:
        locked = re.search(r"--require-hashes --no-deps .*-r /opt/wrpo/build/locks/(\S+)\.txt", line)
        assert locked or "--no-deps --no-build-isolation /opt/wrpo/src" in line, line
        if locked:
            assert (IMAGES / "locks" / f"{locked.group(1)}.txt").is_file(), line
    # the vLLM images install their lock through scripts/setup-vllm-env.sh
    for dist in ("vllm-cpu", "vllm"):
        assert f"WRPO_VLLM_LOCK=/opt/wrpo/build/{dist}.txt" in text and f"images/locks/{dist}.txt" in text
    # the CA bundle only as a build secret: never copied, never an ENV
    assert "COPY" not in " ".join(line for line in text.splitlines() if "cert" in line.lower())
    assert not re.search(r"^ENV[^\n]*(PIP_CERT|REQUESTS_CA_BUNDLE|SSL_CERT)", text, re.M)
    assert text.count("--mount=type=secret,id=ca") == text.count("PIP_CERT=/run/secrets/ca")
    build = (IMAGES / "build.sh").read_text()
    assert '--secret "id=ca,src=${ca}"' in build and "org.opencontainers.image.revision" in build


def test_images_with_torch_carry_a_compiler_and_python_headers():
    """Triton and TorchInductor compile at run time (images/jit_check.py, docs/images.md): the torch
    layer, which every image with torch is built on, installs gcc, g++ and Python's headers; the
    operator image (no torch) does not."""
    stages = containerfile_stages()
    assert re.search(r"apt-get install[^\n]*\n[^\n]*gcc g\+\+ libc6-dev libpython3\.11-dev", stages["torch"])
    for target in ("runtime", "runtime-cpu", "vllm-cpu", "vllm"):
        chain, stage = [], target
        while stage in stages:
            chain.append(stage)
            stage = re.match(r"(\S+) AS", stages[stage]).group(1)
        assert "torch" in chain, (target, chain)
    assert "apt-get" not in stages["operator"] + stages["base"]
    smoke = (IMAGES / "smoke.sh").read_text()
    assert smoke.count("jit_check ok") == 3 and smoke.count("jit_check fail") == 2  # runtime(-cpu), vllm-cpu, vllm


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


LOCKS = IMAGES / "locks"
LAYERS = ("base", "operator", "torch", "runtime", "vllm-cpu", "vllm")


def lock_pins(layer: str) -> dict[str, str]:
    """name -> version of a lock, checking that every package carries sha256 hashes."""
    pins: dict[str, str] = {}
    blocks = re.split(r"\n(?=[a-z0-9])", (LOCKS / f"{layer}.txt").read_text(), flags=re.I)
    for block in blocks:
        if block.startswith("#") or not block.strip():
            continue
        m = re.match(r"([A-Za-z0-9._-]+)==(\S+) \\\n", block)
        assert m, (layer, block[:200])
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", block), (layer, m.group(1))
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def constraint_pins() -> dict[str, str]:
    lines = (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    return {n.lower().replace("_", "-"): v for n, v in (ln.split("==") for ln in lines if "==" in ln)}


def test_every_python_package_of_every_image_is_locked_with_hashes():
    counts = {layer: len(lock_pins(layer)) for layer in LAYERS}
    assert counts["runtime"] > 80 and counts["vllm-cpu"] > 100 and counts["operator"] > 30, counts
    # the base lock holds what the venv is upgraded with; the others leave it out (exactly one place)
    assert set(lock_pins("base")) >= {"pip", "setuptools", "wheel"}
    for layer in ("operator", "torch", "runtime"):
        assert not {"pip", "setuptools", "wheel"} & set(lock_pins(layer)), layer


def test_locks_are_resolved_from_the_current_pins():
    """images/lock.sh's inputs (<layer>.in) are what pyproject.toml, the constraints and
    setup-vllm-env.sh say now, and the locks agree with the constraints and with each other: a stale
    lock fails here, and `bash images/lock.sh` writes it again."""
    sys.path.insert(0, str(IMAGES))
    try:
        from requirements import requirements
    finally:
        sys.path.remove(str(IMAGES))
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = constraint_pins()
    torch = f"torch=={pins['torch']}"
    setup = (ROOT / "scripts" / "setup-vllm-env.sh").read_text()
    vllm = re.search(r'^VLLM_VERSION="\$\{WRPO_VLLM_VERSION:-([^}]+)\}"$', setup, re.M).group(1)
    transformers = re.search(r'^TRANSFORMERS_REQ="\$\{WRPO_TRANSFORMERS:-([^}]+)\}"$', setup, re.M).group(1)

    def inputs(layer):
        return (LOCKS / f"{layer}.in").read_text().splitlines()

    assert inputs("operator") == requirements(pyproject, ["operator"])
    assert inputs("torch") == [torch]
    assert inputs("runtime") == [*requirements(pyproject, ["train"]), torch]
    for dist in ("vllm-cpu", "vllm"):
        assert inputs(dist) == [f"{dist}=={vllm}", transformers]
        assert lock_pins(dist)[dist] == vllm
    # CI's pins hold in the layers resolved with them; the torch layer is the same in every image on it
    for layer in ("operator", "torch", "runtime"):
        locked = lock_pins(layer)
        assert {n: v for n, v in pins.items() if n in locked} == {n: locked[n] for n in pins if n in locked}, layer
    torch_layer = lock_pins("torch")
    for layer in ("runtime", "vllm-cpu", "vllm"):
        locked = lock_pins(layer)
        assert {n: locked.get(n) for n in torch_layer} == torch_layer, layer


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


def workflow() -> dict:
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "images.yml").read_text())
    wf["on"] = wf.pop(True)  # YAML 1.1 reads the key `on` as true
    return wf


def test_workflow_builds_every_image_on_pull_requests_for_every_input():
    wf = workflow()
    assert wf["on"]["push"]["branches"] == ["main"] and wf["on"]["push"]["tags"] == ["v*"]
    for event in ("push", "pull_request"):
        paths = wf["on"][event]["paths"]
        for needed in ("images/**", "wrpo/**", "operator/**", "pyproject.toml", "requirements/**",
                       "scripts/setup-vllm-env.sh", ".github/workflows/images.yml"):
            assert needed in paths, (event, needed)
    build = wf["jobs"]["build"]
    groups = build["strategy"]["matrix"]["include"]
    targets = [t for g in groups for t in g["targets"].split()]
    assert sorted(targets) == sorted(TARGETS)  # every image, once
    assert groups == [g for g in groups if "vllm-cpu" not in g["targets"].split() or "runtime-cpu" in g["targets"]]
    runs = "\n".join(s.get("run", "") for s in build["steps"])
    assert "bash images/build.sh --no-archive ${{ matrix.targets }}" in runs and "--no-smoke" not in runs
    # a pull request's run is replaced by its next push; a publishing run is never cancelled half-way
    assert wf["concurrency"]["cancel-in-progress"] == "${{ github.event_name == 'pull_request' }}"


def test_workflow_publishes_only_after_every_build_and_never_overwrites_a_release():
    wf = workflow()
    jobs = wf["jobs"]
    publish = jobs["publish"]
    assert "build" in publish["needs"] and publish["if"].startswith("success() &&")
    assert "publish == 'true'" in publish["if"]
    runs = "\n".join(s.get("run", "") for s in publish["steps"])
    assert "bash images/publish.sh promote" in runs
    # nothing is pushed under a final name before the publish job: the build jobs only stage
    for name, job in jobs.items():
        text = "\n".join(s.get("run", "") for s in job["steps"])
        if name != "publish":
            assert "publish.sh promote" not in text and "podman push" not in text, name
    assert "bash images/publish.sh stage ${{ matrix.targets }}" in "\n".join(
        s.get("run", "") for s in jobs["build"]["steps"])
    # the version: the commit SHA on main, the tag's version on v* (images/publish.sh version)
    assert "bash images/publish.sh version" in "\n".join(s.get("run", "") for s in jobs["meta"]["steps"])
    text = (ROOT / ".github" / "workflows" / "images.yml").read_text()
    assert not re.search(r"wrpo-(operator|runtime|vllm):\d", text)  # tags come from the chart or the SHA


def test_workflow_attaches_an_sbom_of_every_image_to_the_release():
    wf = workflow()
    build = wf["jobs"]["build"]
    runs = "\n".join(s.get("run", "") for s in build["steps"])
    assert re.fullmatch(r"v\d+\.\d+\.\d+", wf["env"]["SYFT_VERSION"])
    assert 'go install "github.com/anchore/syft/cmd/syft@${SYFT_VERSION}"' in runs
    assert "spdx-json=" in runs and "bash images/build.sh --list" in runs
    uploads = [s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert uploads and uploads[0]["with"]["path"] == "sbom/*.spdx.json"
    release = [s for s in wf["jobs"]["publish"]["steps"] if "gh release" in s.get("run", "")]
    assert release and release[0]["if"] == "github.ref_type == 'tag'" and "sbom/*.spdx.json" in release[0]["run"]


def _publish(tmp_path, *args, **env):
    return subprocess.run(["bash", str(IMAGES / "publish.sh"), *args], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **env})


def test_publish_version_is_the_sha_on_a_branch_and_the_app_version_on_its_tag(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert _publish(tmp_path, "version", GITHUB_REF_TYPE="branch", GITHUB_SHA=sha).stdout.strip() == sha
    version = chart_version()
    tagged = _publish(tmp_path, "version", GITHUB_REF_TYPE="tag", GITHUB_REF_NAME=f"v{version}")
    assert tagged.returncode == 0 and tagged.stdout.strip() == version
    other = _publish(tmp_path, "version", GITHUB_REF_TYPE="tag", GITHUB_REF_NAME="v99.0.0")
    assert other.returncode != 0 and "not the chart's appVersion" in other.stderr


def _k8s_node():
    """tests/cluster/k8s_node.py (the real node's helpers: pause archives, archive digests)."""
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    try:
        import k8s_node
    finally:
        sys.path.remove(str(ROOT / "tests" / "cluster"))
    return k8s_node


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed (apt-get install skopeo)")
def test_publish_promotes_all_staged_images_or_none_and_never_overwrites_a_release(tmp_path):
    """images/publish.sh promote with skopeo on OCI layouts instead of registries (no network)."""
    k8s_node = _k8s_node()
    binary = tmp_path / "pause"
    binary.write_bytes(b"an image")
    archive = k8s_node.pause_archive(binary, tmp_path / "image.tar")
    (tmp_path / "reg").mkdir()
    version = chart_version()
    env = {"WRPO_TRANSPORT": "oci:", "WRPO_STAGING": str(tmp_path / "staging"),
           "WRPO_IMAGE_REGISTRY": str(tmp_path / "reg"), "WRPO_IMAGE_VERSION": version}

    def stage(target):
        subprocess.run(["skopeo", "copy", "-q", f"docker-archive:{archive}",
                        f"oci:{tmp_path / 'staging'}:{version}-{target}"], check=True)

    for target in TARGETS[:-1]:
        stage(target)
    missing = _publish(tmp_path, "promote", **env)  # vllm did not build: nothing is published
    assert missing.returncode != 0 and "vllm: " in missing.stderr and "is not staged" in missing.stderr
    assert not list((tmp_path / "reg").iterdir())
    stage(TARGETS[-1])
    done = _publish(tmp_path, "promote", **env)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == ["wrpo-operator", "wrpo-runtime", "wrpo-vllm"]
    again = _publish(tmp_path, "promote", **env)
    assert again.returncode != 0 and "a release tag is never overwritten" in again.stderr


def test_build_script_rejects_unknown_arguments():
    for bad in (["--bogus"], ["gpu-runtime"]):
        r = subprocess.run(["bash", str(IMAGES / "build.sh"), *bad, "--list"], capture_output=True, text=True)
        assert r.returncode != 0 and ("unknown" in r.stderr), r.stderr


def test_an_archive_is_known_by_its_images_not_its_mtime(tmp_path):
    """The real node imports an archive again only when its images changed (k8s_node.archive_digest):
    the same images saved again (a new file, a new mtime) have the same digest; other images do not."""
    k8s_node = _k8s_node()
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


@pytest.mark.slow
def test_jit_check_passes_with_a_compiler_and_fails_without(tmp_path):
    """images/jit_check.py, the smoke tests' check that kernels can compile at run time, here with this
    environment's torch and Triton (the images' versions): it passes with gcc/g++ and Python's headers,
    and fails naming both compiling paths when no compiler is on PATH (the smoke tests run both ways in
    the GPU images)."""
    pytest.importorskip("triton")
    for compiler in ("gcc", "g++"):
        binaries.require_binary(compiler, hint="the C/C++ compilers Triton and inductor build kernels with")
    check = [sys.executable, str(IMAGES / "jit_check.py")]
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX")}
    ok = subprocess.run(check, capture_output=True, text=True, env=env, timeout=600)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "triton_extension: ok" in ok.stdout and "inductor_cpu: ok" in ok.stdout
    bare = subprocess.run(check, capture_output=True, text=True, timeout=600,
                          env={**env, "PATH": str(Path(sys.executable).parent)})
    assert bare.returncode == 1, bare.stdout + bare.stderr
    assert "triton_extension: FAILED" in bare.stderr and "Failed to find C compiler" in bare.stderr
    assert "inductor_cpu: FAILED" in bare.stderr


IMAGE_LAYERS = {"operator": ("base", "operator"), "runtime": ("base", "torch", "runtime"),
                "runtime-cpu": ("base", "torch", "runtime"), "vllm-cpu": ("base", "torch", "vllm-cpu"),
                "vllm": ("base", "torch", "vllm")}


@pytest.mark.parametrize("target", TARGETS)
def test_the_recorded_package_set_is_what_the_locks_install(target):
    """images/locks/<target>.packages (what build.sh found in the built image, and compares every build
    with) holds exactly the Python packages of the image's hash-checked locks, later layers winning,
    plus the package itself (and vllm-cpu's `vllm` name entry, Containerfile), and Debian packages."""
    recorded = LOCKS / f"{target}.packages"
    if not recorded.exists():
        pytest.skip(f"{recorded.name} not written yet (WRPO_UPDATE_LOCKS=1 bash images/build.sh {target})")
    lines = [line.split() for line in recorded.read_text().splitlines()]
    assert all(len(parts) == 3 and parts[0] in ("deb", "pip") for parts in lines), recorded
    pip = {re.sub(r"[-_.]+", "-", name.lower()): version for kind, name, version in lines if kind == "pip"}
    expected: dict[str, str] = {}
    for layer in IMAGE_LAYERS[target]:
        expected.update({re.sub(r"[-_.]+", "-", n): v for n, v in lock_pins(layer).items()})
    expected["wrpo"] = pip.get("wrpo", "missing") if target in ("operator", "runtime", "runtime-cpu") else None
    if target == "vllm-cpu":
        expected["vllm"] = pip.get("vllm", "missing")
    expected = {n: v for n, v in expected.items() if v is not None}
    assert pip == expected, {n: (pip.get(n), expected.get(n)) for n in pip.keys() ^ expected.keys()
                             or {n for n in pip if pip[n] != expected[n]}}
    debs = {name.split(":")[0] for kind, name, _ in lines if kind == "deb"}
    assert {"python3.11", "ca-certificates"} <= debs
    assert ({"gcc", "g++", "libpython3.11-dev"} <= debs) == (target != "operator"), target
