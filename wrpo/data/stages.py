"""The data stages' bodies: prepare, sample-sources, score-sources, select-sources, sample-target,
score-target, build-pairs (docs/architecture.md, "Stages and the run directory").

Each body takes a `StageContext`, reads committed earlier stages from `ctx.run`, writes its objects
through `ctx.out` and returns a short summary; `wrpo.pipeline.runtime.run_stage` commits the manifest.
The sampling stages also commit shards as they go, so a killed sampling stage resumes where it stopped.
The vLLM servers a stage needs are those of its plan row (`wrpo.pipeline.plan.servers`): one with an
endpoint in `ctx.options` (the operator's Services) is used as it is; the others are served locally
(vLLM if available, else transformers generate).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from wrpo.errors import DataError, WrpoError
from wrpo.pipeline.context import StageContext
from wrpo.pipeline.plan import Server, servers
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


# ---------------------------------------------------------------------------------------------- serving


def given_endpoint(ctx: StageContext, server: Server) -> str | None:
    """The URL of an already-running server for `server` (the operator's Service), if one was given."""
    o = ctx.options
    if server.source is not None:
        return o.endpoints.get(server.source)
    return {"target": o.target_endpoint, "reward": o.reward_endpoint}.get(server.key)


def replica_devices(server: Server, replica: int) -> dict[str, str]:
    """The GPUs of one local replica: replica r gets GPUs [r·tp, (r+1)·tp) of those visible."""
    from wrpo.data.serving import on_gpu

    if server.replicas == 1 or not on_gpu():
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(server.replicas * server.tensor_parallel_size)]
    tp = server.tensor_parallel_size
    mine = ids[replica * tp:(replica + 1) * tp]
    if len(mine) < tp:
        raise WrpoError(f"{server.served_name}: {server.replicas} replicas × tensor-parallel {tp} need "
                        f"{server.replicas * tp} GPUs; {len(ids)} are visible")
    return {"CUDA_VISIBLE_DEVICES": ",".join(mine)}


@contextmanager
def serve(ctx: StageContext, server: Server, model_dir: str | None = None) -> Iterator[list[str] | None]:
    """The root URLs of `server`'s replicas: a given endpoint, or local vLLM servers started from the
    plan's description (stopped on exit); None when vLLM is not available here."""
    from wrpo.data.serving import VLLMServer, vllm_python

    endpoint = given_endpoint(ctx, server)
    if endpoint:
        yield [endpoint.removesuffix("/").removesuffix("/v1")]
        return
    if not vllm_python():
        yield None
        return
    path = model_dir or ctx.work.model(server.model, S3Options.from_spec(ctx.spec.storage))
    with ExitStack() as stack:
        replicas = [VLLMServer(path, server.served_name, runner=server.runner, max_model_len=server.max_model_len,
                               tensor_parallel_size=server.tensor_parallel_size,
                               gpu_memory_utilization=server.gpu_memory_utilization, extra_args=server.args,
                               extra_env=replica_devices(server, r))
                    for r in range(server.replicas)]
        for srv in replicas:  # start side by side, then wait for all
            stack.callback(srv.stop)
            srv.launch()
        for srv in replicas:
            srv.wait_healthy()
        yield [srv.root_url for srv in replicas]


def chat_client(ctx: StageContext, base_url: str | list[str], model: str, api_key: str | None = None) -> Any:
    """An OpenAI-compatible client with the spec's concurrency, timeout and retries."""
    from wrpo.data.sampling import ChatClient

    s = ctx.spec.sampling
    return ChatClient(base_url, model, api_key=api_key, concurrency=s.concurrency, timeout_s=s.request_timeout_s,
                      max_retries=s.max_retries)


@contextmanager
def chat_backend(ctx: StageContext, server: Server, model_dir: str | None = None) -> Iterator[Any]:
    """A ChatBackend for one served model: its server (given or local), or transformers generate."""
    from wrpo.data.sampling import GenerateBackend

    with serve(ctx, server, model_dir) as urls:
        if urls is not None:
            yield chat_client(ctx, [f"{u}/v1" for u in urls], server.served_name)
            return
        log.warning("vLLM is not available (set WRPO_VLLM_PYTHON); sampling %s with transformers generate, "
                    "one prompt at a time", server.served_name)
        yield GenerateBackend(model_dir or ctx.work.model(server.model, S3Options.from_spec(ctx.spec.storage)))


def external_backend(ctx: StageContext, endpoint: Any) -> Any:
    """A ChatBackend for an external OpenAI-compatible endpoint (its key from the env or a file)."""
    from wrpo.data.sampling import resolve_api_key

    return chat_client(ctx, endpoint.url, endpoint.model, resolve_api_key(endpoint.api_key_env,
                                                                         endpoint.api_key_file))


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


@contextmanager
def reward_scorer(ctx: StageContext) -> Iterator[Any]:
    """The scorer the spec asks for: in-process, an external pooling endpoint, or the plan's reward server."""
    from wrpo.data.scoring import ArmoRMScorer, JudgeScorer, RemoteScorer, SequenceClassifierScorer

    r, spec = ctx.spec.reward, ctx.spec
    if r.type == "judge":
        with judge_backend(ctx, r.judge, [s for s in servers(spec, ctx.name, ctx.run.uri) if s.key == "reward"]) \
                as backend:
            j = r.judge
            yield JudgeScorer(backend, j.endpoint.model if j.endpoint else j.model, j.max_tokens, j.temperature,
                              spec.sampling.seed, j.constrained, j.expected_grade)
        return
    model = ctx.work.model(r.model, S3Options.from_spec(spec.storage)) if r.model else None
    if r.type == "remote":
        if model is None:
            raise WrpoError("reward.model is needed to tokenise for a remote reward endpoint")
        with ExitStack() as stack:
            endpoint = r.endpoint
            for server in servers(spec, ctx.name, ctx.run.uri):  # no endpoint in the spec: serve the model
                if server.key != "reward":
                    continue
                urls = stack.enter_context(serve(ctx, server, model))
                if urls is None:
                    raise WrpoError("reward.type 'remote' without an endpoint needs vLLM to serve reward.model "
                                    "(set WRPO_VLLM_PYTHON)")
                endpoint = urls[0]
            yield RemoteScorer(endpoint, r.served_name, model, r.max_length, r.batch_size,
                               max_retries=spec.sampling.max_retries)
        return
    assert model is not None
    cls = ArmoRMScorer if r.type == "armorm" else SequenceClassifierScorer
    yield cls(model, max_length=r.max_length, batch_size=r.batch_size, name=r.model)


@contextmanager
def judge_backend(ctx: StageContext, judge: Any, served: list[Server]) -> Iterator[Any]:
    """The backend of an LLM judge (`JudgeSpec`): its external endpoint, or its model's server (`served`,
    given or started locally; transformers generate without vLLM)."""
    if judge.endpoint is not None:
        yield external_backend(ctx, judge.endpoint)
        return
    (server,) = served
    with chat_backend(ctx, server) as backend:
        yield backend


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
