"""Target-SFT (Sec. 3.1): next-token loss on y_ws, on response tokens only by default.

The shared trainer skeleton (wrpo.engine.trainer) with response tokens as items: the loss of an optimizer
step is the mean NLL over every response token of the step, on all ranks, whatever the micro-batch
sizes. The same collation and memory-light log-probs as WRPO; `packing` puts a micro-batch's examples in
one padding-free row (position ids restart per example).
"""

from __future__ import annotations

from typing import Any

import torch

from wrpo.engine.config import SFTConfig
from wrpo.engine.logps import sequence_logps
from wrpo.engine.trainer import BatchLoss, StepTrainer, TrainingJob, run_training


class SFTTrainer(StepTrainer):
    """Trainer whose loss is −Σ log π(response tokens) / number of response tokens in the step."""

    def __init__(self, *args: Any, chunk_size: int = 1024, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.chunk_size = chunk_size

    def count_items(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["target_ids"].numel())

    def batch_loss(self, model: Any, inputs: dict[str, torch.Tensor]) -> BatchLoss:
        sums, counts = sequence_logps(model, inputs, self.chunk_size,
                                      same_calls_on_all_ranks=self.same_calls_on_all_ranks)  # (S,), (S,)
        tokens = int(counts.sum())
        nll = -sums.sum()
        return BatchLoss(nll, tokens, {"loss": nll.detach() / max(tokens, 1)})


def sft_job(cfg: SFTConfig) -> TrainingJob:
    from wrpo.engine.common import resolve_layout
    from wrpo.engine.data import SFTCollator, encode_sft, limits_of, load_sft

    def datasets(tok: Any):
        train = encode_sft(load_sft(cfg.data), tok, limits_of(cfg))
        return train, encode_sft(load_sft(cfg.eval_data), tok, limits_of(cfg)) if cfg.eval_data else None

    def collator(tok: Any, model: Any) -> SFTCollator:
        layout = "packed" if cfg.packing else resolve_layout(cfg, model, responses=1)
        return SFTCollator(tok.pad_token_id, layout, cfg.completion_only)

    return TrainingJob(SFTTrainer, datasets, collator, {"chunk_size": cfg.logps_chunk_size})


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """SFT `cfg.model` on `cfg.data` ({prompt_id, prompt, response} lines, or quadruples' chosen_source).

    Writes `<output_dir>/model/` (safetensors + tokenizer) and `<output_dir>/metrics.jsonl` (step, loss —
    the mean response-token NLL of the step —, learning_rate); resumes from checkpoints.
    """
    return run_training(cfg, sft_job(cfg))
