"""The Argo CD health script (manifests/argocd/health-fusionrun.lua) run by a real Lua 5.1 interpreter, as
Argo CD (gopher-lua, Lua 5.1) runs it: lupa's `lupa.lua51`, the PyPI package embedding Lua 5.1.5. The
FusionRuns it reads come from the operator's own reconcile (the in-memory apiserver of
test_operator_reconcile), one per phase and for a stalled and a queued stage."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from test_operator_reconcile import PULL, FakeKube, now, stall_settings, step, tiny_spec

lua51 = pytest.importorskip("lupa.lua51", reason="lupa (pip install lupa) embeds Lua 5.1")
SCRIPT = (Path(__file__).resolve().parents[2] / "manifests" / "argocd" / "health-fusionrun.lua").read_text()


def health(obj: dict) -> tuple[str, str]:
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    assert lua.eval("_VERSION") == "Lua 5.1"
    lua.globals().obj = lua.table_from(copy.deepcopy(obj), recursive=True)
    hs = lua.execute(SCRIPT)
    return hs["status"], hs["message"]


def runs() -> dict[str, dict]:
    """FusionRun objects in every phase, as the operator writes them."""
    out = {}
    kube = FakeKube()
    kube.add_run(tiny_spec())
    out["new"] = kube.run  # no status yet
    step(kube)
    out["Running"] = kube.run
    lagging = kube.run
    lagging["metadata"]["generation"] = 2  # the spec changed; the operator has not seen it
    out["lagging"] = lagging
    kube.add_pod("demo-prepare", "demo-prepare-p", copy.deepcopy(PULL))
    kube.objects[("FusionRun", "demo")]["spec"] = stall_settings()
    step(kube)
    out["Stalled"] = kube.run
    kube.objects[("FusionRun", "demo")]["spec"]["suspend"] = True
    kube.objects[("FusionRun", "demo")]["metadata"]["generation"] = 2
    step(kube)
    out["Suspended"] = kube.run
    done = FakeKube()
    done.add_run(tiny_spec())
    from test_operator_reconcile import walk

    walk(done)
    out["Succeeded"] = done.run
    failed = FakeKube()
    failed.add_run(tiny_spec())
    step(failed)
    failed.finish("Job", "demo-prepare", ok=False)
    step(failed)
    out["Failed"] = failed.run
    queued = FakeKube()
    queued.add_run(tiny_spec(cluster={"training": {"gpus": 1}, "queueName": "gpus"}))
    step(queued)
    out["Queued"] = queued.run
    pending = copy.deepcopy(out["Running"])
    pending["status"].update(phase="Pending", message="waiting to start", stage=None)
    out["Pending"] = pending
    return out


RUNS = runs()
EXPECTED = {
    "new": ("Progressing", "Waiting for the operator to observe the latest spec"),
    "lagging": ("Progressing", "Waiting for the operator to observe the latest spec"),
    "Pending": ("Progressing", "waiting to start"),
    "Running": ("Progressing", "stage prepare (0/11): stage prepare running"),
    "Queued": ("Progressing", "stage prepare (0/11): held by Kueue (queue gpus)"),
    "Stalled": ("Degraded", "stage prepare (0/11): stalled: ImagePullBackOff: pod demo-prepare-p container stage: "
                            'Back-off pulling image "nope:1"'),
    "Suspended": ("Suspended", "suspended before stage prepare"),
    "Succeeded": ("Healthy", "fused model at s3://bkt/runs/demo/wrpo/model/"),
    "Failed": ("Degraded", "stage prepare failed: BackoffLimitExceeded: Job has reached the specified backoff limit"),
}


@pytest.mark.parametrize("case", EXPECTED)
def test_argocd_health_of_a_fusionrun(case):
    run = RUNS[case]
    if case not in ("new", "lagging"):
        assert run["status"]["phase"] == ("Running" if case in ("Stalled", "Queued") else case)
    assert health(run) == EXPECTED[case]


def test_every_phase_is_covered():
    from wrpo_operator.status import FusionRunStatus

    phases = set(FusionRunStatus.model_fields["phase"].annotation.__args__)
    assert phases <= {r["status"]["phase"] for r in RUNS.values() if "status" in r}
    assert now()  # the shared clock moved: these statuses come from reconcile, not from a fixture file
