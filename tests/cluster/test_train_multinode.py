"""Multi-node training through the operator's own objects, on each training backend (docs/operator.md,
"Training backends"): the `wrpo` stage on two nodes (`nodes: 2`, `procsPerNode: 1`) as

- `pytorchjob`: the PyTorchJob the operator builds (`build_pytorchjob`: a Master and one Worker), reconciled
  by the real training-operator (pods, the master Service, the workers' init container, PET_* variables);
- `trainjob`: the TrainingRuntime + TrainJob it builds (`build_training_runtime`, `build_trainjob`),
  reconciled by the real Kubeflow Trainer v2 and JobSet controllers (the JobSet, its Indexed Job of two
  pods, its headless Service, the PET_* variables of Trainer's torch plugin, PET_MASTER_ADDR naming the
  first pod as `<trainjob>-node-0-0.<trainjob>`);

created on the real apiserver and executed by the pod runner as two local `torchrun` processes that
rendezvous at the master's address (the runner's stand-in for cluster DNS, tests/cluster/k8s_podrunner.py)
and train under DeepSpeed ZeRO-3 on its CPU accelerator. The stage must commit a model equal to one process
training on the same global batches.

The stages before `wrpo` are committed by the test (select-sources' contributions for the model card, the
tiny target as Target-SFT, 16 example quadruples as build-pairs); `ref-logps` runs for real. The run
directory is a local folder: the pods are local processes. Needs the control plane
(tests/cluster/build-binaries.sh), and for `trainjob` the controllers (tests/cluster/build-controllers.sh);
about two minutes each on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from k8s_harness import wait_for
from k8s_podrunner import DEFAULT_COMMAND_MAP

pytestmark = [pytest.mark.cluster, pytest.mark.heavy, pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "tiny"
REL32 = 100 * (4e3) ** 0.5 * 2**-24  # ≈ 3.8e-4: float32 against the exact float64 result (test_train_multirank)


def _spec(tiny_models: Path, run_uri: str, backend: str):
    from wrpo.pipeline.spec import parse_spec

    return parse_spec({
        "target": {"model": str(tiny_models / "target")},
        "sources": [{"name": "qwen", "model": str(tiny_models / "source-qwen")}],
        "reward": {"type": "sequence-classification", "model": str(tiny_models / "reward")},
        "dataset": {"uri": str(EXAMPLES / "prompts.jsonl")},
        "wrpo": {"beta": 0.5, "alpha": 0.5, "learningRate": 1e-4, "batchSize": 8, "perDeviceBatchSize": 2,
                 "maxSteps": 3, "warmupRatio": 0, "lrScheduler": "constant", "maxLength": 160,
                 "maxPromptLength": 80},
        "training": {"deepspeedStage": 3, "gradientCheckpointing": False, "precision": "fp32"},
        "storage": {"runUri": run_uri},
        # no checkpoint PVC: each pod keeps its scratch in its own folder here (the shared ReadWriteMany
        # checkpoint volume a multi-node spec needs is tested by the pod-runner run, one node)
        "cluster": {"training": {"nodes": 2, "procsPerNode": 1, "gpus": 0, "cpu": "1", "memory": "2Gi",
                                 "backend": backend},
                    "checkpoints": {"enabled": False}, "activeDeadlineSeconds": 1800, "backoffLimit": 0},
    })


def _prepare(spec, run, workdir: Path) -> None:
    """Commit select-sources (its contributions only), sft (the tiny target) and build-pairs (16 quadruples,
    4 for eval) for this spec; run ref-logps."""
    from wrpo.pipeline.context import StageOptions
    from wrpo.pipeline.plan import stage_hashes
    from wrpo.pipeline.runtime import run_stage

    hashes = stage_hashes(spec)
    select = run.stage("select-sources").writer()  # the wrpo stage's model card reads its contributions
    select.put_text("contributions.json", json.dumps({"sources": ["qwen"], "all": {"shares": {"qwen": 1.0}}}) + "\n")
    select.commit(hashes["select-sources"])
    sft = run.stage("sft").writer()
    sft.put_tree("model", Path(spec.target.model))
    sft.commit(hashes["sft"])
    lines = (EXAMPLES / "quadruples.jsonl").read_text().splitlines()
    pairs = run.stage("build-pairs").writer()
    pairs.put_text("train.jsonl", "".join(x + "\n" for x in lines[:16]))
    pairs.put_text("eval.jsonl", "".join(x + "\n" for x in lines[16:20]))
    pairs.put_text("stats.json", "{}\n")
    pairs.commit(hashes["build-pairs"])
    run_stage(spec, run, "ref-logps", StageOptions(workdir=str(workdir)))


def _relative(a, b) -> float:
    """‖a − b‖ / ‖b‖ (see tests/integration/test_train_multirank.py: AdamW amplifies rounding in ~0 gradients)."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@dataclass(frozen=True)
class Backend:
    """How the test drives one training backend: the runner object's API, its pods' label, the conditions that
    end it, and the name suffixes of the node-rank-0 and node-rank-1 pods."""

    api: tuple[str, str, str]  # group, version, plural
    pod_label: str
    done: tuple[str, str]  # success, failure
    master: str  # the pod names (a pattern)
    worker: str


BACKENDS = {
    "pytorchjob": Backend(("kubeflow.org", "v1", "pytorchjobs"), "training.kubeflow.org/job-name",
                          ("Succeeded", "Failed"), "mn-wrpo-master-0", "mn-wrpo-worker-0"),
    # JobSet's pods: <jobset>-<replicated job>-<job index>-<completion index>-<random> (the Job controller's
    # name; the pod's hostname is the name without the random part)
    "trainjob": Backend(("trainer.kubeflow.org", "v1alpha1", "trainjobs"), "jobset.sigs.k8s.io/jobset-name",
                        ("Complete", "Failed"), r"mn-wrpo-node-0-0-\w+", r"mn-wrpo-node-0-1-\w+"),
}


def _create(custom, ns: str, spec, run_uri: str, backend: str) -> None:
    """The `wrpo` stage's runner object(s), as the operator builds them for `backend`."""
    from wrpo_operator.builders import build_pytorchjob, build_training_runtime, build_trainjob

    if backend == "pytorchjob":
        job = build_pytorchjob("mn", ns, spec, "wrpo", run_uri)
        assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}
        custom.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", job)
        return
    group, version, _ = BACKENDS["trainjob"].api
    custom.create_namespaced_custom_object(group, version, ns, "trainingruntimes",
                                           build_training_runtime("mn", ns, spec, "wrpo", run_uri))
    job = build_trainjob("mn", ns, spec, "wrpo", run_uri)
    assert job["spec"]["trainer"] == {"numNodes": 2, "numProcPerNode": 1}

    # Trainer's webhook refuses a TrainJob until its cache has the runtime (docs/operator.md): retried
    wait_for("TrainJob mn-wrpo created", lambda: custom.create_namespaced_custom_object(
        group, version, ns, "trainjobs", job), 60, interval=1)


@pytest.mark.timeout(2700)  # a hang detector (README.md, "Testing"): ≥ 3× its time on a loaded machine
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_wrpo_on_two_nodes_commits_the_single_process_model(
        backend, request, local_namespace, pod_runner, k8s_api_client, tiny_models, tmp_path):
    import torch
    from kubernetes import client
    from safetensors.torch import load_file

    from wrpo.engine.stages import fetch_pairs, fetch_sft_model, wrpo_config
    from wrpo.engine.wrpo_trainer import run_wrpo
    from wrpo.pipeline.rundir import RunDir
    from wrpo.pipeline.workdir import Workdir
    from wrpo_operator.builders import build_spec_configmap

    kind = BACKENDS[backend]
    if backend == "trainjob":
        request.getfixturevalue("k8s_controllers")  # Trainer v2 and JobSet (skips without their build)
    run_uri = str(tmp_path / "run")
    spec = _spec(tiny_models, run_uri, backend)
    run = RunDir(run_uri)
    _prepare(spec, run, tmp_path / "prepare-work")

    ns, core = local_namespace, client.CoreV1Api(k8s_api_client)
    custom = client.CustomObjectsApi(k8s_api_client)
    core.create_namespaced_config_map(ns, build_spec_configmap("mn", ns, spec))
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "operator")]), "DS_ACCELERATOR": "cpu",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo",  # gloo on loopback, where the pods' addresses are
           "WRPO_WORKDIR": "workdir"}  # relative: each pod's own folder, as each node has its own disk
    commands = {**DEFAULT_COMMAND_MAP,  # with the stand-in of the workers' init container (k8s_podrunner._shell)
                "wrpo": [sys.executable, "-m", "wrpo.cli"], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
    runner = pod_runner(ns, label_selector=f"{kind.pod_label}=mn-wrpo", env_overrides=env, command_map=commands)
    _create(custom, ns, spec, run_uri, backend)

    deadline, conditions = time.monotonic() + 1800, set()  # a hang detector: ≥ 3× a loaded machine's time
    while time.monotonic() < deadline and not conditions & set(kind.done):
        time.sleep(2)
        status = custom.get_namespaced_custom_object(*kind.api[:2], ns, kind.api[2], "mn-wrpo")
        conditions = {c["type"] for c in status.get("status", {}).get("conditions", []) if c["status"] == "True"}
    assert kind.done[0] in conditions, (conditions, runner.errors, runner.log_tails(60))

    # the pods as they ran (the training-operator may already have removed a finished worker: cleanPodPolicy)
    master, worker = (next(p for name, p in runner.pods.items() if re.fullmatch(pattern, name))
                      for pattern in (kind.master, kind.worker))
    assert worker.env["PET_NODE_RANK"] == "1" and worker.env["PET_NNODES"] == "2"
    # the master's Service (PyTorchJob) or host name under the JobSet's headless Service (TrainJob), resolved
    # to the master pod
    assert worker.env["PET_MASTER_ADDR"] == master.env["PET_MASTER_ADDR"] == master.ip
    worker_log, master_log = runner.logs(worker.name), runner.logs(master.name)
    if backend == "pytorchjob":
        assert "'-c', 'pass'" in worker_log  # the workers' init container, then torchrun
    else:  # Trainer named the first pod under the JobSet's headless Service; the runner resolved it
        sent = {e.name: e.value for e in core.read_namespaced_pod(worker.name, ns).spec.containers[0].env}
        assert sent["PET_MASTER_ADDR"] == "mn-wrpo-node-0-0.mn-wrpo"
    assert "'--nnodes=2'" in worker_log and "'--node-rank=1'" in worker_log
    assert "'--nnodes=2'" in master_log and "'--node-rank=0'" in master_log

    manifest = run.stage("wrpo").manifest()
    trained = load_file(tmp_path / "run" / "wrpo" / "model" / "model.safetensors")
    metrics = [json.loads(x) for x in run.stage("wrpo").read_text("metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]  # global rank 0 alone wrote them
    assert manifest["summary"]["steps"] == 3

    # the same stage config in one process, without DeepSpeed: the same global batches of 8, in float64 (the
    # exact result); the two-node run computes in float32 (DeepSpeed's CPU accelerator), so it must be within
    # float32's own accuracy of it: REL32, derived in tests/integration/test_train_multirank.py's docstring
    work = Workdir(run_uri, tmp_path / "single-work")
    data = fetch_pairs(run, work) / "train.jsonl"
    cfg = wrpo_config(spec, fetch_sft_model(run, work), data, tmp_path / "single", deepspeed_stage=0,
                      precision="fp64")
    run_wrpo(cfg)
    expected = load_file(tmp_path / "single" / "model" / "model.safetensors")
    single = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in single], rel=REL32)
    initial = load_file(tiny_models / "target" / "model.safetensors")
    assert _relative(torch.cat([expected[k].flatten() for k in expected]),
                     torch.cat([initial[k].flatten() for k in expected])) > 1e-3
    for key in expected:
        assert _relative(trained[key], expected[key]) < REL32, key
    print("\nMULTI-NODE RUN:", json.dumps({"backend": backend, "losses": [m["loss"] for m in metrics]}))
