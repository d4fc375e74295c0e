"""Memory and speed of the data stages at the paper's scale and beyond (docs/data.md, "Scale").

Fabricates a committed run with the project's own commit code (`StageWriter`: prompts, the sampling
shards and their markers, the `sft` stage) at each size - `--prompts` prompts (default 1k, 10k, 60k;
`--full` adds 600k) × `--sources` sources (10) × `--n` answers (5) of 1-2 KB - and then runs each data
stage as its pod would (`run_stage`) in a fresh process: sample-sources and sample-target (every
sampling shard is committed, so only the assembly runs; no server is asked), score-sources and
score-target (a stand-in scorer instead of the reward model: the scorer is the one part that needs a
model, this measures everything around it), select-sources and build-pairs. Each stage prints one JSON
line: prompts, wall and CPU seconds (`wait4`), peak RSS of its process (VmHWM, read by the process
itself as it exits: `ru_maxrss` of a child also counts its parent's RSS at the fork), records/s
(answers the stage read per CPU second) and `rss_growth_mb_per_10k_prompts` against the smallest size.
The run is fabricated in a process of its own too, so the stages' parent stays small.

The data goes under `--tmp` (default: the system's temp dir; 60k prompts need ~10 GB free) and is
deleted after each size. With `--s3-endpoint URL --bucket NAME` (credentials from the environment) the
run lives on S3 instead, and each line also counts the stage's S3 requests by operation
(`s3_requests`) and its GETs per source unit (`gets_per_source`).

`--shards K` runs select-sources and build-pairs as K shard processes (`--shard i/K`, docs/data.md
"Shards"), one after another; their line adds `shards`, every shard's CPU seconds and peak RSS
(`peak_rss_mb` is the largest; the last shard also assembles the parts). `--cli` runs those two stages
as their pod does, `wrpo stage NAME --spec ... --run-uri ...` (the real command line, in a process of
its own under `/usr/bin/time`, whose maximum RSS is the peak RSS; no request counts then).

    python benchmarks/data_scale.py [--prompts 1000,10000,60000] [--full] [--sources 10] [--n 5]
                                    [--s3-endpoint URL --bucket NAME] [--shards K] [--cli]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

STAGES = ("sample-sources", "score-sources", "select-sources", "sample-target", "score-target", "build-pairs")
ENDPOINT = "http://127.0.0.1:9/v1"  # never asked: every sampling shard is committed


def make_spec(sources: int, n: int, eval_size: int):
    from wrpo.pipeline.spec import parse_spec

    return parse_spec({
        "target": {"model": "/models/target"},
        "sources": [{"name": f"src{i}", "endpoint": {"url": ENDPOINT, "model": f"src{i}"}} for i in range(sources)],
        "reward": {"type": "sequence-classification", "model": "/models/reward"},
        "dataset": {"uri": "/data/prompts.jsonl", "evalSize": eval_size},
        "sampling": {"n": n},
    })


def _answers(rng: random.Random, pool: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        size = rng.randint(1000, 2000)
        start = rng.randrange(len(pool) - size)
        out.append(pool[start:start + size])
    return out


def _sample_line(pid: str, model: str, answers: list[str], params: dict, server_model: str) -> bytes:
    rec = {"prompt_id": pid, "model": model, "responses": answers, "finish_reasons": ["stop"] * len(answers),
           "sampling": params | {"server_model": server_model}}
    return (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def run_dir(root: str, endpoint: str | None):
    from wrpo.pipeline.rundir import RunDir
    from wrpo.storage import S3Options

    return RunDir(root, S3Options(endpoint_url=endpoint) if endpoint else None)


def fabricate(root: str, prompts: int, sources: int, n: int, endpoint: str | None = None) -> dict:
    """A run with prepare and sft committed and every sampling shard of both sampling stages committed,
    byte for byte as the stages write them (records.dump_jsonl's format, StageWriter's commits)."""
    from wrpo.data.sampling import SamplingParams, shard_key
    from wrpo.pipeline.plan import servers, stage_hashes
    from wrpo.records import PromptRecord, dump_jsonl

    eval_size = max(1, prompts // 100)
    spec = make_spec(sources, n, eval_size)
    hashes = stage_hashes(spec)
    run = run_dir(root, endpoint)
    rng = random.Random(0)
    pool = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz      .,") for _ in range(1 << 16))
    ids = [f"p{i:07d}" for i in range(prompts)]
    n_sft = prompts // 3
    split = {"sft": ids[:n_sft], "po": ids[n_sft:prompts - eval_size], "eval": ids[prompts - eval_size:]}
    records = {pid: PromptRecord(prompt_id=pid, prompt=[{"role": "user", "content": f"question {pid}: "
                                                         + pool[i % 60000:i % 60000 + 200]}])
               for i, pid in enumerate(ids)}
    out = run.stage("prepare").writer()
    for name, pids in split.items():
        out.put_text(f"{name}.jsonl", dump_jsonl(records[p] for p in pids))
    out.commit(hashes["prepare"])
    out = run.stage("sft").writer()
    out.put_text("model/config.json", "{}\n")
    out.commit(hashes["sft"])

    params = SamplingParams.from_spec(spec.sampling)
    size = spec.sampling.shard_size
    order = split["sft"] + split["po"] + split["eval"]
    target = servers(spec, "sample-target", root)[0].served_name
    groups = [(s.name, s.name, s.name, order) for s in spec.sources]
    groups.append(("target", target, target, split["po"] + split["eval"]))
    sd = run.stage("sample-sources")
    data_bytes = 0
    for file, model, backend_model, pids in groups:
        sd = run.stage("sample-target" if file == "target" else "sample-sources")
        w = sd.writer()
        for index, start in enumerate(range(0, len(pids), size)):
            chunk = pids[start:start + size]
            data = b"".join(_sample_line(p, model, _answers(rng, pool, n), params.to_json(), backend_model)
                            for p in chunk)
            data_bytes += len(data)
            key = shard_key(model, backend_model, params, [records[p] for p in chunk])
            w.commit_shard(file, index, data, key, {"prompts": len(chunk)})
    return {"prompts": prompts, "sample_data_mb": round(data_bytes / 2**20, 1)}


class StandInScorer:
    """The reward model's place in score-sources/score-target: a cheap score from the text (ties
    included), so that the benchmark measures everything the scoring stage does around the model."""

    name = "stand-in"

    def score(self, pairs):
        from wrpo.data.scoring import Score

        return [Score(float(len(text) % 97) / 8) for _, text in pairs]


def child(stage: str, root: str, sources: int, n: int, prompts: int, endpoint: str | None = None,
          report: str | None = None, shard: str | None = None) -> None:
    """Run one stage as its pod would (run_stage), with the stand-in scorer for the scoring stages;
    write its peak RSS and (on S3) its requests by operation into `report`."""
    import wrpo.data.stages as stages
    import wrpo.storage
    from wrpo.pipeline.context import StageOptions
    from wrpo.pipeline.runtime import run_stage

    requests: Counter[str] = Counter()
    init = wrpo.storage.S3Backend.__init__

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.client.meta.events.register("before-call.s3", lambda model, **_: requests.update([model.name]))

    wrpo.storage.S3Backend.__init__ = counting_init

    @contextmanager
    def stand_in(ctx):
        yield StandInScorer()

    stages.reward_scorer = stand_in
    spec = make_spec(sources, n, max(1, prompts // 100))
    i, k = (int(x) for x in shard.split("/")) if shard else (0, 1)
    options = StageOptions(endpoints={s.name: ENDPOINT for s in spec.sources}, target_endpoint=ENDPOINT,
                           workdir=tempfile.mkdtemp() if endpoint else os.path.join(root, "_work"), shard=(i, k))
    result = run_stage(spec, run_dir(root, endpoint), stage, options)
    if result.status != ("done" if i == k - 1 else "partial"):
        raise SystemExit(f"{stage}: {result.status}")
    if report:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        hwm_kb = int(status["VmHWM"].split()[0])
        Path(report).write_text(json.dumps({"peak_rss_mb": round(hwm_kb / 1024, 1), "requests": dict(requests)}))


SHARDED = ("select-sources", "build-pairs")  # the stages `--shards` and `--cli` apply to


def run_once(stage: str, root: str, args, prompts: int, shard: str | None = None) -> tuple[float, float, dict]:
    """One process of `stage` (or of its shard `I/K`): wall and CPU seconds and its report."""
    counts = Path(tempfile.mkdtemp()) / "report.json"
    env = None
    if args.cli and stage in SHARDED:  # the pod's own command line, its max RSS from /usr/bin/time
        spec = counts.parent / "spec.json"
        made = make_spec(args.sources, args.n, max(1, prompts // 100))
        spec.write_text(json.dumps(made.model_dump(mode="json", by_alias=True, exclude_defaults=True)))
        cmd = ["/usr/bin/time", "-f", "%M", "-o", str(counts.parent / "maxrss"), sys.executable, "-m", "wrpo.cli",
               "stage", stage, "--spec", str(spec), "--run-uri", root, "--workdir", str(counts.parent / "work")]
        if args.s3_endpoint:
            env = dict(os.environ, AWS_ENDPOINT_URL_S3=args.s3_endpoint)
    else:
        cmd = [sys.executable, __file__, "--child", stage, "--root", root, "--sources", str(args.sources),
               "--n", str(args.n), "--prompts", str(prompts), "--report", str(counts)]
        if args.s3_endpoint:
            cmd += ["--s3-endpoint", args.s3_endpoint]
    if shard:
        cmd += ["--shard", shard]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if args.cli else None)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{stage} {shard or ''} at {prompts} prompts failed (status {status})")
    if (counts.parent / "maxrss").exists():
        report = {"peak_rss_mb": round(int((counts.parent / "maxrss").read_text().split()[-1]) / 1024, 1)}
    else:
        report = json.loads(counts.read_text())
    shutil.rmtree(counts.parent, ignore_errors=True)
    return wall, usage.ru_utime + usage.ru_stime, report


def measure(stage: str, root: str, args, prompts: int) -> dict:
    k = args.shards if stage in SHARDED else 1
    runs = [run_once(stage, root, args, prompts, f"{i}/{k}" if k > 1 else None) for i in range(k)]
    wall, cpu = sum(r[0] for r in runs), sum(r[1] for r in runs)
    target = stage in ("sample-target", "score-target", "build-pairs")  # the PO and eval prompts only
    answers = (prompts - prompts // 3) * args.n if target else prompts * args.n * args.sources
    row = {"stage": stage, "prompts": prompts, "answers": answers, "wall_s": round(wall, 2),
           "cpu_s": round(cpu, 2), "peak_rss_mb": max(r[2]["peak_rss_mb"] for r in runs),
           "records_per_cpu_s": round(answers / cpu) if cpu else None}
    if k > 1:
        row |= {"shards": k, "shard_cpu_s": [round(r[1], 2) for r in runs],
                "shard_peak_rss_mb": [r[2]["peak_rss_mb"] for r in runs]}
    if args.cli and stage in SHARDED:
        row["command"] = "wrpo stage"
    if args.s3_endpoint and "requests" in runs[0][2]:
        requests = sum((Counter(r[2]["requests"]) for r in runs), Counter())
        units = 1 if target else args.sources
        row |= {"s3_requests": dict(requests), "gets_per_source": round(requests.get("GetObject", 0) / units, 1)}
    return row


def fabricate_apart(root: str, prompts: int, args) -> dict:
    """`fabricate` in a process of its own (its memory must not count towards the stages')."""
    report = Path(tempfile.mkdtemp()) / "made.json"
    cmd = [sys.executable, __file__, "--fabricate", "--root", root, "--sources", str(args.sources), "--n",
           str(args.n), "--prompts", str(prompts), "--report", str(report)]
    if args.s3_endpoint:
        cmd += ["--s3-endpoint", args.s3_endpoint]
    subprocess.run(cmd, check=True)
    made = json.loads(report.read_text())
    shutil.rmtree(report.parent, ignore_errors=True)
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="1000,10000,60000", help="Comma-separated sizes.")
    ap.add_argument("--full", action="store_true", help="Also 600k prompts (~46 GB of sample data).")
    ap.add_argument("--sources", type=int, default=10)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--s3-endpoint", help="Keep the run on this S3 endpoint (with --bucket) and count requests.")
    ap.add_argument("--bucket")
    ap.add_argument("--child")
    ap.add_argument("--root")
    ap.add_argument("--report")
    ap.add_argument("--fabricate", action="store_true")
    ap.add_argument("--shard")
    ap.add_argument("--shards", type=int, default=1, help="Run select-sources and build-pairs as K shards.")
    ap.add_argument("--cli", action="store_true", help="Run select-sources and build-pairs as `wrpo stage`.")
    args = ap.parse_args()
    if args.fabricate:
        made = fabricate(args.root, int(args.prompts), args.sources, args.n, args.s3_endpoint)
        Path(args.report).write_text(json.dumps(made))
        return
    if args.child:
        child(args.child, args.root, args.sources, args.n, int(args.prompts), args.s3_endpoint, args.report,
              args.shard)
        return
    sizes = [int(p) for p in args.prompts.split(",")] + ([600_000] if args.full else [])
    first: dict[str, dict] = {}
    for prompts in sizes:
        if args.s3_endpoint:
            root = f"s3://{args.bucket}/wrpo-data-scale-{prompts}-{os.getpid()}"
        else:
            root = tempfile.mkdtemp(prefix=f"wrpo-data-scale-{prompts}-", dir=args.tmp)
        try:
            t0 = time.perf_counter()
            made = fabricate_apart(root, prompts, args)
            print(json.dumps({"fabricated": made, "seconds": round(time.perf_counter() - t0, 1)}),
                  file=sys.stderr, flush=True)
            for stage in args.stages.split(","):
                row = measure(stage, root, args, prompts) | {"sample_data_mb": made["sample_data_mb"]}
                base = first.setdefault(stage, row)
                growth = None
                if row is not base:
                    growth = round((row["peak_rss_mb"] - base["peak_rss_mb"])
                                   / ((prompts - base["prompts"]) / 10_000), 1)
                print(json.dumps(row | {"rss_growth_mb_per_10k_prompts": growth}), flush=True)
        finally:
            if args.s3_endpoint:
                backend = run_dir(root, args.s3_endpoint).backend
                backend.delete(list(backend.list("")))
            else:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
