"""The training stages (sft, ref-logps, wrpo): spec → trainer config, inputs fetched, outputs uploaded.

The trainers work on local files; these bodies download what a stage reads from the run directory
into a stable work folder (so a killed training resumes from its checkpoints), run the trainer, and
upload the results from global rank 0 only. Under torchrun every rank runs the same body; only the
local rank 0 of each node downloads, the others wait for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from wrpo.errors import WrpoError
from wrpo.spec import FusionSpec
from wrpo.stages import StageOptions, is_rank_zero

DOWNLOAD_TIMEOUT_S = 3600


def workdir(run, options: StageOptions | None, stage: str) -> Path:
    """`--workdir` or ${WRPO_WORKDIR:-~/.cache/wrpo/work}/<hash of the run URI>/<stage>: stable across
    restarts of the same run, so training checkpoints survive a kill."""
    if options and options.workdir:
        base = Path(options.workdir)
    else:
        root = Path(os.environ.get("WRPO_WORKDIR", Path.home() / ".cache" / "wrpo" / "work"))
        base = root / hashlib.sha256(run.uri.encode()).hexdigest()[:16]
    path = base / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fetch_once(dest: Path, fetch, stage: str, version: str) -> Path:
    """Run `fetch(dest)` on local rank 0 unless `dest` already holds `version` of `stage`'s outputs
    (marker `dest/.fetched-<stage>` holds the stage's spec hash, so a re-run stage is fetched again);
    the other local ranks wait for the marker."""
    marker = dest / f".fetched-{stage}"

    def current() -> bool:
        return marker.exists() and marker.read_text() == version

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        if not current():
            marker.unlink(missing_ok=True)
            dest.mkdir(parents=True, exist_ok=True)
            fetch(dest)
            marker.write_text(version)
        return dest
    deadline = time.monotonic() + DOWNLOAD_TIMEOUT_S
    while not current():
        if time.monotonic() > deadline:
            raise WrpoError(f"timed out waiting for local rank 0 to download into {dest}")
        time.sleep(2)
    return dest


def _fetch_objects(run, stage: str, names: list[str], dest: Path) -> Path:
    def fetch(d: Path) -> None:
        sd = run.stage(stage)
        for n in names:
            sd.download(n, d / n)

    return _fetch_once(dest, fetch, stage, run.stage(stage).manifest()["spec_hash"])


def _fetch_sft_model(run, wd: Path) -> Path:
    def fetch(d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)  # no file of an older Target-SFT may survive
        run.stage("sft").download_tree("model", d)

    return _fetch_once(wd / "target-sft", fetch, "sft", run.stage("sft").manifest()["spec_hash"])


def _ensure_distributed_env(deepspeed_stage: int) -> None:
    """DeepSpeed needs a process group even for one process: give a plain `wrpo run` one on loopback."""
    if deepspeed_stage and "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))


def _common(spec: FusionSpec, section) -> dict[str, Any]:
    t = spec.training
    return dict(learning_rate=section.learning_rate, epochs=section.epochs, batch_size=section.batch_size,
                per_device_batch_size=section.per_device_batch_size, max_length=section.max_length,
                warmup_ratio=section.warmup_ratio, lr_scheduler=section.lr_scheduler,
                max_steps=section.max_steps, deepspeed_stage=t.deepspeed_stage,
                gradient_checkpointing=t.gradient_checkpointing, precision=t.precision, seed=t.seed,
                save_steps=t.save_steps)


def run_sft(spec: FusionSpec, run, out, options: StageOptions | None = None) -> dict[str, Any]:
    """Target-SFT on y_ws of the SFT split (select-sources/sft.jsonl)."""
    from wrpo.data_stages import local_model
    from wrpo.train.config import SFTConfig
    from wrpo.train.sft import run_sft as train_sft

    wd = workdir(run, options, "sft")
    data = _fetch_objects(run, "select-sources", ["sft.jsonl"], wd / "data") / "sft.jsonl"
    model = local_model(spec.target.model, spec, options, "target")
    s = spec.sft
    cfg = SFTConfig(model=Path(model), data=data, output_dir=wd / "out", completion_only=s.completion_only,
                    packing=s.packing, max_prompt_length=max(8, s.max_length // 2), **_common(spec, s))
    _ensure_distributed_env(cfg.deepspeed_stage)
    result = train_sft(cfg)
    if is_rank_zero():
        out.put_tree("model", cfg.output_dir / "model")
        out.put_file("metrics.jsonl", cfg.output_dir / "metrics.jsonl")
    return {k: v for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _pairs_and_refs(run, wd: Path) -> Path:
    """The quadruples with their reference log-probs beside them, where the trainer looks for them."""
    names = [f"{split}{suffix}" for split in ("train", "eval")
             for suffix in (".ref_logps.jsonl", ".ref_logps.meta.json")]
    data = _fetch_objects(run, "build-pairs", ["train.jsonl", "eval.jsonl"], wd / "pairs")
    _fetch_objects(run, "ref-logps", names, data)
    return data


def run_ref_logps(spec: FusionSpec, run, out, options: StageOptions | None = None) -> dict[str, Any]:
    """log πref(y|x) of Target-SFT for every response of the train and eval quadruples, once."""
    from wrpo.train.ref_logps import compute_reference_logps

    wd = workdir(run, options, "ref-logps")
    pairs = _fetch_objects(run, "build-pairs", ["train.jsonl", "eval.jsonl"], wd / "pairs")
    model = _fetch_sft_model(run, wd)
    summary: dict[str, Any] = {}
    if not is_rank_zero():
        return summary
    w = spec.wrpo
    for split in ("train", "eval"):
        data = pairs / f"{split}.jsonl"
        records = sum(1 for line in data.read_text().splitlines() if line.strip())
        path = compute_reference_logps(model, data, wd / f"{split}.ref_logps.jsonl", max_length=w.max_length,
                                       max_prompt_length=w.max_prompt_length,
                                       batch_size=w.per_device_batch_size, precision=spec.training.precision)
        out.put_file(f"{split}.ref_logps.jsonl", path)
        meta = path.with_name(path.name.removesuffix(".jsonl") + ".meta.json")
        out.put_file(f"{split}.ref_logps.meta.json", meta)
        summary[f"{split}_records"] = records
    return summary


def wrpo_config(spec: FusionSpec, model: Path, data: Path, output_dir: Path, **overrides: Any):
    """The trainer config of the spec's `wrpo` section (overrides for experiments)."""
    from wrpo.train.config import WRPOConfig

    w = spec.wrpo
    eval_data = data.with_name("eval.jsonl")
    has_eval = eval_data.exists() and eval_data.read_text().strip() != ""
    kwargs = dict(model=model, data=data, output_dir=output_dir, eval_data=eval_data if has_eval else None,
                  objective=w.objective, beta=w.beta, gamma=w.gamma, tau=w.tau,
                  label_smoothing=w.label_smoothing, alpha=w.alpha, alpha_schedule=w.alpha_schedule,
                  rejected_source=w.rejected_source, top_k_sources=spec.selection.top_k_sources,
                  reference=w.reference, max_prompt_length=w.max_prompt_length, **_common(spec, w))
    kwargs.update(overrides)
    return WRPOConfig(**kwargs)


def run_wrpo(spec: FusionSpec, run, out, options: StageOptions | None = None) -> dict[str, Any]:
    """WRPO on the build-pairs quadruples from Target-SFT; also the before/after log-probs (Fig. 1)."""
    from wrpo.train.wrpo_trainer import run_wrpo as train_wrpo

    wd = workdir(run, options, "wrpo")
    data = _pairs_and_refs(run, wd) / "train.jsonl"
    model = _fetch_sft_model(run, wd)
    cfg = wrpo_config(spec, model, data, wd / "out")
    _ensure_distributed_env(cfg.deepspeed_stage)
    result = train_wrpo(cfg)
    if not is_rank_zero():
        return {}
    out_dir = cfg.output_dir
    out.put_tree("model", out_dir / "model")
    out.put_file("metrics.jsonl", out_dir / "metrics.jsonl")
    if (out_dir / "eval_metrics.json").exists():
        out.put_file("eval_metrics.json", out_dir / "eval_metrics.json")
    out.put_text("logps.jsonl", logp_shift(cfg, data, out_dir / "model", wd))
    return _wrpo_summary(result, out_dir / "metrics.jsonl")


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
    from wrpo.train.ref_logps import compute_reference_logps

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
