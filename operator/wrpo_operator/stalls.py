"""Why a stage makes no progress, read from its pods, its Deployments' conditions and the Warning Events on
its Jobs (docs/operator.md, "Stalls"). Pure: Kubernetes objects in, `Stall`s out.

A stall is not a failure: an image can be pushed, a node can be added, a quota raised. `decide` shows it
(the `Stalled` condition, one Warning Event per cause) and fails the stage only after
`cluster.stallTimeoutSeconds`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]

#: Waiting reasons of a container that only a person can fix, folded into one cause each (ErrImagePull and
#: ImagePullBackOff alternate while the kubelet retries: they are one cause, not two).
_WAITING = {
    "ErrImagePull": "ImagePullBackOff", "ImagePullBackOff": "ImagePullBackOff",
    "InvalidImageName": "ImagePullBackOff", "ErrImageNeverPull": "ImagePullBackOff",
    "RegistryUnavailable": "ImagePullBackOff", "SignatureValidationFailed": "ImagePullBackOff",
    "CreateContainerConfigError": "CreateContainerConfigError", "CreateContainerError": "CreateContainerError",
    "RunContainerError": "CreateContainerError", "CrashLoopBackOff": "CrashLoopBackOff",
}
#: Which cause is reported when there are several (the first one here).
ORDER = ("QuotaExceeded", "FailedCreate", "Unschedulable", "ImagePullBackOff", "CreateContainerConfigError",
         "CreateContainerError", "FailedMount", "ContainerCreating", "CrashLoopBackOff", "ServerNotReady",
         "ProgressDeadlineExceeded", "WaitingForGPUBudget")
#: Warning Events that say a controller could not create a pod or a child: Job and ReplicaSet controllers, the
#: training-operator for PyTorchJob pods, Kubeflow Trainer v2 for a TrainJob's JobSet, JobSet for its Jobs
#: and the headless Service it makes before them.
CREATE_FAILURES = ("FailedCreate", "FailedCreatePod", "TrainJobResourcesCreationFailed", "JobCreationFailed",
                   "HeadlessServiceCreationFailed")
#: JobSet's label naming the JobSet of a Job or pod (a TrainJob's JobSet has the TrainJob's name).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
#: Warning Events on a pod whose volumes the kubelet cannot set up (a missing ConfigMap, Secret or PVC).
MOUNT_FAILURES = ("FailedMount", "FailedAttachVolume")
#: Seconds a cause must last before it counts, from when Kubernetes saw it first (`Stall.since`): a pod is
#: briefly unschedulable while its volumes are bound, a volume may be attached late, a ConfigMap or Secret
#: created a moment after the pod, and a large image takes a while to unpack.
GRACE = {"Unschedulable": 30, "FailedMount": 60, "CreateContainerConfigError": 60, "ContainerCreating": 300}
#: Labels naming the runner on its pods, checked in order: JobSet's (a TrainJob's JobSet has the TrainJob's
#: name; its pods carry their Job's name too), the training-operator's (PyTorchJob), the Job controller's.
JOB_NAME_LABELS = (JOBSET_NAME_LABEL, "training.kubeflow.org/job-name", "batch.kubernetes.io/job-name", "job-name")
#: The Job controller's labels naming a pod's own Job.
BATCH_JOB_LABELS = ("batch.kubernetes.io/job-name", "job-name")


@dataclass(frozen=True)
class Stall:
    reason: str  # one of ORDER
    subject: str  # "pod <name> container <name>", "Deployment <name>", "Job <name>"
    message: str
    since: str | None = None  # when Kubernetes saw it first (RFC 3339), where it says
    grace: float | None = None  # seconds it must last from `since` before it counts (None: GRACE's)

    @property
    def text(self) -> str:
        return f"{self.subject}: {self.reason}: {self.message}".rstrip(": ")


def _conditions(obj: Obj) -> dict[str, Obj]:
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}


def create_failure_reason(message: str) -> str:
    """A refused pod (or child) creation: a ResourceQuota, or anything else (PodSecurity, a missing
    PriorityClass, a webhook)."""
    return "QuotaExceeded" if "exceeded quota" in message else "FailedCreate"


def pod_stalls(pod: Obj) -> list[Stall]:
    """Unschedulable (with the scheduler's message), image pulls, container config errors and crash loops
    (with the last termination reason, e.g. OOMKilled) of one pod."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
        return []
    name = meta.get("name", "?")
    out = []
    scheduled = _conditions(pod).get("PodScheduled")
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        out.append(Stall("Unschedulable", f"pod {name}", scheduled.get("message", ""),
                         scheduled.get("lastTransitionTime")))
    for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        cause = _WAITING.get(waiting.get("reason", ""))
        since = None
        if cause in GRACE or waiting.get("reason") == "ContainerCreating":
            cause = cause or "ContainerCreating"
            since = _scheduled_at(pod)  # the kubelet's tries begin once the pod is on a node
        if cause is None or (cause == "ContainerCreating" and since is None):
            continue  # (no time to measure ContainerCreating from: not a stall yet)
        message = waiting.get("message") or waiting.get("reason", "")
        if cause == "ContainerCreating":
            message = "containers not started"
        if cause == "CrashLoopBackOff":
            last = (cs.get("lastState") or {}).get("terminated") or {}
            message = (f"last exit {last.get('reason', 'Error')} (exit code {last.get('exitCode', '?')}), "
                       f"{cs.get('restartCount', 0)} restarts")
        out.append(Stall(cause, f"pod {name} container {cs.get('name', '?')}", message, since))
    return out


def _scheduled_at(pod: Obj) -> str | None:
    scheduled = _conditions(pod).get("PodScheduled") or {}
    if scheduled.get("status") == "True" and scheduled.get("lastTransitionTime"):
        return scheduled["lastTransitionTime"]
    return (pod.get("status") or {}).get("startTime")


def mount_stalls(pod: Obj, events: list[Obj]) -> list[Stall]:
    """FailedMount (or FailedAttachVolume) Warning Events on a pod whose containers have not started: the
    kubelet's message names the volume and what is missing. Counts after GRACE from the first such Event."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") not in (None, "Pending"):
        return []
    mine = sorted((e for e in events if e.get("reason") in MOUNT_FAILURES
                   and (e.get("involvedObject") or {}).get("uid") == meta.get("uid")),
                  key=lambda e: e.get("lastTimestamp") or "")
    if not mine:
        return []
    first_seen = mine[0].get("firstTimestamp") or mine[0].get("lastTimestamp") or None
    return [Stall("FailedMount", f"pod {meta.get('name', '?')}", mine[-1].get("message", ""), first_seen)]


def server_not_ready(pod: Obj, budget_s: int) -> list[Stall]:
    """A vLLM server pod whose container runs but is not Ready `budget_s` after the pod became not Ready
    (its `Ready` condition; else the container's start), `budget_s` being its startup budget: the startup
    probe's initialDelaySeconds + failureThreshold × periodSeconds. Counted from the condition, not the
    container, so a container the startup probe restarts does not reset the clock."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running":
        return []
    ready = _conditions(pod).get("Ready") or {}
    not_ready_since = ready.get("lastTransitionTime") if ready.get("status") == "False" else None
    out = []
    for cs in status.get("containerStatuses") or []:
        started = ((cs.get("state") or {}).get("running") or {}).get("startedAt")
        if started and not cs.get("ready"):
            started = min(started, not_ready_since or started)
            out.append(Stall("ServerNotReady", f"pod {meta.get('name', '?')} container {cs.get('name', '?')}",
                             f"not Ready {budget_s}s after it started (the startup probe's budget), "
                             f"{cs.get('restartCount', 0)} restarts", started,
                             budget_s))
    return out


def job_pods(job: Obj, pods: list[Obj]) -> list[Obj]:
    """The pods of one Job or PyTorchJob: by the label its controller sets (JOB_NAME_LABELS), else (a pod
    without one) by its template's labels."""
    name = (job.get("metadata") or {}).get("name")
    wanted = [(t.get("metadata") or {}).get("labels") or {} for t in _templates(job)]
    out = []
    for p in pods:
        labels = (p.get("metadata") or {}).get("labels") or {}
        owner = next((labels[k] for k in JOB_NAME_LABELS if k in labels), None)
        if owner == name or (owner is None and any(w and w.items() <= labels.items() for w in wanted)):
            out.append(p)
    return out


def _templates(job: Obj) -> list[Obj]:
    spec = job.get("spec") or {}
    if job.get("kind") == "PyTorchJob":
        return [r.get("template") or {} for r in (spec.get("pytorchReplicaSpecs") or {}).values()]
    return [spec.get("template") or {}]


def pod_queued(pod: Obj) -> bool:
    """Held by a queue (Kueue's scheduling gate), not stalled."""
    scheduled = _conditions(pod).get("PodScheduled") or {}
    return bool((pod.get("spec") or {}).get("schedulingGates")) or scheduled.get("reason") == "SchedulingGated"


def deployment_stalls(dep: Obj) -> list[Stall]:
    """ProgressDeadlineExceeded, and ReplicaFailure (its ReplicaSet could not create a pod: a quota,
    PodSecurity admission)."""
    name = (dep.get("metadata") or {}).get("name", "?")
    conds = _conditions(dep)
    out = []
    failure = conds.get("ReplicaFailure")
    if failure and failure.get("status") == "True":
        message = failure.get("message", "")
        out.append(Stall(create_failure_reason(message), f"Deployment {name}", message))
    progressing = conds.get("Progressing")
    if progressing and progressing.get("status") == "False" and progressing.get("reason") == "ProgressDeadlineExceeded":
        out.append(Stall("ProgressDeadlineExceeded", f"Deployment {name}", progressing.get("message", "")))
    return out


def starved_jobs(runner: Obj, jobs: list[Obj], pods: list[Obj]) -> list[Obj]:
    """The unfinished Jobs JobSet made for a TrainJob `runner` (`jobs`: Jobs labelled with the run's UID whose
    controller is not the run) that have fewer pods than their parallelism, not counting failed ones: a pod the
    apiserver refused is missing there (the Job controller retries it, and says why only in a FailedCreate
    Event)."""
    if runner.get("kind") != "TrainJob":
        return []
    name = (runner.get("metadata") or {}).get("name")
    out = []
    for job in jobs:
        meta = job.get("metadata") or {}
        conds = _conditions(job)
        if ((meta.get("labels") or {}).get(JOBSET_NAME_LABEL) != name or meta.get("deletionTimestamp")
                or any((conds.get(t) or {}).get("status") == "True" for t in ("Complete", "Failed"))):
            continue  # not this TrainJob's, or on its way out (JobSet makes a new one to restart)
        mine = [p for p in pods if (p.get("status") or {}).get("phase") != "Failed" and meta.get("name")
                in (((p.get("metadata") or {}).get("labels") or {}).get(k) for k in BATCH_JOB_LABELS)]
        if len(mine) < ((job.get("spec") or {}).get("parallelism") or 1):
            out.append(job)
    return out


def event_stalls(events: list[Obj]) -> list[Stall]:
    """Pod (or child) creation refused, from Warning Events on a Job, PyTorchJob, TrainJob or JobSet's Job
    (their only trace: the Job controller sets no condition for it)."""
    out = []
    for e in sorted(events, key=lambda e: e.get("lastTimestamp") or ""):
        if e.get("reason") in CREATE_FAILURES:
            obj = e.get("involvedObject") or {}
            message = e.get("message", "")
            out.append(Stall(create_failure_reason(message), f"{obj.get('kind', '?')} {obj.get('name', '?')}",
                             message))
    return out[-1:]  # the latest says what blocks it now


def first(stalls: list[Stall]) -> Stall | None:
    """The cause to report: by ORDER, then by subject (deterministic)."""
    if not stalls:
        return None
    return min(stalls, key=lambda s: (ORDER.index(s.reason) if s.reason in ORDER else len(ORDER), s.subject))


def termination_detail(pods: list[Obj]) -> str | None:
    """`pod P container C: OOMKilled (exit code 137)` of the latest failed container, to say why a Job
    gave up."""
    found = []
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "?")
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            for state in ((cs.get("state") or {}).get("terminated"), (cs.get("lastState") or {}).get("terminated")):
                if state and state.get("exitCode", 0) != 0:
                    found.append((state.get("finishedAt") or "", name, cs.get("name", "?"), state))
    if not found:
        return None
    _, pod, container, state = max(found, key=lambda f: f[0])
    return f"pod {pod} container {container}: {state.get('reason', 'Error')} (exit code {state.get('exitCode')})"
