#!/usr/bin/env bash
# Build the optional controllers of the cluster harness from the Go module proxy (issues 22, 23):
# the Kubeflow Trainer v2 controller manager (trainer-local, tests/cluster/trainer-local/main.go over
# the packages of the current release), the JobSet controller (sigs.k8s.io/jobset, the version that
# Trainer's go.mod requires) and Kueue's controller manager, plus the CRDs and webhook manifests of
# each, copied from the same modules. Trainer and Kueue are one `go build` in one wrapper module; JobSet
# (older controller-runtime) is its own, with every other dependency at the same version, so each
# shared package (k8s.io/* v0.35 above all) is compiled once. The CRDs of an
# older Trainer release (WRPO_TRAINER_COMPAT_VERSION, no controller) are copied too, for the test that
# proves a FusionRun's TrainingRuntime/TrainJob shape is accepted there. Everything is cached outside
# the repo under
#   ${WRPO_BIN_CACHE:-${WRPO_CACHE:-$HOME/.cache/wrpo}/k8s-bin}/controllers/<version-key>/
# and a re-run with the same versions does nothing. The last line printed is
#   WRPO_CONTROLLERS_BIN=<dir>
# and the same line is written to <dir>/env (and <cache>/controllers/current points at <dir>).
# Go's module and build caches are the ones of build-binaries.sh, so a CI cache of ~/.cache/wrpo
# covers both. See docs/cluster-harness.md ("Optional controllers").
#
# Usage: tests/cluster/build-controllers.sh
#        WRPO_BUILD_JOBS=1 nice -n 19 tests/cluster/build-controllers.sh   # on a busy machine
set -euo pipefail

TRAINER_VERSION="${WRPO_TRAINER_VERSION:-v2.2.0}"
# The JobSet version Trainer's go.mod requires (v2.2.0: v0.11.1; Kueue v0.17.0 requires the same).
JOBSET_VERSION="${WRPO_JOBSET_VERSION:-v0.11.1}"
KUEUE_VERSION="${WRPO_KUEUE_VERSION:-v0.17.0}"
# The oldest Trainer release whose CRDs the harness keeps (trainer-crds-<version>, no controller).
TRAINER_COMPAT_VERSION="${WRPO_TRAINER_COMPAT_VERSION:-v2.0.0}"

export PATH="/usr/local/go/bin:${PATH}"
command -v go >/dev/null || { echo "build-controllers: 'go' not found (need Go >= 1.26)" >&2; exit 1; }

GO_STATE="${WRPO_GO_CACHE:-${WRPO_CACHE:-$HOME/.cache/wrpo}/go}"
export GOPATH="${GO_STATE}/path"
export GOMODCACHE="${GO_STATE}/path/pkg/mod"
export GOCACHE="${WRPO_GOCACHE:-${GO_STATE}/build}"
export GOFLAGS="-mod=mod -buildvcs=false"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export CGO_ENABLED=0
JOBS="${WRPO_BUILD_JOBS:-$(nproc)}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# trainer-local is built from a file in this repo: rebuild when that file or this script changes.
LOCAL_STAMP=".trainer-local-$(cat "${HERE}/trainer-local/main.go" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-12)"

GO_VERSION="$(go env GOVERSION)"
KEY="trainer-${TRAINER_VERSION}_jobset-${JOBSET_VERSION}_kueue-${KUEUE_VERSION}_${GO_VERSION}"
CACHE_ROOT="${WRPO_BIN_CACHE:-${WRPO_CACHE:-$HOME/.cache/wrpo}/k8s-bin}/controllers"
OUT="${CACHE_ROOT}/${KEY}"
WORK="${CACHE_ROOT}/.work/${KEY}"
mkdir -p "${OUT}" "${WORK}"

LDFLAGS="-s -w"
BUILD_FLAGS=(-trimpath -p "${JOBS}")

LOG_TAG=build-controllers
# shellcheck source=build-common.sh
source "${HERE}/build-common.sh"

# module_dir MODULE VERSION: the module's folder in the module cache (downloaded if missing). Run in
# WORK, which has no go.mod, so no wrapper module is touched.
module_dir() {
  local src
  src="$(cd "${WORK}" && GOFLAGS= go mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
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

# copy_webhooks NAME FILE: a release's webhook manifest as OUT/webhooks/NAME.yaml.
copy_webhooks() {
  mkdir -p "${OUT}/webhooks"
  cp "$2" "${OUT}/webhooks/$1.yaml"
  chmod u+w "${OUT}/webhooks/$1.yaml"
}

# Trainer v2 (the local entry point) and Kueue's cmd/kueue: one module (MVS picks one version of every
# shared dependency: k8s.io/* v0.35, controller-runtime v0.23, the JobSet API) and one `go build`.
build_controllers() {
  local dir
  dir="$(wrapper_module controllers "module wrpo.local/controllers

go 1.26

require (
	github.com/kubeflow/trainer/v2 ${TRAINER_VERSION}
	sigs.k8s.io/jobset ${JOBSET_VERSION}
	sigs.k8s.io/kueue ${KUEUE_VERSION}
)")"
  local trainer kueue
  trainer="$(module_dir github.com/kubeflow/trainer/v2 "${TRAINER_VERSION}")"
  kueue="$(module_dir sigs.k8s.io/kueue "${KUEUE_VERSION}")"
  mkdir -p "${dir}/trainer-local" "${dir}/kueue"
  cp "${HERE}/trainer-local/main.go" "${dir}/trainer-local/main.go"
  # With its own certificate management off (the harness gives the webhook a certificate from its
  # CA), cmd/kueue reads the metrics server's certificate from the fixed /etc/kueue/metrics/certs
  # and exits without it. The wrapper's kueue/main.go is cmd/kueue/main.go of the module with that
  # constant replaced by $KUEUE_METRICS_CERT_DIR (written here, never committed; go build -overlay may
  # not replace files of the module cache), so tests need no file outside their work dir. Everything
  # else is the module's own packages.
  local main="${kueue}/cmd/kueue/main.go" fixed='metricsCertPath := "/etc/kueue/metrics/certs"'
  grep -qF "${fixed}" "${main}" || { log "kueue ${KUEUE_VERSION}: '${fixed}' not found in ${main}"; exit 1; }
  sed "s|${fixed}|metricsCertPath := os.Getenv(\"KUEUE_METRICS_CERT_DIR\")|" "${main}" >"${dir}/kueue/main.go"
  (cd "${dir}" && run go build "${BUILD_FLAGS[@]}" \
    -ldflags "${LDFLAGS} -X sigs.k8s.io/kueue/pkg/version.GitVersion=${KUEUE_VERSION}" \
    -o "${OUT}/" ./trainer-local ./kueue)
  rm -f "${OUT}"/.trainer-local-*
  touch "${OUT}/${LOCAL_STAMP}"
  copy_manifests trainer-crds "${trainer}/manifests/base/crds"
  copy_manifests kueue-crds "${kueue}/config/components/crd/bases"
  copy_webhooks trainer "${trainer}/manifests/base/webhook/manifests.yaml"
  copy_webhooks kueue "${kueue}/config/components/webhook/manifests.yaml"
}

# JobSet's stock main package. Its webhooks are written against controller-runtime v0.22 (v0.23 changed
# ctrl.NewWebhookManagedBy), so it cannot be in the module above. Its wrapper requires every module of
# its own graph at the version the module above resolved, so the packages they share (k8s.io/* above
# all) are the same and compiled once; modules whose newer version would pull in controller-runtime
# v0.23 (e.g. cert-controller) keep JobSet's own version.
build_jobset() {
  local body="module wrpo.local/jobset

go 1.26

require sigs.k8s.io/jobset ${JOBSET_VERSION}"
  local dir own resolved runtime
  dir="$(wrapper_module jobset "${body}")"
  own="$(cd "${dir}" && go list -m -f '{{if not .Main}}{{.Path}}{{end}}' all)"
  runtime="$(cd "${dir}" && go list -m -f '{{.Version}}' sigs.k8s.io/controller-runtime)"
  resolved="$(cd "${WORK}/controllers" && go list -m -f '{{if not .Main}}{{.Path}} {{.Version}}{{end}}' all)"
  local keep="sigs.k8s.io/controller-runtime sigs.k8s.io/jobset" shared got try
  for try in 1 2 3 4 5; do
    shared="$(awk -v keep="${keep}" 'BEGIN { split(keep, k, " "); for (i in k) skip[k[i]] = 1 }
      NR == FNR { own[$1] = 1; next } ($1 in own) && !($1 in skip) { print "\t" $1 " " $2 }' \
      <(echo "${own}") <(echo "${resolved}"))"
    wrapper_module jobset "${body}

require (
${shared}
)" >/dev/null
    got="$(cd "${dir}" && go list -m -f '{{.Version}}' sigs.k8s.io/controller-runtime)"
    [[ "${got}" == "${runtime}" ]] && break
    keep+=" $(cd "${dir}" && go mod graph | awk -v cr="sigs.k8s.io/controller-runtime@${got}" \
      '$2 == cr { sub(/@.*/, "", $1); print $1 }' | sort -u | tr '\n' ' ')"
    log "jobset: keeping its own version of ${keep} (controller-runtime ${got} otherwise)"
  done
  [[ "${got}" == "${runtime}" ]] || { log "jobset: cannot keep controller-runtime ${runtime}"; exit 1; }
  (cd "${dir}" && run go build "${BUILD_FLAGS[@]}" \
    -ldflags "${LDFLAGS} -X sigs.k8s.io/jobset/pkg/version.GitVersion=${JOBSET_VERSION}" \
    -o "${OUT}/jobset" sigs.k8s.io/jobset)
  local jobset
  jobset="$(module_dir sigs.k8s.io/jobset "${JOBSET_VERSION}")"
  copy_manifests jobset-crds "${jobset}/config/components/crd/bases"
  copy_webhooks jobset "${jobset}/config/components/webhook/manifests.yaml"
}

# The CRDs of the older Trainer release (only its module's YAML, nothing built).
copy_compat_crds() {
  copy_manifests "trainer-crds-${TRAINER_COMPAT_VERSION}" \
    "$(module_dir github.com/kubeflow/trainer/v2 "${TRAINER_COMPAT_VERSION}")/manifests/base/crds"
}

total_start=${SECONDS}
log "go ${GO_VERSION}, ${JOBS} parallel jobs, output ${OUT}"
step trainer+kueue trainer-local kueue "${LOCAL_STAMP}" trainer-crds kueue-crds webhooks/trainer.yaml \
  webhooks/kueue.yaml -- build_controllers
step jobset jobset jobset-crds webhooks/jobset.yaml -- build_jobset
step "trainer ${TRAINER_COMPAT_VERSION} CRDs" "trainer-crds-${TRAINER_COMPAT_VERSION}" -- copy_compat_crds
log "all controllers ready in $((SECONDS - total_start))s"

cat >"${OUT}/versions.env" <<VERSIONS
TRAINER_VERSION=${TRAINER_VERSION}
JOBSET_VERSION=${JOBSET_VERSION}
KUEUE_VERSION=${KUEUE_VERSION}
TRAINER_COMPAT_VERSION=${TRAINER_COMPAT_VERSION}
GO_VERSION=${GO_VERSION}
VERSIONS
echo "WRPO_CONTROLLERS_BIN=${OUT}" >"${OUT}/env"
ln -sfn "${KEY}" "${CACHE_ROOT}/current"
ls -l "${OUT}" >&2
echo "WRPO_CONTROLLERS_BIN=${OUT}"
