"""FusionRuns driven as users drive them: the harness's kubectl (built from the same Kubernetes modules as
the control plane, tests/cluster/build-binaries.sh) against the operator — apply (client- and server-side)
of every example manifest, `get` with the printer columns, `describe` with the Events, `wait` for the
Succeeded condition, `explain` with the field descriptions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from operator_harness import wait_events

from wrpo.pipeline.plan import STAGE_NAMES

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))


def names(path: Path) -> list[str]:
    return [d["metadata"]["name"] for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "FusionRun"]


def test_every_example_applies_client_and_server_side(kubectl, operator, k8s_namespace):
    """Into a namespace the operator does not watch: only the apiserver's side (schema, CEL, defaults) acts."""
    ns = k8s_namespace
    for path in EXAMPLES:
        out = kubectl("apply", "-n", ns, "-f", str(path)).stdout
        for name in names(path):
            assert f"fusionrun.fusion.wrpo.io/{name} created" in out, out
        again = kubectl("apply", "-n", ns, "-f", str(path)).stdout
        assert "unchanged" in again, again  # the apiserver's defaults do not fight the last-applied state
        kubectl("delete", "-n", ns, "-f", str(path), "--wait=true")
        out = kubectl("apply", "--server-side", "--field-manager=gitops", "-n", ns, "-f", str(path)).stdout
        for name in names(path):
            assert f"fusionrun.fusion.wrpo.io/{name} serverside-applied" in out, out
            obj = json.loads(kubectl("get", "fr", name, "-n", ns, "-o", "json", "--show-managed-fields").stdout)
            managers = {m["manager"] for m in obj["metadata"]["managedFields"]}
            assert "gitops" in managers
    # the generated CRD itself applies server-side over the chart's copy (no conflict: same content)
    crd = ROOT / "manifests" / "crd" / "fusionruns.fusion.wrpo.io.yaml"
    out = kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd)).stdout
    assert "customresourcedefinition.apiextensions.k8s.io/fusionruns.fusion.wrpo.io serverside-applied" in out


def test_a_user_applies_waits_gets_and_describes_a_run(kubectl, operator, run_namespace, apis):
    ns = run_namespace
    tiny = ROOT / "manifests" / "examples" / "tiny-cpu.yaml"
    kubectl("apply", "-n", ns, "-f", str(tiny))
    kubectl("wait", "-n", ns, "--for=condition=Succeeded", "fr/tiny", "--timeout=300s", timeout=330)
    wait_events(apis[3], ns, "tiny", {"RunSucceeded"}, 120, operator)
    table = kubectl("get", "fr", "-n", ns).stdout.splitlines()
    assert re.split(r"\s{2,}", table[0].strip()) == ["NAME", "PHASE", "STAGE", "PROGRESS", "UNITS",
                                                      "FUSED-VS-TARGET", "AGE"]
    row = table[1].split()
    # no current stage, no units running; kwok's pods leave no eval summary: those columns are empty
    assert row[:3] == ["tiny", "Succeeded", f"{len(STAGE_NAMES)}/{len(STAGE_NAMES)}"], table
    wide = kubectl("get", "fusionruns", "-n", ns, "-o", "wide").stdout
    assert "OUTPUT" in wide and "s3://wrpo/runs/tiny/wrpo/model/" in wide
    described = kubectl("describe", "fr", "tiny", "-n", ns).stdout
    events = described[described.index("Events:"):]
    for reason in ("StageStarted", "StageSucceeded", "RunSucceeded"):
        assert reason in events, events
    assert "stage wrpo committed: s3://wrpo/runs/tiny/wrpo/" in events
    assert "Stalled" in described and "Phase:" in described


def test_explain_shows_the_field_descriptions(kubectl, operator):
    out = kubectl("explain", "fusionrun.spec.wrpo").stdout
    assert "Weighted-reward preference optimisation" in out
    assert re.search(r"beta\s+<number>", out) and "β of DPO/SimPO." in out
    cluster = kubectl("explain", "fusionrun.spec.cluster.stallTimeoutSeconds").stdout
    assert "Fail the stage when its pods stay stalled" in cluster
    status = kubectl("explain", "fusionrun.status.conditions.type").stdout
    assert "ENUM" in status and "Stalled" in status
