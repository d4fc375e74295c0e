"""The whole tiny pipeline through the operator with `cluster.training.backend: trainjob`, its pods run for real
by the harness's PodRunner (as tests/cluster/test_operator_podrunner.py does for PyTorchJob): the SFT and WRPO
stages are TrainJobs that the real Trainer v2 and JobSet controllers turn into pods. The SFT pod stops at a
fault point after its first checkpoint (WRPO_FAULT_AFTER_CHECKPOINT=sft:1) and is deleted there: its Job
fails, JobSet restarts the group (`failurePolicy.maxRestarts`: cluster.backoffLimit), and the new pod resumes
from that checkpoint on the run's PVC (docs/operator.md, "Training backends"). Needs the control plane, the
controllers (tests/cluster/build-controllers.sh), `weed` and the vLLM venv; skips without them. Takes several
minutes on 2 cores."""

from __future__ import annotations

import re
import signal

import pytest
import test_operator_podrunner as real
from operator_harness import create_run, wait, wait_phase
from test_operator_podrunner import start_real_run, tiny_spec

pytestmark = [pytest.mark.cluster, pytest.mark.heavy, pytest.mark.integration, pytest.mark.slow]
weed, vllm_python = real.weed, real.vllm_python  # the fixtures of the PyTorchJob run: SeaweedFS, the vLLM venv
FAULT_LINE = "WRPO_FAULT_AFTER_CHECKPOINT: sft saved checkpoint 1"


# Timeouts are hang detectors (README.md, "Testing"), as for the PyTorchJob run
@pytest.mark.timeout(3600)
def test_tiny_fusion_through_trainjobs_resumes_sft_from_its_checkpoint(
        k8s_controllers, restricted_local_namespace, helm_install, service_account, pod_runner, weed, vllm_python,
        tiny_models, k8s_api_client, tmp_path):
    from kubernetes import client

    ns = restricted_local_namespace
    core, custom = client.CoreV1Api(k8s_api_client), client.CustomObjectsApi(k8s_api_client)
    operator, runner = start_real_run(core, ns, weed, helm_install, service_account, pod_runner, vllm_python,
                                      tmp_path)
    spec = tiny_spec(tiny_models, weed[0])
    spec["cluster"]["training"]["backend"] = "trainjob"
    # What this run adds to the PyTorchJob one is the training stages: one source server instead of two, and no
    # held-out prompts, so the eval stage starts no servers (the PyTorchJob run covers both in full)
    spec["sources"] = spec["sources"][:1]
    spec["dataset"]["evalSize"] = 0
    try:
        create_run(custom, ns, "tiny", spec)

        def sft_pods() -> list[str]:
            return sorted(n for n in runner.pods if n.startswith("tiny-sft-node-"))

        def waiting() -> str | None:
            return next((n for n in sft_pods() if FAULT_LINE in runner.logs(n)), None)

        first = wait(waiting, 1800, "the SFT pod waiting at its fault point after checkpoint 1", operator,
                     interval=0.5)
        core.delete_namespaced_pod(first, ns, grace_period_seconds=0)
        status = wait_phase(custom, ns, "tiny", ["Succeeded", "Failed"], 2700, operator)
        assert status["phase"] == "Succeeded", (status, runner.errors, runner.log_tails())
    finally:
        operator.kill(signal.SIGTERM)
    assert status["training"] == {"backend": "trainjob"}
    # the SFT ran in two pods of the JobSet (its restart after the deleted one); the second resumed at step 1
    pods = sft_pods()
    assert len(pods) == 2 and first in pods, pods
    (second,) = [p for p in pods if p != first]
    log = runner.logs(second)
    resumed = re.findall(r"Resuming training from checkpoint with epoch \d+ and global step (\d+)", log)
    assert resumed == ["1"], log[-3000:]
    assert FAULT_LINE not in log  # it started after checkpoint 1: the fault point never came again
    # the rendezvous variables Trainer's torch plugin gave the pod, read by torchrun
    assert runner.pods[second].env["PET_NNODES"] == "1" and runner.pods[second].env["PET_NPROC_PER_NODE"] == "1"
    assert any(n.startswith("tiny-wrpo-node-") for n in runner.pods)
