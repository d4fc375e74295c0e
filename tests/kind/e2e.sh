#!/usr/bin/env bash
# End-to-end check on a kind cluster, for users with Docker and internet access (not run in CI).
#
#   tests/kind/e2e.sh
#
# Creates a kind cluster, builds and loads the operator and runtime images, installs the Kubeflow
# training-operator v1.9.4, runs an S3 server (SeaweedFS) in the cluster, installs the chart
# charts/wrpo-operator, applies manifests/examples/tiny-fusionrun.yaml and waits for the
# FusionRun to reach .status.phase == Succeeded. On failure it collects logs into
# ${WRPO_E2E_ARTIFACTS}. The cluster is deleted on exit unless WRPO_E2E_KEEP_CLUSTER=1.
#
# Needs: docker, kind, kubectl, helm. Settings (environment):
#   WRPO_KIND_CLUSTER       cluster name (wrpo-e2e)
#   WRPO_KIND_NODE_IMAGE    node image (pinned below)
#   WRPO_OPERATOR_IMAGE     operator image tag to build (wrpo-operator:e2e)
#   WRPO_RUNTIME_IMAGE      runtime image tag to build (wrpo-runtime-cpu:e2e)
#   WRPO_SEAWEEDFS_IMAGE    S3 server image (pinned below)
#   WRPO_HELM_ARGS          extra `helm install` arguments (how the chart is told the images)
#   WRPO_E2E_TIMEOUT        seconds to wait for the FusionRun (1800)
#   WRPO_E2E_ARTIFACTS      where logs go on failure (${TMPDIR:-/tmp}/wrpo-e2e-artifacts)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER="${WRPO_KIND_CLUSTER:-wrpo-e2e}"
NODE_IMAGE="${WRPO_KIND_NODE_IMAGE:-kindest/node:v1.34.0}"
OPERATOR_IMAGE="${WRPO_OPERATOR_IMAGE:-wrpo-operator:e2e}"
RUNTIME_IMAGE="${WRPO_RUNTIME_IMAGE:-wrpo-runtime-cpu:e2e}"
SEAWEEDFS_IMAGE="${WRPO_SEAWEEDFS_IMAGE:-chrislusf/seaweedfs:3.80}"
TRAINING_OPERATOR_REF="v1.9.4"
TIMEOUT="${WRPO_E2E_TIMEOUT:-1800}"
ARTIFACTS="${WRPO_E2E_ARTIFACTS:-${TMPDIR:-/tmp}/wrpo-e2e-artifacts}"
RUN_NAMESPACE="wrpo-e2e"
OPERATOR_NAMESPACE="wrpo-system"
S3_ACCESS_KEY="wrpo-e2e"
S3_SECRET_KEY="wrpo-e2e-secret"
S3_BUCKET="wrpo"
KUBECTL=(kubectl --context "kind-${CLUSTER}")

log() { printf '[e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

collect_logs() {
  mkdir -p "${ARTIFACTS}"
  log "collecting logs into ${ARTIFACTS}"
  "${KUBECTL[@]}" get all,fusionruns.fusion.wrpo.io,pytorchjobs.kubeflow.org,events -A -o wide \
    >"${ARTIFACTS}/objects.txt" 2>&1 || true
  "${KUBECTL[@]}" get fusionruns.fusion.wrpo.io -A -o yaml >"${ARTIFACTS}/fusionruns.yaml" 2>&1 || true
  local ns pod
  for ns in "${OPERATOR_NAMESPACE}" "${RUN_NAMESPACE}" kubeflow; do
    "${KUBECTL[@]}" -n "${ns}" describe pods >"${ARTIFACTS}/${ns}-pods.txt" 2>&1 || true
    for pod in $("${KUBECTL[@]}" -n "${ns}" get pods -o name 2>/dev/null); do
      "${KUBECTL[@]}" -n "${ns}" logs "${pod}" --all-containers --prefix \
        >"${ARTIFACTS}/${ns}-${pod#pod/}.log" 2>&1 || true
    done
  done
  kind export logs "${ARTIFACTS}/kind" --name "${CLUSTER}" >/dev/null 2>&1 || true
}

cleanup() {
  local status=$?
  if [[ ${status} -ne 0 ]]; then
    collect_logs
    log "FAILED (exit ${status}); logs in ${ARTIFACTS}"
  fi
  if [[ "${WRPO_E2E_KEEP_CLUSTER:-0}" == "1" ]]; then
    log "keeping cluster ${CLUSTER} (kind delete cluster --name ${CLUSTER})"
  else
    kind delete cluster --name "${CLUSTER}" >/dev/null 2>&1 || true
  fi
  exit "${status}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in docker kind kubectl helm; do
  command -v "${tool}" >/dev/null || die "'${tool}' is required"
done
[[ -f "${ROOT}/images/operator.Dockerfile" ]] || die "missing images/operator.Dockerfile"
[[ -f "${ROOT}/images/runtime-cpu.Dockerfile" ]] || die "missing images/runtime-cpu.Dockerfile"
[[ -d "${ROOT}/charts/wrpo-operator" ]] || die "missing charts/wrpo-operator"
[[ -f "${ROOT}/manifests/examples/tiny-fusionrun.yaml" ]] || die "missing manifests/examples/tiny-fusionrun.yaml"

log "creating kind cluster ${CLUSTER} (${NODE_IMAGE})"
kind create cluster --name "${CLUSTER}" --image "${NODE_IMAGE}" --wait 180s

log "building images"
docker build -f "${ROOT}/images/operator.Dockerfile" -t "${OPERATOR_IMAGE}" "${ROOT}"
docker build -f "${ROOT}/images/runtime-cpu.Dockerfile" -t "${RUNTIME_IMAGE}" "${ROOT}"
kind load docker-image "${OPERATOR_IMAGE}" "${RUNTIME_IMAGE}" --name "${CLUSTER}"

log "installing the Kubeflow training-operator ${TRAINING_OPERATOR_REF}"
"${KUBECTL[@]}" apply --server-side \
  -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=${TRAINING_OPERATOR_REF}"
"${KUBECTL[@]}" -n kubeflow rollout status deployment/training-operator --timeout=300s

log "starting SeaweedFS S3 in ${RUN_NAMESPACE}"
"${KUBECTL[@]}" create namespace "${RUN_NAMESPACE}"
"${KUBECTL[@]}" -n "${RUN_NAMESPACE}" create secret generic wrpo-s3-credentials \
  --from-literal=AWS_ACCESS_KEY_ID="${S3_ACCESS_KEY}" \
  --from-literal=AWS_SECRET_ACCESS_KEY="${S3_SECRET_KEY}" \
  --from-literal=AWS_ENDPOINT_URL="http://s3.${RUN_NAMESPACE}.svc:8333" \
  --from-literal=AWS_DEFAULT_REGION=us-east-1
"${KUBECTL[@]}" -n "${RUN_NAMESPACE}" apply -f - <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: seaweedfs-s3
data:
  s3.json: |
    {"identities": [{"name": "wrpo", "credentials": [{"accessKey": "${S3_ACCESS_KEY}",
      "secretKey": "${S3_SECRET_KEY}"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: s3
spec:
  replicas: 1
  selector:
    matchLabels: {app: s3}
  template:
    metadata:
      labels: {app: s3}
    spec:
      containers:
      - name: seaweedfs
        image: ${SEAWEEDFS_IMAGE}
        args: ["server", "-dir=/data", "-s3", "-s3.port=8333", "-s3.config=/config/s3.json",
               "-master.volumeSizeLimitMB=64", "-volume.max=0"]
        ports:
        - containerPort: 8333
        readinessProbe:
          tcpSocket: {port: 8333}
          periodSeconds: 2
        volumeMounts:
        - {name: config, mountPath: /config}
        - {name: data, mountPath: /data}
      volumes:
      - name: config
        configMap: {name: seaweedfs-s3}
      - name: data
        emptyDir: {}
---
apiVersion: v1
kind: Service
metadata:
  name: s3
spec:
  selector: {app: s3}
  ports:
  - {port: 8333, targetPort: 8333}
EOF
"${KUBECTL[@]}" -n "${RUN_NAMESPACE}" rollout status deployment/s3 --timeout=300s

log "creating bucket ${S3_BUCKET}"
"${KUBECTL[@]}" -n "${RUN_NAMESPACE}" run make-bucket --rm -i --restart=Never \
  --image="${RUNTIME_IMAGE}" --image-pull-policy=Never \
  --overrides='{"spec":{"containers":[{"name":"make-bucket","image":"'"${RUNTIME_IMAGE}"'","imagePullPolicy":"Never","envFrom":[{"secretRef":{"name":"wrpo-s3-credentials"}}],"command":["python","-c","import boto3,time\nfor i in range(30):\n  try:\n    boto3.client(\"s3\").create_bucket(Bucket=\"'"${S3_BUCKET}"'\"); break\n  except Exception as e:\n    print(e); time.sleep(2)\nelse:\n  raise SystemExit(1)"]}]}}'

log "installing charts/wrpo-operator"
read -r -a helm_args <<<"${WRPO_HELM_ARGS:---set image.repository=${OPERATOR_IMAGE%:*} --set image.tag=${OPERATOR_IMAGE##*:} --set image.pullPolicy=Never --set runtimeImage=${RUNTIME_IMAGE}}"
helm --kube-context "kind-${CLUSTER}" install wrpo "${ROOT}/charts/wrpo-operator" \
  --namespace "${OPERATOR_NAMESPACE}" --create-namespace --wait --timeout 300s "${helm_args[@]}"

log "applying manifests/examples/tiny-fusionrun.yaml"
created="$("${KUBECTL[@]}" -n "${RUN_NAMESPACE}" create -f "${ROOT}/manifests/examples/tiny-fusionrun.yaml" -o name)"
run="$(grep -m1 '^fusionrun' <<<"${created}")" || die "no FusionRun in tiny-fusionrun.yaml (${created})"
wait_for_run() {
  local run="$1" deadline=$((SECONDS + TIMEOUT)) phase=""
  log "waiting up to ${TIMEOUT}s for ${run} to succeed"
  while ((SECONDS < deadline)); do
    phase="$("${KUBECTL[@]}" -n "${RUN_NAMESPACE}" get "${run}" -o jsonpath='{.status.phase}')"
    case "${phase}" in
      Succeeded) log "${run} Succeeded"; return 0 ;;
      Failed) log "ERROR: ${run} Failed"; return 1 ;;
    esac
    sleep 10
  done
  log "ERROR: ${run} did not succeed within ${TIMEOUT}s (last phase: '${phase}')"
  return 1
}
wait_for_run "${run}"
