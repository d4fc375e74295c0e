"""Peer check: our DPO loss equals TRL's DPOTrainer on the same model and batch. (DeepSpeed runs with more
than one rank: tests/integration/test_train_multirank.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "tiny"


def _records(n: int) -> list[dict]:
    return [json.loads(x) for x in (EXAMPLES / "quadruples.jsonl").read_text().splitlines()[:n]]


def test_dpo_loss_equals_trl_dpo_trainer(tiny_models: Path, tmp_path: Path):
    """Same policy (target), same reference (source-qwen, same tokenizer), same 4 pairs (y_wt, y_l), β = 0.1.

    TRL gets the prompt already rendered with the chat template (its non-conversational path adds EOS to
    each completion), which is exactly our tokenisation: template prompt + response + one EOS."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from wrpo.engine.collate import Limits, collate, encode_example
    from wrpo.engine.logps import example_logps
    from wrpo.engine.losses import dpo_loss

    tok = AutoTokenizer.from_pretrained(tiny_models / "target")
    # float64 (see the assertion below)
    policy = AutoModelForCausalLM.from_pretrained(tiny_models / "target", dtype=torch.float64).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_models / "source-qwen", dtype=torch.float64).eval()
    recs = _records(4)
    rows = [{"prompt": tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False),
             "chosen": r["chosen_target"], "rejected": r["rejected"]} for r in recs]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, per_device_train_batch_size=4,
                     report_to="none",
                     max_length=None, use_cpu=True, bf16=False, dataloader_drop_last=False, seed=0)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()

        limits = Limits(max_length=2048, max_prompt_length=1024)
        examples = [encode_example(tok, r["prompt"], [r["chosen_target"], r["rejected"]], limits)
                    for r in recs]
        inputs = collate(examples, "padded", tok.pad_token_id)
        pol, _ = example_logps(policy, inputs)  # (B, 2)
        ref, _ = example_logps(reference, inputs)
        ours = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=0.1).losses.mean().item()
    # Both models run in float64, so our loss is exact to ~1e-13 (test_train_exact's bound); TRL rounds its
    # log-probs and loss to float32 (u32 = 2^-24) a few times per value, relative ≤ c·u32 with c ≤ 10^2
    # (measured: 1.4e-7 relative). Any real difference (a token, the EOS, β) is ≥ 1e-3.
    assert abs(ours - trl_loss) <= 100 * 2**-24 * abs(trl_loss), (ours, trl_loss)
    assert abs(ours - 0.6931) > 1e-3  # a real comparison, not two losses at log 2

