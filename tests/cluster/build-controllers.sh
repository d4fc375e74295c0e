#!/usr/bin/env bash
# Build the optional controllers of the cluster harness from the Go module proxy (issues 22, 23):
# the Kubeflow Trainer v2 controller manager (trainer-local, tests/cluster/trainer-local/main.go over
# the v2.0.0 packages), the JobSet controller (sigs.k8s.io/jobset, the version Trainer requires) and
# Kueue's controller manager, plus the CRDs and webhook manifests of each, copied from the same
# modules. Everything is cached outside the repo under
#   ${WRPO_BIN_CACHE:-$HOME/.cache/wrpo/k8s-bin}/controllers/<version-key>/
# and a re-run with the same versions does nothing. The last line printed is
#   WRPO_CONTROLLERS_BIN=<dir>
# and the same line is written to <dir>/env (and <cache>/controllers/current points at <dir>).
# Go's module and build caches are the ones of build-binaries.sh, so a CI cache of ~/.cache/wrpo
# covers both. See docs/cluster-harness.md ("Optional controllers").
#
# Usage: tests/cluster/build-controllers.sh
#        WRPO_BUILD_JOBS=1 nice -n 19 tests/cluster/build-controllers.sh   # on a busy machine
set -euo pipefail

TRAINER_VERSION="${WRPO_TRAINER_VERSION:-v2.0.0}"
# The JobSet version Trainer's go.mod requires (v2.0.0: v0.8.2); both are built in one module, so
# they share every compiled package (k8s.io/* v0.32, controller-runtime v0.20).
JOBSET_VERSION="${WRPO_JOBSET_VERSION:-v0.8.2}"
KUEUE_VERSION="${WRPO_KUEUE_VERSION:-v0.17.0}"

export PATH="/usr/local/go/bin:${PATH}"
command -v go >/dev/null || { echo "build-controllers: 'go' not found (need Go >= 1.26)" >&2; exit 1; }

GO_STATE="${WRPO_GO_CACHE:-$HOME/.cache/wrpo/go}"
export GOPATH="${GO_STATE}/path"
export GOMODCACHE="${GO_STATE}/path/pkg/mod"
export GOCACHE="${WRPO_GOCACHE:-${GO_STATE}/build}"
export GOFLAGS="-mod=mod -buildvcs=false"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export CGO_ENABLED=0
JOBS="${WRPO_BUILD_JOBS:-$(nproc)}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# trainer-local is built from a file in this repo: rebuild it when that file changes.
LOCAL_STAMP=".trainer-local-$(sha256sum "${HERE}/trainer-local/main.go" | cut -c1-12)"

GO_VERSION="$(go env GOVERSION)"
KEY="trainer-${TRAINER_VERSION}_jobset-${JOBSET_VERSION}_kueue-${KUEUE_VERSION}_${GO_VERSION}"
CACHE_ROOT="${WRPO_BIN_CACHE:-$HOME/.cache/wrpo/k8s-bin}/controllers"
OUT="${CACHE_ROOT}/${KEY}"
WORK="${CACHE_ROOT}/.work/${KEY}"
mkdir -p "${OUT}" "${WORK}"

LDFLAGS="-s -w"
BUILD_FLAGS=(-trimpath -p "${JOBS}")

LOG_TAG=build-controllers
# shellcheck source=build-common.sh
source "${HERE}/build-common.sh"

# module_dir MODULE VERSION: the module's folder in the module cache (downloaded by the build).
module_dir() {
  local src
  src="$(go mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [[ -d "${src}" ]] || { log "module $1@$2 not in the module cache"; exit 1; }
  echo "${src}"
}

# copy_manifests NAME SRC_DIR...: the YAML files of the folders into OUT/NAME (kustomization removed).
copy_manifests() {
  local name="$1"; shift
  rm -rf "${OUT}/${name}.tmp"
  mkdir -p "${OUT}/${name}.tmp"
  local d
  for d in "$@"; do
    [[ -d "${d}" ]] || { log "no manifests in ${d}"; exit 1; }
    cp "${d}"/*.yaml "${OUT}/${name}.tmp/"
  done
  chmod -R u+w "${OUT}/${name}.tmp"
  rm -f "${OUT}/${name}.tmp/kustomization.yaml" "${OUT}/${name}.tmp/kustomizeconfig.yaml"
  rm -rf "${OUT:?}/${name}"
  mv "${OUT}/${name}.tmp" "${OUT}/${name}"
}

# Trainer v2 (the local entry point) and JobSet's stock main package, one module and one `go build`.
build_trainer_jobset() {
  local dir
  dir="$(wrapper_module trainer-local "module wrpo.local/trainer-local

go 1.26

require (
	github.com/kubeflow/trainer/v2 ${TRAINER_VERSION}
	sigs.k8s.io/jobset ${JOBSET_VERSION}
)")"
  cp "${HERE}/trainer-local/main.go" "${dir}/main.go"
  (cd "${dir}" && run go build "${BUILD_FLAGS[@]}" -ldflags "${LDFLAGS} -X sigs.k8s.io/jobset/pkg/version.GitVersion=${JOBSET_VERSION}" \
    -o "${OUT}/" . sigs.k8s.io/jobset)
  rm -f "${OUT}"/.trainer-local-*
  touch "${OUT}/${LOCAL_STAMP}"
  local trainer jobset
  trainer="$(module_dir github.com/kubeflow/trainer/v2 "${TRAINER_VERSION}")"
  jobset="$(module_dir sigs.k8s.io/jobset "${JOBSET_VERSION}")"
  copy_manifests trainer-crds "${trainer}/manifests/base/crds"
  copy_manifests jobset-crds "${jobset}/config/components/crd/bases"
  mkdir -p "${OUT}/webhooks"
  cp "${trainer}/manifests/base/webhook/manifests.yaml" "${OUT}/webhooks/trainer.yaml"
  cp "${jobset}/config/components/webhook/manifests.yaml" "${OUT}/webhooks/jobset.yaml"
  chmod u+w "${OUT}"/webhooks/*.yaml
}

# Kueue's stock controller manager (cmd/kueue) in its own module (k8s.io/* v0.35, controller-runtime
# v0.23: nothing to share with Trainer's).
build_kueue() {
  local dir
  dir="$(wrapper_module kueue "module wrpo.local/kueue

go 1.26

require sigs.k8s.io/kueue ${KUEUE_VERSION}")"
  local kueue
  kueue="$(module_dir sigs.k8s.io/kueue "${KUEUE_VERSION}")"
  # With its own certificate management off (the harness gives the webhook a certificate from its
  # CA), cmd/kueue reads the metrics server's certificate from the fixed /etc/kueue/metrics/certs
  # and exits without it. The wrapper's main.go is cmd/kueue/main.go of the module with that constant
  # replaced by $KUEUE_METRICS_CERT_DIR (written here, never committed; go build -overlay may not
  # replace files of the module cache), so tests need no file outside their work dir. Everything
  # else is the module's own packages.
  local main="${kueue}/cmd/kueue/main.go" fixed='metricsCertPath := "/etc/kueue/metrics/certs"'
  grep -qF "${fixed}" "${main}" || { log "kueue ${KUEUE_VERSION}: '${fixed}' not found in ${main}"; exit 1; }
  sed "s|${fixed}|metricsCertPath := os.Getenv(\"KUEUE_METRICS_CERT_DIR\")|" "${main}" >"${dir}/main.go"
  rm -f "${dir}/doc.go"
  local v="sigs.k8s.io/kueue/pkg/version"
  (cd "${dir}" && run go build "${BUILD_FLAGS[@]}" \
    -ldflags "${LDFLAGS} -X ${v}.GitVersion=${KUEUE_VERSION}" -o "${OUT}/kueue" .)
  touch "${OUT}/.kueue-metrics-cert-dir"
  copy_manifests kueue-crds "${kueue}/config/components/crd/bases"
  mkdir -p "${OUT}/webhooks"
  cp "${kueue}/config/components/webhook/manifests.yaml" "${OUT}/webhooks/kueue.yaml"
  chmod u+w "${OUT}/webhooks/kueue.yaml"
}

total_start=${SECONDS}
log "go ${GO_VERSION}, ${JOBS} parallel jobs, output ${OUT}"
step trainer+jobset trainer-local jobset "${LOCAL_STAMP}" trainer-crds jobset-crds webhooks/trainer.yaml \
  webhooks/jobset.yaml -- build_trainer_jobset
step kueue kueue .kueue-metrics-cert-dir kueue-crds webhooks/kueue.yaml -- build_kueue
log "all controllers ready in $((SECONDS - total_start))s"

cat >"${OUT}/versions.env" <<VERSIONS
TRAINER_VERSION=${TRAINER_VERSION}
JOBSET_VERSION=${JOBSET_VERSION}
KUEUE_VERSION=${KUEUE_VERSION}
GO_VERSION=${GO_VERSION}
VERSIONS
echo "WRPO_CONTROLLERS_BIN=${OUT}" >"${OUT}/env"
ln -sfn "${KEY}" "${CACHE_ROOT}/current"
ls -l "${OUT}" >&2
echo "WRPO_CONTROLLERS_BIN=${OUT}"
