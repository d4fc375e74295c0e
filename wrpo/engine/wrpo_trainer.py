"""The WRPO trainer: transformers.Trainer with one overridden loss (docs/architecture.md, "Engine").

compute_loss = one forward over every response of the batch (wrpo.engine.logps) → the pure loss of wrpo.engine.losses
at α = alpha_at(global_step) (wrpo.engine.schedule) → metrics. No reference model is loaded: reference log-probs
come with the batch from `wrpo ref-logps`, unless `reference="on-the-fly"` (kept for comparison).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from wrpo.engine.common import MetricSums, window_means
from wrpo.engine.config import WRPOConfig
from wrpo.engine.logps import example_logps
from wrpo.engine.losses import PreferenceLoss, ResponseLogps, reward_metrics, weighted_preference_loss, wrpo_loss
from wrpo.engine.schedule import alpha_at


def response_names(cfg: WRPOConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(chosen, rejected) response names in column order: [y_ws, y_wt, extras...], [y_l, y_ls]."""
    if cfg.baseline == "target":
        return ("chosen_target",), ("rejected",)
    if cfg.baseline == "source":
        return ("chosen_source",), ("rejected",)
    extras = tuple(f"extra_chosen_source[{i}]" for i in range(cfg.top_k_sources - 1))
    return ("chosen_source", "chosen_target", *extras), ("rejected",) + (("rejected_source",) *
                                                                          cfg.rejected_source)


class WRPOTrainer(Trainer):
    """Trainer for WRPO and its plain-objective baselines (see WRPOConfig)."""

    def __init__(self, *args: Any, wrpo: WRPOConfig, ref_model: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.wrpo = wrpo
        self.chosen_names, self.rejected_names = response_names(wrpo)
        self.ref_model = ref_model
        if ref_model is not None:
            self.ref_model = ref_model.to(self.args.device).eval().requires_grad_(False)
        self.loss_is_scaled_for_ga = False  # our loss is a batch mean: let Trainer divide by accumulation
        self.step_metrics, self.eval_metrics = MetricSums(), MetricSums()
        self.log_window: list[dict[str, float]] = []

    # -- the loss ------------------------------------------------------------------------------------------
    def current_alpha(self) -> float:
        """α of the optimizer step being computed (global_step counts finished updates)."""
        total = max(self.state.max_steps, 1)
        step = min(self.state.global_step, total - 1)
        return alpha_at(step, total, self.wrpo.alpha, self.wrpo.alpha_schedule)

    def _reference(self, inputs: dict[str, torch.Tensor], k: int) -> ResponseLogps | None:
        if not self.wrpo.needs_reference:
            return None
        if "reference_logps" in inputs:
            ref = inputs["reference_logps"]  # (B, R)
        else:
            with torch.no_grad():
                ref, _ = example_logps(self.ref_model, inputs, self.wrpo.logps_chunk_size)
        return ResponseLogps(ref[:, :k], ref[:, k:])

    def preference_loss(self, model: Any, inputs: dict[str, torch.Tensor], alpha: float) -> PreferenceLoss:
        """One forward over all responses, then the configured objective (WRPO or a plain baseline)."""
        k, c = len(self.chosen_names), self.wrpo
        logps, tokens = example_logps(model, inputs, c.logps_chunk_size)  # (B, R), (B, R)
        policy = ResponseLogps(logps[:, :k], logps[:, k:], tokens[:, :k], tokens[:, k:])
        reference = self._reference(inputs, k)
        if c.baseline == "none":
            return wrpo_loss(policy, reference, alpha, c.objective, c.beta, c.gamma, c.tau, c.label_smoothing)
        return weighted_preference_loss(policy, reference, [1.0], [1.0], c.objective, c.beta, c.gamma, c.tau,
                                        c.label_smoothing)

    def _metrics(self, out: PreferenceLoss, alpha: float) -> dict[str, Any]:
        names = tuple(self.chosen_names[:2])
        return {"loss": out.losses.mean().detach(), "alpha": alpha,
                **reward_metrics(out.chosen_rewards[:, :2], out.rejected_rewards, names)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        alpha = self.current_alpha()
        out = self.preference_loss(model, inputs, alpha)
        loss = out.losses.mean()
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 0.0
        self.step_metrics.add({**self._metrics(out, alpha), "learning_rate": lr}, out.losses.shape[0])
        return (loss, {"margin": out.margin}) if return_outputs else loss

    # -- evaluation: loss and reward accuracies over the whole eval split ----------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            out = self.preference_loss(model, inputs, self.current_alpha())
        self.eval_metrics.add(self._metrics(out, self.current_alpha()), out.losses.shape[0])
        return out.losses.mean().detach(), None, None

    def evaluation_loop(self, *args, **kwargs):
        self.eval_metrics = MetricSums()
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        for key, value in self.eval_metrics.reduce(self.accelerator).items():
            if key != "alpha":
                output.metrics[f"{prefix}_{key}"] = value
        return output

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the per-step metrics since the last log to Trainer's own (report_to sees them)."""
        if "loss" in logs and self.log_window:
            logs.update({k: v for k, v in window_means(self.log_window).items() if k not in logs})
            self.log_window = []
        super().log(logs, *args, **kwargs)


def metrics_path(cfg: WRPOConfig) -> Path:
    return cfg.output_dir / "metrics.jsonl"


def _dataset(cfg: WRPOConfig, path: Path, ref_path: Path, tokenizer: Any):
    from wrpo.engine.data import encode_preferences, limits_of, load_preferences, read_ref_logps, ref_meta

    chosen, rejected = response_names(cfg)
    records = load_preferences(path, chosen + rejected)
    reference = None
    if cfg.needs_reference and cfg.reference == "precomputed":
        reference = read_ref_logps(ref_path, ref_meta(tokenizer, limits_of(cfg)))
    return encode_preferences(records, chosen + rejected, tokenizer, limits_of(cfg), reference, str(ref_path))


def run_wrpo(cfg: WRPOConfig) -> dict[str, Any]:
    """Train WRPO (or a baseline) on `cfg.data` with stored reference log-probs.

    Writes `<output_dir>/model/` (safetensors + tokenizer), `<output_dir>/metrics.jsonl` (one object per
    optimizer step), checkpoints under `<output_dir>/checkpoints/` (resumed automatically) and, with eval
    data, `<output_dir>/eval_metrics.json`. All input is checked before training starts.
    """
    import json

    from wrpo.engine.common import (
        StepMetricsCallback,
        checkpoint_step,
        last_checkpoint,
        load_causal_lm,
        load_tokenizer,
        resolve_layout,
        save_final,
        training_arguments,
        truncate_metrics,
    )
    from wrpo.engine.config import default_ref_path
    from wrpo.engine.data import PreferenceCollator

    tok = load_tokenizer(cfg.model)
    train_ds = _dataset(cfg, cfg.data, cfg.ref_logps, tok)
    eval_ds = _dataset(cfg, cfg.eval_data, default_ref_path(cfg.eval_data), tok) if cfg.eval_data else None
    model = load_causal_lm(cfg.model, cfg)
    ref_model = load_causal_lm(cfg.model, cfg) if cfg.needs_reference and cfg.reference == "on-the-fly" \
        else None
    trainer = WRPOTrainer(model=model, args=training_arguments(cfg, eval_ds is not None),
                          train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                          data_collator=PreferenceCollator(tok.pad_token_id, resolve_layout(cfg)),
                          wrpo=cfg, ref_model=ref_model)
    checkpoint = last_checkpoint(cfg)
    if trainer.is_world_process_zero():
        truncate_metrics(metrics_path(cfg), checkpoint_step(checkpoint))
    trainer.add_callback(StepMetricsCallback(trainer, metrics_path(cfg)))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    summary: dict[str, Any] = {"steps": trainer.state.global_step, "train_loss": result.training_loss,
                               "resumed_from": checkpoint}
    if eval_ds is not None:
        summary["eval"] = trainer.evaluate()
        if trainer.is_world_process_zero():
            (cfg.output_dir / "eval_metrics.json").write_text(json.dumps(summary["eval"], indent=2) + "\n")
    summary["model"] = str(save_final(trainer, tok, cfg.output_dir))
    summary["metrics"] = str(metrics_path(cfg))
    return summary
