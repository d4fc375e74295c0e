#!/usr/bin/env bash
# Install everything the tests need (cached under ${WRPO_CACHE:-~/.cache/wrpo}) and run the whole suite:
# lint, unit, integration (real SeaweedFS and vLLM servers, tiny models) and cluster (a real
# control plane built from Go modules). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export WRPO_CACHE="${WRPO_CACHE:-$HOME/.cache/wrpo}"
t0=$SECONDS

py="$(bash scripts/install.sh all --venv | tail -n1)"
echo "test.sh: main environment $py ($((SECONDS - t0)) s)"

export WRPO_VLLM_PYTHON="$(bash scripts/setup-vllm-env.sh | tail -n1)"
echo "test.sh: vLLM environment $WRPO_VLLM_PYTHON ($((SECONDS - t0)) s)"

# Without the real node's binaries: its tests run in scripts/test-images.sh (docs/images.md "Cost").
k8s_line="$(WRPO_NODE_BINARIES=0 bash tests/cluster/build-binaries.sh | tail -n1)"
export WRPO_K8S_BIN="${k8s_line#WRPO_K8S_BIN=}"
echo "test.sh: Kubernetes binaries $WRPO_K8S_BIN ($((SECONDS - t0)) s)"

# In CI every real component must be there: a missing one fails instead of skipping.
if [[ "${CI:-}" == "true" ]]; then
    export WRPO_REQUIRE_VLLM=1 WRPO_REQUIRE_CLUSTER=1
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PATH="$(dirname "$py"):$PATH"

"$py" -m ruff check .
"$py" -m ruff format --check wrpo operator tests benchmarks >/dev/null 2>&1 || echo "test.sh: note: ruff format would reformat some files"

set +e
"$py" -m pytest tests "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
    echo "test.sh: pytest collected no tests - that is a failure for this project" >&2
    exit 1
fi
echo "test.sh: done in $((SECONDS - t0)) s (pytest exit $rc)"
exit $rc
