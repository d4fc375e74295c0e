"""The operator at scale on the cluster harness (docs/operator.md, "Scale"; docs/cluster-harness.md).

A fresh control plane (kwok nodes complete every stage pod after a second), the chart's RBAC in one
namespace, the operator as its ServiceAccount at the chart's default log level, then `--runs` tiny
FusionRuns created at once (a thread pool) and waited for until all Succeeded. Prints one JSON line:

- `all_succeeded`, `seconds` (first create → last Succeeded);
- `operator_rss_mb` (peak, VmHWM) against the 300 MB target;
- `first_child_s` (the run's create returned → its first Job seen by a watch: p50/p95/max) and
  `first_configmap_s`, against the 5 s target;
- `api_requests`: every request the operator's identity made, from the apiserver's audit log (its
  watches and lists as well as reconcile's writes) in total, per run and per stage transition (a stage
  reaching Succeeded: one per stage of the plan per run), and reconcile's writes by verb and kind from its metrics.

    python benchmarks/operator_scale.py [--runs 100] [--nodes 20] [--timeout 2400]

`--dry-run-only` measures admission instead (docs/operator.md, "Admission"): the seconds the operator's
server-side dry run of every child of the paper's 10-source run (manifests/examples/paper-llama3-8b.yaml)
takes, with the operator's thread pool and one at a time (`admission_s`, `serial_s`: best and median of
`--repeat` tries), the children and dry-run requests it makes, and whether the apiserver admitted them all.

    python benchmarks/operator_scale.py --dry-run-only [--repeat 5]

Needs the harness binaries (tests/cluster/build-binaries.sh, WRPO_K8S_BIN). On the 2-core build machine
the control plane, kwok and the operator share the cores: `seconds` is the harness's pace, not the
operator's; `first_child_s` includes the apiserver's queueing under 100 simultaneous creates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

NS, SA = "bench", "wrpo-operator"
TARGET_RSS_MB, TARGET_FIRST_CHILD_S = 300, 5


def audit_policy() -> dict:
    return {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
            "rules": [{"level": "Metadata", "users": [f"system:serviceaccount:{NS}:{SA}"]}, {"level": "None"}]}


def spec(tiny_spec) -> dict:
    """tiny-cpu.yaml; scratch and model downloads on emptyDirs so that the harness's volume provisioner is
    not the bottleneck (the operator's work is the same: the checkpoint PVC is still a child)."""
    return tiny_spec(scratch={"type": "emptyDir", "size": "1Gi"}, modelVolume={"type": "emptyDir", "size": "1Gi"})


def percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {}
    return {"p50": round(statistics.median(values), 2), "p95": round(values[int(0.95 * (len(values) - 1))], 2),
            "max": round(values[-1], 2)}


class Watcher:
    """The first time a watch shows each run's first Job and first ConfigMap (monotonic clock)."""

    def __init__(self, api_client):
        from kubernetes import client

        self.core, self.batch = client.CoreV1Api(api_client), client.BatchV1Api(api_client)
        self.first: dict[str, dict[str, float]] = {"Job": {}, "ConfigMap": {}}
        self.stop = threading.Event()

    def _watch(self, kind: str, list_fn) -> None:
        from kubernetes import watch

        while not self.stop.is_set():
            w = watch.Watch()
            for event in w.stream(list_fn, NS, label_selector="fusion.wrpo.io/run", timeout_seconds=5):
                run = event["object"].metadata.labels.get("fusion.wrpo.io/run")
                self.first[kind].setdefault(run, time.monotonic())

    def start(self) -> Watcher:
        for kind, fn in (("Job", self.batch.list_namespaced_job), ("ConfigMap", self.core.list_namespaced_config_map)):
            threading.Thread(target=self._watch, args=(kind, fn), daemon=True).start()
        return self


class RSS:
    def __init__(self, pid: int):
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def _field(self, name: str) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.samples.append(self._field("VmRSS"))
                self.peak = self._field("VmHWM")
            except OSError:
                return

    def start(self) -> RSS:
        self.peak = 0.0
        threading.Thread(target=self.run, daemon=True).start()
        return self


def audit_counts(path: Path) -> Counter:
    """Requests by (verb, resource): each counted once, a watch when its response started (it may still be
    open), anything else when it completed."""
    counts: Counter = Counter()
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event.get("stage") != ("ResponseStarted" if event.get("verb") == "watch" else "ResponseComplete"):
            continue
        ref = event.get("objectRef") or {}
        counts[(event["verb"], ref.get("resource", event.get("requestURI", "?")))] += 1
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--timeout", type=float, default=2400)
    p.add_argument("--workers", type=int, default=16, help="WRPO_OPERATOR_WORKERS (the chart's default: 16)")
    p.add_argument("--keep", action="store_true", help="keep the control plane's work dir")
    p.add_argument("--dry-run-only", action="store_true", help="time the admission dry run of the paper's run")
    p.add_argument("--repeat", type=int, default=5, help="with --dry-run-only: tries of each")
    args = p.parse_args()
    if args.dry_run_only:
        dry_run_only(args.repeat, args.keep)
        return

    import k8s_harness
    from kubernetes import client
    from operator_harness import CHART, Operator, tiny_spec

    work = Path(tempfile.mkdtemp(prefix="wrpo-scale-"))
    cluster = k8s_harness.start_cluster(work, nodes=args.nodes, audit_policy=audit_policy(), timeout=300)
    api = cluster.api_client()
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    operator = None
    try:
        core.create_namespace({"metadata": {"name": NS, "labels": k8s_harness.RESTRICTED_LABELS}})
        k8s_harness.Helm(cluster).install(SA, CHART, NS, values={"scope": "namespace", "metrics": {"enabled": False}})
        identity = k8s_harness.service_account_identity(cluster, NS, SA, create=False)
        operator = Operator(identity, NS, work / "operator.log", log_level="",
                            env={"WRPO_OPERATOR_WORKERS": str(args.workers)}).start()
        rss = RSS(operator.pid).start()
        watcher = Watcher(api).start()
        body = spec(tiny_spec)
        created: dict[str, float] = {}
        create_s: list[float] = []

        def create(i: int) -> None:
            name = f"run-{i:03d}"
            started = time.monotonic()
            custom.create_namespaced_custom_object("fusion.wrpo.io", "v1alpha1", NS, "fusionruns", {
                "apiVersion": "fusion.wrpo.io/v1alpha1", "kind": "FusionRun", "metadata": {"name": name},
                "spec": body})
            created[name] = time.monotonic()
            create_s.append(created[name] - started)

        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(args.runs)))
        phases: Counter = Counter()
        while time.monotonic() - t0 < args.timeout:
            items = custom.list_namespaced_custom_object("fusion.wrpo.io", "v1alpha1", NS, "fusionruns")["items"]
            phases = Counter((r.get("status") or {}).get("phase", "New") for r in items)
            if phases.get("Succeeded", 0) + phases.get("Failed", 0) == args.runs:
                break
            time.sleep(5)
        seconds = time.monotonic() - t0
        time.sleep(5)  # the last status patches and Events reach the audit log
        metrics = operator.metrics()
        rss.stop.set()
        watcher.stop.set()
        audit = audit_counts(work / "audit.log")
        from wrpo.pipeline.plan import STAGE_NAMES

        transitions = args.runs * len(STAGE_NAMES)
        total = sum(audit.values())
        writes = {k: v for k, v in metrics.items() if k.startswith("wrpo_apiserver_requests_total")}
        first_child = [watcher.first["Job"][n] - t for n, t in created.items() if n in watcher.first["Job"]]
        first_cm = [watcher.first["ConfigMap"][n] - t for n, t in created.items() if n in watcher.first["ConfigMap"]]
        report = {
            "benchmark": "operator_scale", "runs": args.runs, "nodes": args.nodes,
            "all_succeeded": phases.get("Succeeded", 0) == args.runs, "phases": dict(phases),
            "seconds": round(seconds, 1),
            "operator_rss_mb": {"peak": round(rss.peak, 1), "last": round(rss.samples[-1], 1) if rss.samples else None,
                                "target_lt": TARGET_RSS_MB},
            "first_child_s": {**percentiles(first_child), "n": len(first_child), "target_lt": TARGET_FIRST_CHILD_S},
            "first_configmap_s": percentiles(first_cm),
            "fusionrun_create_call_s": percentiles(create_s),  # the apiserver's own pace under the burst
            "api_requests": {
                "total": total, "per_run": round(total / args.runs, 1),
                "per_run_per_stage_transition": round(total / transitions, 2),
                "by_verb": dict(sum((Counter({verb: n}) for (verb, _), n in audit.items()), Counter())),
                "by_verb_resource": {f"{v} {r}": n for (v, r), n in sorted(audit.items())},
                "reconcile_writes": int(sum(writes.values())),
                "reconcile_writes_per_run_per_stage_transition": round(sum(writes.values()) / transitions, 2),
            },
            "apiserver_seconds_per_request": round(metrics.get("wrpo_apiserver_request_seconds_sum", 0)
                                                   / max(metrics.get("wrpo_apiserver_request_seconds_count", 1), 1), 3),
            "workers": args.workers,
            "reconciles": metrics.get('wrpo_reconciles_total{result="ok"}'),
            "reconcile_errors": metrics.get('wrpo_reconciles_total{result="error"}', 0),
        }
        report["met"] = bool(report["all_succeeded"] and rss.peak < TARGET_RSS_MB and first_child
                             and max(first_child) < TARGET_FIRST_CHILD_S)
        print(json.dumps(report))
    finally:
        if operator is not None:
            operator.kill()
        api.close()
        cluster.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work dir kept: {work}", file=sys.stderr)


def dry_run_only(repeat: int, keep: bool) -> None:
    """The admission of the paper's run (`--dry-run-only`), on a fresh control plane with its CRDs."""
    import k8s_harness

    from wrpo.pipeline.spec import load_spec
    from wrpo_operator.admission import WORKERS, dry_run, run_children, template_jobs
    from wrpo_operator.kube import Kube

    work = Path(tempfile.mkdtemp(prefix="wrpo-admission-"))
    cluster = k8s_harness.start_cluster(work, nodes=1, timeout=300)
    api = cluster.api_client()
    try:
        from kubernetes import client

        client.CoreV1Api(api).create_namespace({"metadata": {"name": NS, "labels": k8s_harness.RESTRICTED_LABELS}})
        spec = load_spec(ROOT / "manifests" / "examples" / "paper-llama3-8b.yaml", cluster=True)
        kube = Kube(api)
        timings: dict[int, list[float]] = {WORKERS: [], 1: []}
        refusals: list[str] = []
        for _ in range(repeat):
            for workers in timings:
                started = time.monotonic()
                kids = run_children("wrpo-llama3-8b", NS, spec, "00000000-0000-0000-0000-000000000000")
                refusals = [str(r) for r in dry_run(kube, kids, spec, workers)]
                timings[workers].append(time.monotonic() - started)

        def best_median(values: list[float]) -> dict[str, float]:
            return {"best": round(min(values), 3), "median": round(statistics.median(values), 3)}

        print(json.dumps({
            "benchmark": "operator_scale", "mode": "dry-run-only", "spec": "manifests/examples/paper-llama3-8b.yaml",
            "sources": len(spec.sources), "children": len(kids),
            "requests": len(kids) + sum(len(template_jobs(k)) for k in kids),
            "kinds": dict(Counter(k["kind"] for k in kids)), "workers": WORKERS,
            "admission_s": best_median(timings[WORKERS]), "serial_s": best_median(timings[1]),
            "repeat": repeat, "admitted": not refusals, "refusals": refusals[:3],
        }))
    finally:
        api.close()
        cluster.stop()
        if not keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
