"""What SFT and WRPO share: precision, layout, model loading, TrainingArguments, metrics, final save."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from wrpo.engine.collate import Layout
from wrpo.engine.config import ConfigError, TrainCommon


def use_bf16(precision: str) -> bool:
    """bf16 when asked, or on `auto` when a CUDA device supports it; fp32 otherwise (CPU)."""
    if precision == "bf16":
        return True
    return precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def attn_implementation(cfg: TrainCommon) -> str:
    return cfg.attn_implementation or "sdpa"


def resolve_layout(cfg: TrainCommon) -> Layout:
    """packed where a varlen kernel makes it free (flash attention), padded otherwise (see wrpo.engine.collate)."""
    if cfg.layout != "auto":
        return cfg.layout
    return "packed" if "flash" in attn_implementation(cfg) else "padded"


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.chat_template is None:
        raise ConfigError(f"the tokenizer in {model_dir} has no chat template")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(model_dir: Path, cfg: TrainCommon) -> Any:
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if use_bf16(cfg.precision) else torch.float32
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype,
                                                attn_implementation=attn_implementation(cfg))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_config_path(stage: int) -> str | None:
    """The packaged ZeRO-2/3 config (all batch and precision values `auto`, filled by the HF integration)."""
    if stage == 0:
        return None
    return str(resources.files("wrpo.engine").joinpath(f"configs/zero{stage}.json"))


def training_arguments(cfg: TrainCommon, has_eval: bool) -> Any:
    """TrainingArguments from a config: accumulation makes up `batch_size` over all processes."""
    from transformers import TrainingArguments

    per_step = cfg.per_device_batch_size * world_size()
    if cfg.batch_size % per_step:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be a multiple of per_device_batch_size × "
                          f"processes ({per_step})")
    eval_strategy = "steps" if has_eval and cfg.eval_steps else "no"
    return TrainingArguments(
        output_dir=str(cfg.output_dir / "checkpoints"),
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.batch_size // per_step,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, seed=cfg.seed, data_seed=cfg.seed,
        bf16=use_bf16(cfg.precision),
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        report_to=cfg.report_to or "none", remove_unused_columns=False,
        deepspeed=deepspeed_config_path(cfg.deepspeed_stage), eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps, dataloader_num_workers=cfg.dataloader_num_workers,
        disable_tqdm=True,
    )


def last_checkpoint(cfg: TrainCommon) -> str | None:
    """The newest complete checkpoint to resume from, if resuming is on and one exists. A pod killed while
    saving leaves a `checkpoint-N` without `trainer_state.json` (the Trainer writes it after the weights
    and optimizer): resuming from it would fail on every restart, so it is skipped."""
    folder = cfg.output_dir / "checkpoints"
    if not cfg.resume or not folder.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    complete = [p for _, p in steps if (p / "trainer_state.json").is_file()]
    return str(complete[-1]) if complete else None


def save_final(trainer: Any, tokenizer: Any, out: Path) -> Path:
    """<output>/model/: safetensors weights, config, generation config and tokenizer."""
    target = out / "model"
    trainer.save_model(str(target))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(target))
    return target


@dataclass
class MetricSums:
    """Sums of per-batch metric means weighted by batch size, to average over micro-batches and ranks."""

    sums: dict[str, float] = field(default_factory=dict)
    weight: float = 0.0

    def add(self, values: dict[str, torch.Tensor | float], n: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
        self.weight += n

    def reduce(self, accelerator: Any | None) -> dict[str, float]:
        """Means over everything added here and, given an accelerator, over all processes."""
        keys = sorted(self.sums)
        vec = torch.tensor([self.sums[k] for k in keys] + [self.weight], dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            vec = accelerator.reduce(vec.to(accelerator.device), reduction="sum").cpu()
        total = vec[-1].item()
        return {k: vec[i].item() / total for i, k in enumerate(keys)} if total else {}


class StepMetricsCallback(TrainerCallback):
    """After every optimizer step: the trainer's step metrics → one line of `metrics.jsonl` (rank 0).

    The trainer gathers `step_metrics` (a MetricSums) during the step's micro-batches; this callback reduces
    it over processes, adds `step` (1-based count of finished updates) and writes it.
    """

    def __init__(self, trainer: Any, path: Path):
        self.trainer, self.path = trainer, path

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        values = t.step_metrics.reduce(t.accelerator)
        t.step_metrics = MetricSums()
        if not values:
            return
        row = {"step": state.global_step, **values}
        t.log_window.append(row)
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")


def window_means(rows: list[dict[str, float]]) -> dict[str, float]:
    """Means of the per-step metrics since the last Trainer log (for report_to)."""
    keys = {k for r in rows for k in r if k != "step"}
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in sorted(keys)}


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop metric lines of steps the checkpoint does not include (they will be redone)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= after_step]
    path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


def checkpoint_step(checkpoint: str | None) -> int:
    if checkpoint is None:
        return 0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state["global_step"])
