"""Target-SFT (Sec. 3.1): next-token loss on y_ws, on response tokens only by default.

The same collation and memory-light log-probs as WRPO; `packing` puts a micro-batch's examples in one
padding-free row (position ids restart per example). The loss is the mean over response tokens of the
whole accumulated step (Trainer's `num_items_in_batch`), so accumulation does not reweight examples.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from wrpo.engine.common import MetricSums, window_means
from wrpo.engine.config import SFTConfig
from wrpo.engine.logps import sequence_logps


class SFTTrainer(Trainer):
    """Trainer whose loss is −Σ log π(response tokens) / number of response tokens in the step."""

    def __init__(self, *args: Any, chunk_size: int = 1024, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.chunk_size = chunk_size
        self.loss_is_scaled_for_ga = True  # divided by the step's token count below
        self.step_metrics = MetricSums()
        self.log_window: list[dict[str, float]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sums, counts = sequence_logps(model, inputs, self.chunk_size)  # (S,), (S,)
        tokens = counts.sum()
        loss = -sums.sum() / (num_items_in_batch if num_items_in_batch is not None else tokens.clamp(min=1))
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # gradients are averaged over processes
        if model.training:
            lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 0.0
            mean_nll = (-sums.sum() / tokens.clamp(min=1)).detach()
            self.step_metrics.add({"loss": mean_nll, "learning_rate": lr}, int(tokens))
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self.log_window:
            logs.update({k: v for k, v in window_means(self.log_window).items() if k not in logs})
            self.log_window = []
        super().log(logs, *args, **kwargs)


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """SFT `cfg.model` on `cfg.data` ({prompt_id, prompt, response} lines, or quadruples' chosen_source).

    Writes `<output_dir>/model/` (safetensors + tokenizer) and `<output_dir>/metrics.jsonl` (step, loss —
    the mean response-token NLL of the step —, learning_rate, tokens); resumes from checkpoints.
    """
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
    from wrpo.engine.data import SFTCollator, encode_sft, limits_of, load_sft

    tok = load_tokenizer(cfg.model)
    train_ds = encode_sft(load_sft(cfg.data), tok, limits_of(cfg))
    eval_ds = encode_sft(load_sft(cfg.eval_data), tok, limits_of(cfg)) if cfg.eval_data else None
    layout = "packed" if cfg.packing else resolve_layout(cfg)
    args = training_arguments(cfg, eval_ds is not None)
    trainer = SFTTrainer(model=load_causal_lm(cfg.model, cfg), args=args,
                         train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                         data_collator=SFTCollator(tok.pad_token_id, layout, cfg.completion_only),
                         chunk_size=cfg.logps_chunk_size)
    metrics = cfg.output_dir / "metrics.jsonl"
    checkpoint = last_checkpoint(cfg)
    if trainer.is_world_process_zero():
        truncate_metrics(metrics, checkpoint_step(checkpoint))
    trainer.add_callback(StepMetricsCallback(trainer, metrics))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    summary: dict[str, Any] = {"steps": trainer.state.global_step, "train_loss": result.training_loss,
                               "resumed_from": checkpoint}
    if eval_ds is not None:
        summary["eval"] = trainer.evaluate()
    summary["model"] = str(save_final(trainer, tok, cfg.output_dir))
    summary["metrics"] = str(metrics)
    return summary
