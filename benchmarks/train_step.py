"""WRPO training step vs TRL's DPOTrainer and our own DPO, in one process, same model/prompts/batch.

Prints one JSON line:
  step_time_vs_trl_dpo         WRPO step time / TRL DPOTrainer step time (TRL defaults: reference model
                               on the fly, padded batches)                                   target ≤ 1.0
  token_throughput_vs_own_dpo  WRPO response tokens/s / our DPO's (baseline=target)          target ≥ 0.95
  peak_memory_vs_trl_dpo       WRPO peak memory / TRL DPOTrainer peak memory                 target ≤ 1.0
plus the raw numbers. WRPO and our DPO read reference log-probs precomputed by `wrpo ref-logps` (a one-off
pass, not timed: that is the design). Memory is the peak resident set size (RSS, sampled every 2 ms by a
thread) above the RSS before the trainer and its models were built — tracemalloc does not see torch's
allocations. Each trainer runs `--steps` optimizer steps after one warm-up step; step time is the median.

Model: a random Qwen2 (hidden 512, 4 layers, 8 heads, vocab 32k: ~30M parameters, fp32) so that matrix
products, not Python, dominate on a CPU. Run: `python benchmarks/train_step.py [--steps 3]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen2Config, TrainerCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "tiny" / "quadruples.jsonl"


class PeakRSS:
    """Peak RSS of this process above its value at start, sampled in a thread."""

    def __init__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        gc.collect()
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.delta = max(self.peak - self.base, 0)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t0)


class CountingCollator:
    """Wraps a collator and counts response (label) tokens of the timed steps."""

    def __init__(self, inner, key: str):
        self.inner, self.key, self.tokens = inner, key, []

    def __call__(self, items):
        batch = self.inner(items)
        mask = batch[self.key] if self.key == "completion_mask" else (batch["labels"] != -100)
        self.tokens.append(int(mask.sum()))
        return batch


def make_model(folder: Path) -> Path:
    from wrpo.models.tiny import write_tiny_tokenizer

    tok = write_tiny_tokenizer(folder, "chatml")
    cfg = Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(folder))
    return folder


def run_ours(model_dir: Path, data: Path, out: Path, batch: int, steps: int, baseline: str, layout: str):
    from wrpo.engine.common import load_causal_lm, load_tokenizer, training_arguments
    from wrpo.engine.config import WRPOConfig
    from wrpo.engine.data import PreferenceCollator
    from wrpo.engine.wrpo_trainer import WRPOTrainer, _dataset

    cfg = WRPOConfig(model=model_dir, data=data, output_dir=out, batch_size=batch,
                     per_device_batch_size=batch,
                     max_steps=steps + 1, learning_rate=1e-6, warmup_ratio=0.0, baseline=baseline,
                     gradient_checkpointing=False, layout=layout, save_steps=10_000, max_length=512,
                     max_prompt_length=256)
    with PeakRSS() as mem:
        tok = load_tokenizer(model_dir)
        collator = CountingCollator(PreferenceCollator(tok.pad_token_id, layout), "labels")
        trainer = WRPOTrainer(model=load_causal_lm(model_dir, cfg), args=training_arguments(cfg, False),
                              train_dataset=_dataset(cfg, data, cfg.ref_logps, tok), data_collator=collator,
                              processing_class=tok, wrpo=cfg)
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
    return timer.times[1:], collator.tokens[1:], mem.delta


def run_trl(model_dir: Path, data: Path, out: Path, batch: int, steps: int):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in data.read_text().splitlines()]
    with PeakRSS() as mem:
        tok = AutoTokenizer.from_pretrained(model_dir)
        ds = Dataset.from_list([{"prompt": r["prompt"],
                                 "chosen": [{"role": "assistant", "content": r["chosen_target"]}],
                                 "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                                for r in rows])
        args = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps + 1,
                         learning_rate=1e-6, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                         beta=0.01, disable_tqdm=True, logging_steps=1000)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                             ref_model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                             train_dataset=ds, processing_class=tok)
        collator = CountingCollator(trainer.data_collator, "completion_mask")
        trainer.data_collator = collator
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
    return timer.times[1:], collator.tokens[1:], mem.delta


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layout", default="padded", choices=["padded", "packed"])
    a = parser.parse_args()
    from wrpo.engine.ref_logps import compute_reference_logps

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model_dir = make_model(tmp_path / "model")
        data = tmp_path / "train.jsonl"
        data.write_text(DATA.read_text())
        compute_reference_logps(model_dir, data, max_length=512, max_prompt_length=256, batch_size=16)
        trl_t, trl_tok, trl_mem = run_trl(model_dir, data, tmp_path / "trl", a.batch, a.steps)
        gc.collect()
        dpo_t, dpo_tok, dpo_mem = run_ours(model_dir, data, tmp_path / "dpo", a.batch, a.steps, "target",
                                           a.layout)
        gc.collect()
        w_t, w_tok, w_mem = run_ours(model_dir, data, tmp_path / "wrpo", a.batch, a.steps, "none", a.layout)
    med = statistics.median
    wrpo_tps, dpo_tps = sum(w_tok) / sum(w_t), sum(dpo_tok) / sum(dpo_t)
    print(json.dumps({
        "step_time_vs_trl_dpo": round(med(w_t) / med(trl_t), 3),
        "token_throughput_vs_own_dpo": round(wrpo_tps / dpo_tps, 3),
        "peak_memory_vs_trl_dpo": round(w_mem / trl_mem, 3),
        "model": "Qwen2 random, hidden 512, 4 layers, vocab 32000, fp32, ~30M params",
        "device": "cpu", "threads": torch.get_num_threads(), "batch": a.batch, "steps": a.steps,
        "layout": a.layout, "memory": "peak RSS delta (sampled)",
        "step_s": {"wrpo": round(med(w_t), 3), "own_dpo": round(med(dpo_t), 3),
                   "trl_dpo": round(med(trl_t), 3)},
        "response_tokens_per_s": {"wrpo": round(wrpo_tps, 1), "own_dpo": round(dpo_tps, 1),
                                  "trl_dpo": round(sum(trl_tok) / sum(trl_t), 1)},
        "peak_mib": {"wrpo": w_mem >> 20, "own_dpo": dpo_mem >> 20, "trl_dpo": trl_mem >> 20},
    }))


if __name__ == "__main__":
    main()
