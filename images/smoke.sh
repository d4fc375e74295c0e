#!/usr/bin/env bash
# Smoke-test one built image inside the image itself, with no network (images/build.sh runs it after
# each build; the publish workflow too):
#
#   images/smoke.sh TARGET IMAGE [RUNTIME_CPU_IMAGE]
#
#   operator      the operator starts and answers its liveness endpoint (/healthz)
#   runtime, runtime-cpu
#                 `wrpo --help`; torch, transformers and DeepSpeed import; tiny models are written and
#                 one SFT optimizer step runs (on the CPU) and saves the model
#   vllm-cpu      `vllm serve` serves a tiny model (written by RUNTIME_CPU_IMAGE) and answers one chat
#                 request
#   vllm          the GPU build: `vllm --version` and `vllm serve --help=all` list the builders' flags
#                 (no GPU needed)
# and in every image with torch, images/jit_check.py: Triton's C-extension build and torch.compile on
# the CPU work; in the GPU images (runtime, vllm) it must also fail with no compiler on PATH, so the
# check is known to catch a missing compiler.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "${HERE}")"
target="${1:?usage: smoke.sh TARGET IMAGE [RUNTIME_CPU_IMAGE]}"
image="${2:?usage: smoke.sh TARGET IMAGE [RUNTIME_CPU_IMAGE]}"
runtime_image="${3:-}"
# shellcheck source=images/podman.sh
source "${HERE}/podman.sh"

log() { printf '[smoke %s %s] %s\n' "$(date +%H:%M:%S)" "${target}" "$*" >&2; }
scratch="$(mktemp -d "${TMPDIR:-/tmp}/wrpo-smoke.XXXXXX")"
trap 'rm -rf "${scratch}"' EXIT
chmod 0777 "${scratch}"  # the images run as uid 1000
run=(podman run --rm --pull=never --network=none)

# jit_check EXPECT: images/jit_check.py in the image; EXPECT "ok", or "fail" with no compiler on PATH
# (only the venv's bin; the images set no CC or CXX).
jit_check() {
  local env=() rc=0 out
  [[ "$1" == fail ]] && env=(-e PATH=/opt/wrpo/bin)
  out="$("${run[@]}" "${env[@]}" -v "${HERE}/jit_check.py:/opt/wrpo-check/jit_check.py:ro" \
    --entrypoint python "${image}" /opt/wrpo-check/jit_check.py 2>&1)" || rc=$?
  printf '%s\n' "${out}"
  if [[ "$1" == ok && "${rc}" != 0 ]]; then
    log "run-time compilation fails in this image"; exit 1
  elif [[ "$1" == fail ]] && ! { [[ "${rc}" != 0 ]] && grep -q "Failed to find C compiler" <<<"${out}" \
      && grep -q "C++ compiler" <<<"${out}"; }; then
    log "jit_check.py did not fail for want of a compiler with none on PATH: it cannot catch one missing"
    exit 1
  fi
  log "jit check: ${1}"
}

case "${target}" in
  operator)
    # No cluster: a kubeconfig naming an address where nothing listens. kopf logs in (it only reads
    # the credentials), its watchers retry, and the liveness endpoint answers all the same.
    cat >"${scratch}/kubeconfig" <<'EOF'
apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: smoke}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
EOF
    chmod 0644 "${scratch}/kubeconfig"
    "${run[@]}" -v "${scratch}/kubeconfig:/etc/wrpo/kubeconfig:ro" -e KUBECONFIG=/etc/wrpo/kubeconfig \
      --entrypoint python "${image}" -c '
import subprocess, sys, time, urllib.request
op = subprocess.Popen([sys.executable, "-m", "wrpo_operator", "--standalone", "--all-namespaces",
                       "--liveness=http://127.0.0.1:8080/healthz"])
try:
    for _ in range(120):
        if op.poll() is not None:
            sys.exit(f"the operator exited with {op.returncode}")
        try:
            with urllib.request.urlopen("http://127.0.0.1:8080/healthz", timeout=2) as r:
                print("healthz", r.status, r.read().decode()[:200])
                sys.exit(0 if r.status == 200 else 1)
        except OSError:
            time.sleep(1)
    sys.exit("no answer from /healthz in 120 s")
finally:
    op.terminate()
'
    ;;
  runtime|runtime-cpu)
    "${run[@]}" -v "${ROOT}/examples/tiny:/data:ro" "${image}" sh -ec '
wrpo --help >/dev/null
python -c "import torch, transformers, deepspeed, wrpo.cli; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"transformers\", transformers.__version__, \"deepspeed\", deepspeed.__version__)"
wrpo tiny-models /tmp/models --pretrain-steps 0 >/dev/null
wrpo sft --model /tmp/models/target --data /data/sft.jsonl --output-dir /tmp/sft --max-steps 1 \
  --batch-size 2 --per-device-batch-size 2 --max-length 128 --max-prompt-length 64 \
  --no-gradient-checkpointing --precision fp32
test -s /tmp/sft/model/model.safetensors && echo "one SFT step: model saved"
'
    jit_check ok
    if [[ "${target}" == runtime ]]; then jit_check fail; fi
    ;;
  vllm-cpu)
    [[ -n "${runtime_image}" ]] || { log "needs the runtime-cpu image (third argument) for its tiny models"; exit 2; }
    "${run[@]}" -v "${scratch}:/out" "${runtime_image}" wrpo tiny-models /out/models --pretrain-steps 0 >/dev/null
    "${run[@]}" --shm-size=1g -e VLLM_CPU_KVCACHE_SPACE=1 -e HF_HUB_OFFLINE=1 \
      -v "${scratch}/models:/models:ro" --entrypoint python "${image}" -c '
import json, subprocess, sys, time, urllib.request
argv = ["vllm", "serve", "/models/source-llama", "--served-model-name", "tiny", "--host", "127.0.0.1",
        "--port", "8000", "--dtype", "float32", "--enforce-eager", "--no-enable-chunked-prefill",
        "--max-model-len", "512", "--seed", "0"]
server = subprocess.Popen(argv, stdout=open("/tmp/vllm.log", "w"), stderr=subprocess.STDOUT)
def get(path, body=None):
    req = urllib.request.Request("http://127.0.0.1:8000" + path, data=body and json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, r.read().decode()
try:
    for _ in range(300):
        if server.poll() is not None:
            sys.exit("vllm serve exited:\n" + open("/tmp/vllm.log").read()[-3000:])
        try:
            if get("/health")[0] == 200:
                break
        except OSError:
            time.sleep(1)
    else:
        sys.exit("vllm serve not healthy in 300 s:\n" + open("/tmp/vllm.log").read()[-3000:])
    status, text = get("/v1/chat/completions", {"model": "tiny", "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    answer = json.loads(text)
    print("chat answer:", json.dumps(answer["choices"][0]["message"])[:200], answer["usage"])
    sys.exit(0 if status == 200 and answer["usage"]["completion_tokens"] > 0 else 1)
finally:
    server.terminate()
'
    jit_check ok
    ;;
  vllm)
    # The CUDA build on a machine without a GPU: vLLM cannot infer a device while it builds its argument
    # parser, so the CPU platform is named for these two commands (they only print).
    "${run[@]}" -e VLLM_TARGET_DEVICE=cpu "${image}" --version
    "${run[@]}" -e VLLM_TARGET_DEVICE=cpu "${image}" serve --help=all >"${scratch}/help.txt"
    for flag in --served-model-name --tensor-parallel-size --gpu-memory-utilization --max-model-len --runner; do
      grep -q -- "${flag}" "${scratch}/help.txt" || { log "vllm serve has no ${flag}"; exit 1; }
    done
    jit_check ok
    jit_check fail
    ;;
  *) log "unknown target"; exit 2 ;;
esac
log "ok"
