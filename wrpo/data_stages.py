"""The data stages' bodies: prepare, sample-sources, score-sources, select-sources, sample-target,
score-target, build-pairs (ARCHITECTURE.md, "Stages and the run directory").

Each `run_<stage>(spec, run, out, options)` reads committed earlier stages from `run`, writes its objects
through `out` (a StageWriter) and returns a short summary; `wrpo.stages.run_stage` commits the manifest.
The sampling stages also commit shards as they go, so a killed sampling stage resumes where it stopped.
`options` is a `wrpo.stages.StageOptions` (endpoints of already-running servers, a scratch workdir); a
source or reward model without an endpoint is served locally (vLLM if available, else transformers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from wrpo.errors import DataError, WrpoError
from wrpo.records import PromptRecord, SampleRecord, ScoreRecord, dump_jsonl, parse_jsonl
from wrpo.spec import FusionSpec
from wrpo.storage import RunDir, S3Options, StageWriter, download_uri_tree

log = logging.getLogger(__name__)
SPLITS = ("sft", "po", "eval")


# ---------------------------------------------------------------------------------------------- helpers


def _opt(options: Any, name: str, default: Any = None) -> Any:
    """An attribute of the runner's StageOptions (None-safe, so stages can be called with options=None)."""
    return getattr(options, name, default) if options is not None else default


def read_records(run: RunDir, stage: str, name: str, model: type) -> list[Any]:
    """Records of a committed stage's JSONL object (errors name the object's URI and line)."""
    sd = run.stage(stage)
    return parse_jsonl(sd.read_text(name), model, sd.uri(name))


def read_prompts(run: RunDir, splits: Sequence[str] = SPLITS) -> list[PromptRecord]:
    """Prepared prompts of the given splits, in split order."""
    return [p for split in splits for p in read_records(run, "prepare", f"{split}.jsonl", PromptRecord)]


def _workdir(options: Any) -> Path:
    wd = _opt(options, "workdir")
    return Path(wd) if wd else Path(tempfile.mkdtemp(prefix="wrpo-data-"))


def local_model(uri: str, spec: FusionSpec, options: Any, name: str) -> str:
    """A local folder for a model given as a folder or an s3:// prefix (downloaded once into the workdir)."""
    if not uri.startswith("s3://"):
        return uri
    dest = _workdir(options) / "models" / name
    if not (dest / "config.json").exists():
        download_uri_tree(uri, dest, S3Options.from_spec(spec.storage))
    return str(dest)


# ---------------------------------------------------------------------------------------------- prepare


def run_prepare(spec: FusionSpec, run: RunDir, out: StageWriter,
                options: Any = None) -> dict[str, Any]:
    """Load, normalise, deduplicate and split the prompt dataset into sft/po/eval.jsonl."""
    from wrpo.prepare import load_rows, normalise, split_prompts

    ds = spec.dataset
    rows = load_rows(ds.uri, ds.format, S3Options.from_spec(spec.storage))
    prompts, report = normalise(rows, ds.uri, ds.prompt_field, ds.id_field, ds.max_prompts)
    if not prompts:
        raise DataError(ds.uri, f"no usable prompts ({report.dropped_empty} empty, "
                        f"{report.dropped_duplicates} duplicates)")
    split = split_prompts(prompts, ds.sft_fraction, ds.eval_size, ds.seed)
    for name in SPLITS:
        out.put_text(f"{name}.jsonl", dump_jsonl(getattr(split, name)))
    return {"rows": report.rows, "prompts": report.kept, "sft": len(split.sft), "po": len(split.po),
            "eval": len(split.eval), "dropped_empty": report.dropped_empty,
            "dropped_duplicates": report.dropped_duplicates, "dropped_over_max": report.dropped_over_max}


# ---------------------------------------------------------------------------------------------- sampling


@contextmanager
def chat_backend(spec: FusionSpec, name: str, options: Any, *, endpoint: str | None, served_model: str,
                 model: str | None, external: Any = None,
                 vllm: dict[str, Any] | None = None) -> Iterator[Any]:
    """A ChatBackend for one model: a given endpoint, an external one, a local vLLM server, or generate."""
    from wrpo.sampling import ChatClient, GenerateBackend, resolve_api_key
    from wrpo.serving import VLLMServer, vllm_python

    s = spec.sampling
    client = dict(concurrency=s.concurrency, timeout_s=s.request_timeout_s, max_retries=s.max_retries)
    if endpoint:
        yield ChatClient(endpoint, served_model, **client)
    elif external is not None:
        key = resolve_api_key(external.api_key_env, external.api_key_file)
        yield ChatClient(external.url, external.model, api_key=key, **client)
    elif vllm_python():
        path = local_model(model or "", spec, options, name)
        with VLLMServer(path, served_model, **(vllm or {})) as server:
            yield ChatClient(server.base_url, served_model, **client)
    else:
        log.warning("vLLM is not available (set WRPO_VLLM_PYTHON); sampling %s with transformers generate, "
                    "one prompt at a time", name)
        yield GenerateBackend(local_model(model or "", spec, options, name))


async def _sample(backend: Any, prompts: Sequence[PromptRecord], spec: FusionSpec, out: StageWriter,
                  name: str, file: str) -> dict[str, Any]:
    from wrpo.sampling import SamplingParams, sample_group

    params = SamplingParams.from_spec(spec.sampling)
    async with backend:
        return await sample_group(backend, prompts, params, out, name, spec.sampling.shard_size, file=file)


def run_sample_sources(spec: FusionSpec, run: RunDir, out: StageWriter,
                       options: Any = None) -> dict[str, Any]:
    """N answers per prompt (all splits) from every source into `<source>.jsonl`, shard by shard."""
    prompts = read_prompts(run)
    endpoints = _opt(options, "endpoints") or {}
    summary: dict[str, Any] = {"prompts": len(prompts)}
    for src in spec.sources:
        vllm = dict(max_model_len=src.max_model_len, tensor_parallel_size=src.tensor_parallel_size,
                    gpu_memory_utilization=src.gpu_memory_utilization, extra_args=src.vllm_args)
        with chat_backend(spec, src.name, options, endpoint=endpoints.get(src.name), served_model=src.name,
                          model=src.model, external=src.endpoint, vllm=vllm) as backend:
            summary[src.name] = asyncio.run(_sample(backend, prompts, spec, out, src.name, src.name))
    return summary


def run_sample_target(spec: FusionSpec, run: RunDir, out: StageWriter,
                      options: Any = None) -> dict[str, Any]:
    """N answers of Target-SFT per PO/eval prompt into `target.jsonl`."""
    prompts = read_prompts(run, ("po", "eval"))
    endpoint = _opt(options, "target_endpoint") or _opt(options, "endpoint")
    model_dir = _opt(options, "model_dir")
    with ExitStack() as stack:
        if not endpoint and not model_dir:
            model_dir = str(run.stage("sft").download_tree("model", _workdir(options) / "target-sft"))
        vllm = dict(tensor_parallel_size=spec.target.tensor_parallel_size, extra_args=spec.target.vllm_args)
        backend = stack.enter_context(chat_backend(spec, "target", options, endpoint=endpoint,
                                                   served_model=spec.target.served_name, model=model_dir,
                                                   vllm=vllm))
        result = asyncio.run(_sample(backend, prompts, spec, out, spec.target.served_name, "target"))
    return {"prompts": len(prompts), **result}


# ---------------------------------------------------------------------------------------------- scoring


@contextmanager
def reward_scorer(spec: FusionSpec, options: Any) -> Iterator[Any]:
    """The scorer the spec asks for; a `reward_endpoint` option (a running pooling server) wins."""
    from wrpo.scoring import ArmoRMScorer, RemoteScorer, SequenceClassifierScorer
    from wrpo.serving import VLLMServer

    r = spec.reward
    endpoint = _opt(options, "reward_endpoint") or (r.endpoint if r.type == "remote" else None)
    model = local_model(r.model, spec, options, "reward") if r.model else None
    if endpoint or r.type == "remote":
        if model is None:
            raise WrpoError("reward.model is needed to tokenise for a remote reward endpoint")
        with ExitStack() as stack:
            if not endpoint:
                endpoint = stack.enter_context(VLLMServer(model, r.served_name, runner="pooling")).root_url
            yield RemoteScorer(endpoint, r.served_name, model, r.max_length, r.batch_size,
                               max_retries=spec.sampling.max_retries)
        return
    assert model is not None
    cls = ArmoRMScorer if r.type == "armorm" else SequenceClassifierScorer
    yield cls(model, max_length=r.max_length, batch_size=r.batch_size, name=r.model)


def _score_file(scorer: Any, run: RunDir, stage: str, name: str, prompts: dict[str, PromptRecord],
                out: StageWriter) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from wrpo.scoring import score_samples

    samples = read_records(run, stage, name, SampleRecord)
    total = sum(len(s.responses) for s in samples)
    with tqdm(total=total, desc=f"score {name}", unit="answer") as bar:
        scores = score_samples(scorer, samples, prompts, progress=bar.update)
    out.put_text(name, dump_jsonl(scores))
    flat = [v for s in scores for v in s.scores]
    return {"answers": total, "mean": sum(flat) / len(flat) if flat else None}


def run_score_sources(spec: FusionSpec, run: RunDir, out: StageWriter,
                      options: Any = None) -> dict[str, Any]:
    """Reward of every source answer into `<source>.jsonl` (ScoreRecords)."""
    prompts = {p.prompt_id: p for p in read_prompts(run)}
    with reward_scorer(spec, options) as scorer:
        return {src.name: _score_file(scorer, run, "sample-sources", f"{src.name}.jsonl", prompts, out)
                for src in spec.sources}


def run_score_target(spec: FusionSpec, run: RunDir, out: StageWriter,
                     options: Any = None) -> dict[str, Any]:
    """Reward of every Target-SFT answer into `target.jsonl`."""
    prompts = {p.prompt_id: p for p in read_prompts(run, ("po", "eval"))}
    with reward_scorer(spec, options) as scorer:
        return _score_file(scorer, run, "sample-target", "target.jsonl", prompts, out)


# ---------------------------------------------------------------------------------------------- selection


def _candidates(run: RunDir, sample_stage: str, score_stage: str, file: str) -> dict[str, list[Any]]:
    """prompt_id -> scored candidates of one model's sample and score files."""
    from wrpo.selection import join_candidates

    samples = read_records(run, sample_stage, file, SampleRecord)
    scores = {s.prompt_id: s for s in read_records(run, score_stage, file, ScoreRecord)}
    out = {}
    for s in samples:
        if s.prompt_id not in scores:
            raise DataError(run.stage(score_stage).uri(file), f"no scores for prompt '{s.prompt_id}'")
        out[s.prompt_id] = join_candidates(s, scores[s.prompt_id], run.stage(score_stage).uri(file))
    return out


def run_select_sources(spec: FusionSpec, run: RunDir, out: StageWriter,
                       options: Any = None) -> dict[str, Any]:
    """y_ws per prompt (sft.jsonl for Target-SFT, chosen_source.jsonl for all) and the contributions."""
    from wrpo.selection import choose_sources, contributions, plot_contributions, source_names

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


def run_build_pairs(spec: FusionSpec, run: RunDir, out: StageWriter,
                    options: Any = None) -> dict[str, Any]:
    """WRPO quadruples for the PO split (train.jsonl) and the eval holdout (eval.jsonl), plus stats.json."""
    from wrpo.selection import SourceChoice, build_pairs

    choices = {c["prompt_id"]: SourceChoice.from_json(c)
               for c in (json.loads(line) for line in
                         run.stage("select-sources").read_text("chosen_source.jsonl").splitlines() if line)}
    target = _candidates(run, "sample-target", "score-target", "target.jsonl")
    stats: dict[str, Any] = {}
    for split, file in (("po", "train.jsonl"), ("eval", "eval.jsonl")):
        prompts = read_records(run, "prepare", f"{split}.jsonl", PromptRecord)
        records, st = build_pairs(prompts, choices, target, spec.selection.min_reward_gap)
        out.put_text(file, dump_jsonl(records))
        stats[file.removesuffix(".jsonl")] = st.to_json()
    if stats["train"]["pairs"] == 0:
        raise WrpoError(f"build-pairs: no training pairs survived ({json.dumps(stats['train']['dropped'])})")
    out.put_text("stats.json", json.dumps(stats, indent=2) + "\n")
    return {"train_pairs": stats["train"]["pairs"], "eval_pairs": stats["eval"]["pairs"],
            "dropped": stats["train"]["dropped_total"] + stats["eval"]["dropped_total"]}
