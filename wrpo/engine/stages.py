"""The training stages' bodies (sft, ref-logps, wrpo): spec → trainer config, inputs fetched, outputs uploaded.

The trainers work on local files; these bodies fetch what a stage reads into the run's workdir (local
copies keyed by the committed hash of the stage they come from, `wrpo.pipeline.workdir`), train in the
stage's scratch folder (so a killed training resumes from its checkpoints), and upload the results from
global rank 0 only. Under torchrun every rank runs the same body.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from wrpo.pipeline.context import StageContext, is_rank_zero
from wrpo.pipeline.plan import target_model_uri
from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.spec import FusionSpec
from wrpo.pipeline.workdir import Workdir
from wrpo.storage import S3Options

REF_NAMES = [f"{split}{suffix}" for split in ("train", "eval")
             for suffix in (".ref_logps.jsonl", ".ref_logps.meta.json")]


def fetch_sft_model(run: RunDir, work: Workdir) -> Path:
    """A local copy of the committed Target-SFT model."""
    return work.fetch(run, "sft", tree="model")


def fetch_pairs(run: RunDir, work: Workdir) -> Path:
    """The quadruples (train.jsonl, eval.jsonl) with their reference log-probs beside them, where the
    trainer looks for them."""
    return work.fetch_together(run, {"build-pairs": ["train.jsonl", "eval.jsonl"], "ref-logps": REF_NAMES},
                               "pairs-with-refs")


def _ensure_distributed_env(deepspeed_stage: int) -> None:
    """DeepSpeed needs a process group even for one process: give a plain `wrpo run` one on loopback."""
    if deepspeed_stage and "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))


def trainer_config(cls: type, spec: FusionSpec, section: Any, **fields: Any) -> Any:
    """The trainer config (`SFTConfig` / `WRPOConfig`) of a spec section: every field of `spec.training`
    and of the section that the config also has, by name — the one spec → config mapping for both
    trainings (the names are the same on purpose; tests/unit/test_trainer_config.py keeps them so)."""
    from dataclasses import fields as dataclass_fields

    names = {f.name for f in dataclass_fields(cls)}
    values = {name: value for part in (spec.training, section) for name, value in part if name in names}
    return cls(**{**values, **fields})


def sft(ctx: StageContext) -> dict[str, Any]:
    """Target-SFT on y_ws of the SFT split (select-sources/sft.jsonl)."""
    from wrpo.engine.config import SFTConfig
    from wrpo.engine.sft import run_sft as train_sft

    spec, out = ctx.spec, ctx.out
    data = ctx.work.fetch(ctx.run, "select-sources", ["sft.jsonl"]) / "sft.jsonl"
    model = ctx.work.model(spec.target.model, S3Options.from_spec(spec.storage))
    cfg = trainer_config(SFTConfig, spec, spec.sft, model=Path(model), data=data,
                         output_dir=ctx.work.scratch(ctx.name, ctx.hash),
                         max_prompt_length=max(8, spec.sft.max_length // 2))
    _ensure_distributed_env(cfg.deepspeed_stage)
    result = train_sft(cfg)
    if is_rank_zero():
        out.put_tree("model", cfg.output_dir / "model")
        out.put_file("metrics.jsonl", cfg.output_dir / "metrics.jsonl")
    return {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def ref_logps(ctx: StageContext) -> dict[str, Any]:
    """log πref(y|x) of Target-SFT for every response of the train and eval quadruples, once. Sharded
    (`--shard i/K`), it computes this shard's share of each split; the parts concatenate to the whole."""
    from wrpo.engine.ref_logps import compute_reference_logps

    spec, out = ctx.spec, ctx.out
    pairs = ctx.work.fetch(ctx.run, "build-pairs", ["train.jsonl", "eval.jsonl"])
    model = fetch_sft_model(ctx.run, ctx.work)
    summary: dict[str, Any] = {}
    if not is_rank_zero():
        return summary
    scratch = ctx.work.scratch(ctx.name, ctx.hash)
    w = spec.wrpo
    for split in ("train", "eval"):
        lines = [line for line in (pairs / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        data = scratch / f"{split}.jsonl"
        data.write_text("".join(line + "\n" for line in ctx.my_part(lines)))
        path = compute_reference_logps(model, data, scratch / f"{split}.ref_logps.jsonl", max_length=w.max_length,
                                       max_prompt_length=w.max_prompt_length,
                                       batch_size=w.per_device_batch_size, precision=spec.training.precision)
        meta = path.with_name(path.name.removesuffix(".jsonl") + ".meta.json")
        # the same in every shard: what the values depend on, not where this process kept its copies
        fields = {k: v for k, v in json.loads(meta.read_text()).items() if k not in ("records", "reference_model")}
        meta.write_text(json.dumps({**fields, "reference_model": target_model_uri(ctx.run.uri)}, indent=2,
                                   sort_keys=True) + "\n")
        out.put_file(f"{split}.ref_logps.jsonl", path)
        out.put_file(f"{split}.ref_logps.meta.json", meta)
        summary[f"{split}_records"] = len(ctx.my_part(lines))
    return summary


def wrpo_config(spec: FusionSpec, model: Path, data: Path, output_dir: Path, **overrides: Any):
    """The trainer config of the spec's `wrpo` section (overrides for experiments)."""
    from wrpo.engine.config import WRPOConfig

    eval_data = data.with_name("eval.jsonl")
    has_eval = eval_data.exists() and eval_data.read_text().strip() != ""
    return trainer_config(WRPOConfig, spec, spec.wrpo, **{
        "model": model, "data": data, "output_dir": output_dir, "eval_data": eval_data if has_eval else None,
        "top_k_sources": spec.selection.top_k_sources, **overrides})


def wrpo(ctx: StageContext) -> dict[str, Any]:
    """WRPO on the build-pairs quadruples from Target-SFT; also the before/after log-probs (Fig. 1)."""
    from wrpo.engine.wrpo_trainer import run_wrpo as train_wrpo

    out = ctx.out
    data = fetch_pairs(ctx.run, ctx.work) / "train.jsonl"
    model = fetch_sft_model(ctx.run, ctx.work)
    scratch = ctx.work.scratch(ctx.name, ctx.hash)
    cfg = wrpo_config(ctx.spec, model, data, scratch / "out")
    _ensure_distributed_env(cfg.deepspeed_stage)
    result = train_wrpo(cfg)
    if not is_rank_zero():
        return {}
    out_dir = cfg.output_dir
    out.put_tree("model", out_dir / "model")
    out.put_file("metrics.jsonl", out_dir / "metrics.jsonl")
    if (out_dir / "eval_metrics.json").exists():
        out.put_file("eval_metrics.json", out_dir / "eval_metrics.json")
    out.put_text("logps.jsonl", logp_shift(cfg, data, out_dir / "model", scratch))
    summary = _wrpo_summary(result, out_dir / "metrics.jsonl")
    out.put_text("model/README.md", _model_card(ctx, summary))  # the card beside the weights (docs/eval.md)
    return summary


def _model_card(ctx: StageContext, summary: dict[str, Any]) -> str:
    """The fused model's card: sources and their y_ws shares, reward model, hyper-parameters, hashes."""
    from wrpo.pipeline.card import model_card, read_target_card

    contributions = json.loads(ctx.run.stage("select-sources").read_text("contributions.json")).get("all")
    target = read_target_card(ctx.spec.target.model, S3Options.from_spec(ctx.spec.storage))
    return model_card(ctx.spec, ctx.hashes, contributions, summary, target=target)


def _wrpo_summary(result: dict[str, Any], metrics: Path) -> dict[str, Any]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary = {"steps": result.get("steps"), "train_loss": result.get("train_loss")}
    if rows:
        last = rows[-1]
        for key in ("alpha", "margins/hybrid", "margins/on_policy", "accuracy/hybrid"):
            if key in last:
                summary[key.replace("/", "_")] = last[key]
    return summary


def logp_shift(cfg, data: Path, trained: Path, wd: Path) -> str:
    """Per-token average log-probs of y_ws, y_wt, y_l under Target-SFT (before) and the trained model."""
    from wrpo.engine.ref_logps import compute_reference_logps

    before = _avg_logps(data.with_name(data.name.removesuffix(".jsonl") + ".ref_logps.jsonl"))
    after_path = compute_reference_logps(trained, data, wd / "after.logps.jsonl", max_length=cfg.max_length,
                                         max_prompt_length=cfg.max_prompt_length,
                                         batch_size=cfg.per_device_batch_size, precision=cfg.precision)
    after = _avg_logps(after_path)
    rows = [{"prompt_id": pid, "before": before[pid], "after": after[pid]} for pid in before if pid in after]
    return "".join(json.dumps(r) + "\n" for r in rows)


def _avg_logps(path: Path) -> dict[str, dict[str, float]]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out[row["prompt_id"]] = {k: v / max(1, row["tokens"][k]) for k, v in row["logps"].items()}
    return out
