#!/usr/bin/env bash
# Build the binaries of a real Kubernetes control plane from the Go module proxy:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, helm and the Kubeflow
# training-operator (plus its CRD YAMLs), and of a real node for tests/cluster/k8s_node.py:
# kubelet, kube-proxy and CoreDNS. Everything is cached outside the repo under
#   ${WRPO_BIN_CACHE:-${WRPO_CACHE:-$HOME/.cache/wrpo}/k8s-bin}/<version-key>/
# and a re-run with the same versions does nothing. The last line printed is
#   WRPO_K8S_BIN=<dir>
# and the same line is written to <dir>/env (and <cache>/current points at <dir>).
#
# Usage: tests/cluster/build-binaries.sh            # build what is missing
#        WRPO_K8S_VERSION=v1.34.4 tests/cluster/build-binaries.sh
#        WRPO_NODE_BINARIES=0 tests/cluster/build-binaries.sh   # without kubelet, kube-proxy, CoreDNS
set -euo pipefail

K8S_VERSION="${WRPO_K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${WRPO_ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${WRPO_KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${WRPO_HELM_VERSION:-v3.22.0}"
TRAINING_OPERATOR_VERSION="${WRPO_TRAINING_OPERATOR_VERSION:-v1.9.4}"
# Not in the cache key below (adding the node kept existing control-plane caches): its binary is
# named coredns-<version>, so a new version is a new build.
COREDNS_VERSION="${WRPO_COREDNS_VERSION:-v1.15.0}"

export PATH="/usr/local/go/bin:${PATH}"
command -v go >/dev/null || { echo "build-binaries: 'go' not found (need Go >= 1.26)" >&2; exit 1; }

# Go state lives under ~/.cache so that re-runs (and CI caches) reuse downloads and compiles.
GO_STATE="${WRPO_GO_CACHE:-${WRPO_CACHE:-$HOME/.cache/wrpo}/go}"
export GOPATH="${GO_STATE}/path"
export GOMODCACHE="${GO_STATE}/path/pkg/mod"
export GOCACHE="${WRPO_GOCACHE:-${GO_STATE}/build}"
export GOFLAGS="-mod=mod -buildvcs=false"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export CGO_ENABLED=0
JOBS="${WRPO_BUILD_JOBS:-$(nproc)}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# training-operator-local is built from a file in this repo: rebuild it when that file changes.
LOCAL_STAMP=".training-operator-local-$(sha256sum "${HERE}/training-operator-local/main.go" | cut -c1-12)"

GO_VERSION="$(go env GOVERSION)"
KEY="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}_to-${TRAINING_OPERATOR_VERSION}_${GO_VERSION}"
# WRPO_GO_GCFLAGS (e.g. "-N -l": no optimisation, no inlining) is passed as -gcflags=all=...: about 40% less
# compile CPU (measured on etcd: 88 → 52 CPU-s, 27 → 34 MB) for slower binaries; such builds get their own key.
GCFLAGS="${WRPO_GO_GCFLAGS:-}"
if [[ -n "${GCFLAGS}" ]]; then
  KEY+="_gcflags-$(printf '%s' "${GCFLAGS}" | sha256sum | cut -c1-8)"
fi
CACHE_ROOT="${WRPO_BIN_CACHE:-${WRPO_CACHE:-$HOME/.cache/wrpo}/k8s-bin}"
OUT="${CACHE_ROOT}/${KEY}"
WORK="${CACHE_ROOT}/.work/${KEY}"
mkdir -p "${OUT}" "${WORK}"

LDFLAGS_BASE="-s -w"
BUILD_FLAGS=(-trimpath -p "${JOBS}")
if [[ -n "${GCFLAGS}" ]]; then
  BUILD_FLAGS+=("-gcflags=all=${GCFLAGS}")
fi

LOG_TAG=build-binaries
# shellcheck source=build-common.sh
source "${HERE}/build-common.sh"

build_etcd() {
  local dir
  dir="$(wrapper_module etcd "module wrpo.local/etcd

go 1.26

require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}")"
  cat >"${dir}/main.go" <<'EOF'
// Command etcd is etcd's own entry point, built from the module proxy.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  (cd "${dir}" && run go build "${BUILD_FLAGS[@]}" \
    -ldflags "${LDFLAGS_BASE}" -o "${OUT}/etcd" .)
}

build_kubernetes() {
  local minor="${K8S_VERSION#v1.}"
  minor="${minor%%.*}"
  local staging_version="v0.${K8S_VERSION#v1.}"
  local staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go
    cloud-provider cluster-bootstrap code-generator component-base component-helpers
    controller-manager cri-api cri-client csi-translation-lib dynamic-resource-allocation
    endpointslice externaljwt kms kube-aggregator kube-controller-manager kube-proxy
    kube-scheduler kubectl kubelet metrics mount-utils pod-security-admission sample-apiserver
    sample-cli-plugin sample-controller)
  local body="module wrpo.local/kubernetes

go 1.26

require k8s.io/kubernetes ${K8S_VERSION}
"
  local m
  for m in "${staging[@]}"; do
    body+="
replace k8s.io/${m} => k8s.io/${m} ${staging_version}"
  done
  local dir
  dir="$(wrapper_module kubernetes "${body}")"
  # A placeholder package so the module is a valid main module.
  printf 'package kubernetes\n' >"${dir}/doc.go"
  local v="k8s.io/component-base/version"
  local ldflags="${LDFLAGS_BASE} -X ${v}.gitVersion=${K8S_VERSION} -X ${v}.gitMajor=1"
  ldflags+=" -X ${v}.gitMinor=${minor} -X ${v}.gitTreeState=clean"
  ldflags+=" -X ${v}.buildDate=1970-01-01T00:00:00Z"
  # One invocation for all three binaries: they share most packages and the link step is the
  # memory peak, so building them together is both the fastest and the most predictable.
  (cd "${dir}" && run go build "${BUILD_FLAGS[@]}" -ldflags "${ldflags}" -o "${OUT}/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler)
}

# go install PKG@VERSION into OUT (for modules without replace directives).
go_install() {
  local pkg="$1" version="$2" ldflags="$3"
  GOBIN="${OUT}" run go install "${BUILD_FLAGS[@]}" -ldflags "${LDFLAGS_BASE} ${ldflags}" \
    "${pkg}@${version}"
}

build_kwok() {
  go_install sigs.k8s.io/kwok/cmd/kwok "${KWOK_VERSION}" \
    "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION}"
}

build_helm() {
  go_install helm.sh/helm/v3/cmd/helm "${HELM_VERSION}" \
    "-X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
}

build_training_operator() {
  local mod="github.com/kubeflow/training-operator"
  # The stock binary, for reference and for users who run it in a cluster: the tests use
  # training-operator-local only, so it is built on request (WRPO_STOCK_TRAINING_OPERATOR=1; a link less).
  if [[ "${WRPO_STOCK_TRAINING_OPERATOR:-0}" == 1 ]]; then
    go_install "${mod}/cmd/training-operator.v1" "${TRAINING_OPERATOR_VERSION}" ""
    mv "${OUT}/training-operator.v1" "${OUT}/training-operator"
  fi
  # The test entry point (training-operator-local/main.go): same reconciler and webhook
  # packages, every listener on 127.0.0.1, certificates from a directory we choose.
  local dir
  dir="$(wrapper_module training-operator-local "module wrpo.local/training-operator-local

go 1.26

require ${mod} ${TRAINING_OPERATOR_VERSION}")"
  cp "${HERE}/training-operator-local/main.go" "${dir}/main.go"
  (cd "${dir}" && run go build "${BUILD_FLAGS[@]}" -ldflags "${LDFLAGS_BASE}" \
    -o "${OUT}/training-operator-local" .)
  rm -f "${OUT}"/.training-operator-local-*
  touch "${OUT}/${LOCAL_STAMP}"
  # Its CRDs ship in the module zip (manifests/base/crds); copy them next to the binary.
  local src
  src="$(go list -m -f '{{.Dir}}' "${mod}@${TRAINING_OPERATOR_VERSION}" 2>/dev/null || true)"
  if [[ -z "${src}" ]]; then
    src="${GOMODCACHE}/${mod}@${TRAINING_OPERATOR_VERSION}"
  fi
  [[ -d "${src}/manifests/base/crds" ]] || { log "no CRDs in ${src}/manifests/base/crds"; exit 1; }
  mkdir -p "${OUT}/training-operator-crds.tmp"
  cp "${src}"/manifests/base/crds/*.yaml "${OUT}/training-operator-crds.tmp/"
  chmod -R u+w "${OUT}/training-operator-crds.tmp"
  rm -f "${OUT}/training-operator-crds.tmp/kustomization.yaml"
  rm -rf "${OUT}/training-operator-crds"
  mv "${OUT}/training-operator-crds.tmp" "${OUT}/training-operator-crds"
}

# kubectl, for the cluster tests that drive FusionRuns as users do (apply, get, describe, wait,
# explain). Its own wrapper module over the same staging modules as the control plane
# (k8s.io/kubectl and friends at v0.<minor>.<patch>), with the same version ldflags; main.go is
# what k8s.io/kubernetes/cmd/kubectl runs.
build_kubectl() {
  local minor="${K8S_VERSION#v1.}"
  minor="${minor%%.*}"
  local staging_version="v0.${K8S_VERSION#v1.}"
  local dir
  dir="$(wrapper_module kubectl "module wrpo.local/kubectl

go 1.26

require (
	k8s.io/client-go ${staging_version}
	k8s.io/component-base ${staging_version}
	k8s.io/kubectl ${staging_version}
)")"
  cat >"${dir}/main.go" <<'EOF'
// Command kubectl is upstream kubectl's entry point (k8s.io/kubernetes/cmd/kubectl).
package main

import (
	"k8s.io/component-base/cli"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"

	_ "k8s.io/client-go/plugin/pkg/client/auth"
)

func main() {
	command := cmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		util.CheckErr(err)
	}
}
EOF
  local v="k8s.io/component-base/version"
  local ldflags="${LDFLAGS_BASE} -X ${v}.gitVersion=${K8S_VERSION} -X ${v}.gitMajor=1"
  ldflags+=" -X ${v}.gitMinor=${minor} -X ${v}.gitTreeState=clean"
  ldflags+=" -X ${v}.buildDate=1970-01-01T00:00:00Z"
  (cd "${dir}" && run go build "${BUILD_FLAGS[@]}" -ldflags "${ldflags}" -o "${OUT}/kubectl" .)
}

# -- the node (tests/cluster/k8s_node.py): kubelet and kube-proxy from the same wrapper module and
# with the same version stamp as the control plane, and CoreDNS with the few plugins the node uses.

build_node() {
  [[ -f "${WORK}/kubernetes/go.mod" ]] || build_kubernetes  # the module (cheap with a warm cache)
  local minor="${K8S_VERSION#v1.}"
  minor="${minor%%.*}"
  local v="k8s.io/component-base/version"
  local ldflags="${LDFLAGS_BASE} -X ${v}.gitVersion=${K8S_VERSION} -X ${v}.gitMajor=1"
  ldflags+=" -X ${v}.gitMinor=${minor} -X ${v}.gitTreeState=clean"
  ldflags+=" -X ${v}.buildDate=1970-01-01T00:00:00Z"
  (cd "${WORK}/kubernetes" && run go build "${BUILD_FLAGS[@]}" -ldflags "${ldflags}" -o "${OUT}/" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
}

build_coredns() {
  local dir
  dir="$(wrapper_module "coredns-${COREDNS_VERSION}" "module wrpo.local/coredns

go 1.26

require github.com/coredns/coredns ${COREDNS_VERSION}")"
  cat >"${dir}/main.go" <<'EOF'
// Command coredns is CoreDNS with only the plugins the node harness's Corefile uses.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	// Plugin order within a server block (CoreDNS's own list, cut to these plugins).
	dnsserver.Directives = []string{"bind", "log", "health", "ready", "errors", "cache", "kubernetes"}
}

func main() { coremain.Run() }
EOF
  (cd "${dir}" && run go build "${BUILD_FLAGS[@]}" -ldflags "${LDFLAGS_BASE}" \
    -o "${OUT}/coredns-${COREDNS_VERSION}-bind" .)
}

# The pod sandbox's process: waits for SIGTERM/SIGINT (k8s_node.py wraps it into the sandbox image).
build_pause() {
  local dir
  dir="$(wrapper_module pause "module wrpo.local/pause

go 1.26")"
  cat >"${dir}/main.go" <<'EOF'
// Command pause holds a pod's namespaces until it is told to stop.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
}
EOF
  (cd "${dir}" && run go build "${BUILD_FLAGS[@]}" -ldflags "${LDFLAGS_BASE}" -o "${OUT}/pause" .)
}

total_start=${SECONDS}
log "go ${GO_VERSION}, ${JOBS} parallel jobs, output ${OUT}"
step etcd etcd -- build_etcd
step kwok kwok -- build_kwok
step helm helm -- build_helm
step training-operator training-operator-local "${LOCAL_STAMP}" \
  training-operator-crds -- build_training_operator
step kubernetes kube-apiserver kube-controller-manager kube-scheduler -- build_kubernetes
step kubectl kubectl -- build_kubectl
# The real node's binaries; WRPO_NODE_BINARIES=0 skips them (scripts/test.sh: its tests do not use them).
if [[ "${WRPO_NODE_BINARIES:-1}" == 1 ]]; then
  step node kubelet kube-proxy -- build_node
  step coredns "coredns-${COREDNS_VERSION}-bind" -- build_coredns
  step pause pause -- build_pause
  ln -sfn "coredns-${COREDNS_VERSION}-bind" "${OUT}/coredns"
fi
log "all binaries ready in $((SECONDS - total_start))s"

cat >"${OUT}/versions.env" <<EOF
K8S_VERSION=${K8S_VERSION}
ETCD_VERSION=${ETCD_VERSION}
KWOK_VERSION=${KWOK_VERSION}
HELM_VERSION=${HELM_VERSION}
TRAINING_OPERATOR_VERSION=${TRAINING_OPERATOR_VERSION}
COREDNS_VERSION=${COREDNS_VERSION}
GO_VERSION=${GO_VERSION}
EOF
echo "WRPO_K8S_BIN=${OUT}" >"${OUT}/env"
ln -sfn "${KEY}" "${CACHE_ROOT}/current"
ls -l "${OUT}" >&2
echo "WRPO_K8S_BIN=${OUT}"
