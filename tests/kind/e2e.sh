#!/usr/bin/env bash
# End-to-end check on a kind cluster, for users with Docker (and internet access for kind's node
# image, the training-operator and SeaweedFS). Not run in CI: tests/unit/test_kind_script.py runs
# everything here that needs no Docker (arguments, file checks, the rendered manifests, `helm
# template` with the values), and tests/cluster/test_node_e2e.py runs the same FusionRun on a real
# kubelet with the same images.
#
#   tests/kind/e2e.sh                 build (or load) the images, run the tiny FusionRun, wait for Succeeded
#   tests/kind/e2e.sh --render DIR    only write what would be applied into DIR (no Docker, no cluster)
#
# Steps: the images of images/build.sh (or WRPO_IMAGE_ARCHIVE) → kind cluster → `kind load
# image-archive` → Kubeflow training-operator v1.9.4 → SeaweedFS S3 (Service seaweedfs.wrpo-system,
# as manifests/examples/tiny-cpu.yaml expects) → charts/wrpo-operator → a Job that writes the tiny
# models (`wrpo tiny-models`) and uploads them and examples/tiny/prompts.jsonl to the bucket →
# tiny-cpu.yaml with the built images → wait for .status.phase == Succeeded. On failure logs go to
# ${WRPO_E2E_ARTIFACTS}; the cluster is deleted on exit unless WRPO_E2E_KEEP_CLUSTER=1.
#
# Needs: docker, kind, kubectl, helm, python3 (and for building the images: mmdebstrap, podman,
# skopeo, root). The tiny example requests 5 CPUs at its peak (two vLLM servers and a sampling Job).
# Settings (environment):
#   WRPO_IMAGE_ARCHIVE      docker-archive of images/build.sh to load (default: build it)
#   WRPO_KIND_CLUSTER       cluster name (wrpo-e2e)
#   WRPO_KIND_NODE_IMAGE    node image (pinned below)
#   WRPO_SEAWEEDFS_IMAGE    S3 server image (pinned below)
#   WRPO_HELM_ARGS          extra `helm install` arguments
#   WRPO_E2E_TIMEOUT        seconds to wait for the FusionRun (2400)
#   WRPO_E2E_ARTIFACTS      where logs go on failure (${TMPDIR:-/tmp}/wrpo-e2e-artifacts)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLUSTER="${WRPO_KIND_CLUSTER:-wrpo-e2e}"
NODE_IMAGE="${WRPO_KIND_NODE_IMAGE:-kindest/node:v1.34.0}"
SEAWEEDFS_IMAGE="${WRPO_SEAWEEDFS_IMAGE:-chrislusf/seaweedfs:3.80}"
TRAINING_OPERATOR_REF="v1.9.4"
TIMEOUT="${WRPO_E2E_TIMEOUT:-2400}"
ARTIFACTS="${WRPO_E2E_ARTIFACTS:-${TMPDIR:-/tmp}/wrpo-e2e-artifacts}"
RUN_NAMESPACE="wrpo-e2e"
OPERATOR_NAMESPACE="wrpo-system"
# What manifests/examples/tiny-cpu.yaml names: the S3 Service and the credentials Secret.
S3_SERVICE="seaweedfs"
S3_PORT=8333
S3_SECRET_NAME="s3-credentials"
S3_ACCESS_KEY="wrpo-e2e"
S3_SECRET_KEY="wrpo-e2e-secret"
S3_BUCKET="wrpo"
KUBECTL=(kubectl --context "kind-${CLUSTER}")

log() { printf '[e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

render_dir=""
while (($#)); do
  case "$1" in
    --render) [[ $# -ge 2 && -n "$2" ]] || { log "--render needs a folder"; usage; }
              render_dir="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) log "unknown argument: $1"; usage ;;
  esac
done

for f in images/build.sh charts/wrpo-operator/Chart.yaml manifests/examples/tiny-cpu.yaml \
         examples/tiny/prompts.jsonl; do
  [[ -f "${ROOT}/${f}" ]] || die "missing ${f}"
done
if [[ -n "${render_dir}" ]]; then
  tools=(helm python3)
else
  tools=(docker kind kubectl helm python3)
fi
for tool in "${tools[@]}"; do
  command -v "${tool}" >/dev/null || die "'${tool}' is required"
done

# The image names: exactly what images/build.sh builds and the chart and examples name.
declare -A IMAGE=()
while read -r target name; do IMAGE[${target}]="${name}"; done < <(bash "${ROOT}/images/build.sh" --list)
for t in operator runtime-cpu vllm-cpu; do
  [[ -n "${IMAGE[${t}]:-}" ]] || die "images/build.sh --list names no ${t} image"
done

# -- what gets applied ------------------------------------------------------------------------------
WORK="${render_dir:-$(mktemp -d "${TMPDIR:-/tmp}/wrpo-e2e.XXXXXX")}"
mkdir -p "${WORK}"

cat >"${WORK}/values.yaml" <<EOF
image:
  repository: ${IMAGE[operator]%:*}
  tag: "${IMAGE[operator]##*:}"
  pullPolicy: Never
EOF

cat >"${WORK}/seaweedfs.yaml" <<EOF
apiVersion: v1
kind: ConfigMap
metadata: {name: seaweedfs-s3, namespace: ${OPERATOR_NAMESPACE}}
data:
  s3.json: |
    {"identities": [{"name": "wrpo", "credentials": [{"accessKey": "${S3_ACCESS_KEY}",
      "secretKey": "${S3_SECRET_KEY}"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ${S3_SERVICE}, namespace: ${OPERATOR_NAMESPACE}}
spec:
  replicas: 1
  selector:
    matchLabels: {app: ${S3_SERVICE}}
  template:
    metadata:
      labels: {app: ${S3_SERVICE}}
    spec:
      containers:
      - name: seaweedfs
        image: ${SEAWEEDFS_IMAGE}
        args: ["server", "-dir=/data", "-s3", "-s3.port=${S3_PORT}", "-s3.config=/config/s3.json",
               "-master.volumeSizeLimitMB=64", "-volume.max=0"]
        ports:
        - containerPort: ${S3_PORT}
        readinessProbe:
          tcpSocket: {port: ${S3_PORT}}
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
metadata: {name: ${S3_SERVICE}, namespace: ${OPERATOR_NAMESPACE}}
spec:
  selector: {app: ${S3_SERVICE}}
  ports:
  - {port: ${S3_PORT}, targetPort: ${S3_PORT}}
EOF

# JSON is YAML: the Secret and the prompts ConfigMap are written with python3's standard library.
python3 - "${WORK}" "${RUN_NAMESPACE}" "${S3_SECRET_NAME}" "${S3_ACCESS_KEY}" "${S3_SECRET_KEY}" \
  "${ROOT}/examples/tiny/prompts.jsonl" <<'EOF'
import json, sys
work, ns, name, key, secret, prompts = sys.argv[1:]
json.dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
           "stringData": {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}},
          open(f"{work}/secret.json", "w"), indent=1)
json.dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tiny-prompts", "namespace": ns},
           "data": {"prompts.jsonl": open(prompts).read()}}, open(f"{work}/prompts.json", "w"), indent=1)
EOF

cat >"${WORK}/upload.yaml" <<EOF
apiVersion: batch/v1
kind: Job
metadata: {name: upload-inputs, namespace: ${RUN_NAMESPACE}}
spec:
  backoffLimit: 2
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: upload
        image: ${IMAGE[runtime-cpu]}
        imagePullPolicy: Never
        env:
        - {name: AWS_ENDPOINT_URL_S3, value: "http://${S3_SERVICE}.${OPERATOR_NAMESPACE}.svc:${S3_PORT}"}
        - {name: AWS_DEFAULT_REGION, value: us-east-1}
        - name: AWS_ACCESS_KEY_ID
          valueFrom: {secretKeyRef: {name: ${S3_SECRET_NAME}, key: AWS_ACCESS_KEY_ID}}
        - name: AWS_SECRET_ACCESS_KEY
          valueFrom: {secretKeyRef: {name: ${S3_SECRET_NAME}, key: AWS_SECRET_ACCESS_KEY}}
        command:
        - python
        - -c
        - |
          import pathlib, subprocess, time
          import boto3
          subprocess.run(["wrpo", "tiny-models", "/tmp/models"], check=True)
          s3 = boto3.client("s3")
          for attempt in range(60):
              try:
                  if "${S3_BUCKET}" not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
                      s3.create_bucket(Bucket="${S3_BUCKET}")
                  break
              except Exception as e:
                  print("S3 not ready:", e); time.sleep(2)
          for model in pathlib.Path("/tmp/models").iterdir():
              for f in model.rglob("*"):
                  if f.is_file():
                      s3.upload_file(str(f), "${S3_BUCKET}", f"models/{model.name}/{f.relative_to(model)}")
          s3.upload_file("/prompts/prompts.jsonl", "${S3_BUCKET}", "data/prompts.jsonl")
          print("uploaded", sorted(o["Key"] for o in s3.list_objects_v2(Bucket="${S3_BUCKET}")["Contents"]))
        volumeMounts:
        - {name: prompts, mountPath: /prompts}
      volumes:
      - name: prompts
        configMap: {name: tiny-prompts}
EOF

# The example as users apply it, with the images of images/build.sh, never pulled.
sed -e "s#^\(    runtimeImage:\).*#\1 ${IMAGE[runtime-cpu]}#" \
    -e "s#^\(    vllmImage:\).*#\1 ${IMAGE[vllm-cpu]}\n    imagePullPolicy: Never#" \
    "${ROOT}/manifests/examples/tiny-cpu.yaml" >"${WORK}/fusionrun.yaml"
grep -q "imagePullPolicy: Never" "${WORK}/fusionrun.yaml" || die "could not set the images in tiny-cpu.yaml"

read -r -a extra_helm_args <<<"${WRPO_HELM_ARGS:-}"
helm template wrpo "${ROOT}/charts/wrpo-operator" --namespace "${OPERATOR_NAMESPACE}" \
  --values "${WORK}/values.yaml" "${extra_helm_args[@]}" >"${WORK}/chart.yaml"

if [[ -n "${render_dir}" ]]; then
  log "rendered into ${WORK}"
  exit 0
fi

# -- the cluster ---------------------------------------------------------------------------------------
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
  rm -rf "${WORK}"
  exit "${status}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

archive="${WRPO_IMAGE_ARCHIVE:-}"
if [[ -z "${archive}" ]]; then
  log "building the images (images/build.sh)"
  line="$(bash "${ROOT}/images/build.sh" | tail -n1)"
  archive="${line#WRPO_IMAGE_ARCHIVE=}"
fi
[[ -s "${archive}" ]] || die "no image archive at ${archive}"

log "creating kind cluster ${CLUSTER} (${NODE_IMAGE})"
kind create cluster --name "${CLUSTER}" --image "${NODE_IMAGE}" --wait 180s
log "loading ${archive}"
kind load image-archive "${archive}" --name "${CLUSTER}"

log "installing the Kubeflow training-operator ${TRAINING_OPERATOR_REF}"
"${KUBECTL[@]}" apply --server-side \
  -k "github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=${TRAINING_OPERATOR_REF}"
"${KUBECTL[@]}" -n kubeflow rollout status deployment/training-operator --timeout=300s

log "starting SeaweedFS S3 (${S3_SERVICE}.${OPERATOR_NAMESPACE}.svc:${S3_PORT})"
"${KUBECTL[@]}" create namespace "${OPERATOR_NAMESPACE}"
"${KUBECTL[@]}" create namespace "${RUN_NAMESPACE}"
"${KUBECTL[@]}" apply -f "${WORK}/seaweedfs.yaml"
"${KUBECTL[@]}" -n "${OPERATOR_NAMESPACE}" rollout status "deployment/${S3_SERVICE}" --timeout=300s

log "installing charts/wrpo-operator (${IMAGE[operator]})"
helm --kube-context "kind-${CLUSTER}" install wrpo "${ROOT}/charts/wrpo-operator" \
  --namespace "${OPERATOR_NAMESPACE}" --wait --timeout 300s --values "${WORK}/values.yaml" "${extra_helm_args[@]}"

log "uploading the tiny models and prompts to s3://${S3_BUCKET}/"
"${KUBECTL[@]}" apply -f "${WORK}/secret.json" -f "${WORK}/prompts.json" -f "${WORK}/upload.yaml"
"${KUBECTL[@]}" -n "${RUN_NAMESPACE}" wait --for=condition=complete job/upload-inputs --timeout=900s

log "applying manifests/examples/tiny-cpu.yaml"
run="$("${KUBECTL[@]}" -n "${RUN_NAMESPACE}" create -f "${WORK}/fusionrun.yaml" -o name)"
deadline=$((SECONDS + TIMEOUT))
phase=""
log "waiting up to ${TIMEOUT}s for ${run} to succeed"
while ((SECONDS < deadline)); do
  phase="$("${KUBECTL[@]}" -n "${RUN_NAMESPACE}" get "${run}" -o jsonpath='{.status.phase}')"
  case "${phase}" in
    Succeeded) break ;;
    Failed) die "${run} Failed: $("${KUBECTL[@]}" -n "${RUN_NAMESPACE}" get "${run}" -o jsonpath='{.status.message}')" ;;
  esac
  sleep 10
done
[[ "${phase}" == "Succeeded" ]] || die "${run} did not succeed within ${TIMEOUT}s (last phase: '${phase}')"
output="$("${KUBECTL[@]}" -n "${RUN_NAMESPACE}" get "${run}" -o jsonpath='{.status.outputUri}')"
log "${run} Succeeded; the fused model is at ${output}"
