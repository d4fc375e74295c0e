"""The data stages' bodies: prepare, sample-sources, score-sources, select-sources, sample-target,
score-target, build-pairs (docs/architecture.md, "The plan", "Stage runtime").

Each body takes a `StageContext`, reads committed earlier stages from `ctx.run`, writes its objects
through `ctx.out` and returns a short summary; `wrpo.pipeline.runtime.run_stage` commits the manifest.
The sampling stages also commit shards as they go, so a killed sampling stage resumes where it stopped.
The vLLM servers a stage needs are those of its plan row (`wrpo.pipeline.plan.servers`), reached through
`wrpo.data.backends` (one with an endpoint in `ctx.options`, the operator's Services, is used as it is; the
others are served locally by `wrpo.data.serving`: vLLM if available, else transformers generate).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from wrpo.data.backends import chat_backend, chat_client, external_backend, reward_scorer
from wrpo.data.serving import given_endpoint
from wrpo.errors import DataError, WrpoError
from wrpo.pipeline.context import StageContext
from wrpo.pipeline.plan import servers
from wrpo.pipeline.rundir import RunDir
from wrpo.records import PromptRecord, SampleRecord, ScoreRecord, dump_jsonl, parse_jsonl
from wrpo.storage import S3Options

log = logging.getLogger(__name__)
SPLITS = ("sft", "po", "eval")


# ---------------------------------------------------------------------------------------------- helpers


def read_records(run: RunDir, stage: str, name: str, model: type) -> list[Any]:
    """Records of a committed stage's JSONL object (errors name the object's URI and line)."""
    sd = run.stage(stage)
    return parse_jsonl(sd.read_text(name), model, sd.uri(name))


def read_prompts(run: RunDir, splits: Sequence[str] = SPLITS) -> list[PromptRecord]:
    """Prepared prompts of the given splits, in split order."""
    return [p for split in splits for p in read_records(run, "prepare", f"{split}.jsonl", PromptRecord)]


# ---------------------------------------------------------------------------------------------- prepare


def prepare(ctx: StageContext) -> dict[str, Any]:
    """Load, normalise, deduplicate and split the prompt dataset into sft/po/eval.jsonl."""
    from wrpo.data.prepare import check_splits, load_rows, normalise, split_prompts

    ds = ctx.spec.dataset
    rows = load_rows(ds.uri, ds.format, S3Options.from_spec(ctx.spec.storage))
    prompts, report = normalise(rows, ds.uri, ds.prompt_field, ds.id_field, ds.max_prompts)
    if not prompts:
        raise DataError(ds.uri, f"no usable prompts ({report.dropped_empty} empty, "
                        f"{report.dropped_duplicates} duplicates)")
    split = split_prompts(prompts, ds.sft_fraction, ds.eval_size, ds.seed)
    check_splits(split, ds.uri, ds.sft_fraction, ds.eval_size, report)  # before anything is written
    for name in SPLITS:
        ctx.out.put_text(f"{name}.jsonl", dump_jsonl(getattr(split, name)))
    return {"rows": report.rows, "prompts": report.kept, "sft": len(split.sft), "po": len(split.po),
            "eval": len(split.eval), "dropped_empty": report.dropped_empty,
            "dropped_duplicates": report.dropped_duplicates, "dropped_over_max": report.dropped_over_max}


# ---------------------------------------------------------------------------------------------- sampling


async def _sample(backend: Any, prompts: Sequence[PromptRecord], ctx: StageContext, name: str,
                  file: str) -> dict[str, Any]:
    from wrpo.data.sampling import SamplingParams, sample_group

    params = SamplingParams.from_spec(ctx.spec.sampling)
    async with backend:
        return await sample_group(backend, prompts, params, ctx.out, name, ctx.spec.sampling.shard_size,
                                  file=file)


def sample_sources(ctx: StageContext) -> dict[str, Any]:
    """One unit: N answers per prompt (all splits) from source `ctx.unit` into `<source>.jsonl`, shard by
    shard (a killed unit resumes at its first uncommitted shard)."""
    prompts = read_prompts(ctx.run)
    src = next(s for s in ctx.spec.sources if s.name == ctx.unit)
    with ExitStack() as stack:
        given = ctx.options.endpoints.get(src.name)  # a running server for this source wins
        if given:
            backend = chat_client(ctx, given, src.name)
        elif src.endpoint is not None:
            backend = external_backend(ctx, src.endpoint)
        else:
            (server,) = [s for s in servers(ctx.spec, ctx.name, ctx.run.uri) if s.source == src.name]
            backend = stack.enter_context(chat_backend(ctx, server))
        return {"prompts": len(prompts), **asyncio.run(_sample(backend, prompts, ctx, src.name, src.name))}


def sample_target(ctx: StageContext) -> dict[str, Any]:
    """N answers of Target-SFT per PO/eval prompt into `target.jsonl`."""
    prompts = read_prompts(ctx.run, ("po", "eval"))
    (server,) = servers(ctx.spec, ctx.name, ctx.run.uri)
    model_dir = None
    if given_endpoint(ctx, server) is None:
        model_dir = str(ctx.work.fetch(ctx.run, "sft", tree="model"))
    with chat_backend(ctx, server, model_dir) as backend:
        result = asyncio.run(_sample(backend, prompts, ctx, server.served_name, "target"))
    return {"prompts": len(prompts), **result}


# ---------------------------------------------------------------------------------------------- scoring


def _score_file(ctx: StageContext, stage: str, name: str, prompts: dict[str, PromptRecord]) -> dict[str, Any]:
    """Score this shard's share of the sample records in `stage`/`name` into `name` (ScoreRecords in the
    samples' order). The summary is additive over shards (`answers`, `score_sum`; an LLM judge's
    `unparsed`), and so is an LLM judge's `<name>.verdicts.jsonl`."""
    from tqdm.auto import tqdm

    from wrpo.data.scoring import score_samples

    samples = ctx.my_part(read_records(ctx.run, stage, name, SampleRecord))
    total = sum(len(s.responses) for s in samples)
    scorer = ctx.shared("reward", lambda: reward_scorer(ctx))  # loaded once for all units
    with tqdm(total=total, desc=f"score {name}", unit="answer") as bar:
        scores = score_samples(scorer, samples, prompts, progress=bar.update)
    ctx.out.put_text(name, dump_jsonl(scores))
    summary = {"answers": total, "score_sum": sum(v for s in scores for v in s.scores)}
    verdicts = getattr(scorer, "verdicts", None)
    if verdicts is not None:  # an LLM judge: every raw verdict, in the order the answers were scored
        keys = [{"prompt_id": s.prompt_id, "model": s.model, "response": j} for s in samples
                for j in range(len(s.responses))]
        mine = verdicts[len(verdicts) - total:]
        ctx.out.put_text(name.removesuffix(".jsonl") + ".verdicts.jsonl",
                         dump_jsonl(k | v for k, v in zip(keys, mine, strict=True)))
        summary["unparsed"] = sum(v["value"] is None for v in mine)
    return summary


def score_sources(ctx: StageContext) -> dict[str, Any]:
    """One unit: the reward of every answer of source `ctx.unit` into `<source>.jsonl`."""
    prompts = {p.prompt_id: p for p in read_prompts(ctx.run)}
    return _score_file(ctx, "sample-sources", f"{ctx.unit}.jsonl", prompts)


def score_target(ctx: StageContext) -> dict[str, Any]:
    """Reward of every Target-SFT answer into `target.jsonl`."""
    prompts = {p.prompt_id: p for p in read_prompts(ctx.run, ("po", "eval"))}
    return _score_file(ctx, "sample-target", "target.jsonl", prompts)


# ---------------------------------------------------------------------------------------------- selection


def _candidates(run: RunDir, sample_stage: str, score_stage: str, file: str) -> dict[str, list[Any]]:
    """prompt_id -> scored candidates of one model's sample and score files."""
    from wrpo.data.selection import join_candidates

    samples = read_records(run, sample_stage, file, SampleRecord)
    scores = {s.prompt_id: s for s in read_records(run, score_stage, file, ScoreRecord)}
    out = {}
    for s in samples:
        if s.prompt_id not in scores:
            raise DataError(run.stage(score_stage).uri(file), f"no scores for prompt '{s.prompt_id}'")
        out[s.prompt_id] = join_candidates(s, scores[s.prompt_id], run.stage(score_stage).uri(file))
    return out


def select_sources(ctx: StageContext) -> dict[str, Any]:
    """y_ws per prompt (sft.jsonl for Target-SFT, chosen_source.jsonl for all) and the contributions."""
    from wrpo.data.selection import choose_sources, contributions, plot_contributions, source_names

    spec, run, out = ctx.spec, ctx.run, ctx.out

    splits = {name: read_records(run, "prepare", f"{name}.jsonl", PromptRecord) for name in SPLITS}
    names = source_names(spec.sources, spec.selection.source_groups)
    cands: dict[str, list[Any]] = {}
    for name in names:
        for pid, cs in _candidates(run, "sample-sources", "score-sources", f"{name}.jsonl").items():
            cands.setdefault(pid, []).extend(cs)
    ids = [p.prompt_id for split in SPLITS for p in splits[split]]
    choices, dropped = choose_sources(ids, cands, names, spec.selection)
    by_id = {c.prompt_id: c for c in choices}
    sft = [{"prompt_id": p.prompt_id, "prompt": [m.model_dump() for m in p.prompt],
            "response": by_id[p.prompt_id].chosen.text, "source_model": by_id[p.prompt_id].chosen.model,
            "score": by_id[p.prompt_id].chosen.score} for p in splits["sft"] if p.prompt_id in by_id]
    out.put_text("sft.jsonl", dump_jsonl(sft))
    out.put_text("chosen_source.jsonl", dump_jsonl(c.to_json() for c in choices))
    report = {"sources": names, "all": contributions(choices, names)}
    for split in SPLITS:
        ids_split = {p.prompt_id for p in splits[split]}
        report[split] = contributions([c for c in choices if c.prompt_id in ids_split], names)
    out.put_text("contributions.json", json.dumps(report, indent=2) + "\n")
    out.put_bytes("contributions.png", plot_contributions(report["all"]))
    return {"prompts": len(ids), "chosen": len(choices), "sft_examples": len(sft), **dict(dropped),
            "shares": {k: round(v, 4) for k, v in report["all"]["shares"].items()}}


def build_pairs(ctx: StageContext) -> dict[str, Any]:
    """WRPO quadruples for the PO split (train.jsonl) and the eval holdout (eval.jsonl), plus stats.json."""
    from wrpo.data.selection import SourceChoice
    from wrpo.data.selection import build_pairs as make_pairs

    spec, run, out = ctx.spec, ctx.run, ctx.out

    choices = {c["prompt_id"]: SourceChoice.from_json(c)
               for c in (json.loads(line) for line in
                         run.stage("select-sources").read_text("chosen_source.jsonl").splitlines() if line)}
    target = _candidates(run, "sample-target", "score-target", "target.jsonl")
    stats: dict[str, Any] = {}
    for split, file in (("po", "train.jsonl"), ("eval", "eval.jsonl")):
        prompts = read_records(run, "prepare", f"{split}.jsonl", PromptRecord)
        records, st = make_pairs(prompts, choices, target, spec.selection.min_reward_gap)
        out.put_text(file, dump_jsonl(records))
        stats[file.removesuffix(".jsonl")] = st.to_json()
    if stats["train"]["pairs"] == 0:
        raise WrpoError(f"build-pairs: no training pairs survived ({json.dumps(stats['train']['dropped'])})")
    out.put_text("stats.json", json.dumps(stats, indent=2) + "\n")
    return {"train_pairs": stats["train"]["pairs"], "eval_pairs": stats["eval"]["pairs"],
            "dropped": stats["train"]["dropped_total"] + stats["eval"]["dropped_total"]}
