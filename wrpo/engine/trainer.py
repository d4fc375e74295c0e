"""The trainer skeleton SFT and WRPO share (docs/training.md, "One trainer skeleton").

`StepTrainer` is `transformers.Trainer` with one contract for its subclasses: `batch_loss(model, inputs)`
returns the *sum* of the batch's item losses (items: preference examples for WRPO, response tokens for
SFT), their count and the batch's metric means. The skeleton turns that into

- an exact optimizer-step loss: the mean over every item of the step, whatever the micro-batch sizes
  (a ragged last step of 4 + 2 examples weighs each of the 6 by 1/6) and on every number of ranks. The
  step's items are counted over its micro-batches and all ranks before the first forward
  (`get_batch_samples`), and each micro-batch contributes Σ losses / N_step · world (data parallelism
  averages gradients over ranks), so the Trainer's own logged loss (`report_to`) is that mean too;
- one metrics.jsonl line per optimizer step, written by global rank 0 only: metric means weighted by
  item counts over micro-batches and ranks, plus that step's exact `learning_rate` (and α for WRPO);
- the same means over the evaluation split; the window of per-step metrics added to Trainer's logs.

`run_training` is the bootstrap both commands share: tokenizer and data checked first, TrainingArguments
before the model (ZeRO-3 partitioned loading), the trainer, resume from the newest checkpoint (metric
lines after it dropped), evaluation, and the final save.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from wrpo.engine.config import TrainCommon


@dataclass
class BatchLoss:
    """What a subclass computes for one micro-batch.

    total:  0-d tensor, Σ of the per-item losses (with gradient).
    items:  number of items the total sums over.
    means:  metric means over those items (weighted by `items` across micro-batches and ranks).
    values: metrics that are one value for the whole step (α); logged as they are.
    """

    total: torch.Tensor
    items: int
    means: dict[str, torch.Tensor | float]
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class MetricSums:
    """Sums of per-batch metric means weighted by item counts, to average over micro-batches and ranks."""

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


class StepTrainer(Trainer):
    """Trainer whose loss is the exact mean over an optimizer step's items (see the module docstring)."""

    def __init__(self, *args: Any, metrics_path: Path, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the step's item count itself
        self.metrics_path = metrics_path
        self.step_sums, self.step_values, self.eval_sums = MetricSums(), {}, MetricSums()
        self.log_window: list[dict[str, float]] = []
        self.add_callback(StepLines(self))

    # -- what a subclass provides --------------------------------------------------------------------------
    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def batch_loss(self, model: Any, inputs: dict[str, torch.Tensor]) -> BatchLoss:
        raise NotImplementedError

    @property
    def same_calls_on_all_ranks(self) -> bool:
        """ZeRO-3: every rank must call each module equally often (see wrpo.engine.logps)."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        return self.accelerator.num_processes > 1 and is_deepspeed_zero3_enabled()

    # -- the exact step loss -------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches and the number of items in them over all ranks."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        items = torch.tensor(sum(self.count_items(b) for b in batches), dtype=torch.long, device=device)
        if self.accelerator.num_processes > 1:
            items = self.accelerator.reduce(items, reduction="sum")
        return batches, items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = self.batch_loss(model, inputs)
        if num_items_in_batch is None:  # called outside a training step: the batch mean
            return (out.total / max(out.items, 1), None) if return_outputs else out.total / max(out.items, 1)
        loss = out.total / num_items_in_batch.clamp(min=1) * self.accelerator.num_processes
        self.step_sums.add(out.means, out.items)
        self.step_values = {**out.values, "learning_rate": self._get_learning_rate()}
        return (loss, None) if return_outputs else loss

    # -- evaluation: the same means over the whole eval split -----------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            out = self.batch_loss(model, inputs)
        self.eval_sums.add(out.means, out.items)
        return (out.total / max(out.items, 1)).detach(), None, None

    def evaluation_loop(self, *args, **kwargs):
        self.eval_sums = MetricSums()
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        for key, value in self.eval_sums.reduce(self.accelerator).items():
            output.metrics[f"{prefix}_{key}"] = value
        return output

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the per-step metrics since the last log to Trainer's own (report_to sees them)."""
        if "loss" in logs and self.log_window:
            logs.update({k: v for k, v in window_means(self.log_window).items() if k not in logs})
            self.log_window = []
        super().log(logs, *args, **kwargs)


class StepLines(TrainerCallback):
    """After every optimizer step: its metrics, reduced over processes → one line of metrics.jsonl (rank 0)."""

    def __init__(self, trainer: StepTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        means = t.step_sums.reduce(t.accelerator)
        t.step_sums = MetricSums()
        if not means:
            return
        row = {"step": state.global_step, **means, **t.step_values}
        t.log_window.append(row)
        if state.is_world_process_zero:
            t.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with t.metrics_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")


class FaultPoint(TrainerCallback):
    """Test hook (README.md, "Testing"): with WRPO_FAULT_AFTER_CHECKPOINT=KIND:N (KIND sft or wrpo),
    the process stops at a known point: after it saved checkpoint N it says so on stderr and waits to be
    killed. A resumed run saves only later checkpoints, so the restarted process runs through."""

    def __init__(self, kind: str, step: int):
        self.kind, self.step = kind, step

    @classmethod
    def from_env(cls, kind: str) -> FaultPoint | None:
        name, _, step = os.environ.get("WRPO_FAULT_AFTER_CHECKPOINT", "").partition(":")
        return cls(kind, int(step)) if name == kind and step.isdigit() else None

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            print(f"WRPO_FAULT_AFTER_CHECKPOINT: {self.kind} saved checkpoint {self.step}; waiting to be killed",
                  file=sys.stderr, flush=True)
            while True:
                time.sleep(60)


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


@dataclass
class TrainingJob:
    """What differs between SFT and WRPO: the trainer class and how data and collator are made."""

    trainer_class: type[StepTrainer]
    datasets: Callable[[Any], tuple[Any, Any | None]]  # tokenizer → (train, eval or None); checks all input
    collator: Callable[[Any, Any], Any]  # (tokenizer, model) → data collator
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


def run_training(cfg: TrainCommon, job: TrainingJob) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data`; write model/, metrics.jsonl, checkpoints/ (and eval_metrics.json)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from wrpo.engine.common import last_checkpoint, load_causal_lm, load_tokenizer, save_final, training_arguments

    tok = load_tokenizer(cfg.model)
    train_ds, eval_ds = job.datasets(tok)
    args = training_arguments(cfg, eval_ds is not None)  # before the model: ZeRO-3 loads it partitioned
    model = load_causal_lm(cfg.model, cfg)
    metrics = cfg.output_dir / "metrics.jsonl"
    trainer = job.trainer_class(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                processing_class=tok, data_collator=job.collator(tok, model),
                                metrics_path=metrics, **job.trainer_kwargs)
    fault = FaultPoint.from_env(type(cfg).__name__.removesuffix("Config").lower())  # "sft" or "wrpo"
    if fault:
        trainer.add_callback(fault)
    checkpoint = last_checkpoint(cfg)
    if trainer.is_world_process_zero():
        truncate_metrics(metrics, checkpoint_step(checkpoint))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    summary: dict[str, Any] = {"steps": trainer.state.global_step, "train_loss": result.training_loss,
                               "resumed_from": checkpoint}
    if eval_ds is not None:
        summary["eval"] = trainer.evaluate()
        if trainer.is_world_process_zero():
            (cfg.output_dir / "eval_metrics.json").write_text(json.dumps(summary["eval"], indent=2) + "\n")
    summary["model"] = str(save_final(trainer, tok, cfg.output_dir))
    summary["metrics"] = str(metrics)
    unset_hf_deepspeed_config()  # models loaded later in this process (the stage's log-prob shift) are whole
    summary["layout"] = getattr(trainer.data_collator, "layout", None)
    return summary
