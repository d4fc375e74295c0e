#!/usr/bin/env bash
# The README's main job: install (cached), make the tiny models, run the tiny fusion, write the report.
#   bash scripts/demo.sh [extra `wrpo run` options, e.g. --run-uri s3://bucket/tiny]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py="$(bash scripts/install.sh all --venv | tail -n1)"
wrpo="$(dirname "$py")/wrpo"
# Sampling uses vLLM when WRPO_VLLM_PYTHON points at a vLLM environment (scripts/setup-vllm-env.sh builds
# one), else transformers generate.
"$wrpo" tiny-models examples/tiny/models
"$wrpo" run examples/tiny/fusion.yaml "$@"
run_uri="examples/tiny/runs/tiny"
for arg in "$@"; do [[ "${prev:-}" == "--run-uri" ]] && run_uri="$arg"; prev="$arg"; done
"$wrpo" report "$run_uri"
echo "demo: fused model in $run_uri/wrpo/model, report in $run_uri/report (or ./report-* for s3 runs)"
