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
import hashlib
import itertools
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from typing import Any

from wrpo.data.backends import chat_backend, chat_client, external_backend, reward_scorer
from wrpo.data.serving import given_endpoint
from wrpo.errors import DataError, WrpoError
from wrpo.pipeline.context import StageContext
from wrpo.pipeline.plan import servers
from wrpo.pipeline.rundir import RunDir
from wrpo.records import (
    PromptRecord,
    SampleRecord,
    ScoreRecord,
    dump_jsonl,
    dump_line,
    iter_jsonl,
    parse_jsonl,
    parse_line,
    prompt_id_of,
    split_lines,
)
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


Keep = Callable[[str], bool] | None  # which prompt ids a shard keeps (None: all of them)


def prompt_shard(pid: str, count: int) -> int:
    """The shard of prompt `pid` among `count` (docs/data.md, "Shards"): a stable hash of the id alone,
    so a prompt's shard never depends on the other prompts or on where the stage runs."""
    return int.from_bytes(hashlib.sha256(pid.encode()).digest()[:8], "big") % count


def shard_keep(ctx: StageContext) -> Keep:
    """The prompts of this invocation's shard `--shard i/K` (None without one: all prompts)."""
    i, k = ctx.shard
    return None if k == 1 else (lambda pid: prompt_shard(pid, k) == i)


def kept_lines(lines: Iterator[str], keep: Keep) -> Iterator[str]:
    """`lines` with the records of prompts not kept blanked (so line numbers stay right), read for their
    prompt id only (`prompt_id_of`): a shard parses just its own records."""
    if keep is None:
        yield from lines
        return
    for text in lines:
        pid = prompt_id_of(text)
        yield "" if pid is not None and not keep(pid) else text


def iter_records(run: RunDir, stage: str, name: str, model: type, keep: Keep = None) -> Iterator[tuple[int, Any]]:
    """(line, record) of a committed stage's JSONL object, streamed (docs/data.md, "Scale"): one line
    in memory at a time; errors name the object's URI and line, and the object is checked against the
    manifest when its end is reached. With `keep`, only the records of the prompts it keeps."""
    sd = run.stage(stage)
    return iter_jsonl(kept_lines(sd.iter_lines(name), keep), model, sd.uri(name))


def iter_prompts(run: RunDir, splits: Sequence[str] = SPLITS, keep: Keep = None) -> Iterator[tuple[int, PromptRecord]]:
    """`read_prompts`, streamed (with `keep`: only the prompts it keeps)."""
    for split in splits:
        yield from iter_records(run, "prepare", f"{split}.jsonl", PromptRecord, keep)


class InOrder:
    """The records of one stream read alongside the prepared prompts, which every data stage writes in
    the same order (prepare's sft, po, eval; docs/data.md, "Scale"): `take(pid)` gives the record of
    the current prompt (None when the stream has none), `seek(pid)` skips to it. Only the next record is
    held. A record left over at `finish` was out of that order, repeated or of an unknown prompt."""

    def __init__(self, records: Iterator[tuple[int, Any]], uri: str, key: Callable[[Any], str] | None = None):
        self._records, self.uri = records, uri
        self._key = key or (lambda r: r.prompt_id)
        self._next = next(self._records, None)

    def take(self, pid: str) -> Any | None:
        if self._next is None or self._key(self._next[1]) != pid:
            return None
        rec = self._next[1]
        self._next = next(self._records, None)
        return rec

    def seek(self, pid: str) -> Any | None:
        while self._next is not None and self._key(self._next[1]) != pid:
            self._next = next(self._records, None)
        return self.take(pid)

    def finish(self) -> None:
        if self._next is not None:
            line, rec = self._next
            raise DataError(self.uri, f"the record of prompt '{self._key(rec)}' is out of the prepared prompts' "
                            "order (sft, po, eval), repeated, or of a prompt that was not prepared; the data "
                            "stages stream their inputs in that order", line, "prompt_id")


def progress(desc: str, unit: str, total: int | None = None) -> Any:
    """A progress bar (records done, records/s) for `wrpo run` and a pod's log: refreshed twice a second
    on a terminal, every 30 s otherwise, so a log gets a line now and then."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, mininterval=0.5 if sys.stderr.isatty() else 30.0)


def split_sizes(run: RunDir, splits: Sequence[str] = SPLITS) -> int | None:
    """How many prompts the splits hold (prepare's summary), for progress bars; None if unknown."""
    summary = run.stage("prepare").manifest().get("summary", {})
    sizes = [summary.get(split) for split in splits]
    return sum(sizes) if all(isinstance(n, int) for n in sizes) else None


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


async def _sample(backend: Any, ctx: StageContext, splits: Sequence[str], name: str, file: str) -> dict[str, Any]:
    """Sample the prompts of `splits`, streamed from prepare's objects (docs/data.md, "Scale")."""
    from wrpo.data.sampling import SamplingParams, sample_group

    params = SamplingParams.from_spec(ctx.spec.sampling)
    prompts = (p for _, p in iter_prompts(ctx.run, splits))
    async with backend:
        return await sample_group(backend, prompts, params, ctx.out, name, ctx.spec.sampling.shard_size,
                                  file=file, total=split_sizes(ctx.run, splits))


def sample_sources(ctx: StageContext) -> dict[str, Any]:
    """One unit: N answers per prompt (all splits) from source `ctx.unit` into `<source>.jsonl`, shard by
    shard (a killed unit resumes at its first uncommitted shard)."""
    src = next(s for s in ctx.spec.sources if s.name == ctx.unit)
    with ExitStack() as stack:
        given = ctx.options.endpoints.get(src.name)  # a running server for this source wins
        if given:
            backend = chat_client(ctx, given, src.name, discover=True)  # its replicas: docs/operator.md
        elif src.endpoint is not None:
            backend = external_backend(ctx, src.endpoint)
        else:
            (server,) = [s for s in servers(ctx.spec, ctx.name, ctx.run.uri) if s.source == src.name]
            backend = stack.enter_context(chat_backend(ctx, server))
        return asyncio.run(_sample(backend, ctx, SPLITS, src.name, src.name))


def sample_target(ctx: StageContext) -> dict[str, Any]:
    """N answers of Target-SFT per PO/eval prompt into `target.jsonl`."""
    (server,) = servers(ctx.spec, ctx.name, ctx.run.uri)
    model_dir = None
    if given_endpoint(ctx, server) is None:
        model_dir = str(ctx.work.fetch(ctx.run, "sft", tree="model"))
    with chat_backend(ctx, server, model_dir) as backend:
        return asyncio.run(_sample(backend, ctx, ("po", "eval"), server.served_name, "target"))


# ---------------------------------------------------------------------------------------------- scoring


SCORE_CHECKPOINT = 1024  # sample records per committed scoring checkpoint: with N answers each, a multiple
# of the scorer's 1024-answer chunks, so checkpoints do not change what the scorer is sent together


def _score_file(ctx: StageContext, stage: str, name: str, splits: Sequence[str]) -> dict[str, Any]:
    """Score this shard's share of the sample records in `stage`/`name` into `name` (ScoreRecords in the
    samples' order), streamed (docs/data.md, "Scale"): the samples are read line by line and only this
    shard's lines are parsed; every SCORE_CHECKPOINT records the scores are committed as a checkpoint
    (a `_shards/` group of this stage, keyed by the unit's hash, the shard and the samples' sha256), so
    a killed unit or shard resumes after its last checkpoint; the object is then assembled from them.
    The summary is additive over shards (`answers`, `score_sum`; an LLM judge's `unparsed`), and so is
    an LLM judge's `<name>.verdicts.jsonl`."""
    import hashlib

    from wrpo.data.scoring import score_stream

    sd = ctx.run.stage(stage)
    i, k = ctx.shard
    lo, hi = 0, None
    if k > 1:  # this shard's contiguous share (ctx.my_part) of the records, counted without parsing
        total = sum(1 for line in sd.iter_lines(name) if line.strip())
        lo, hi = total * i // k, total * (i + 1) // k
    stem = name.removesuffix(".jsonl")
    group, verdict_group = f"{stem}.{i}-of-{k}", f"{stem}.{i}-of-{k}.verdicts"
    made_from = f"{ctx.unit_hash}:{i}/{k}:{sd.objects()[name]['sha256']}"

    def key(index: int) -> str:
        return hashlib.sha256(f"{made_from}:{index}".encode()).hexdigest()

    store = ctx.out.stage
    done = store.committed_shards(group)
    reused = 0
    while reused in done and done[reused].key == key(reused):
        reused += 1
    skip = sum(done[j].meta["records"] for j in range(reused))
    scorer = ctx.shared("reward", lambda: reward_scorer(ctx))  # loaded once for all units
    judge = getattr(scorer, "verdicts", None) is not None
    prompts = InOrder(iter_prompts(ctx.run, splits), "prepare")

    def mine() -> Iterator[tuple[SampleRecord, PromptRecord | None]]:
        number = 0
        for line, text in enumerate(sd.iter_lines(name), start=1):
            if not text.strip():
                continue
            number += 1
            if number <= lo + skip:
                continue
            if hi is not None and number > hi:
                return
            sample = parse_line(text, SampleRecord, sd.uri(name), line)
            yield sample, prompts.seek(sample.prompt_id)

    index, records = reused, mine()
    with progress(f"score {name}", "answer") as bar:
        bar.update(sum(done[j].meta["answers"] for j in range(reused)))
        while batch := list(itertools.islice(records, SCORE_CHECKPOINT)):
            scores = list(score_stream(scorer, batch, progress=bar.update))
            answers = sum(len(r.scores) for r in scores)
            meta = {"records": len(scores), "answers": answers, "score_sum": sum(v for r in scores for v in r.scores)}
            if judge:  # an LLM judge: every raw verdict, in the order the answers were scored
                mine_v = scorer.verdicts[len(scorer.verdicts) - answers:]
                keys = [{"prompt_id": r.prompt_id, "model": r.model, "response": j} for r in scores
                        for j in range(len(r.scores))]
                ctx.out.commit_shard(verdict_group, index, dump_jsonl(
                    kv | v for kv, v in zip(keys, mine_v, strict=True)).encode(), key(index))
                meta["unparsed"] = sum(v["value"] is None for v in mine_v)
            ctx.out.commit_shard(group, index, dump_jsonl(scores).encode(), key(index), meta)
            index += 1
    done = store.committed_shards(group)
    ctx.out.put_chunks(name, store.prefetched(done[j] for j in range(index)))
    metas = [done[j].meta for j in range(index)]
    summary = {"answers": sum(m["answers"] for m in metas), "score_sum": 0.0}
    for m in metas:
        summary["score_sum"] += m["score_sum"]
    if judge:
        verdicts = store.committed_shards(verdict_group)
        ctx.out.put_chunks(f"{stem}.verdicts.jsonl", store.prefetched(verdicts[j] for j in range(index)))
        summary["unparsed"] = sum(m["unparsed"] for m in metas)
    return summary


def score_sources(ctx: StageContext) -> dict[str, Any]:
    """One unit: the reward of every answer of source `ctx.unit` into `<source>.jsonl`."""
    return _score_file(ctx, "sample-sources", f"{ctx.unit}.jsonl", SPLITS)


def score_target(ctx: StageContext) -> dict[str, Any]:
    """Reward of every Target-SFT answer into `target.jsonl`."""
    return _score_file(ctx, "sample-target", "target.jsonl", ("po", "eval"))


# ---------------------------------------------------------------------------------------------- selection


class Scored:
    """One model's sample and score objects read side by side in prompt order (`InOrder`): `take(pid)`
    gives the prompt's scored candidates (none when the model has no record of it)."""

    def __init__(self, run: RunDir, sample_stage: str, score_stage: str, file: str, keep: Keep = None):
        self.uri = run.stage(score_stage).uri(file)
        self.samples = InOrder(iter_records(run, sample_stage, file, SampleRecord, keep),
                               run.stage(sample_stage).uri(file))
        self.scores = InOrder(iter_records(run, score_stage, file, ScoreRecord, keep), self.uri)

    def take(self, pid: str) -> list[Any]:
        from wrpo.data.selection import join_candidates

        sample, score = self.samples.take(pid), self.scores.take(pid)
        if sample is None:
            return []
        if score is None:
            raise DataError(self.uri, f"no scores for prompt '{pid}'")
        return join_candidates(sample, score, self.uri)

    def finish(self) -> None:
        self.samples.finish()
        self.scores.finish()


def select_sources(ctx: StageContext) -> dict[str, Any]:
    """y_ws per prompt (sft.jsonl for Target-SFT, chosen_source.jsonl for all) and the contributions.

    Streamed (docs/data.md, "Scale"): the prompts and every source's samples and scores are read side
    by side in prompt order, and each prompt's choice is written before the next prompt is read. A shard
    (`--shard i/K`) does the prompts of its hash (`prompt_shard`) and leaves the contributions to the
    assembly of the parts (`assemble_select_sources`), which needs every shard's counts."""
    from wrpo.data.selection import choose_one, source_names

    spec, run, out = ctx.spec, ctx.run, ctx.out
    keep = shard_keep(ctx)
    names = source_names(spec.sources, spec.selection.source_groups)
    sources = [Scored(run, "sample-sources", "score-sources", f"{name}.jsonl", keep) for name in names]
    counts: dict[str, Counter[str]] = {split: Counter() for split in SPLITS}
    dropped: Counter[str] = Counter()
    prompts = sft_examples = 0
    with out.open("sft.jsonl") as sft, out.open("chosen_source.jsonl") as chosen, \
            progress("select-sources", "prompt", None if keep else split_sizes(run)) as bar:
        for split in SPLITS:
            for _, p in iter_records(run, "prepare", f"{split}.jsonl", PromptRecord, keep):
                prompts += 1
                cands = [c for src in sources for c in src.take(p.prompt_id)]
                choice = choose_one(p.prompt_id, cands, names, spec.selection, dropped)
                bar.update()
                if choice is None:
                    continue
                counts[split][choice.chosen.model] += 1
                chosen.write_line(dump_line(choice.to_json()))
                if split == "sft":
                    sft.write_line(dump_line({"prompt_id": p.prompt_id, "prompt": [m.model_dump() for m in p.prompt],
                                              "response": choice.chosen.text, "source_model": choice.chosen.model,
                                              "score": choice.chosen.score}))
                    sft_examples += 1
    for src in sources:
        src.finish()
    part = {"prompts": prompts, "sft_examples": sft_examples, "dropped": dict(dropped),
            "counts": {split: dict(c) for split, c in counts.items()}}
    return part if keep else _contributions(ctx.out, names, part)


def _contributions(out: Any, names: list[str], part: dict[str, Any]) -> dict[str, Any]:
    """Write contributions.json and .png from select-sources' counts (of one invocation or of all its
    shards added up) and return the stage's summary."""
    from wrpo.data.selection import contribution_counts, plot_contributions

    counts = {split: Counter(part["counts"][split]) for split in SPLITS}
    report = {"sources": names, "all": contribution_counts(sum(counts.values(), Counter()), names)}
    for split in SPLITS:
        report[split] = contribution_counts(counts[split], names)
    out.put_text("contributions.json", json.dumps(report, indent=2) + "\n")
    out.put_bytes("contributions.png", plot_contributions(report["all"]))
    return {"prompts": part["prompts"], "chosen": report["all"]["total"], "sft_examples": part["sft_examples"],
            **part["dropped"], "shares": {k: round(v, 4) for k, v in report["all"]["shares"].items()}}


def merge_parts(sd: Any, parts: Sequence[dict[str, Any]], out: Any, name: str, splits: Sequence[str]) -> None:
    """Write object `name` of a stage sharded by prompt from its parts' objects, in prompt order: prepare's
    prompts of `splits` are walked, and each takes the next line of its shard's part when that line is
    its record (docs/data.md, "Shards"). The result is byte for byte what one invocation writes; a
    line left over in a part (out of order, or of another shard) is an error naming the part's object."""
    k = len(parts)
    streams = [InOrder(((n, text) for n, text in enumerate(split_lines(sd.iter_part(p, name)), start=1) if text),
                       sd.uri(f"{p['prefix']}/{name}"), key=prompt_id_of) for p in parts]
    prepared = prompt_ids(sd.run, splits)
    with out.open(name) as f:
        for pid in prepared:
            text = streams[prompt_shard(pid, k)].take(pid)
            if text is not None:
                f.write_line(text + "\n")
    for stream in streams:
        stream.finish()


def prompt_ids(run: RunDir, splits: Sequence[str]) -> Iterator[str]:
    """The prepared prompts' ids of `splits` in order, read without parsing the prompts."""
    prepare = run.stage("prepare")
    for split in splits:
        for line, text in enumerate(prepare.iter_lines(f"{split}.jsonl"), start=1):
            if text.strip():
                pid = prompt_id_of(text)
                if pid is None:
                    raise DataError(prepare.uri(f"{split}.jsonl"), "no prompt_id", line, "prompt_id")
                yield pid


def _added(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Numbers added up over the parts' summaries, recursively through dicts (counts per key)."""
    out: dict[str, Any] = {}
    for summary in summaries:
        for key, value in summary.items():
            if isinstance(value, dict):
                out[key] = _added([out.get(key, {}), value])
            else:
                out[key] = out.get(key, 0) + value
    return out


def assemble_select_sources(spec: Any, sd: Any, parts: Sequence[dict[str, Any]], out: Any) -> dict[str, Any]:
    """select-sources' objects from its K shards (the plan row's `assemble`): sft.jsonl and
    chosen_source.jsonl merged back into prompt order, the contributions from the added-up counts."""
    from wrpo.data.selection import source_names

    merge_parts(sd, parts, out, "sft.jsonl", ("sft",))
    merge_parts(sd, parts, out, "chosen_source.jsonl", SPLITS)
    part = _added([p["summary"] for p in parts])
    part.setdefault("dropped", {})
    part["counts"] = {split: part.get("counts", {}).get(split, {}) for split in SPLITS}
    return _contributions(out, source_names(spec.sources, spec.selection.source_groups), part)


def build_pairs(ctx: StageContext) -> dict[str, Any]:
    """WRPO quadruples for the PO split (train.jsonl) and the eval holdout (eval.jsonl), plus stats.json.

    Streamed like select-sources: the prompts, the source choices and the target's samples and scores
    side by side in prompt order, each quadruple written as it is made. A shard (`--shard i/K`) does the
    prompts of its hash; `assemble_build_pairs` merges the parts and writes stats.json."""
    from wrpo.data.selection import PairStats, SourceChoice, pair_for

    spec, run, out = ctx.spec, ctx.run, ctx.out
    keep = shard_keep(ctx)
    sd = run.stage("select-sources")
    lines = enumerate(kept_lines(sd.iter_lines("chosen_source.jsonl"), keep), start=1)
    choices = InOrder(((n, SourceChoice.from_json(json.loads(line))) for n, line in lines if line),
                      sd.uri("chosen_source.jsonl"))
    target = Scored(run, "sample-target", "score-target", "target.jsonl", keep)
    for _, p in iter_records(run, "prepare", "sft.jsonl", PromptRecord, keep):  # chosen_source.jsonl starts with them
        choices.take(p.prompt_id)
    stats: dict[str, Any] = {}
    with progress("build-pairs", "prompt", None if keep else split_sizes(run, ("po", "eval"))) as bar:
        for split, file in (("po", "train.jsonl"), ("eval", "eval.jsonl")):
            st = PairStats()
            with out.open(file) as f:
                for _, p in iter_records(run, "prepare", f"{split}.jsonl", PromptRecord, keep):
                    rec = pair_for(p, choices.take(p.prompt_id), target.take(p.prompt_id),
                                   spec.selection.min_reward_gap, st)
                    bar.update()
                    if rec is not None:
                        f.write_line(dump_line(rec))
            stats[file.removesuffix(".jsonl")] = st.to_json()
    choices.finish()
    target.finish()
    return {"stats": stats} if keep else _pair_stats(out, stats)


def _pair_stats(out: Any, stats: dict[str, Any]) -> dict[str, Any]:
    """Write build-pairs' stats.json (refusing a run without training pairs) and return its summary."""
    if stats["train"]["pairs"] == 0:
        raise WrpoError(f"build-pairs: no training pairs survived ({json.dumps(stats['train']['dropped'])})")
    out.put_text("stats.json", json.dumps(stats, indent=2) + "\n")
    return {"train_pairs": stats["train"]["pairs"], "eval_pairs": stats["eval"]["pairs"],
            "dropped": stats["train"]["dropped_total"] + stats["eval"]["dropped_total"]}


def assemble_build_pairs(spec: Any, sd: Any, parts: Sequence[dict[str, Any]], out: Any) -> dict[str, Any]:
    """build-pairs' objects from its K shards (the plan row's `assemble`): train.jsonl and eval.jsonl
    merged back into prompt order, stats.json from the added-up counts."""
    from wrpo.data.selection import PairStats

    merge_parts(sd, parts, out, "train.jsonl", ("po",))
    merge_parts(sd, parts, out, "eval.jsonl", ("eval",))
    stats = {}
    for file in ("train", "eval"):
        got = [p["summary"]["stats"][file] for p in parts]
        stats[file] = PairStats(sum(g["prompts"] for g in got), sum(g["pairs"] for g in got),
                                sum((Counter(g["dropped"]) for g in got), Counter())).to_json()
    return _pair_stats(out, stats)
