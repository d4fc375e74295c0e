"""Least privilege on the harness (docs/operator.md, "Security"): every pod the operator builds passes the
apiserver's PodSecurity admission enforcing `restricted`; OwnerReferencesPermissionEnforcement is on and the
chart's RBAC satisfies it; and no secret value ever appears in the FusionRun, ConfigMaps, pod specs, status,
Events, the operator's debug log or kopf's annotations."""

from __future__ import annotations

import json

import pytest
from operator_harness import create_run, tiny_spec, wait, wait_phase

from wrpo.pipeline.plan import STAGE_NAMES
from wrpo.pipeline.spec import parse_spec
from wrpo_operator import builders as b
from wrpo_operator.kube import ApiError, Kube

pytestmark = pytest.mark.cluster
URI = "s3://bucket/runs/demo"


def rich_spec():
    return parse_spec({
        "target": {"model": "s3://bucket/models/target", "tensorParallelSize": 2},
        "sources": [{"name": "llama", "model": "s3://bucket/models/llama"},
                    {"name": "qwen", "model": "/models/qwen"},
                    {"name": "api", "endpoint": {"url": "https://api.example.com/v1", "model": "gpt",
                                                 "apiKeyEnv": "API_KEY", "apiKeySecret": "api-key"}}],
        "reward": {"type": "remote", "model": "s3://bucket/models/rm"},
        "dataset": {"uri": "s3://bucket/data/prompts.jsonl"},
        "storage": {"runUri": URI, "credentialsSecret": "s3-creds"},
        "cluster": {"modelsPvc": "models", "hfTokenSecret": "hf", "queueName": "q",
                    "env": [{"name": "WANDB_API_KEY", "secretKeyRef": {"name": "wandb", "key": "key"}}],
                    "training": {"gpus": 8, "nodes": 2}, "checkpoints": {"accessModes": ["ReadWriteMany"]},
                    "pods": {"vllm": {"volumes": [{"name": "cache", "emptyDir": {}}],
                                      "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}}},
    })


def pods_of_every_child(ns: str) -> list[dict]:
    spec, out = rich_spec(), []
    for stage in STAGE_NAMES:
        for obj in [*b.build_stage_servers("demo", ns, spec, stage, URI, "h"),
                    b.build_stage_runner("demo", ns, spec, stage, URI, "h")]:
            for i, template in enumerate(b.pod_templates(obj)):
                out.append({"apiVersion": "v1", "kind": "Pod",
                            "metadata": {"name": f"{obj['metadata']['name']}-{i}", "namespace": ns,
                                         "labels": template["metadata"]["labels"]},
                            "spec": template["spec"]})
    return out


def test_every_pod_passes_the_restricted_standard_as_the_apiserver_enforces_it(k8s_api_client,
                                                                               restricted_namespace):
    kube = Kube(k8s_api_client)
    pods = pods_of_every_child(restricted_namespace)
    assert len(pods) >= 13
    for pod in pods:
        kube.create(pod, dry_run=True)  # PodSecurity admission runs on dry-run creates; raises on a violation
    # the control: the same pod as a root container with privilege escalation is refused
    bad = json.loads(json.dumps(pods[0]))
    bad["metadata"]["name"] = "not-restricted"
    bad["spec"].pop("securityContext")
    bad["spec"]["containers"][0]["securityContext"] = {"allowPrivilegeEscalation": True}
    with pytest.raises(ApiError) as e:
        kube.create(bad, dry_run=True)
    assert e.value.status == 403 and 'violates PodSecurity "restricted:latest"' in e.value.message


def test_owner_references_need_the_finalizers_permission(k8s_api_client, k8s_namespace, service_account):
    """OwnerReferencesPermissionEnforcement is on: a child with blockOwnerDeletion is refused to an identity
    that may create it but not update its owner's finalizers (the chart grants fusionruns/finalizers)."""
    from kubernetes import client

    rbac = client.RbacAuthorizationV1Api(k8s_api_client)
    rules = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
             {"apiGroups": ["fusion.wrpo.io"], "resources": ["fusionruns"], "verbs": ["get"]}]
    rbac.create_namespaced_role(k8s_namespace, {"metadata": {"name": "no-finalizers"}, "rules": rules})
    rbac.create_namespaced_role_binding(k8s_namespace, {
        "metadata": {"name": "no-finalizers"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "no-finalizers"},
        "subjects": [{"kind": "ServiceAccount", "name": "creator", "namespace": k8s_namespace}]})
    identity = service_account(k8s_namespace, "creator")
    plain = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "plain", "namespace": k8s_namespace}}
    owned = {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "child", "namespace": k8s_namespace,
                          "ownerReferences": [b.owner_reference("demo", "00000000-0000-0000-0000-000000000001")]}}
    api = identity.api_client()
    try:
        kube = Kube(api)
        wait(lambda: _allowed(kube, plain), 120, "RBAC to let the identity create ConfigMaps")
        with pytest.raises(ApiError) as e:
            kube.create(owned)
        assert e.value.status == 403 and "cannot set blockOwnerDeletion" in e.value.message, e.value.message
    finally:
        api.close()


def _allowed(kube: Kube, obj: dict) -> bool:
    try:
        kube.create(obj, dry_run=True)
        return True
    except ApiError as e:
        if e.status == 403:
            return False
        raise


SECRETS = {"HF_TOKEN": "hf_LEAK_hftoken_7d1a", "key": "wandb-LEAK-4c2e9b", "api-key": "sk-LEAK-apikey-91f0",
           "AWS_ACCESS_KEY_ID": "AKIALEAKACCESS0001", "AWS_SECRET_ACCESS_KEY": "leak/secret/access/key/0002"}


@pytest.mark.slow
def test_no_secret_value_leaves_its_secret(operator, apis, run_namespace, k8s_api_client):
    """A whole run with every kind of secret reference, the operator logging at debug level; then every
    object of the namespace, the run's Events and the operator's log are searched for the values."""
    custom, batch, apps, core = apis
    ns = run_namespace
    for name, keys in (("hf", ["HF_TOKEN"]), ("wandb", ["key"]), ("api-key", ["api-key"]),
                       ("s3-credentials", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])):
        core.create_namespaced_secret(ns, {"metadata": {"name": name}, "stringData": {k: SECRETS[k] for k in keys}})
    spec = tiny_spec(hfTokenSecret="hf", env=[{"name": "WANDB_API_KEY", "secretKeyRef": {"name": "wandb",
                                                                                       "key": "key"}}],
                     pods={"vllm": {"env": [{"name": "VLLM_API_KEY", "secretKeyRef": {"name": "api-key",
                                                                                     "key": "api-key"}}]}})
    spec["sources"].append({"name": "api", "endpoint": {"url": "https://api.example.com/v1", "model": "gpt",
                                                        "apiKeyEnv": "OPENAI_API_KEY", "apiKeySecret": "api-key"}})
    create_run(custom, ns, "secret", spec)
    status = wait_phase(custom, ns, "secret", ["Succeeded", "Failed"], 600, operator)
    assert status["phase"] == "Succeeded", status
    seen = {
        "FusionRun (with kopf's annotations and the status)": custom.get_namespaced_custom_object(
            "fusion.wrpo.io", "v1alpha1", ns, "fusionruns", "secret"),
        "ConfigMaps": core.list_namespaced_config_map(ns).to_dict(),
        "Pods": core.list_namespaced_pod(ns).to_dict(),
        "Jobs": batch.list_namespaced_job(ns).to_dict(),
        "Deployments": apps.list_namespaced_deployment(ns).to_dict(),
        "PyTorchJobs": custom.list_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs"),
        "Events": core.list_namespaced_event(ns).to_dict(),
    }
    texts = {what: json.dumps(obj, default=str) for what, obj in seen.items()}
    texts["operator log (debug)"] = operator.log.read_text()
    assert "DEBUG" in texts["operator log (debug)"] and "secret" in texts["Pods"]
    leaks = [(what, key) for what, text in texts.items() for key, value in SECRETS.items() if value in text]
    assert leaks == []
    # what the pods do get: references
    pod = next(p for p in seen["Pods"]["items"] if p["metadata"]["name"].startswith("secret-prepare"))
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["value_from"]["secret_key_ref"]["name"] == "hf"
    assert env["WANDB_API_KEY"]["value_from"]["secret_key_ref"] == {"key": "key", "name": "wandb",
                                                                     "optional": None}
    annotations = seen["FusionRun (with kopf's annotations and the status)"]["metadata"].get("annotations") or {}
    assert not [k for k in annotations if "kopf" in k or k.startswith("fusion.wrpo.io/")]  # kopf stores nothing
