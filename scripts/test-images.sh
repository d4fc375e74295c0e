#!/usr/bin/env bash
# The image tests, apart from scripts/test.sh (CI) because they take longer than CI's budget allows
# (docs/images.md "Cost"): build the images with images/build.sh (each one smoke-tested inside
# itself), then run tests/cluster/test_node_e2e.py: a real node (kubelet, containerd, runc, kube-proxy,
# CoreDNS on a test-owned bridge) beside the harness's control plane, and the tiny FusionRun with every
# stage pod running there inside the built images, once training through PyTorchJob (training-operator
# v1) and once through TrainJob (Kubeflow Trainer v2 and JobSet, tests/cluster/build-controllers.sh).
# Needs root; installs the Debian packages it needs when they are missing. Extra arguments go to pytest.
#
#   WRPO_PYTHON   a Python that already has the `all` extra's dependencies (e.g. a shared CI venv):
#                 used as it is, with this checkout first on PYTHONPATH, instead of scripts/install.sh's
#                 venv (which installs this checkout into it)
#   WRPO_K8S_BIN  the binaries of tests/cluster/build-binaries.sh, node binaries included, when they
#                 are already built elsewhere (default: build them, or reuse its cache)
#   WRPO_CONTROLLERS_BIN  the same for tests/cluster/build-controllers.sh (Trainer v2, JobSet, Kueue)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export WRPO_CACHE="${WRPO_CACHE:-$HOME/.cache/wrpo}"
t0=$SECONDS

packages=(mmdebstrap podman skopeo runc uidmap containerd containernetworking-plugins iptables)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "test-images.sh: installing ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

if [[ -n "${WRPO_PYTHON:-}" ]]; then
    py="$WRPO_PYTHON"
    export PYTHONPATH="$root:$root/operator${PYTHONPATH:+:$PYTHONPATH}"
else
    py="$(bash scripts/install.sh all --venv | tail -n1)"
fi
if [[ -z "${WRPO_K8S_BIN:-}" ]]; then
    k8s_line="$(bash tests/cluster/build-binaries.sh | tail -n1)"
    export WRPO_K8S_BIN="${k8s_line#WRPO_K8S_BIN=}"
fi
if [[ -z "${WRPO_CONTROLLERS_BIN:-}" ]]; then
    controllers_line="$(bash tests/cluster/build-controllers.sh | tail -n1)"
    export WRPO_CONTROLLERS_BIN="${controllers_line#WRPO_CONTROLLERS_BIN=}"
fi
echo "test-images.sh: environment and Kubernetes binaries ready ($((SECONDS - t0)) s)"

archive_line="$(bash images/build.sh | tail -n1)"
export WRPO_IMAGE_ARCHIVE="${archive_line#WRPO_IMAGE_ARCHIVE=}"
echo "test-images.sh: images built and smoke-tested: $WRPO_IMAGE_ARCHIVE ($((SECONDS - t0)) s)"

export WRPO_NODE_E2E=1 WRPO_REQUIRE_NODE=1 WRPO_REQUIRE_CLUSTER=1 WRPO_REQUIRE_CONTROLLERS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PATH="$(dirname "$py"):$PATH"
set +e
"$py" -m pytest tests/cluster/test_node_e2e.py -s "$@"
rc=$?
set -e
echo "test-images.sh: done in $((SECONDS - t0)) s (pytest exit $rc)"
exit $rc
