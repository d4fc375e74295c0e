"""The WRPO trainer: the shared skeleton (wrpo.engine.trainer) with one loss (docs/architecture.md, "Engine").

batch_loss = one forward over every response of the batch (wrpo.engine.logps; by default shared-prompt
packing, so a quadruple's prompt is encoded once) → the pure loss of wrpo.engine.losses at
α = alpha_at(global_step) (wrpo.engine.schedule) → metrics. No reference model is loaded: reference
log-probs come with the batch from `wrpo ref-logps`, unless `reference="on-the-fly"`; that reference
model is loaded like the policy (partitioned under ZeRO-3) and wrapped by DeepSpeed there.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from wrpo.engine.config import WRPOConfig
from wrpo.engine.logps import example_logps
from wrpo.engine.losses import PreferenceLoss, ResponseLogps, reward_metrics, weighted_preference_loss, wrpo_loss
from wrpo.engine.schedule import alpha_at
from wrpo.engine.trainer import BatchLoss, StepTrainer, TrainingJob, run_training


def response_names(cfg: WRPOConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(chosen, rejected) response names in column order: [y_ws, y_wt, extras...], [y_l, y_ls]."""
    if cfg.baseline == "target":
        return ("chosen_target",), ("rejected",)
    if cfg.baseline == "source":
        return ("chosen_source",), ("rejected",)
    extras = tuple(f"extra_chosen_source[{i}]" for i in range(cfg.top_k_sources - 1))
    return ("chosen_source", "chosen_target", *extras), ("rejected",) + (("rejected_source",) *
                                                                          cfg.rejected_source)


class WRPOTrainer(StepTrainer):
    """Trainer for WRPO and its plain-objective baselines (see WRPOConfig); items are examples."""

    def __init__(self, *args: Any, wrpo: WRPOConfig, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.wrpo = wrpo
        self.chosen_names, self.rejected_names = response_names(wrpo)
        self.ref_model = None
        if wrpo.needs_reference and wrpo.reference == "on-the-fly":
            from wrpo.engine.common import load_causal_lm

            self.ref_model = self._prepare_reference(load_causal_lm(wrpo.model, wrpo))

    def _prepare_reference(self, model: Any) -> Any:
        """The frozen reference: on the device, or under ZeRO-3 a DeepSpeed inference engine over its
        partitions (loaded partitioned, it cannot run without one). ZeRO-2 keeps a whole copy per rank."""
        from transformers.integrations import is_deepspeed_zero3_enabled

        model.eval().requires_grad_(False)
        if not (self.is_deepspeed_enabled and is_deepspeed_zero3_enabled()):
            return model.to(self.args.device)
        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        hidden = model.config.get_text_config().hidden_size
        zero = config["zero_optimization"]
        # the values the HF integration fills in for the trained model (its `auto`s), from the same size
        zero.update(reduce_bucket_size=hidden * hidden, stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                    stage3_param_persistence_threshold=10 * hidden)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # DeepSpeedEngine.eval returns None
        return engine

    # -- the loss ------------------------------------------------------------------------------------------
    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["num_sequences"]) // int(batch["responses_per_example"])

    def current_alpha(self) -> float:
        """α of the optimizer step being computed (global_step counts finished updates)."""
        total = max(self.state.max_steps, 1)
        step = min(self.state.global_step, total - 1)
        return alpha_at(step, total, self.wrpo.alpha, self.wrpo.alpha_schedule)

    def _logps(self, model: Any, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return example_logps(model, inputs, self.wrpo.logps_chunk_size,
                             same_calls_on_all_ranks=self.same_calls_on_all_ranks)

    def _reference(self, inputs: dict[str, torch.Tensor], k: int, dtype: torch.dtype) -> ResponseLogps | None:
        if not self.wrpo.needs_reference:
            return None
        if "reference_logps" in inputs:
            ref = inputs["reference_logps"].to(dtype)  # (B, R), stored fp64 → the policy's log-prob dtype
        else:
            with torch.no_grad():
                ref, _ = self._logps(self.ref_model, inputs)
        return ResponseLogps(ref[:, :k], ref[:, k:])

    def preference_loss(self, model: Any, inputs: dict[str, torch.Tensor], alpha: float) -> PreferenceLoss:
        """One forward over all responses, then the configured objective (WRPO or a plain baseline)."""
        k, c = len(self.chosen_names), self.wrpo
        logps, tokens = self._logps(model, inputs)  # (B, R), (B, R)
        policy = ResponseLogps(logps[:, :k], logps[:, k:], tokens[:, :k], tokens[:, k:])
        reference = self._reference(inputs, k, logps.dtype)
        if c.baseline == "none":
            return wrpo_loss(policy, reference, alpha, c.objective, c.beta, c.gamma, c.tau, c.label_smoothing)
        return weighted_preference_loss(policy, reference, [1.0], [1.0], c.objective, c.beta, c.gamma, c.tau,
                                        c.label_smoothing)

    def batch_loss(self, model: Any, inputs: dict[str, torch.Tensor]) -> BatchLoss:
        alpha = self.current_alpha()
        out = self.preference_loss(model, inputs, alpha)
        means = {"loss": out.losses.detach().mean(),
                 **reward_metrics(out.chosen_rewards[:, :2], out.rejected_rewards, tuple(self.chosen_names[:2]))}
        return BatchLoss(out.losses.sum(), out.losses.shape[0], means, {"alpha": alpha})


def wrpo_job(cfg: WRPOConfig) -> TrainingJob:
    """The data, collator and trainer of a WRPO run; every record is checked before the model loads."""
    from wrpo.engine.common import resolve_layout
    from wrpo.engine.config import default_ref_path
    from wrpo.engine.data import PreferenceCollator

    def datasets(tok: Any):
        eval_ds = _dataset(cfg, cfg.eval_data, default_ref_path(cfg.eval_data), tok) if cfg.eval_data else None
        return _dataset(cfg, cfg.data, cfg.ref_logps, tok), eval_ds

    def collator(tok: Any, model: Any) -> PreferenceCollator:
        chosen, rejected = response_names(cfg)
        return PreferenceCollator(tok.pad_token_id, resolve_layout(cfg, model, len(chosen) + len(rejected)))

    return TrainingJob(WRPOTrainer, datasets, collator, {"wrpo": cfg})


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
    return run_training(cfg, wrpo_job(cfg))
