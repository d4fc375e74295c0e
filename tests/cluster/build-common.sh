# Shared by tests/cluster/build-binaries.sh and build-controllers.sh (sourced, not run): logging, a command
# that names itself when it fails, cached build steps and wrapper modules. The sourcing script sets
# LOG_TAG (its name in log lines), OUT (the cache folder of its outputs) and WORK (its wrapper modules).

log() { printf '[%s %s] %s\n' "${LOG_TAG}" "$(date +%H:%M:%S)" "$*" >&2; }

# run CMD...: run a command, and on failure say exactly which command failed.
run() {
  if ! "$@"; then
    log "FAILED (in $(pwd)): $*"
    exit 1
  fi
}

# step NAME OUTPUT... -- FUNCTION: run FUNCTION unless every OUTPUT already exists in OUT; time it.
step() {
  local name="$1"; shift
  local outputs=()
  while [[ "$1" != "--" ]]; do outputs+=("$1"); shift; done
  shift
  local missing=0 f
  for f in "${outputs[@]}"; do [[ -e "${OUT}/${f}" ]] || missing=1; done
  if [[ "${missing}" == 0 ]]; then
    log "${name}: cached"
    return
  fi
  local start=${SECONDS}
  log "${name}: building"
  "$@"
  log "${name}: built in $((SECONDS - start))s"
}

# wrapper_module NAME GO_MOD_BODY: a wrapper module in WORK/NAME with that go.mod; prints its folder.
wrapper_module() {
  local dir="${WORK}/$1"
  mkdir -p "${dir}"
  printf '%s\n' "$2" >"${dir}/go.mod"
  echo "${dir}"
}
