"""Shards of the data stages on S3 (SeaweedFS; docs/data.md, "Shards" and "Scale"): select-sources and
build-pairs split by prompt hash into parts on S3 assemble the bytes one invocation writes there, and
the bodies of sampling shards are read ahead by the bounded pool, in order and checked.

The run is fabricated with the project's own writers (prepare, then 3 sources and the target with 3
answers each for 600 prompts, with scores), as the earlier stages commit it.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

from wrpo.pipeline import rundir
from wrpo.pipeline.context import StageOptions
from wrpo.pipeline.plan import stage_hashes
from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.runtime import run_stage
from wrpo.pipeline.spec import parse_spec
from wrpo.records import PromptRecord, SampleRecord, ScoreRecord, dump_jsonl
from wrpo.storage import S3Options, StorageError

pytestmark = pytest.mark.integration
PROMPTS, SOURCES, N = 600, ("a", "b", "c"), 3


def make_spec(weed, tmp_path, name: str):
    return parse_spec({
        "target": {"model": str(tmp_path / "target")},
        "sources": [{"name": s, "endpoint": {"url": "http://127.0.0.1:9/v1", "model": s}} for s in SOURCES],
        "reward": {"type": "sequence-classification", "model": str(tmp_path / "reward")},
        "dataset": {"uri": str(tmp_path / "prompts.jsonl"), "evalSize": 40},
        "sampling": {"n": N},
        "storage": {"s3Endpoint": weed.endpoint_url, "runUri": f"s3://{weed.bucket}/runs/{name}"},
    })


def fabricate(run: RunDir, hashes: dict[str, str]) -> None:
    rng = random.Random(0)
    ids = [f"p{i:04d}" for i in range(PROMPTS)]
    split = {"sft": ids[:200], "po": ids[200:-40], "eval": ids[-40:]}
    out = run.stage("prepare").writer()
    for name, pids in split.items():
        out.put_text(f"{name}.jsonl", dump_jsonl(PromptRecord(prompt_id=p, prompt=[{"role": "user", "content": p}])
                                                 for p in pids))
    out.commit(hashes["prepare"], summary={k: len(v) for k, v in split.items()})
    for sample_stage, files in (("sample-sources", {s: ids for s in SOURCES}),
                                ("sample-target", {"target": split["po"] + split["eval"]})):
        samples, scores = run.stage(sample_stage).writer(), run.stage(sample_stage.replace("sample", "score")).writer()
        for model, pids in files.items():
            kept = [p for k, p in enumerate(pids) if k % 7 != 3]  # prompts the model has no record of
            samples.put_text(f"{model}.jsonl", dump_jsonl(SampleRecord(
                prompt_id=p, model=model, responses=[rng.choice(["yes", "no", "", "maybe"]) for _ in range(N)],
                finish_reasons=["stop"] * N) for p in kept))
            scores.put_text(f"{model}.jsonl", dump_jsonl(ScoreRecord(
                prompt_id=p, model=model, scores=[rng.choice([0.0, 0.5, 1.0]) for _ in range(N)]) for p in kept))
        samples.commit(hashes[sample_stage])
        scores.commit(hashes[sample_stage.replace("sample", "score")])


def test_sharded_selection_on_s3_equals_one_invocation(seaweedfs, tmp_path):
    runs = {}
    for name in ("whole", "sharded"):
        spec = make_spec(seaweedfs, tmp_path, name)
        runs[name] = RunDir(spec.storage.run_uri, S3Options.from_spec(spec.storage))
        fabricate(runs[name], stage_hashes(spec))
    for stage in ("select-sources", "build-pairs"):
        assert run_stage(spec, runs["whole"], stage).status == "done"
        states = [run_stage(spec, runs["sharded"], stage, StageOptions(shard=(i, 4))).status for i in (2, 0, 3, 1)]
        assert states == ["partial", "partial", "partial", "done"]
        whole, sharded = runs["whole"].stage(stage), runs["sharded"].stage(stage)
        assert {k: v["sha256"] for k, v in sharded.objects().items()} == \
            {k: v["sha256"] for k, v in whole.objects().items()}
        assert sharded.manifest()["summary"] == whole.manifest()["summary"]


def test_shard_bodies_are_read_ahead_from_s3_in_order_by_a_bounded_pool(seaweedfs, monkeypatch):
    sd = RunDir(f"s3://{seaweedfs.bucket}/runs/prefetch", S3Options(endpoint_url=seaweedfs.endpoint_url)).stage("s")
    out = sd.writer()
    bodies = [f"shard {i}\n".encode() * (i + 1) for i in range(40)]
    for i, body in enumerate(bodies):
        out.commit_shard("m", i, body, f"k{i}")
    done = sd.committed_shards("m")
    busy = peak = 0
    lock = threading.Lock()
    real = sd.read_shard

    def counted(info):
        nonlocal busy, peak
        with lock:
            busy += 1
            peak = max(peak, busy)
        time.sleep(0.02)  # a slow GET, so that reads overlap
        try:
            return real(info)
        finally:
            with lock:
                busy -= 1

    monkeypatch.setattr(sd, "read_shard", counted)
    assert list(sd.prefetched(done[i] for i in range(40))) == bodies
    assert 1 < peak <= rundir.POOL  # read ahead, never more than the pool at once
    monkeypatch.setattr(rundir, "PREFETCH_BYTES", 1)  # shards bigger than the byte budget: one at a time
    peak = 0
    assert list(sd.prefetched(done[i] for i in range(5))) == bodies[:5] and peak == 1
    sd.backend.put_bytes(sd.key(done[3].name), b"x" * done[3].size)  # same size, other bytes
    with pytest.raises(StorageError, match=r"m/000003\.jsonl: shard content does not match its marker"):
        list(sd.prefetched(done[i] for i in range(5)))
