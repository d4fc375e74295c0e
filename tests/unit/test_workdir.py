"""The one workdir policy: local copies follow the committed stage they were fetched from, scratch is
kept for a restart of the same stage and removed once it commits."""

from __future__ import annotations

from pathlib import Path

from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.workdir import Workdir


def commit_sft(run: RunDir, version: str) -> None:
    sd = run.stage("sft")
    if sd.is_committed():
        sd.reset()
    out = sd.writer()
    out.put_text(f"model/weights-{version}.safetensors", version)
    out.put_text("model/config.json", "{}")
    out.commit(spec_hash=version)


def test_a_re_run_stage_is_fetched_again_and_nothing_old_survives(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    work = Workdir(run.uri, tmp_path / "work")
    commit_sft(run, "h1")
    model = work.fetch(run, "sft", tree="model")
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "weights-h1.safetensors"]
    (model / "weights-h1.safetensors").write_text("local edit")  # a second fetch of h1 reuses the copy
    assert work.fetch(run, "sft", tree="model") == model
    assert (model / "weights-h1.safetensors").read_text() == "local edit"
    commit_sft(run, "h2")  # the spec changed and sft was committed again
    model2 = work.fetch(run, "sft", tree="model")
    assert sorted(p.name for p in model2.iterdir()) == ["config.json", "weights-h2.safetensors"]
    assert not model.exists(), "the copy of the older commit was not removed"


def test_fetch_together_is_keyed_by_every_stage_it_reads(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    work = Workdir(run.uri, tmp_path / "work")
    for stage, version in (("build-pairs", "p1"), ("ref-logps", "r1")):
        out = run.stage(stage).writer()
        out.put_text("a.jsonl" if stage == "build-pairs" else "b.jsonl", version)
        out.commit(spec_hash=version)
    parts = {"build-pairs": ["a.jsonl"], "ref-logps": ["b.jsonl"]}
    first = work.fetch_together(run, parts, "pairs")
    assert (first / "a.jsonl").read_text() == "p1" and (first / "b.jsonl").read_text() == "r1"
    run.stage("ref-logps").reset()
    out = run.stage("ref-logps").writer()
    out.put_text("b.jsonl", "r2")
    out.commit(spec_hash="r2")
    second = work.fetch_together(run, parts, "pairs")
    assert second != first and (second / "b.jsonl").read_text() == "r2"
    assert not first.exists()


def test_scratch_survives_a_restart_of_the_same_stage_and_goes_after_commit(tmp_path):
    work = Workdir("s3://bucket/runs/x", tmp_path / "work")
    scratch = work.scratch("wrpo", "a" * 64)
    (scratch / "checkpoint-3").mkdir()
    assert work.scratch("wrpo", "a" * 64) == scratch and (scratch / "checkpoint-3").exists()
    other = work.scratch("wrpo", "b" * 64)  # the spec changed: the old checkpoints must not be resumed
    assert not scratch.exists() and other.exists()
    work.finish("wrpo")
    assert not other.exists()


def test_only_the_committing_rank_removes_the_scratch_another_node_shares(tmp_path, monkeypatch):
    """Two training nodes mount one checkpoint PVC as the scratch folder: the second node's first process
    (RANK 1, LOCAL_RANK 0) ends while rank 0 still uploads the model from there, and must leave it."""
    work = Workdir("s3://bucket/runs/x", tmp_path / "work")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    scratch = work.scratch("sft", "a" * 64)
    (scratch / "metrics.jsonl").write_text("{}\n")
    monkeypatch.setenv("RANK", "1")  # the other node's first process
    work.finish("sft")
    assert (scratch / "metrics.jsonl").exists()
    monkeypatch.setenv("RANK", "0")  # rank 0, after its commit
    work.finish("sft")
    assert not (tmp_path / "work" / "scratch" / "sft").exists()


def test_the_default_root_is_keyed_by_the_run_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("WRPO_WORKDIR", str(tmp_path))
    a, b = Workdir("s3://bucket/runs/a"), Workdir("s3://bucket/runs/b/")
    assert a.base.parent == b.base.parent == Path(tmp_path) and a.base != b.base
    assert Workdir("s3://bucket/runs/b").base == b.base
