#!/usr/bin/env bash
# Build the wrpo container images without Docker and without pulling any base image: a Debian root
# filesystem made from packages (mmdebstrap), images built with podman (runc) from images/Containerfile,
# smoke-tested inside each image with no network, and saved as one multi-image docker-archive for
# `kind load image-archive` / `ctr images import` (OCI archives on request). See docs/images.md.
#
#   images/build.sh                  build the default set, smoke-test it, write the archive
#   images/build.sh --list           print "<target> <image>" for every image, build nothing
#   images/build.sh --all            also the GPU vLLM image (vllm from PyPI on the same torch layer)
#   images/build.sh --oci            also one OCI archive per image
#   images/build.sh --no-smoke       skip the smoke tests
#   images/build.sh --no-archive     write no archive (the images stay in podman's storage)
#   images/build.sh TARGET...        only these targets (operator runtime runtime-cpu vllm-cpu vllm)
#
# The last line printed is `WRPO_IMAGE_ARCHIVE=<path>`. Settings (environment):
#   WRPO_IMAGE_REGISTRY  registry/owner of the image names (ghcr.io/wrpo)
#   WRPO_IMAGE_VERSION   image version (the chart's appVersion)
#   WRPO_IMAGE_CACHE     podman storage, base root fs and archives (${WRPO_CACHE:-~/.cache/wrpo}/images)
#   WRPO_BUILD_CA        CA bundle handed to pip as a build secret, never stored in an image
#                        (default: the host's bundle, when there is one)
#   WRPO_DEBIAN_SUITE, WRPO_DEBIAN_MIRROR   the Debian release and mirror of the base (bookworm)
#   WRPO_IMAGE_REVISION  the OCI revision label (default: git HEAD of this checkout)
#   WRPO_NO_CACHE=1      build every layer again (podman's --no-cache): with the package-set check, a
#                        second build of the same commit that installed anything else fails
#   WRPO_UPDATE_LOCKS=1  write images/locks/<target>.packages instead of comparing with them
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="${ROOT}/images"
REGISTRY="${WRPO_IMAGE_REGISTRY:-ghcr.io/wrpo}"
APP_VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "${ROOT}/charts/wrpo-operator/Chart.yaml")"
VERSION="${WRPO_IMAGE_VERSION:-${APP_VERSION}}"
SUITE="${WRPO_DEBIAN_SUITE:-bookworm}"
MIRROR="${WRPO_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SOURCE_URL="https://github.com/wrpo/wrpo"
# Versions pinned where CI pins them: torch in requirements/constraints.txt, vLLM in
# scripts/setup-vllm-env.sh (the vLLM the tests run).
TORCH_VERSION="$(sed -n 's/^torch==//p' "${ROOT}/requirements/constraints.txt")"
VLLM_VERSION="$(sed -n 's/^VLLM_VERSION="${WRPO_VLLM_VERSION:-\([^}]*\)}"$/\1/p' "${ROOT}/scripts/setup-vllm-env.sh")"
# Debian packages of the base: Python 3.11 (bookworm's python3), venv, CA certificates, and the two
# libraries vLLM's CPU backend loads (NUMA, tcmalloc); small, so every image shares one base layer.
BASE_PACKAGES="python3,python3-venv,ca-certificates,libnuma1,libtcmalloc-minimal4"

# target -> image name. The chart (image.repository + appVersion), the spec defaults
# (cluster.runtimeImage, cluster.vllmImage), manifests/examples/tiny-cpu.yaml and
# .github/workflows/images.yml name exactly these (tests/unit/test_images.py checks it).
declare -A IMAGE=(
  [operator]="${REGISTRY}/wrpo-operator:${VERSION}"
  [runtime]="${REGISTRY}/wrpo-runtime:${VERSION}"
  [runtime-cpu]="${REGISTRY}/wrpo-runtime:${VERSION}-cpu"
  [vllm]="${REGISTRY}/wrpo-vllm:${VERSION}"
  [vllm-cpu]="${REGISTRY}/wrpo-vllm:${VERSION}-cpu"
)
ORDER=(operator runtime runtime-cpu vllm-cpu vllm)
DEFAULT_TARGETS=(operator runtime runtime-cpu vllm-cpu)

log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

targets=() oci=0 smoke=1 list=0 archive_out=1
for arg in "$@"; do
  case "${arg}" in
    --list) list=1 ;;
    --all) targets=("${ORDER[@]}") ;;
    --oci) oci=1 ;;
    --no-smoke) smoke=0 ;;
    --no-archive) archive_out=0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option ${arg} (see --help)" ;;
    *) [[ -n "${IMAGE[${arg}]:-}" ]] || die "unknown target '${arg}' (one of: ${ORDER[*]})"
       targets+=("${arg}") ;;
  esac
done
[[ -n "${VERSION}" ]] || die "no appVersion in charts/wrpo-operator/Chart.yaml"
[[ -n "${TORCH_VERSION}" ]] || die "no torch== pin in requirements/constraints.txt"
[[ -n "${VLLM_VERSION}" ]] || die "no default VLLM_VERSION in scripts/setup-vllm-env.sh"
if [[ "${list}" == 1 ]]; then
  for t in "${ORDER[@]}"; do echo "${t} ${IMAGE[${t}]}"; done
  exit 0
fi
((${#targets[@]})) || targets=("${DEFAULT_TARGETS[@]}")

# The Debian packages the build needs, installed when missing (as scripts/test-images.sh does) if this
# runs as root on Debian/Ubuntu; otherwise the command to run is named.
TOOL_PACKAGES=(mmdebstrap podman skopeo runc uidmap debian-archive-keyring)
missing=()
for p in "${TOOL_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "${p}" 2>/dev/null | grep -q "install ok installed" || missing+=("${p}")
done
if ((${#missing[@]})); then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    log "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
  for tool in mmdebstrap podman skopeo runc; do
    command -v "${tool}" >/dev/null || die "'${tool}' is required: run as root (it is then installed) or \
apt-get install --no-install-recommends ${TOOL_PACKAGES[*]}"
  done
fi

# shellcheck source=images/podman.sh
source "${HERE}/podman.sh"

total_start=${SECONDS}
REVISION="${WRPO_IMAGE_REVISION:-$(git -C "${ROOT}" rev-parse HEAD 2>/dev/null || echo unknown)}"

# -- the base root filesystem, from Debian's packages -------------------------------------------------
base_key="$(printf '%s\n' "${SUITE}" "${MIRROR}" "${BASE_PACKAGES}" v1 | sha256sum | cut -c1-12)"
BASE_IMAGE="localhost/wrpo-base:${base_key}"
if ! podman image exists "${BASE_IMAGE}"; then
  base_tar="${IMAGE_CACHE}/base-${base_key}.tar"
  if [[ ! -s "${base_tar}" ]]; then
    start=${SECONDS}
    log "base: mmdebstrap ${SUITE} (${BASE_PACKAGES})"
    # The host's resolv.conf and hostname are copied in by mmdebstrap: removed, the runtime sets them.
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin mmdebstrap --mode=root --variant=apt --format=tar --quiet \
      --include="${BASE_PACKAGES}" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --customize-hook='rm -f "$1/etc/resolv.conf" "$1/etc/hostname"' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
      "${SUITE}" "${base_tar}.tmp" "${MIRROR}"
    mv "${base_tar}.tmp" "${base_tar}"
    log "base: root fs in $((SECONDS - start))s ($(du -h "${base_tar}" | cut -f1))"
  fi
  podman import --quiet --change 'CMD ["/bin/bash"]' "${base_tar}" "${BASE_IMAGE}" >/dev/null
fi

# -- the images -------------------------------------------------------------------------------------
ca="${WRPO_BUILD_CA:-}"
if [[ -z "${ca}" ]]; then
  for f in "${PIP_CERT:-}" "${REQUESTS_CA_BUNDLE:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
    [[ -n "${f}" && -s "${f}" ]] && { ca="${f}"; break; }
  done
fi
build_args=(--pull=never --layers --format docker --ignorefile "${HERE}/containerignore"
  --build-arg "BASE_IMAGE=${BASE_IMAGE}" --build-arg "TORCH_VERSION=${TORCH_VERSION}"
  --build-arg "VLLM_VERSION=${VLLM_VERSION}"
  --label "org.opencontainers.image.source=${SOURCE_URL}"
  --label "org.opencontainers.image.version=${VERSION}"
  --label "org.opencontainers.image.revision=${REVISION}"
  --label "org.opencontainers.image.licenses=Apache-2.0")
[[ "${WRPO_NO_CACHE:-0}" == 1 ]] && build_args+=(--no-cache)
# An empty secret when there is no bundle: the Containerfile then uses the image's own CA store.
[[ -n "${ca}" ]] || { ca="${IMAGE_CACHE}/no-ca.pem"; : >"${ca}"; }
build_args+=(--secret "id=ca,src=${ca}")

for t in "${ORDER[@]}"; do
  [[ " ${targets[*]} " == *" ${t} "* ]] || continue
  start=${SECONDS}
  log "${t}: building ${IMAGE[${t}]}"
  podman build "${build_args[@]}" --target "${t}" --tag "${IMAGE[${t}]}" \
    --label "org.opencontainers.image.title=${IMAGE[${t}]%:*}" -f "${HERE}/Containerfile" "${ROOT}" >"${IMAGE_CACHE}/build-${t}.log" 2>&1 \
    || { tail -n 40 "${IMAGE_CACHE}/build-${t}.log" >&2; die "${t}: build failed (log: ${IMAGE_CACHE}/build-${t}.log)"; }
  log "${t}: built in $((SECONDS - start))s"
done

if [[ "${smoke}" == 1 ]]; then
  for t in "${ORDER[@]}"; do
    [[ " ${targets[*]} " == *" ${t} "* ]] || continue
    start=${SECONDS}
    bash "${HERE}/smoke.sh" "${t}" "${IMAGE[${t}]}" "${IMAGE[runtime-cpu]}" || die "${t}: smoke test failed"
    log "${t}: smoke test passed in $((SECONDS - start))s"
  done
fi

# -- the package sets ---------------------------------------------------------------------------------
# Every Debian and Python package of each image (name and version), compared with the committed set in
# images/locks/<target>.packages: a build that installed anything else fails, naming the difference
# (a second build of the same commit gives the same set). WRPO_UPDATE_LOCKS=1 writes the sets instead.
mkdir -p "${IMAGE_CACHE}/packages"
for t in "${ORDER[@]}"; do
  [[ " ${targets[*]} " == *" ${t} "* ]] || continue
  got="${IMAGE_CACHE}/packages/${t}.packages"
  podman run --rm --pull=never --network=none --entrypoint sh "${IMAGE[${t}]}" -c \
    "dpkg-query -W -f='deb \${Package}:\${Architecture} \${Version}\n'; \
     python -m pip list --format=freeze --disable-pip-version-check | sed 's/^/pip /; s/==/ /'" \
    | LC_ALL=C sort >"${got}"
  want="${HERE}/locks/${t}.packages"
  if [[ "${WRPO_UPDATE_LOCKS:-0}" == 1 ]]; then
    mkdir -p "${HERE}/locks"
    cp "${got}" "${want}"
    log "${t}: package set written to ${want}"
  elif [[ ! -f "${want}" ]]; then
    log "${t}: no ${want} to compare with (WRPO_UPDATE_LOCKS=1 writes it)"
  elif ! diff -u "${want}" "${got}" >"${got}.diff"; then
    cat "${got}.diff" >&2
    die "${t}: the image's packages differ from ${want} (above); update the locks if that is intended"
  else
    log "${t}: $(wc -l <"${got}") packages, as in images/locks/${t}.packages"
  fi
done

# -- sizes and archives -------------------------------------------------------------------------------
names=()
for t in "${ORDER[@]}"; do
  [[ " ${targets[*]} " == *" ${t} "* ]] || continue
  names+=("${IMAGE[${t}]}")
  size="$(podman image inspect --format '{{.Size}}' "${IMAGE[${t}]}")"
  log "size ${t}: $((size / 1000000)) MB  ${IMAGE[${t}]}"
done
if [[ "${archive_out}" == 0 ]]; then
  log "done in $((SECONDS - total_start))s (no archive)"
  exit 0
fi
archive="${IMAGE_CACHE}/wrpo-images-${VERSION}.tar"
start=${SECONDS}
# What the archive holds: each name with its image ID (the digest of its config, which names every
# layer). An archive whose images are unchanged is left untouched (not re-saved: same file, same
# mtime), so a node that imported it does not import it again (tests/cluster/k8s_node.py).
ids="$(for n in "${names[@]}"; do printf '%s %s\n' "${n}" "$(podman image inspect --format '{{.Id}}' "${n}")"; done)"
if [[ -s "${archive}" && -f "${archive}.ids" && "$(cat "${archive}.ids")" == "${ids}" ]]; then
  log "archive ${archive}: unchanged (same images), not saved again"
else
  rm -f "${archive}.tmp" "${archive}.ids"
  # One docker-archive holding every image, each shared layer once: what `kind load image-archive` and
  # `ctr images import` take (containerd 1.6 keeps the names of a docker-archive, not of an OCI one).
  podman save --quiet --multi-image-archive --format docker-archive -o "${archive}.tmp" "${names[@]}"
  mv "${archive}.tmp" "${archive}"
  printf '%s\n' "${ids}" >"${archive}.ids"
  log "archive ${archive}: $(du -h "${archive}" | cut -f1) in $((SECONDS - start))s"
fi
skopeo inspect --config "docker-archive:${archive}:${names[0]}" >/dev/null
if [[ "${oci}" == 1 ]]; then
  for n in "${names[@]}"; do
    f="${IMAGE_CACHE}/$(basename "${n%:*}")-${n##*:}.oci.tar"
    podman save --quiet --format oci-archive -o "${f}" "${n}"
    log "OCI archive ${f}"
  done
fi
log "done in $((SECONDS - total_start))s"
echo "WRPO_IMAGE_ARCHIVE=${archive}"
