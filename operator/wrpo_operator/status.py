"""`.status` of a FusionRun: its schema (a pydantic model, from which the CRD's status schema is
generated) and pure functions that read children and pods and derive phase, conditions, transitions and
the summary a stage's pod reports (status.eval, for the plan row whose `summary` names it)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AliasGenerator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from wrpo.pipeline.plan import STAGES
from wrpo_operator import LABEL_STAGE, LABEL_STAGE_HASH

Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
StageState = Literal["Pending", "Waiting", "Queued", "Running", "Succeeded", "Failed"]
CONDITION_TYPES = ("Ready", "Progressing", "Succeeded", "Failed", "Suspended", "Stalled")
#: Leading characters of a stage hash kept in status and in children's labels.
HASH_PREFIX = 16


class _Status(BaseModel):
    model_config = ConfigDict(
        alias_generator=AliasGenerator(alias=to_camel), populate_by_name=True, extra="ignore",
    )


Timestamp = str  # RFC 3339, UTC ("2025-01-31T12:00:00Z")


class Condition(_Status):
    """A standard Kubernetes condition (GitOps tools such as Argo CD read these)."""

    type: Literal["Ready", "Progressing", "Succeeded", "Failed", "Suspended", "Stalled", "SpecInvalid"]
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(description="CamelCase reason of the last transition.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: Timestamp = Field(description="When status last changed.")
    observed_generation: int | None = Field(default=None, description="The .metadata.generation it reflects.")


class StallStatus(_Status):
    """Why the stage makes no progress (docs/operator.md, "Stalls")."""

    reason: str = Field(description="ImagePullBackOff, CrashLoopBackOff, Unschedulable, QuotaExceeded, ...")
    subject: str = Field(description="The pod and container, Deployment or Job it was seen on.")
    message: str = Field(default="", description="What Kubernetes said.")
    since: Timestamp = Field(description="When the stage became stalled (the timeout counts from here).")


class StageStatus(_Status):
    """One stage of the pipeline as the operator last saw it."""

    name: str = Field(description="Stage name (wrpo.pipeline.plan.STAGE_NAMES).")
    state: StageState = Field(
        default="Pending", description="Pending, Waiting (for servers), Queued (held by Kueue), Running, ...")
    hash: str | None = Field(default=None, description="Prefix of the stage hash it ran (or runs) with.")
    start_time: Timestamp | None = Field(default=None, description="When its first child was created.")
    completion_time: Timestamp | None = Field(default=None, description="When it succeeded or failed.")
    message: str | None = Field(default=None, description="Why it is in this state.")
    output_uri: str | None = Field(default=None, description="<run>/<stage>/ once committed.")
    retries: int = Field(default=0, description="Failed pods so far (retried up to cluster.backoffLimit).")
    stall: StallStatus | None = Field(default=None, description="Set while the stage is stalled.")
    waiting_since: Timestamp | None = Field(default=None, description="When it began to wait for "
                                            "cluster.gpuBudget, while it waits (WaitingForGPUBudget counts from here).")
    units: str | None = Field(default=None, description="Units done / all units, for a stage made of units "
                              "(sample-sources: one per source), e.g. 4/10.")


class EvalSummary(_Status):
    """The eval stage's key figures (win rates in %), from its pod's termination message (docs/eval.md)."""

    prompts: int | None = Field(default=None, description="Evaluation prompts answered.")
    fused_vs_target: float | None = Field(default=None, description="Win rate of the fused model against the "
                                          "original target (%): the reward model's, or the LLM judge's when "
                                          "there is no reward model.")
    fused_vs_sft: float | None = Field(default=None, description="Reward-model win rate against Target-SFT (%).")
    lc_fused_vs_target: float | None = Field(default=None, description="Length-controlled win rate (%).")
    judge_fused_vs_target: float | None = Field(default=None, description="LLM-judge win rate against the target (%).")
    hash: str | None = Field(default=None, description="Prefix of the eval stage hash these figures belong to.")


class TrainingStatus(_Status):
    """How the run's SFT/WRPO stages are run (docs/operator.md, "Training backends")."""

    backend: Literal["pytorchjob", "trainjob"] = Field(description=(
        "The resolved cluster.training.backend: pytorchjob (kubeflow.org/v1 PyTorchJob) or trainjob "
        "(trainer.kubeflow.org/v1alpha1 TrainJob); `auto` is resolved once per run from what the apiserver "
        "serves."))


class FusionRunStatus(_Status):
    """Observed state of a FusionRun."""

    phase: Phase = Field(default="Pending", description="Pending, Running, Suspended, Succeeded or Failed.")
    stage: str | None = Field(default=None, description="The stage running now (or the one that failed).")
    progress: str | None = Field(default=None, description="Committed stages / all stages, e.g. 3/10.")
    message: str | None = Field(default=None, description="Human-readable summary.")
    units: str | None = Field(default=None, description="The current stage's units done / all, e.g. 4/10.")
    observed_generation: int | None = Field(default=None, description="The generation last reconciled.")
    run_uri: str | None = Field(default=None, description="The run directory.")
    output_uri: str | None = Field(default=None, description="The fused model (<run>/wrpo/model/), once Succeeded.")
    start_time: Timestamp | None = Field(default=None, description="When the first stage started.")
    completion_time: Timestamp | None = Field(default=None, description="When the run succeeded or failed.")
    stages: list[StageStatus] = Field(default_factory=list, description="Every stage in pipeline order.")
    eval: EvalSummary | None = Field(default=None, description="Did the fusion help? The eval stage's summary.")
    training: TrainingStatus | None = Field(default=None, description="The training backend the run uses.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Progressing, ..., Stalled, and "
                                        "SpecInvalid when the apiserver refused a child at admission.")
    admitted_hash: str | None = Field(default=None, description="The spec hash whose children the apiserver "
                                      "admitted in a dry run (docs/operator.md, \"Admission\").")
    refused_hash: str | None = Field(default=None, description="The spec hash whose children it refused.")


def timestamp(now: datetime) -> Timestamp:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype and c.get("status") == "True":
            return c
    return None


def job_state(job: dict[str, Any]) -> tuple[StageState, str | None, int]:
    """(state, message, failed pods) of a batch/v1 Job, a kubeflow.org/v1 PyTorchJob or a
    trainer.kubeflow.org/v1alpha1 TrainJob; `Queued` while it is suspended (Kueue admits it by resuming it)."""
    st, spec = job.get("status") or {}, job.get("spec") or {}
    if job.get("kind") == "TrainJob":  # Trainer v2: Complete/Failed mirror its JobSet's
        failed = sum((j or {}).get("failed", 0) for j in st.get("jobsStatus") or [])
        done, bad = _condition(job, "Complete"), _condition(job, "Failed")
        suspended = spec.get("suspend")
    elif job.get("kind") == "PyTorchJob":
        failed = sum((r or {}).get("failed", 0) for r in (st.get("replicaStatuses") or {}).values())
        done, bad = _condition(job, "Succeeded"), _condition(job, "Failed")
        suspended = (spec.get("runPolicy") or {}).get("suspend")
    else:
        failed = st.get("failed", 0)
        done, bad = _condition(job, "Complete"), _condition(job, "Failed")
        suspended = spec.get("suspend")
    if done:
        return "Succeeded", None, failed
    if bad:
        return "Failed", f"{bad.get('reason', 'Failed')}: {bad.get('message', '')}".rstrip(": "), failed
    if suspended:
        return "Queued", None, failed
    return "Running", None, failed


def deployment_ready(dep: dict[str, Any]) -> bool:
    return ((dep.get("status") or {}).get("availableReplicas") or 0) >= 1


def derive_conditions(phase: Phase, message: str, generation: int, old: list[dict[str, Any]],
                      now: datetime, stall: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The six conditions for `phase` (and the current stage's stall); lastTransitionTime moves only when a
    condition's status does."""
    truth = {
        "Ready": phase == "Succeeded",
        "Progressing": phase in ("Pending", "Running"),
        "Succeeded": phase == "Succeeded",
        "Failed": phase == "Failed",
        "Suspended": phase == "Suspended",
        "Stalled": stall is not None,
    }
    before = {c["type"]: c for c in old}
    out = []
    for ctype in CONDITION_TYPES:
        status = "True" if truth[ctype] else "False"
        prev = before.get(ctype)
        since = prev["lastTransitionTime"] if prev and prev.get("status") == status else timestamp(now)
        reason, text = phase, message
        if ctype == "Stalled" and stall is not None:
            reason, text = stall["reason"], f"{stall['subject']}: {stall['message']}"
        out.append({"type": ctype, "status": status, "reason": reason, "message": text,
                    "lastTransitionTime": since, "observedGeneration": generation})
    refused = before.get("SpecInvalid")
    if refused is not None:  # the spec was refused once and fixed since: False, so `kubectl wait` can see it
        fixed = refused.get("status") == "False"
        out.append({"type": "SpecInvalid", "status": "False", "reason": "Admitted",
                    "message": "the apiserver admitted every child of the current spec (dry run)",
                    "lastTransitionTime": refused["lastTransitionTime"] if fixed else timestamp(now),
                    "observedGeneration": generation})
    return out


def transitions(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Kubernetes Events (type, reason, message) for what changed between two statuses."""
    events: list[tuple[str, str, str]] = []
    before = {s["name"]: s for s in old.get("stages") or []}
    for s in new.get("stages") or []:
        events += _stall_events(s, (before.get(s["name"]) or {}).get("stall"))
        prev = (before.get(s["name"]) or {}).get("state", "Pending")
        if s["state"] == prev:
            continue
        if s["state"] == "Running" or (prev in ("Pending", "Waiting", "Queued") and (
                s["state"] == "Succeeded" or (s["state"] == "Failed" and s.get("retries")))):
            # a stage that ran to its end while no operator watched still gets its StageStarted; one that
            # failed before a pod of it ran (a deadline while waiting, a refused child, a stall) does not
            events.append(("Normal", "StageStarted", f"stage {s['name']} started"))
        if s["state"] == "Waiting":
            events.append(("Normal", "StageWaiting", f"stage {s['name']}: {s.get('message') or 'waiting'}"))
        elif s["state"] == "Queued":
            events.append(("Normal", "StageQueued", f"stage {s['name']}: {s.get('message') or 'queued'}"))
        elif s["state"] == "Succeeded":
            events.append(("Normal", "StageSucceeded", f"stage {s['name']} committed: {s.get('outputUri')}"))
        elif s["state"] == "Failed":
            events.append(("Warning", "StageFailed", f"stage {s['name']} failed: {s.get('message')}"))
    phase, prev_phase = new.get("phase"), old.get("phase")
    if phase != prev_phase:
        kind = "Warning" if phase == "Failed" else "Normal"
        reason = {"Succeeded": "RunSucceeded", "Failed": "RunFailed", "Suspended": "Suspended"}.get(
            phase, "Resumed" if prev_phase == "Suspended" else "Running")
        events.append((kind, reason, new.get("message") or f"run is {phase}"))
    return events


def _stall_events(stage: dict[str, Any], prev: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """One Warning Event per cause (reason and subject): a cause that stays gets none, a new one gets one."""
    now = stage.get("stall")
    key = (now or {}).get("reason"), (now or {}).get("subject")
    if now and key != ((prev or {}).get("reason"), (prev or {}).get("subject")):
        text = f"{now['subject']}: {now['reason']}: {now.get('message', '')}".rstrip(": ")
        return [("Warning", "StageStalled", f"stage {stage['name']}: {text}")]
    if prev and not now and stage.get("state") not in ("Failed", "Pending"):
        return [("Normal", "StallCleared", f"stage {stage['name']}: {prev['reason']} resolved")]
    return []


#: summary key of `wrpo stage eval` → status.eval field
_EVAL_KEYS = {"prompts": "prompts", "fused_vs_target": "fusedVsTarget", "fused_vs_sft": "fusedVsSft",
              "lc_fused_vs_target": "lcFusedVsTarget", "judge_fused_vs_target": "judgeFusedVsTarget"}


def eval_summary(pods: list[dict[str, Any]], stage_hash: str) -> dict[str, Any] | None:
    """status.eval from the eval stage's pods: the termination message (`wrpo stage` writes its JSON line
    there) of a container that exited 0; None when no such message can be read."""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            done = ((cs.get("state") or {}).get("terminated")) or {}
            if done.get("exitCode") != 0 or not done.get("message"):
                continue
            try:
                summary = json.loads(done["message"]).get("summary") or {}
            except (ValueError, AttributeError):
                continue
            out = {_EVAL_KEYS[k]: v for k, v in summary.items() if k in _EVAL_KEYS and isinstance(v, int | float)}
            return {**out, "hash": stage_hash}
    return None


#: Seconds before reading a stage pod's termination message again (see `read_summaries`), and for how long
#: after the stage succeeded it is tried.
SUMMARY_RETRY_S, SUMMARY_PATIENCE_S = 2.0, 120.0


def read_summaries(pods: list[dict[str, Any]], old: dict[str, Any], status: dict[str, Any], now: datetime) -> bool:
    """Fill status.<summary> of every plan row with a `summary` (status.eval): kept while the stage's hash is
    unchanged, else read from its pods' termination message once it succeeded (docs/operator.md, "Status");
    the pods come from the watch cache. True when a stage succeeded lately and no summary could be read yet
    (the Job's completion can reach the watch before its pod's message: the caller looks again soon)."""
    again = False
    entries = {s["name"]: s for s in status["stages"]}
    for row in STAGES:
        entry = entries.get(row.name)
        if row.summary is None or entry is None or entry["state"] != "Succeeded":
            continue
        if (old.get(row.summary) or {}).get("hash") == entry["hash"]:
            status[row.summary] = old[row.summary]
            continue
        mine = [p for p in pods if (p["metadata"].get("labels") or {}).get(LABEL_STAGE) == row.name
                and p["metadata"]["labels"].get(LABEL_STAGE_HASH) == entry["hash"]]
        found = eval_summary(mine, entry["hash"])
        if found is not None:
            status[row.summary] = found
            continue
        done = entry.get("completionTime")
        again = again or (bool(done) and (now - parse_time(done)).total_seconds() < SUMMARY_PATIENCE_S)
    return again
