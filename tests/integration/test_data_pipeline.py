"""The data stages end to end against real servers: prompts on SeaweedFS S3, N answers per prompt from two
tiny models served by real vLLM, rewards in-process and through vLLM's pooling endpoint (same scores),
selection, and quadruples that the trainer's loader accepts. Stages run through `wrpo.pipeline.runtime.run_stage`,
so manifests carry the real stage hashes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.spec import parse_spec
from wrpo.records import PromptRecord, SampleRecord, ScoreRecord, parse_jsonl
from wrpo.storage import S3Backend, S3Options

pytestmark = pytest.mark.integration
N = 3
EXAMPLE = Path(__file__).parents[2] / "examples" / "tiny" / "prompts.jsonl"


@pytest.fixture(scope="module")
def pipeline(seaweedfs, vllm_servers, tiny_models, tmp_path_factory):
    """Run prepare → build-pairs once; returns (spec, run, servers, workdir)."""
    from wrpo.pipeline.context import StageOptions
    from wrpo.pipeline.plan import stage_hashes
    from wrpo.pipeline.runtime import run_stage

    bucket, endpoint = seaweedfs.bucket, seaweedfs.endpoint_url
    s3 = S3Options(endpoint_url=endpoint)
    S3Backend(bucket, "inputs", s3).put_bytes("prompts.jsonl", EXAMPLE.read_bytes())
    spec = parse_spec({
        "target": {"model": str(tiny_models / "target")},
        "sources": [{"name": "source-qwen", "model": str(tiny_models / "source-qwen")},
                    {"name": "source-llama", "model": str(tiny_models / "source-llama")}],
        "reward": {"type": "sequence-classification", "model": str(tiny_models / "reward"), "maxLength": 512},
        "dataset": {"uri": f"s3://{bucket}/inputs/prompts.jsonl", "evalSize": 2, "seed": 3},
        "sampling": {"n": N, "maxTokens": 24, "concurrency": 8, "shardSize": 4, "maxRetries": 3},
        "storage": {"s3Endpoint": endpoint, "runUri": f"s3://{bucket}/runs/pipeline"},
    })
    run = RunDir(spec.storage.run_uri, S3Options.from_spec(spec.storage))
    work = tmp_path_factory.mktemp("work")
    target_url = vllm_servers.sources["source-qwen"].base_url
    opts = StageOptions(endpoints=vllm_servers.endpoints(), target_endpoint=target_url, workdir=str(work))
    for name in ("prepare", "sample-sources", "score-sources", "select-sources"):
        run_stage(spec, run, name, opts)
    # Target-SFT is trained by the engine's stage; here a committed `sft` stage holds the tiny target and
    # the Qwen server answers as `target` (same tokenizer and template).
    sft = run.stage("sft").writer()
    sft.put_tree("model", tiny_models / "target")
    sft.commit(stage_hashes(spec)["sft"])
    for name in ("sample-target", "score-target", "build-pairs"):
        run_stage(spec, run, name, opts)
    return spec, run, vllm_servers, work


def records(run, stage, name, model):
    return parse_jsonl(run.stage(stage).read_text(name), model, name)


def test_prepare_splits(pipeline):
    _, run, _, _ = pipeline
    sizes = {s: len(records(run, "prepare", f"{s}.jsonl", PromptRecord)) for s in ("sft", "po", "eval")}
    assert sum(sizes.values()) == 16 and sizes["eval"] == 2 and sizes["sft"] > 0 and sizes["po"] > 0
    assert run.stage("prepare").manifest()["summary"]["prompts"] == 16


def test_n_answers_per_prompt_from_two_vllm_models(pipeline):
    spec, run, _, _ = pipeline
    for src in ("source-qwen", "source-llama"):
        recs = records(run, "sample-sources", f"{src}.jsonl", SampleRecord)
        assert len(recs) == 16
        assert all(len(r.responses) == N and len(r.finish_reasons) == N for r in recs)
        assert {r.sampling["server_model"] for r in recs} == {src}
        assert all(r.sampling["n"] == N and r.sampling["temperature"] == 0.8 for r in recs)
        assert set(r.finish_reasons[0] for r in recs) <= {"stop", "length"}
        assert sum(len(set(r.responses)) > 1 for r in recs) > 8  # N different samples, not N copies
    manifest = run.stage("sample-sources").manifest()
    assert set(manifest["objects"]) == {"source-qwen.jsonl", "source-llama.jsonl"}
    assert manifest["versions"]["python"]


def test_scores_in_process_equal_vllm_pooling(pipeline):
    from wrpo.data.stages import score_sources
    from wrpo.pipeline.context import StageOptions
    from wrpo.pipeline.runtime import context_for

    spec, run, servers, work = pipeline
    spec = spec.model_copy(update={"reward": spec.reward.model_copy(update={"type": "remote"})})
    out = run.stage("score-sources-remote").writer()
    summary = {}
    for src in ("source-qwen", "source-llama"):
        ctx = context_for(spec, run, "score-sources",
                          StageOptions(reward_endpoint=servers.reward.root_url, workdir=str(work)), unit=src)
        ctx.out = out
        with ctx.resources:
            summary[src] = score_sources(ctx)
    assert summary["source-qwen"]["answers"] == 16 * N
    for src in ("source-qwen", "source-llama"):
        local = records(run, "score-sources", f"{src}.jsonl", ScoreRecord)
        remote = parse_jsonl((out.stage.backend.get_bytes(f"score-sources-remote/{src}.jsonl")).decode(),
                             ScoreRecord, src)
        assert [r.prompt_id for r in local] == [r.prompt_id for r in remote]
        for a, b in zip(local, remote, strict=True):
            # vLLM's and transformers' float32 forwards differ in summation order and kernels: ≤ 100·√n·u32
            # relative, n < 4·10^3, u32 = 2^-24 (tests/integration/test_train_multirank.py's REL32)
            assert b.scores == pytest.approx(a.scores, rel=3.8e-4, abs=3.8e-4)
    run.stage("score-sources-remote").reset(shards=True)


def test_selection_and_contributions(pipeline):
    spec, run, _, _ = pipeline
    chosen = [json.loads(line) for line in run.stage("select-sources").read_text("chosen_source.jsonl")
              .splitlines()]
    assert len(chosen) == 16
    scores = {src: {r.prompt_id: r.scores for r in records(run, "score-sources", f"{src}.jsonl", ScoreRecord)}
              for src in ("source-qwen", "source-llama")}
    for c in chosen:
        best = max(s for src in scores for s in scores[src][c["prompt_id"]])
        assert c["score"] == best
    contrib = json.loads(run.stage("select-sources").read_text("contributions.json"))
    assert sum(contrib["all"]["counts"].values()) == 16
    assert sum(contrib["all"]["shares"].values()) == pytest.approx(1.0)
    assert run.stage("select-sources").read_bytes("contributions.png")[:4] == b"\x89PNG"


def test_quadruples_load_in_the_trainer(pipeline):
    from wrpo.engine.data import load_preferences, load_sft

    _, run, _, work = pipeline
    stats = json.loads(run.stage("build-pairs").read_text("stats.json"))
    assert stats["train"]["pairs"] + stats["train"]["dropped_total"] == stats["train"]["prompts"]
    assert stats["train"]["pairs"] > 0
    path = run.stage("build-pairs").download("train.jsonl", work / "train.jsonl")
    prefs = load_preferences(path, ("chosen_source", "chosen_target", "rejected"))
    assert all(p.score_chosen_target >= p.score_rejected for p in prefs)
    assert all(p.source_model in ("source-qwen", "source-llama") for p in prefs)
    sft = load_sft(run.stage("select-sources").download("sft.jsonl", work / "sft.jsonl"))
    assert len(sft) == len(records(run, "prepare", "sft.jsonl", PromptRecord))
    target = records(run, "sample-target", "target.jsonl", SampleRecord)
    assert len(target) == stats["train"]["prompts"] + stats["eval"]["prompts"]
    assert {t.sampling["server_model"] for t in target} == {"source-qwen"}  # the alias' server


def test_streamed_outputs_equal_the_whole_file_implementation(pipeline):
    """select-sources and build-pairs stream their inputs from S3 (docs/data.md, "Scale"); on the real
    samples and scores they give the bytes of the implementation that loaded them whole."""
    from data_oracle import oracle_pairs, oracle_select

    spec, run, _, _ = pipeline
    for name, oracle in (("select-sources", oracle_select), ("build-pairs", oracle_pairs)):
        for obj, data in oracle(spec, run).items():
            assert run.stage(name).read_bytes(obj) == data, f"{name}/{obj}"
