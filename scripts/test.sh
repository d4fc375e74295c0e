#!/usr/bin/env bash
# Install everything the tests need (cached under ${WRPO_CACHE:-~/.cache/wrpo}) and run the whole suite:
# lint, unit, integration (real SeaweedFS and vLLM servers, tiny models) and cluster (a real
# control plane built from Go modules). Extra arguments go to pytest.
#
# The Kubernetes binaries (tests/cluster/build-binaries.sh, the longest step when its cache is cold) build
# in the background while the environments are made and the tests not marked `cluster` run; the tests
# marked `cluster` (the control plane, kubectl, helm) start when the build is done, as three runs side by
# side, beside the first tier if it still runs (each run's lines carry its name). With extra arguments,
# one pytest run over `tests` follows the build. At the end (also after a failure) it prints each step's
# wall time, and the Go build's, with whether the build was cached.
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
tier_pids=()
keep_k8s_log=0
on_exit() {
    if [[ $build_running == 1 ]]; then
        kill -- -"$k8s_pid" 2>/dev/null || true
    fi
    local pid
    for pid in "${tier_pids[@]}"; do  # a test tier still running (test.sh stopped early): pytest tears down
        pkill -TERM -P "$pid" 2>/dev/null || true
    done
    if [[ ${#timings[@]} -gt 0 ]]; then
        echo "test.sh: timing summary (wall; total $((SECONDS - t0)) s):"
        printf '  %s\n' "${timings[@]}"
    fi
    # the build's log stays only when a failure named it
    [[ $keep_k8s_log == 1 ]] || rm -f "$k8s_log"
    [[ -z ${tiers:-} ]] || rm -rf "$tiers"
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
        keep_k8s_log=1
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
    # The tiers run side by side (README.md, "Testing"): the first from the start, the cluster tests as soon
    # as the Go build is done (at once when it is cached, else after it), as three pytest runs with a control
    # plane each: the ones that run real training or vLLM processes (marker `heavy`, CPU-bound) and the others
    # split by file in two shards (WRPO_TEST_SHARD, tests/conftest.py), which mostly wait on controllers and
    # pods. Each run draws its listening ports from its own quarter of the range outside the ephemeral ports
    # (WRPO_PORT_RANGE, docs/cluster-harness.md "Ports") and prefixes its output lines with its name.
    tiers="$(mktemp -d "${TMPDIR:-/tmp}/wrpo-tiers.XXXXXX")"
    read -r plow phigh < <("$py" -c 'from wrpo.data import serving; print(*(serving._listening_range() or (0, 0)))')
    pspan=$(((phigh - plow + 1) / 4))
    ntier=0
    run_tier() {  # NAME SHARD ARGS...: one prefixed pytest run in the background; its exit and wall time in $tiers
        local name=$1 shard=$2 ports=""
        shift 2
        [[ $plow -gt 0 ]] && ports="$((plow + ntier * pspan))-$((plow + (ntier + 1) * pspan - 1))"
        ntier=$((ntier + 1))
        (
            set +e -o pipefail
            start=$SECONDS
            WRPO_PORT_RANGE=$ports WRPO_TEST_SHARD=$shard PYTHONUNBUFFERED=1 "$py" -m pytest "$@" 2>&1 |
                sed -u "s/^/[$name] /"
            r=$?
            [[ $r -eq 5 ]] && { echo "[$name] test.sh: pytest collected no tests - a failure for this project"; r=1; }
            echo "$r $((SECONDS - start)) pytest $* ${shard:+(shard $shard)}" > "$tiers/$name"
        ) &
        tier_pids+=("$!")
    }
    tiers_t=$SECONDS
    run_tier first "" tests -m "not cluster"
    wait_binaries
    run_tier cluster-heavy "" tests -m "cluster and heavy"
    run_tier cluster-1 0/2 tests -m "cluster and not heavy"
    run_tier cluster-2 1/2 tests -m "cluster and not heavy"
    wait "${tier_pids[@]}" || true
    tier_pids=()
    for tier in first cluster-heavy cluster-1 cluster-2; do
        read -r r secs label < "$tiers/$tier" || { r=1; secs=0; label="$tier (no result)"; }
        [[ $r -eq 0 ]] || rc=$r
        timings+=("$(printf '%-58s %6d s' "[$tier] $label (exit $r; own wall)" "$secs")")
    done
    timings+=("$(printf '%-58s %6d s' "all tiers, side by side (wall)" $((SECONDS - tiers_t)))")
    rm -rf "$tiers"
else
    wait_binaries
    pytest_tier "$@"  # paths in ARGS, else pyproject's testpaths (all of tests/)
fi
echo "test.sh: done in $((SECONDS - t0)) s (pytest exit $rc)"
exit $rc
