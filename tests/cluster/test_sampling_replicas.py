"""Sampling replicas that exist (docs/operator.md, "Sampling replicas"): a source with `replicas: 2` gets a
Deployment of two server pods behind one headless Service; the sample-sources unit Job's client resolves the
Service's name to both pods and spreads its requests over them; a replica deleted while requests are in
flight has them retried on the other, and the committed output has every prompt once with all its samples.

The operator's objects come from its builders (`stage_children`), created in the order the operator creates
them (servers, then the unit Job once both replicas are Ready, then the commit Job); the real Deployment,
ReplicaSet and Job controllers and scheduler act on them, and the PodRunner runs the pods: the stage pods
really run `wrpo stage sample-sources`. MOCKS, for what cannot run here: the server pods are the OpenAI
stand-in (tests/openai_standin.py, not vLLM: it counts the requests of each replica and holds them until
the test has deleted one, so "mid-stage" is a known point, not a race), and cluster DNS is the PodRunner's
stand-in (tests/cluster/podrunner_site/sitecustomize.py; the real-node harness runs CoreDNS).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from operator_harness import wait

from wrpo.data.stages import SPLITS, read_records
from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.spec import parse_spec
from wrpo.records import PromptRecord, SampleRecord

pytestmark = [pytest.mark.cluster]
ROOT = Path(__file__).resolve().parents[2]
RUN, SOURCE, SAMPLES = "rep", "a", 2


def spec_of(run_dir: Path):
    """tiny-cpu.yaml with one source of two replicas, local prompts and a local run directory."""
    spec = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())["spec"]
    spec["sources"] = [{"name": SOURCE, "model": "/models/a", "replicas": 2}]
    spec["dataset"]["uri"] = str(ROOT / "examples" / "tiny" / "prompts.jsonl")
    spec["sampling"].update(n=SAMPLES, maxTokens=8, shardSize=4, concurrency=4)
    spec["storage"] = {"runUri": str(run_dir)}  # the PodRunner's pods share this machine's disk
    spec["cluster"]["activeDeadlineSeconds"] = 900  # a hang detector per stage
    return parse_spec(spec)


def standin_server(hold_file: Path):
    """`vllm serve MODEL --host H --port P ...` of a server pod → the OpenAI stand-in on H:P, holding every
    request until `hold_file` exists."""

    def command(argv: list[str]) -> list[str]:
        opt = dict(zip(argv[3::2], argv[4::2], strict=False))  # after `vllm serve MODEL`
        return [
            sys.executable,
            str(ROOT / "tests" / "openai_standin.py"),
            "--host",
            opt["--host"],
            "--port",
            opt["--port"],
            "--hold-file",
            str(hold_file),
        ]

    return command


def served(runner, pod: str, what: str) -> list[str]:
    """The prompts a server pod logged as `request` or `answered`."""
    return re.findall(rf"standin: {what} '(.*)' n=", runner.logs(pod))


@pytest.mark.timeout(900)  # a hang detector: the whole test takes about a minute
def test_two_replicas_both_serve_and_a_deleted_one_loses_nothing(local_namespace, pod_runner, k8s_api_client, tmp_path):
    from kubernetes import client, utils

    from wrpo_operator.builders import build_spec_configmap, spec_text, stage_children

    ns, run_dir, hold = local_namespace, tmp_path / "run", tmp_path / "release"
    apps, batch, core = (
        client.AppsV1Api(k8s_api_client),
        client.BatchV1Api(k8s_api_client),
        client.CoreV1Api(k8s_api_client),
    )
    spec = spec_of(run_dir)
    (tmp_path / "spec.yaml").write_text(spec_text(spec))  # as the pods read it from the ConfigMap
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "operator")]), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "wrpo.cli",
            "stage",
            "prepare",
            "--spec",
            str(tmp_path / "spec.yaml"),
            "--run-uri",
            str(run_dir),
        ],
        check=True,
        env={**os.environ, **env},
        timeout=300,
    )
    prompts = {
        r.prompt_id
        for split in SPLITS
        for r in read_records(RunDir(str(run_dir)), "prepare", f"{split}.jsonl", PromptRecord)
    }

    runner = pod_runner(
        ns, env_overrides=env, command_map={"wrpo": [sys.executable, "-m", "wrpo.cli"], "vllm": standin_server(hold)}
    )
    kids = stage_children(RUN, ns, spec, "sample-sources", str(run_dir), "h")
    (unit,) = kids.units
    create = [build_spec_configmap(RUN, ns, spec), *unit.servers]
    utils.create_from_yaml(k8s_api_client, yaml_objects=create, namespace=ns)

    # one Deployment of two replicas behind one Service
    (dep,) = [o for o in unit.servers if o["kind"] == "Deployment"]
    (svc,) = [o for o in unit.servers if o["kind"] == "Service"]
    name = dep["metadata"]["name"]
    assert apps.read_namespaced_deployment(name, ns).spec.replicas == 2

    def ready_pods() -> list[str]:
        return sorted(
            p for p, local in runner.pods.items() if p.startswith(name) and local.ready and not local.finished
        )

    first = wait(
        lambda: len(ready_pods()) == 2 and ready_pods(), 120, "both server replicas Ready", seen=runner.log_tails
    )
    utils.create_from_yaml(k8s_api_client, yaml_objects=[unit.runner], namespace=ns)

    # both replicas get requests (each holds them): the client sees both behind the one name
    wait(
        lambda: all(served(runner, p, "request") for p in first),
        120,
        "requests at both replicas",
        seen=lambda: runner.log_tails(10),
    )
    dead, alive = first
    in_flight = served(runner, dead, "request")
    core.delete_namespaced_pod(dead, ns, grace_period_seconds=0)  # its held requests die with it
    wait(lambda: runner.pods[dead].finished, 60, f"pod {dead} killed", seen=runner.log_tails)
    hold.touch()  # now the replicas answer

    job = unit.runner["metadata"]["name"]
    done = wait(lambda: _finished(batch, ns, job), 600, f"Job {job} finished", seen=runner.log_tails)
    assert done == "Complete", runner.log_tails(60)
    (commit,) = kids.runners
    utils.create_from_yaml(k8s_api_client, yaml_objects=[commit], namespace=ns)
    done = wait(
        lambda: _finished(batch, ns, commit["metadata"]["name"]), 300, "the commit Job finished", seen=runner.log_tails
    )
    assert done == "Complete", runner.log_tails(60)

    # nothing the deleted replica held was lost: every prompt answered once, by the replicas that lived
    servers = [p for p in runner.pods if p.startswith(name)]
    answered = [prompt for p in servers for prompt in served(runner, p, "answered")]
    assert not served(runner, dead, "answered") and in_flight
    assert sorted(answered) == sorted(set(answered)) and len(answered) == len(prompts), answered
    assert set(in_flight) <= set(served(runner, alive, "answered")) | {
        a for p in servers if p not in first for a in served(runner, p, "answered")
    }
    records = read_records(RunDir(str(run_dir)), "sample-sources", f"{SOURCE}.jsonl", SampleRecord)
    assert sorted(r.prompt_id for r in records) == sorted(prompts)  # prompts × samples, each prompt once
    assert all(len(r.responses) == SAMPLES for r in records)
    pods = core.list_namespaced_pod(ns, label_selector=f"job-name={job}").items
    assert len(pods) == 1  # the unit's pod retried the requests itself: the Job never restarted it
    # the Service is headless: its name resolves to the Ready replicas (a ClusterIP hides them)
    assert core.read_namespaced_service(svc["metadata"]["name"], ns).spec.cluster_ip == "None"
    print(
        "\nSAMPLING REPLICAS:",
        json.dumps(
            {
                p: {"requests": len(served(runner, p, "request")), "answered": len(served(runner, p, "answered"))}
                for p in servers
            }
        ),
    )


def _finished(batch, ns: str, job: str) -> str | None:
    for c in batch.read_namespaced_job(job, ns).status.conditions or []:
        if c.type in ("Complete", "Failed") and c.status == "True":
            return c.type
    return None
