#!/usr/bin/env bash
# Install everything the tests need (cached under ${WRPO_CACHE:-~/.cache/wrpo}) and run the whole suite:
# lint, unit, integration (real SeaweedFS and vLLM servers, tiny models) and cluster (a real
# control plane built from Go modules). Extra arguments go to pytest.
#
# The Kubernetes binaries (tests/cluster/build-binaries.sh, the longest step when its cache is cold) build
# in the background while the environments are made and the tests not marked `cluster` run; the tests
# marked `cluster` (the control plane, kubectl, helm) follow the build. With extra arguments, one pytest
# run over `tests` follows the build. At the end (also after a failure) it prints each step's wall time,
# and the Go build's, with whether the build was cached.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export WRPO_CACHE="${WRPO_CACHE:-$HOME/.cache/wrpo}"
# DeepSpeed's CPU ops, compiled by the first multi-rank test (docs/training.md): cached with the rest, so an
# empty WRPO_CACHE is a cold run and a CI cache of it keeps them
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$WRPO_CACHE/torch_extensions}"
t0=$SECONDS

# The timing summary: "name seconds" lines, printed by on_exit.
timings=()
step_t=$SECONDS
timed() {  # NAME: the wall time since the previous timed step
    timings+=("$(printf '%-58s %6d s' "$1" $((SECONDS - step_t)))")
    step_t=$SECONDS
}
build_summary() {  # the background Go build's own wall times (from its log) and whether it was cached
    local state=cached bins ctrls
    grep -q ': building$' "$k8s_log" && state="built (a cold or partly cold cache)"
    bins="$(grep -o 'all binaries ready in [0-9]*s' "$k8s_log" | tail -n1 | grep -o '[0-9]*s$' || echo '?')"
    ctrls="$(grep -o 'all controllers ready in [0-9]*s' "$k8s_log" | tail -n1 | grep -o '[0-9]*s$' || echo '?')"
    timings+=("Go build in the background: binaries ${bins}, controllers ${ctrls}; ${state}")
}

# Without the real node's binaries: its tests run in scripts/test-images.sh (docs/images.md "Cost").
# Then the Kubeflow Trainer v2, JobSet and Kueue controllers (tests/cluster/build-controllers.sh), whose last
# line follows the binaries' line in the same log.
k8s_log="$(mktemp "${TMPDIR:-/tmp}/wrpo-build-binaries.XXXXXX")"
# Its own session, so that an early exit stops the whole build (go and its compilers), not just the script.
setsid bash -c 'set -e; WRPO_NODE_BINARIES=0 bash tests/cluster/build-binaries.sh; bash tests/cluster/build-controllers.sh' \
    >"$k8s_log" 2>&1 &
k8s_pid=$!
build_running=1
on_exit() {
    if [[ $build_running == 1 ]]; then
        kill -- -"$k8s_pid" 2>/dev/null || true
    fi
    if [[ ${#timings[@]} -gt 0 ]]; then
        echo "test.sh: timing summary (wall; total $((SECONDS - t0)) s):"
        printf '  %s\n' "${timings[@]}"
    fi
}
trap on_exit EXIT
wait_binaries() {
    local rc=0
    wait "$k8s_pid" || rc=$?
    build_running=0
    timed "waiting for the Kubernetes binaries + controllers"
    build_summary
    if [[ $rc -ne 0 ]]; then
        tail -n 40 "$k8s_log" >&2
        echo "test.sh: tests/cluster/build-binaries.sh or build-controllers.sh failed ($rc), log $k8s_log" >&2
        exit 1
    fi
    local line
    line="$(grep '^WRPO_K8S_BIN=' "$k8s_log" | tail -n1)"
    export WRPO_K8S_BIN="${line#WRPO_K8S_BIN=}"
    line="$(grep '^WRPO_CONTROLLERS_BIN=' "$k8s_log" | tail -n1)"
    export WRPO_CONTROLLERS_BIN="${line#WRPO_CONTROLLERS_BIN=}"
    grep -h 'built in\|cached\|all binaries' "$k8s_log" >&2 || true
    echo "test.sh: Kubernetes binaries $WRPO_K8S_BIN, controllers $WRPO_CONTROLLERS_BIN ($((SECONDS - t0)) s)"
}

# This checkout's python on the cached dependencies (never another clone's code: scripts/install.sh).
py="$(bash scripts/install.sh all --venv | tail -n1)"
echo "test.sh: main environment $py ($((SECONDS - t0)) s)"
timed "main environment (scripts/install.sh)"

# (assigned, then exported: `export X="$(cmd)"` would hide a failing cmd from `set -e`)
WRPO_VLLM_PYTHON="$(bash scripts/setup-vllm-env.sh | tail -n1)"
export WRPO_VLLM_PYTHON
echo "test.sh: vLLM environment $WRPO_VLLM_PYTHON ($((SECONDS - t0)) s)"
timed "vLLM environment (scripts/setup-vllm-env.sh)"

# The Kubeflow client SDKs' own venvs (tests/cluster/test_sdk_clients.py builds them too; here a failure
# shows early). Without them the SDK tests skip, or fail in CI.
for sdk in kubeflow kubeflow-training; do
    bash scripts/setup-sdk-env.sh "$sdk" >/dev/null || echo "test.sh: note: scripts/setup-sdk-env.sh $sdk failed" >&2
done
echo "test.sh: Kubeflow SDK environments ($((SECONDS - t0)) s)"
timed "Kubeflow SDK environments (scripts/setup-sdk-env.sh)"

# In CI every real component must be there: a missing one fails instead of skipping (tests/binaries.py).
if [[ "${CI:-}" == "true" ]]; then
    export WRPO_REQUIRE_VLLM=1 WRPO_REQUIRE_CLUSTER=1 WRPO_REQUIRE_CONTROLLERS=1
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PATH="$(dirname "$py"):$PATH"

"$py" -m ruff check .
"$py" -m ruff format --check wrpo operator tests benchmarks >/dev/null 2>&1 || echo "test.sh: note: ruff format would reformat some files"
timed "ruff"

rc=0
pytest_tier() {  # ARGS...: one pytest run; exit 5 (nothing collected) is a failure for this project
    local r=0
    "$py" -m pytest "$@" || r=$?
    if [[ $r -eq 5 ]]; then
        echo "test.sh: pytest collected no tests ($*) - that is a failure for this project" >&2
        r=1
    fi
    [[ $r -eq 0 ]] || rc=$r
    timed "pytest $* (exit $r)"
}
if [[ $# -eq 0 ]]; then
    pytest_tier tests -m "not cluster"
    echo "test.sh: the tests without the Kubernetes binaries done ($((SECONDS - t0)) s)"
    wait_binaries
    pytest_tier tests -m cluster
else
    wait_binaries
    pytest_tier tests "$@"
fi
echo "test.sh: done in $((SECONDS - t0)) s (pytest exit $rc)"
exit $rc
