#!/usr/bin/env bash
# The train-step benchmark (benchmarks/train_step.py) on a GPU machine that has torch and transformers but
# no network and no TRL: WRPO against TRL's DPOTrainer (reference log-probs precomputed on both sides, and
# TRL at its defaults), in bf16 on a random model of Qwen2-0.5B's shape, plus one WRPO step with shared-prompt
# packing checked against the padded layout. Prints the benchmark's JSON line; under 10 minutes on one GPU.
# See docs/training.md, "Benchmark".
#
#   benchmarks/gpu_check.sh download [--binary]
#                                      here, with network: the pure-Python wheels the benchmark imports
#                                      (TRL, accelerate, datasets, pydantic, ...) into benchmarks/wheels/;
#                                      --binary adds the compiled ones (pyarrow, pandas, xxhash, ...) for this
#                                      interpreter's Python and platform, for an image that lacks them
#   benchmarks/gpu_check.sh [gpu]      on the GPU machine: installs what is missing from benchmarks/wheels/
#                                      (pip --no-index, into a throw-away venv over the system packages), runs
#   benchmarks/gpu_check.sh cpu        the same on a CPU with a tiny model (what the test suite runs)
#
# PYTHON picks the interpreter (default python3); WRPO_BENCH_WHEELS the wheel folder.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
mode=${1:-gpu}
py=${PYTHON:-python3}
wheels=${WRPO_BENCH_WHEELS:-$here/wheels}

# the modules the benchmark's processes import, beyond torch and transformers
probe='from trl import DPOConfig, DPOTrainer; import datasets, accelerate; import wrpo.engine.wrpo_trainer, wrpo.engine.ref_logps, wrpo.models.tiny'

case "$mode" in
  download)
    mkdir -p "$wheels"
    # every pure-Python distribution those imports load (the GPU machine may lack any of them); binary ones
    # (pyarrow, pydantic-core, xxhash, ...) must be in its image: the install step below names them if not
    PYTHONPATH="$root" "$py" - "$probe" "${2:-}" > "$wheels/requirements.txt" <<'PY'
import sys
from importlib import metadata
exec(sys.argv[1])
names = metadata.packages_distributions()
dists = {d for m in list(sys.modules) for d in names.get(m.split(".")[0], [])}
for d in sorted(dists - {"wrpo", "torch", "transformers", "triton"}):
    pure = "Root-Is-Purelib: true" in (metadata.distribution(d).read_text("WHEEL") or "")
    if pure or (sys.argv[2] == "--binary" and not d.startswith(("nvidia", "cuda"))):
        print(f"{d}=={metadata.version(d)}")
PY
    "$py" -m pip download --no-deps --only-binary=:all: -d "$wheels" -r "$wheels/requirements.txt"
    echo "wrote $(ls "$wheels"/*.whl | wc -l) wheels to $wheels" >&2
    exit 0 ;;
  gpu) args=(--size 0.5b --device cuda --bf16 --steps 5 --batch 4 --prompt 128 --response 256 --quick) ;;
  cpu) args=(--size tiny --device cpu --steps 2 --batch 1 --prompt 24 --response 16 --quick --threads 2) ;;
  *) echo "usage: $0 [gpu|cpu|download]" >&2; exit 2 ;;
esac

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
if ! "$py" -c "$probe" 2>/dev/null; then
  # install the carried wheels this interpreter lacks, never from the network, into a folder of their own
  # put on the path (the interpreter's own packages stay as they are)
  [ -d "$wheels" ] || { echo "$wheels is missing: run '$0 download' where there is network" >&2; exit 1; }
  target=$(mktemp -d)/site-packages  # dill (datasets' hashing) pickles modules found elsewhere by value
  # a wheel goes in when its distribution is missing, or installed at another version and not one that torch
  # or transformers require (the image's own set stays): the folder's versions were resolved together
  missing=$("$py" - "$wheels" <<'PY'
import re
import sys
from importlib import metadata
from pathlib import Path

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

kept = {norm(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]) for top in ("torch", "transformers")
        for req in metadata.requires(top) or [] if "extra ==" not in req}
for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        print(whl)
        continue
    if have != version and norm(name) not in kept:
        print(whl)
PY
)
  # shellcheck disable=SC2086
  [ -z "$missing" ] || "$py" -m pip install --quiet --no-index --no-deps --target "$target" $missing
  export PYTHONPATH="$PYTHONPATH:$target"
  "$py" -c "$probe" || { echo "the benchmark's imports fail even with $wheels: a compiled dependency the image lacks? (download --binary)" >&2; exit 1; }
fi
if [ "$mode" = gpu ]; then
  "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device")'
fi
cd "$root"
exec timeout 570 "$py" benchmarks/train_step.py "${args[@]}"
