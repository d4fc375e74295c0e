"""The streamed data stages (docs/data.md, "Scale") give byte for byte the outputs of the whole-file
implementation they replaced, on a fabricated 2k-prompt run with ties, duplicate and empty answers,
prompts a source has no record of, and target answers that drop prompts for every reason.

The oracle (tests/data_oracle.py) is the previous implementation of select-sources and build-pairs
(whole objects parsed into lists and dicts, then `choose_sources` / `build_pairs` over them).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
from data_oracle import oracle_pairs, oracle_select

from wrpo.data.scoring import ScoringError
from wrpo.errors import DataError
from wrpo.pipeline.plan import plan_hashes, stage_hashes
from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.runtime import run_stage
from wrpo.pipeline.spec import parse_spec
from wrpo.records import PromptRecord, SampleRecord, ScoreRecord, dump_jsonl, lines_of, split_lines
from wrpo.storage import StorageError

SPLITS = ("sft", "po", "eval")
SOURCES = ("a", "b", "c")
N = 4
PROMPTS = 2000


# ---------------------------------------------------------------------------------------------- the run


def make_spec(tmp: Path, selection: dict | None = None):
    return parse_spec({
        "target": {"model": str(tmp / "target")},
        "sources": [{"name": s, "endpoint": {"url": "http://127.0.0.1:9/v1", "model": s}} for s in SOURCES],
        "reward": {"type": "sequence-classification", "model": str(tmp / "reward")},
        "dataset": {"uri": str(tmp / "prompts.jsonl"), "evalSize": 50},
        "sampling": {"n": N},
        "selection": selection or {},
        **({"wrpo": {"rejectedSource": True}} if (selection or {}).get("rejectedSource") else {}),
    })


def _answers(rng: random.Random, model: str) -> tuple[list[str], list[float]]:
    words = ["yes", "no", "maybe", "it depends", "42"]  # few texts: duplicates within and across sources
    texts, scores = [], []
    for _ in range(N):
        roll = rng.random()
        texts.append("" if roll < 0.1 else "  " if roll < 0.13 else f"{rng.choice(words)} ({model})"
                     if rng.random() < 0.5 else rng.choice(words))
        scores.append(rng.choice([0.0, 0.25, 0.5, 1.0, -0.5]))  # ties everywhere
    return texts, scores


def fabricate(root: Path, spec, prompts: int = PROMPTS, seed: int = 0) -> RunDir:
    """prepare, sample-/score-sources and sample-/score-target committed as the stages write them."""
    rng = random.Random(seed)
    run, hashes = RunDir(str(root)), stage_hashes(spec)
    ids = [f"p{i:05d}" for i in range(prompts)]
    split = {"sft": ids[:prompts // 3], "po": ids[prompts // 3:-50], "eval": ids[-50:]}
    out = run.stage("prepare").writer()
    for name, pids in split.items():
        out.put_text(f"{name}.jsonl", dump_jsonl(
            PromptRecord(prompt_id=p, prompt=[{"role": "user", "content": f"q {p} \u2028 é"}]) for p in pids))
    out.commit(hashes["prepare"], summary={k: len(v) for k, v in split.items()})
    order = split["sft"] + split["po"] + split["eval"]
    groups = {"sample-sources": {s: order for s in SOURCES}, "sample-target": {"target": split["po"] + split["eval"]}}
    for sample_stage, files in groups.items():
        score_stage = sample_stage.replace("sample", "score")
        samples, scores = run.stage(sample_stage).writer(), run.stage(score_stage).writer()
        for model, pids in files.items():
            srecs, crecs = [], []
            for k, pid in enumerate(pids):
                if model == "c" and k % 5 == 0 or model == "target" and k % 13 == 0:
                    continue  # no record of this prompt at all
                texts, values = _answers(rng, model)
                if model == "c" and k % 11 == 0:
                    texts = [""] * N  # only empty answers
                if model == "target" and k % 7 == 0:
                    texts = ["same"] * N
                if model == "target" and k % 17 == 0:
                    values = [0.5] * N
                srecs.append(SampleRecord(prompt_id=pid, model=model, responses=texts,
                                          finish_reasons=["stop"] * N, sampling={"n": N}))
                crecs.append(ScoreRecord(prompt_id=pid, model=model, scores=values, reward_model="rm"))
            samples.put_text(f"{model}.jsonl", dump_jsonl(srecs))
            scores.put_text(f"{model}.jsonl", dump_jsonl(crecs))
        samples.commit(hashes[sample_stage])
        scores.commit(hashes[score_stage])
    return run


def made(tmp_path: Path, selection: dict | None = None):
    """(spec, run): a fabricated run for this selection (the target's stages hash the selection too)."""
    spec = make_spec(tmp_path, selection)
    return spec, fabricate(tmp_path / "run", spec)


SELECTIONS = [{}, {"rejectedSource": True, "topKSources": 3}, {"sourceRank": 2, "minRewardGap": 0.3},
              {"sourceGroups": ["c", "a"], "topKSources": 2}]


@pytest.mark.parametrize("selection", SELECTIONS, ids=["default", "y_ls-top3", "rank2-gap", "groups"])
def test_streamed_selection_and_pairs_equal_the_whole_file_implementation(tmp_path, selection):
    spec, run = made(tmp_path, selection)
    for name, oracle in (("select-sources", oracle_select), ("build-pairs", oracle_pairs)):
        assert run_stage(spec, run, name).status == "done"
        expected = oracle(spec, run)
        sd = run.stage(name)
        for obj, data in expected.items():
            assert sd.read_bytes(obj) == data, f"{name}/{obj} differs from the whole-file implementation"
    stats = json.loads(run.stage("build-pairs").read_text("stats.json"))
    assert stats["train"]["pairs"] > 100 and len(stats["train"]["dropped"]) >= 3  # the run exercises drops


@pytest.mark.parametrize("selection", SELECTIONS[:2], ids=["default", "y_ls-top3"])
def test_sharded_selection_and_pairs_equal_one_invocation(tmp_path, selection):
    """select-sources and build-pairs split by prompt hash (`--shard i/K`, docs/data.md "Shards") and
    assembled from their parts give the bytes and the summary of one invocation (and of the oracle)."""
    from wrpo.pipeline.context import StageOptions

    spec, run = made(tmp_path, selection)
    whole = RunDir(str(tmp_path / "whole"))
    for name in ("prepare", "sample-sources", "score-sources", "sample-target", "score-target"):
        shutil.copytree(run.stage(name).uri(), whole.stage(name).uri())
    k = 3
    for name, oracle in (("select-sources", oracle_select), ("build-pairs", oracle_pairs)):
        states = [run_stage(spec, run, name, StageOptions(shard=(i, k))).status for i in range(k)]
        assert states == ["partial"] * (k - 1) + ["done"]
        one = run_stage(spec, whole, name)
        sd = run.stage(name)
        assert sd.manifest()["summary"] == one.summary
        for obj, entry in whole.stage(name).objects().items():
            assert sd.objects()[obj]["sha256"] == entry["sha256"], f"{name}/{obj} differs from one invocation"
        for obj, data in oracle(spec, run).items():
            assert sd.read_bytes(obj) == data, f"{name}/{obj} differs from the whole-file implementation"
        parts = [p for p in Path(sd.uri()).rglob("*.done")]
        assert len(parts) == k and all(json.loads(p.read_text())["objects"] for p in parts)
        sizes = [json.loads(p.read_text())["summary"] for p in parts]
        assert all(s for s in sizes)  # every shard got prompts of its own


def test_a_killed_selection_shard_is_redone_alone(tmp_path, monkeypatch):
    import wrpo.data.stages as data_stages
    from wrpo.pipeline.context import StageOptions

    spec, run = made(tmp_path)
    calls: list[tuple[int, int]] = []
    real = data_stages.select_sources

    def dying(ctx):
        calls.append(ctx.shard)
        summary = real(ctx)  # its objects are written, its part is not committed: the worst moment
        if ctx.shard == (1, 3) and calls.count((1, 3)) == 1:
            raise RuntimeError("shard pod killed")
        return summary

    monkeypatch.setattr(data_stages, "select_sources", dying)
    assert run_stage(spec, run, "select-sources", StageOptions(shard=(0, 3))).status == "partial"
    with pytest.raises(RuntimeError, match="shard pod killed"):
        run_stage(spec, run, "select-sources", StageOptions(shard=(1, 3)))
    assert run_stage(spec, run, "select-sources", StageOptions(shard=(2, 3))).status == "partial"
    assert run_stage(spec, run, "select-sources", StageOptions(shard=(1, 3))).status == "done"
    assert calls == [(0, 3), (1, 3), (2, 3), (1, 3)]  # the retry redid shard 1 only
    for obj, data in oracle_select(spec, run).items():
        assert run.stage("select-sources").read_bytes(obj) == data
    # the commit Job after the Indexed Job: a stage whose shards committed its unit only commits
    (tmp_path / "run" / "select-sources" / "_MANIFEST.json").unlink()
    assert run_stage(spec, run, "select-sources").status == "done" and len(calls) == 4
    assert run_stage(spec, run, "select-sources", StageOptions(shard=(0, 3))).status == "skipped"


def test_a_part_record_of_another_shard_is_named(tmp_path):
    from wrpo.data.stages import prompt_shard
    from wrpo.pipeline.context import StageOptions

    spec, run = made(tmp_path)
    run_stage(spec, run, "select-sources", StageOptions(shard=(0, 2)))
    (done,) = Path(run.stage("select-sources").uri()).rglob("0-of-2.done")
    marker = json.loads(done.read_text())
    chosen = done.parent / "0-of-2" / "chosen_source.jsonl"
    lines = chosen.read_text().splitlines(keepends=True)
    stray = next(f"p{i:05d}" for i in range(PROMPTS) if prompt_shard(f"p{i:05d}", 2) == 1)
    lines.insert(0, json.dumps({"prompt_id": stray}) + "\n")  # a record of shard 1 in shard 0's part
    chosen.write_text("".join(lines))
    marker["objects"]["chosen_source.jsonl"] |= {"size": chosen.stat().st_size,
                                                 "sha256": hashlib.sha256(chosen.read_bytes()).hexdigest()}
    done.write_text(json.dumps(marker))
    with pytest.raises(DataError, match=rf"0-of-2/chosen_source\.jsonl:1: .*'{stray}'.* out of the prepared"):
        run_stage(spec, run, "select-sources", StageOptions(shard=(1, 2)))
    assert not run.stage("select-sources").is_committed()


@pytest.mark.parametrize(("line", "pid"), [('{"prompt_id":"p1","x":1}', "p1"), ('{"prompt_id":"a\\"b"}', 'a"b'),
                                           ('{"x": 1, "prompt_id": "p2"}', "p2"), ('{ "prompt_id" : "p3"}', "p3"),
                                           ('{"prompt_id":7}', None), ("[1]", None), ("", None), ("{bad", None)])
def test_prompt_id_of_reads_the_id_of_any_line(line, pid):
    from wrpo.records import prompt_id_of

    assert prompt_id_of(line) == pid


def test_shard_bodies_are_read_in_order_and_checked(tmp_path):
    """`StageDir.prefetched` on a local folder (one at a time; the read-ahead on S3 is in
    tests/integration/test_data_shards_s3.py)."""
    sd = RunDir(str(tmp_path / "run")).stage("sample")
    out = sd.writer()
    bodies = [f"shard {i}\n".encode() * (i + 1) for i in range(5)]
    for i, body in enumerate(bodies):
        out.commit_shard("m", i, body, f"k{i}")
    done = sd.committed_shards("m")
    assert list(sd.prefetched(done[i] for i in range(5))) == bodies
    (tmp_path / "run" / "sample" / done[3].name).write_bytes(b"x" * done[3].size)
    with pytest.raises(StorageError, match=r"m/000003\.jsonl: shard content does not match its marker"):
        list(sd.prefetched(done[i] for i in range(5)))


def test_a_record_out_of_the_prompts_order_names_file_and_line(tmp_path):
    spec, run = made(tmp_path)
    sd = run.stage("sample-sources")
    lines = sd.read_text("b.jsonl").splitlines(keepends=True)
    lines[10], lines[11] = lines[11], lines[10]
    manifest = sd.manifest()
    data = "".join(lines).encode()
    (tmp_path / "run" / "sample-sources" / "b.jsonl").write_bytes(data)
    out = sd.writer()
    out.put_bytes("b.jsonl", data)
    out.adopt({k: v for k, v in manifest["objects"].items() if k != "b.jsonl"})
    out.commit(manifest["spec_hash"])
    with pytest.raises(DataError, match=r"b\.jsonl:12: .*p00010.* out of the prepared prompts' order"):
        run_stage(spec, run, "select-sources")
    assert not run.stage("select-sources").is_committed()


def test_a_corrupt_object_is_caught_by_the_streaming_check(tmp_path):
    spec, run = made(tmp_path)
    path = tmp_path / "run" / "score-sources" / "a.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"rm"', b'"RM"'))  # same size, other bytes, still valid
    with pytest.raises(StorageError, match=r"a\.jsonl: content does not match the manifest"):
        run_stage(spec, run, "select-sources")
    assert not run.stage("select-sources").is_committed()


@pytest.mark.parametrize("text", ["", "a\n", "a\nb", "a\r\nb\r\n", "x\u2028y\n\nz\u0085\n", "é" * 3000 + "\n"])
def test_split_lines_equals_lines_of_whatever_the_chunks(text):
    data = text.encode()
    for size in (1, 2, 3, 7, 4096):
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        assert list(split_lines(chunks)) == lines_of(text)


class DyingScorer:
    """A stand-in for the reward model (the scorer is the one part that needs a model): a score from
    the text, and a RuntimeError - the pod killed - once `die_after` answers are scored."""

    name = "stand-in"

    def __init__(self, die_after: int | None = None):
        self.die_after, self.scored = die_after, 0

    def score(self, pairs):
        from wrpo.data.scoring import Score

        if self.die_after is not None and self.scored + len(pairs) > self.die_after:
            raise RuntimeError("scoring pod killed")
        self.scored += len(pairs)
        return [Score(float(len(text) % 7)) for _, text in pairs]


@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_a_killed_scoring_unit_resumes_after_its_last_checkpoint(tmp_path, monkeypatch, shard):
    from contextlib import contextmanager

    import wrpo.data.stages as data_stages
    from wrpo.pipeline.context import StageOptions

    spec, run = made(tmp_path)
    ref = RunDir(str(tmp_path / "ref"))
    monkeypatch.setattr(data_stages, "SCORE_CHECKPOINT", 300)  # records: 1200 answers, past the 1024 chunks
    scorer = DyingScorer()
    monkeypatch.setattr(data_stages, "reward_scorer", contextmanager(lambda ctx: (yield scorer)))
    for name in ("prepare", "sample-sources"):  # the same inputs, scored uninterrupted as the reference
        shutil.copytree(run.stage(name).uri(), ref.stage(name).uri())
    opts = StageOptions(units=["a"], shard=shard)
    run_stage(spec, ref, "score-sources", opts)
    whole = scorer.scored

    shutil.rmtree(run.stage("score-sources").uri())
    scorer.die_after, scorer.scored = 2500, 0  # dies in the third checkpoint of the unit
    with pytest.raises(RuntimeError, match="scoring pod killed"):
        run_stage(spec, run, "score-sources", opts)
    assert not run.stage("score-sources").committed_units()
    scorer.die_after, scorer.scored = None, 0
    run_stage(spec, run, "score-sources", opts)
    assert scorer.scored == whole - 2 * 1200  # the two committed checkpoints were not scored again
    # and the result is the uninterrupted one, byte for byte (sizes and sha256 of the unit's or part's objects)
    unit_hash = plan_hashes(spec).units["score-sources"]["a"]

    def objects(rd: RunDir) -> dict:
        sd = rd.stage("score-sources")
        if shard[1] == 1:
            return sd.committed_units()["a"]["objects"]
        return sd.committed_parts("a", unit_hash, shard[1])[shard[0]]["objects"]

    assert objects(run) == objects(ref) and objects(run)["a.jsonl"]["size"] > 0


class RecordingScorer:
    name = "recording"

    def __init__(self):
        self.calls: list[list[str]] = []

    def score(self, pairs):
        from wrpo.data.scoring import Score

        self.calls.append([text for _, text in pairs])
        return [Score(float(len(text))) for _, text in pairs]


def test_scoring_checkpoints_send_the_scorer_the_same_chunks_as_one_pass():
    """1024 records of N answers are whole 1024-answer chunks: scoring checkpoint by checkpoint sends the
    scorer exactly what scoring everything at once does (so checkpoints cannot move a score)."""
    import itertools

    from wrpo.data.scoring import score_samples, score_stream
    from wrpo.data.stages import SCORE_CHECKPOINT

    prompt = PromptRecord(prompt_id="p", prompt=[{"role": "user", "content": "q"}])
    samples = [SampleRecord(prompt_id=f"p{i}", model="m", responses=[f"{i}-{j}" for j in range(5)])
               for i in range(2 * SCORE_CHECKPOINT + 77)]
    whole = RecordingScorer()
    expected = score_samples(whole, samples, {s.prompt_id: prompt for s in samples})
    parts, got, records = RecordingScorer(), [], iter(samples)
    while batch := list(itertools.islice(records, SCORE_CHECKPOINT)):
        got += score_stream(parts, [(s, prompt) for s in batch])
    assert parts.calls == whole.calls and got == expected
    with pytest.raises(ScoringError, match="'p0' .*not among the prepared prompts"):
        list(score_stream(parts, [(samples[0], None)]))
