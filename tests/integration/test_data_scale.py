"""The data stages in bounded memory (docs/data.md, "Scale"), as a pod runs them: `wrpo stage` against
SeaweedFS in a process whose address space is capped (RLIMIT_AS) well below what loading its inputs
whole takes. The run is fabricated with the project's own writers: prompts, then 3 sources × 4 answers
of ~1.5 KB for 24k prompts (~430 MB of samples), with their scores.

The cap is on virtual memory, which counts reservations as well as use: glibc reserves 64 MiB per
thread arena and OpenBLAS a buffer per thread, so the child runs with MALLOC_ARENA_MAX=2 and one BLAS
thread (and an 8 MiB stack limit: a thread's stack is reserved at that size). The streamed stage peaks at
~340 MB of address space and ~150 MB of RSS whatever the number of prompts; the whole-file implementation
it replaced peaked at 905 MB of RSS on this run, so it cannot run under the cap, and fails the RSS bound too.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from wrpo.pipeline.plan import stage_hashes
from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.spec import parse_spec
from wrpo.records import PromptRecord, dump_jsonl, dump_line
from wrpo.storage import S3Options

pytestmark = pytest.mark.integration
PROMPTS, SOURCES, N = 24_000, ("a", "b", "c"), 4
CAP_MB = 480


def spec_data(weed, tmp: Path) -> dict:
    return {
        "target": {"model": str(tmp / "target")},
        "sources": [{"name": s, "endpoint": {"url": "http://127.0.0.1:9/v1", "model": s}} for s in SOURCES],
        "reward": {"type": "sequence-classification", "model": str(tmp / "reward")},
        "dataset": {"uri": str(tmp / "prompts.jsonl"), "evalSize": 100},
        "sampling": {"n": N},
        "storage": {"s3Endpoint": weed.endpoint_url, "runUri": f"s3://{weed.bucket}/runs/scale"},
    }


def fabricate(run: RunDir, hashes: dict[str, str]) -> int:
    """Commit prepare, sample-sources and score-sources as the stages write them; returns sample bytes."""
    rng = random.Random(0)
    pool = "".join(rng.choice("abcdefghij klmnop") for _ in range(1 << 15))
    ids = [f"p{i:06d}" for i in range(PROMPTS)]
    split = {"sft": ids[:PROMPTS // 3], "po": ids[PROMPTS // 3:-100], "eval": ids[-100:]}
    out = run.stage("prepare").writer()
    for name, pids in split.items():
        out.put_text(f"{name}.jsonl", dump_jsonl(PromptRecord(prompt_id=p, prompt=[{"role": "user", "content": p}])
                                                 for p in pids))
    out.commit(hashes["prepare"], summary={k: len(v) for k, v in split.items()})
    samples, scores = run.stage("sample-sources").writer(), run.stage("score-sources").writer()
    for src in SOURCES:
        with samples.open(f"{src}.jsonl") as fs, scores.open(f"{src}.jsonl") as fc:
            for pid in ids:
                answers = [pool[(k := rng.randrange(30000)):k + rng.randint(1000, 2000)] for _ in range(N)]
                fs.write_line(dump_line({"prompt_id": pid, "model": src, "responses": answers,
                                         "finish_reasons": ["stop"] * N, "sampling": {"n": N}}))
                fc.write_line(dump_line({"prompt_id": pid, "model": src, "scores": [rng.random() for _ in answers],
                                         "reward_model": "rm"}))
    samples.commit(hashes["sample-sources"])
    scores.commit(hashes["score-sources"])
    return sum(e["size"] for e in samples.written.values())


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CAP_MB << 20, CAP_MB << 20))
    # glibc reserves each new thread's stack at RLIMIT_STACK's size (64 MiB each under `ulimit -s 65536`, as
    # some machines set it: ten S3 threads alone would pass the cap): the usual 8 MiB, on any machine
    stack = 8 << 20
    hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
    resource.setrlimit(resource.RLIMIT_STACK, (stack if hard == resource.RLIM_INFINITY else min(stack, hard), hard))


def test_select_sources_streams_from_s3_under_a_memory_cap(seaweedfs, tmp_path):
    data = spec_data(seaweedfs, tmp_path)
    spec = parse_spec(data)
    run = RunDir(spec.storage.run_uri, S3Options.from_spec(spec.storage))
    size = fabricate(run, stage_hashes(spec))
    assert size > 400 << 20  # the samples alone: most of the cap, before any parsing
    (tmp_path / "spec.json").write_text(json.dumps(data))
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", WITH_PEAKS, "stage", "select-sources", "--spec",
                           str(tmp_path / "spec.json")], env=env, cwd=tmp_path, preexec_fn=_cap,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = {k: int(v.split()[0]) >> 10 for k, v in (line.split(":", 1) for line in proc.stderr.splitlines()
                                                      if line.startswith(("VmPeak:", "VmHWM:")))}
    print(f"select-sources on {size >> 20} MB of samples: peak address space {peaks['VmPeak']} MB, "
          f"peak RSS {peaks['VmHWM']} MB (cap {CAP_MB} MB)")
    assert peaks["VmHWM"] < (size >> 20) // 2  # never near its inputs' size: nothing is held whole
    summary = json.loads(proc.stdout.strip().splitlines()[-1])["summary"]
    assert summary["prompts"] == summary["chosen"] == PROMPTS
    assert sum(1 for _ in run.stage("select-sources").iter_lines("chosen_source.jsonl")) == PROMPTS + 1


# `wrpo stage ...` that writes its peak address space and RSS (from /proc) to stderr when it exits
WITH_PEAKS = """
import atexit, sys
atexit.register(lambda: sys.stderr.write(open("/proc/self/status").read()))
from wrpo.cli.main import main
sys.argv[0] = "wrpo"
main()
"""
