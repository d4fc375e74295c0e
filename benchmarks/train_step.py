"""A WRPO optimizer step against TRL's DPOTrainer doing equal work, each contender in a fresh process.

Prints one JSON line (docs/training.md, "Benchmark"):
  step_time_vs_trl_dpo            the headline: WRPO step / TRL DPOTrainer step with
                                  `precompute_ref_log_probs=True`: both read reference log-probs made before
                                  training, and both precomputations are left out of the timed steps (they
                                  are reported apart, `reference_precompute_s`)              goal ≤ 1.0
  flop_floor_vs_trl_dpo           what the FLOP count alone predicts for it
  step_time_vs_trl_dpo_defaults   the same against TRL at its defaults (a reference forward in every step),
  flop_floor_vs_trl_dpo_defaults  with its FLOP floor
  token_throughput_vs_own_dpo     WRPO response tokens/s / our own DPO baseline's (baseline=target)
  peak_memory_vs_trl_dpo          WRPO's peak / TRL's (precomputed): RSS on a CPU, allocated GPU memory on CUDA
  layout_check                    one WRPO step (loss, rewards, gradient) with shared-prompt packing against
                                  the padded layout on the same records
plus each ratio from process CPU time and from the fastest timed step; `settings`, every contender's
settings read back from its trainer and model (gradient checkpointing, dtype, attention kernel, layout,
TRL's precompute flag and reference model), `equal_settings`; `workload`, the prompt and response lengths
measured from the records fed (chat template included) beside the requested ones; per contender, wall and
process-CPU seconds per step (median, fastest), the optimizer step alone, response tokens and input
positions per step, peak memory. Without `--quick`: the pair with gradient checkpointing off on both sides
(`gc_off`) and on prompts as long as the responses (`prompt_equals_response`), each with its FLOP floor.

The workload (UltraFeedback-like): prompts of `--prompt` tokens (chat template included), three responses
(y_ws, y_wt, y_l) of `--response` tokens each; DPO contenders train on (y_wt, y_l). Every contender sees the
same records, micro-batch `--batch`, learning rate, precision and threads; one warm-up step, then `--steps`
timed steps. Models (`--size`, random weights): `cpu` a Qwen2 of hidden 1024, 8 layers, vocabulary 32000
untied (169M parameters), compute-bound on a CPU; `0.5b` the shape of Qwen2-0.5B (hidden 896, 24 layers, 14
heads, 2 KV heads, MLP 4864, vocabulary 151936 tied; 494M) for a GPU in bf16 (`benchmarks/gpu_check.sh`);
`tiny` for the test suite.

TRL runs at its documented defaults (DPOConfig: padded batches, gradient checkpointing on, max_length 1024,
β 0.1) except what sizes the run (batch, steps, no saving or logging), the precision (the same as ours:
fp32 on a CPU, bf16 weights and autocast on a GPU) and, for the headline, `precompute_ref_log_probs=True`.
WRPO and our DPO read reference log-probs made once by `wrpo ref-logps` and use their defaults: shared-prompt
packing (each prompt encoded once for its responses) and the LM head over response tokens only.

FLOP model (flop_floor): matrix products of a step at the measured lengths, forward = 1, backward = 2,
checkpointed layers recomputed once more; the LM head in tiles recomputed in backward on both sides (TRL's
fused log-prob head and our checkpointed chunks) over the positions each scores (TRL: every position; we:
response tokens); attention as the causal (or shared-prompt) pattern needs; TRL at its defaults adds the
reference forward.
Run: `python benchmarks/train_step.py [--size cpu] [--steps 5] [--batch 2] [--prompt 128] [--response 256]`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # Qwen2 shapes
    "cpu": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=16, head_dim=64, tie_word_embeddings=False),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True),
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=False),
}
WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "be", "by", "on", "not", "this",
         "are", "or", "from", "at", "which", "but", "have", "an", "they", "you")


# -- the workload -----------------------------------------------------------------------------------------

def make_model(folder: Path, size: str) -> tuple[Path, int]:
    """A random Qwen2 of `size` with the tiny ChatML tokenizer; returns the folder and the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from wrpo.models.tiny import write_tiny_tokenizer

    tok = write_tiny_tokenizer(folder, "chatml")
    torch.manual_seed(0)
    cfg = Qwen2Config(**SIZES[size], max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(folder))
    return folder, sum(p.numel() for p in model.parameters())


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """The token ids of a chat prompt with its generation prompt, as both trainers encode it. (transformers
    5.x `apply_chat_template(tokenize=True)` returns a dict: its len() counts its keys, not tokens.)"""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def _text(tok, n: int, seed: int) -> str:
    """Words that are one token each (after a space), `n` tokens in all."""
    import random

    rng = random.Random(seed)
    single = [w for w in WORDS if all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in (w, " " + w))]
    text = "".join(" " + rng.choice(single) for _ in range(n)).strip()
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == n
    return text


def write_data(folder: Path, model_dir: Path, n: int, prompt: int, response: int) -> Path:
    """`n` quadruples: a prompt of `prompt` tokens (chat template included), three responses of exactly
    `response` tokens (+ the end-of-turn token)."""
    from wrpo.engine.common import load_tokenizer

    tok = load_tokenizer(model_dir)
    rows = []
    for i in range(n):
        words = prompt - (len(prompt_ids(tok, [{"role": "user", "content": "the"}])) - 1)
        msg = [{"role": "user", "content": _text(tok, words, seed=4 * i)}]
        # the template's tokens next to the text may merge: measure and set the length once more
        words += prompt - len(prompt_ids(tok, msg))
        msg = [{"role": "user", "content": _text(tok, words, seed=4 * i)}]
        ws, wt, lose = (_text(tok, response, seed=4 * i + k) for k in (1, 2, 3))
        rows.append({"prompt_id": f"p{i}", "prompt": msg, "chosen_source": ws, "chosen_target": wt, "rejected": lose,
                     "source_model": "s", "score_chosen_source": 3.0, "score_chosen_target": 2.0,
                     "score_rejected": 1.0})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def measure(data: Path, model_dir: Path) -> dict:
    """Prompt and response lengths in tokens of the records in `data` (what the contenders are fed)."""
    from wrpo.engine.common import load_tokenizer

    tok = load_tokenizer(model_dir)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    prompts = [len(prompt_ids(tok, r["prompt"])) for r in rows]
    responses = [len(tok(r[k], add_special_tokens=False)["input_ids"]) for r in rows
                 for k in ("chosen_source", "chosen_target", "rejected")]
    return {"prompt_tokens": statistics.mean(prompts), "prompt_tokens_range": [min(prompts), max(prompts)],
            "response_tokens": statistics.mean(responses), "response_tokens_range": [min(responses), max(responses)]}


# -- one contender, in its own process --------------------------------------------------------------------

class _Probe:
    """A TrainerCallback timing optimizer steps (wall and process CPU) and a collator wrapper counting tokens."""

    def __init__(self, collator, count, cuda: bool):
        self.collator, self.count, self.tokens, self.wall, self.cpu, self.optimizer = collator, count, [], [], [], []
        self.cuda = cuda

    def __call__(self, items):
        batch = self.collator(items)
        self.tokens.append(self.count(batch))
        return batch

    def clock(self) -> float:
        if self.cuda:  # kernels run asynchronously: a step ends when the device is done
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def callback(self):
        from transformers import TrainerCallback

        probe = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                probe.t0 = (probe.clock(), time.process_time())

            def on_pre_optimizer_step(self, args, state, control, **kw):
                probe.t_opt = probe.clock()

            def on_optimizer_step(self, args, state, control, **kw):
                probe.optimizer.append(probe.clock() - probe.t_opt)

            def on_step_end(self, args, state, control, **kw):
                probe.wall.append(probe.clock() - probe.t0[0])
                probe.cpu.append(time.process_time() - probe.t0[1])

        return Timer()


def read_back(trainer, **extra) -> dict:
    """The settings a contender really trained with, read from its trainer and model (not the requested ones)."""
    model = trainer.model
    param = next(model.parameters())
    return {"gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            "bf16_autocast": bool(trainer.args.bf16), "dtype": str(param.dtype).removeprefix("torch."),
            "device": param.device.type, "attn_implementation": model.config._attn_implementation, **extra}


def _ours(spec: dict, layout: str):
    from wrpo.engine.common import load_causal_lm, load_tokenizer, training_arguments
    from wrpo.engine.config import WRPOConfig
    from wrpo.engine.wrpo_trainer import WRPOTrainer, wrpo_job

    gc = {} if spec["gc"] is None else {"gradient_checkpointing": spec["gc"]}  # None: our default
    cfg = WRPOConfig(model=Path(spec["model"]), data=Path(spec["data"]), output_dir=Path(spec["out"]),
                     batch_size=spec["batch"], per_device_batch_size=spec["batch"], max_steps=spec["steps"] + 1,
                     learning_rate=1e-6, warmup_ratio=0.0, beta=0.1, baseline=spec["baseline"], layout=layout,
                     save_steps=10**6, max_length=1024, max_prompt_length=512,
                     precision="bf16" if spec["bf16"] else "fp32", **gc)
    job = wrpo_job(cfg)
    tok = load_tokenizer(cfg.model)
    train_ds, _ = job.datasets(tok)
    args = training_arguments(cfg, False)
    model = load_causal_lm(cfg.model, cfg)
    collator = job.collator(tok, model)
    return cfg, tok, model, collator, lambda data_collator: WRPOTrainer(
        model=model, args=args, train_dataset=train_ds, processing_class=tok, data_collator=data_collator,
        metrics_path=cfg.output_dir / "metrics.jsonl", **job.trainer_kwargs)


def run_ours(spec: dict) -> _Probe:
    cfg, _, _, collator, make = _ours(spec, spec["layout"])
    probe = _Probe(collator, lambda b: (int(b["target_ids"].numel()), int(b["input_ids"].numel())),
                   spec["device"] == "cuda")
    trainer = make(probe)
    trainer.add_callback(probe.callback())
    trainer.train()
    probe.settings = read_back(trainer, layout=collator.layout, reference="precomputed by wrpo ref-logps",
                               beta=cfg.beta)
    return probe


def run_trl(spec: dict) -> _Probe:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    ds = Dataset.from_list([{"prompt": r["prompt"],
                             "chosen": [{"role": "assistant", "content": r["chosen_target"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    gc = {} if spec["gc"] is None else {"gradient_checkpointing": spec["gc"]}  # None: TRL's default
    args = DPOConfig(output_dir=spec["out"], per_device_train_batch_size=spec["batch"], max_steps=spec["steps"] + 1,
                     bf16=spec["bf16"], precompute_ref_log_probs=spec["precompute"], report_to="none",
                     save_strategy="no", logging_steps=10**6, disable_tqdm=True, use_cpu=spec["device"] == "cpu",
                     **gc)
    precompute = DPOTrainer._precompute_ref_logps  # runs in __init__: timed apart, never in a step
    spent = []

    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        out = precompute(self, *a, **kw)
        spent.append(time.perf_counter() - t0)
        return out

    DPOTrainer._precompute_ref_logps = timed
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16 if spec["bf16"] else torch.float32)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    probe = _Probe(trainer.data_collator, lambda b: (int(b["completion_mask"].sum()), int(b["input_ids"].numel())),
                   spec["device"] == "cuda")
    trainer.data_collator = probe
    trainer.add_callback(probe.callback())
    trainer.train()
    probe.settings = read_back(trainer, layout="padded", beta=trainer.args.beta,
                               precompute_ref_log_probs=bool(trainer.args.precompute_ref_log_probs),
                               reference_model_loaded=trainer.ref_model is not None,
                               reference_precompute_s=round(sum(spent), 3) if spent else None)
    return probe


def layout_check(spec: dict) -> dict:
    """One WRPO step's loss, policy log-probs and gradient on the same micro-batch, shared-prompt packed and
    padded: the two layouts must agree up to the precision's rounding. The reference log-probs are moved off
    the policy's (by the same amounts in both layouts) so that the loss is not at its log 2 starting point."""
    import torch

    from wrpo.engine.data import PreferenceCollator

    _, tok, model, _, make = _ours(spec, "shared")
    trainer = make(None)
    device = torch.device("cuda" if spec["device"] == "cuda" else "cpu")
    model.to(device).train()
    items = [trainer.train_dataset[i] for i in range(spec["batch"])]
    seen = {}
    for layout in ("shared", "padded"):
        batch = {k: v.to(device) for k, v in PreferenceCollator(tok.pad_token_id, layout)(items).items()}
        batch["reference_logps"] = batch["reference_logps"] + torch.tensor([[2.0, 1.0, -3.0]], device=device)
        model.zero_grad(set_to_none=True)
        out = trainer.preference_loss(model, batch, alpha=0.5)  # α halfway: both chosen responses count
        out.losses.sum().backward()
        grad = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        with torch.no_grad():
            logps, _ = trainer._logps(model, batch)  # (B, 3): y_ws, y_wt, y_l
        seen[layout] = (out.losses.detach().float(), logps.float(), grad)
    (ls, ps, gs), (lp, pp, gp) = seen["shared"], seen["padded"]
    loss_rel = float(((ls - lp).abs() / lp.abs()).max())
    logps_rel = float(((ps - pp).abs() / pp.abs()).max())
    grad_rel = float((gs - gp).norm() / gp.norm())
    tolerance = 5e-2 if spec["bf16"] else 1e-4  # bf16 keeps 8 bits of mantissa: 0.4% per rounding
    return {"loss_shared": float(ls.mean()), "loss_padded": float(lp.mean()), "loss_rel_diff": loss_rel,
            "logps_padded": [round(float(x), 3) for x in pp[0]], "logps_rel_diff": logps_rel,
            "grad_rel_diff": grad_rel, "grad_cosine": float(gs.double() @ gp.double() / (gs.double().norm() *
                                                                                      gp.double().norm())),
            "tolerance": tolerance, "ok": max(loss_rel, logps_rel, grad_rel) < tolerance}


def contender(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    if spec["kind"] == "layout_check":
        return {"name": spec["name"], **layout_check(spec)}
    probe = run_trl(spec) if spec["kind"] == "trl" else run_ours(spec)
    timed = slice(1, None)  # the first step warms up
    wall, cpu, tokens = probe.wall[timed], probe.cpu[timed], probe.tokens[1:len(probe.wall)]
    if spec["device"] == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"name": spec["name"], "settings": probe.settings,
            "steps_timed": len(wall), "step_s": statistics.median(wall), "step_s_min": min(wall),
            "cpu_s": statistics.median(cpu), "optimizer_s": statistics.median(probe.optimizer[timed]),
            "step_s_all": [round(x, 4) for x in wall],
            "response_tokens_per_step": statistics.mean(t[0] for t in tokens),
            "input_positions_per_step": statistics.mean(t[1] for t in tokens),
            "peak_memory_mib": peak, "threads": torch.get_num_threads()}


# -- the FLOP model ---------------------------------------------------------------------------------------

def step_flops(model: dict, kind: str, gc: bool, batch: int, prompt: float, response: float, responses: int,
               reference_forward: bool = False) -> float:
    """Matrix-product FLOPs of one optimizer step (see the module docstring). `responses` per prompt; lengths
    in tokens, the response's end-of-turn token included."""
    h, v, layers = model["hidden_size"], model["vocab_size"], model["num_hidden_layers"]
    q = model["num_attention_heads"] * model["head_dim"]
    kv = model["num_key_value_heads"] * model["head_dim"]
    body = 2 * layers * (2 * h * q + 2 * h * kv + 3 * h * model["intermediate_size"])  # per token, forward
    head = 2 * h * v  # per scored position, forward
    attn_pair = 2 * 2 * q * layers  # QKᵀ and AV per (query, key) pair, forward
    causal = lambda n: n * (n + 1) / 2  # noqa: E731
    train = 4 if gc else 3  # forward, backward (2), recompute (1) of the checkpointed layers
    if kind == "trl":  # separate padded rows of prompt + response; head over every position
        tokens = responses * (prompt + response)
        pairs = responses * causal(prompt + response)
        fwd = tokens * body + pairs * attn_pair
        ref = fwd + tokens * head if reference_forward else 0.0
        return batch * (train * fwd + 4 * tokens * head + ref)
    tokens = prompt + responses * response  # shared prompt
    pairs = causal(prompt) + responses * (response * prompt + causal(response))
    return batch * (train * (tokens * body + pairs * attn_pair) + 4 * responses * response * head)


# -- the driver ---------------------------------------------------------------------------------------------

def _run(spec: dict) -> dict:
    """One contender in a fresh interpreter; its JSON result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--contender", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"{spec['name']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratios(a: dict, b: dict) -> dict:
    return {"step_time": round(a["step_s"] / b["step_s"], 3), "cpu_time": round(a["cpu_s"] / b["cpu_s"], 3),
            "fastest_step": round(a["step_s_min"] / b["step_s_min"], 3)}


def _floor(model: dict, ours: dict, trl: dict, batch: int, lengths: dict) -> float:
    """The FLOP model's ratio for two contenders at the lengths fed and the settings read back."""
    p, r = lengths["prompt_tokens"], lengths["response_tokens"] + 1  # + the end-of-turn token
    mine = step_flops(model, "ours", ours["settings"]["gradient_checkpointing"], batch, p, r, 3)
    theirs = step_flops(model, "trl", trl["settings"]["gradient_checkpointing"], batch, p, r, 2,
                        reference_forward=not trl["settings"]["precompute_ref_log_probs"])
    return round(mine / theirs, 3)


def _equal(a: dict, b: dict) -> bool:
    """The settings that change a step's work are the same on both sides."""
    keys = ("gradient_checkpointing", "dtype", "bf16_autocast", "device", "attn_implementation")
    return all(a["settings"][k] == b["settings"][k] for k in keys)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=sorted(SIZES), default="cpu", help="the random model (module docstring)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 weights and autocast on both sides (a GPU)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--batch", type=int, default=2, help="prompts per optimizer step (one micro-batch)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--response", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--quick", action="store_true", help="only the main contenders (no gc_off, no P = R)")
    p.add_argument("--contender", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.contender:
        print(json.dumps(contender(json.loads(a.contender))))
        return
    import torch

    from wrpo.engine.ref_logps import compute_reference_logps

    model_shape = SIZES[a.size]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, params = make_model(root / "model", a.size)
        shapes = {"main": (a.prompt, a.response)}
        if not a.quick:
            shapes["prompt_equals_response"] = (a.response, a.response)
        data, lengths, ref_s = {}, {}, {}
        for shape, (prompt, response) in shapes.items():
            data[shape] = write_data(root / shape, model, a.batch * (a.steps + 1), prompt, response)
            lengths[shape] = measure(data[shape], model)
            t0 = time.perf_counter()
            compute_reference_logps(model, data[shape], max_length=1024, max_prompt_length=512, batch_size=4,
                                    precision="bf16" if a.bf16 else "fp32")
            ref_s[shape] = time.perf_counter() - t0
        base = {"model": str(model), "batch": a.batch, "steps": a.steps, "threads": a.threads, "layout": "auto",
                "device": a.device, "bf16": a.bf16, "precompute": False, "baseline": "none"}
        runs = [("trl_dpo", "trl", None, "main", {"precompute": True}),
                ("trl_dpo_defaults", "trl", None, "main", {}),
                ("wrpo", "ours", True, "main", {}),
                ("own_dpo", "ours", True, "main", {"baseline": "target"}),
                ("layout_check", "layout_check", True, "main", {})]
        if not a.quick:
            runs += [("trl_dpo_gc_off", "trl", False, "main", {"precompute": True}),
                     ("wrpo_gc_off", "ours", False, "main", {}),
                     ("trl_dpo_p_eq_r", "trl", None, "prompt_equals_response", {"precompute": True}),
                     ("wrpo_p_eq_r", "ours", True, "prompt_equals_response", {})]
        results = {}
        for name, kind, gc, shape, extra in runs:
            spec = {**base, "name": name, "kind": kind, "gc": gc, "data": str(data[shape]),
                    "out": str(root / "out" / name), **extra}
            results[name] = _run(spec)
            print(f"# {name}: {json.dumps(results[name])}", file=sys.stderr)
    w, t, td, d = results["wrpo"], results["trl_dpo"], results["trl_dpo_defaults"], results["own_dpo"]
    main_len = lengths["main"]

    def throughput(key: str) -> float:  # response tokens per second, WRPO over our DPO
        return (w["response_tokens_per_step"] / w[key]) / (d["response_tokens_per_step"] / d[key])

    headline, defaults = _ratios(w, t), _ratios(w, td)
    r = main_len["response_tokens"] + 1
    out = {
        "step_time_vs_trl_dpo": headline["step_time"],
        "flop_floor_vs_trl_dpo": _floor(model_shape, w, t, a.batch, main_len),
        "step_time_vs_trl_dpo_defaults": defaults["step_time"],
        "flop_floor_vs_trl_dpo_defaults": _floor(model_shape, w, td, a.batch, main_len),
        "token_throughput_vs_own_dpo": round(throughput("step_s"), 3),
        "peak_memory_vs_trl_dpo": round(w["peak_memory_mib"] / t["peak_memory_mib"], 3),
        # the same ratios from process CPU time and from the fastest step: on a machine shared with other
        # work, wall time measures the neighbours too
        "cpu_time_vs_trl_dpo": headline["cpu_time"], "fastest_step_vs_trl_dpo": headline["fastest_step"],
        "cpu_time_vs_trl_dpo_defaults": defaults["cpu_time"],
        "fastest_step_vs_trl_dpo_defaults": defaults["fastest_step"],
        "token_throughput_vs_own_dpo_by_cpu_time": round(throughput("cpu_s"), 3),
        "equal_settings": _equal(w, t),
        "layout_check": {k: v for k, v in results["layout_check"].items() if k != "name"},
        # made before training on both sides and left out of every ratio above
        "reference_precompute_s": {"wrpo": round(ref_s["main"], 3),
                                   "trl_dpo": t["settings"]["reference_precompute_s"]},
        "settings": {n: c["settings"] for n, c in results.items() if "settings" in c},
        "ceilings": {  # a measured ratio beyond `hard` is a benchmark bug
            # WRPO's step does all the work of our DPO's step on the same prompts plus a third response, so
            # it cannot be faster: throughput at most the response-token ratio. The FLOP count alone predicts
            # less; what it leaves out (element-wise work, per-step costs such as the optimizer step,
            # `optimizer_s`) and a machine shared with other work move a measurement around that figure.
            "token_throughput_vs_own_dpo": {
                "hard": round(w["response_tokens_per_step"] / d["response_tokens_per_step"], 3),
                "flop_model": round(step_flops(model_shape, "ours", True, a.batch, main_len["prompt_tokens"], r, 2)
                                    * 3 / (step_flops(model_shape, "ours", True, a.batch,
                                                      main_len["prompt_tokens"], r, 3) * 2), 3)}},
        "load_average": os.getloadavg(),
        "model": {"size": a.size, "parameters": params, **model_shape},
        "workload": {"requested": {"prompt_tokens": a.prompt, "response_tokens": a.response},
                     "measured": main_len, "batch": a.batch, "timed_steps": a.steps, "threads": a.threads,
                     "device": a.device, "bf16": a.bf16, "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None},
        "contenders": {n: c for n, c in results.items() if n != "layout_check"},
    }
    if not a.quick:
        pe = lengths["prompt_equals_response"]
        gc_off, wt, tt = results["wrpo_gc_off"], results["wrpo_p_eq_r"], results["trl_dpo_p_eq_r"]
        out["gc_off"] = {**_ratios(gc_off, results["trl_dpo_gc_off"]),
                         "flop_floor": _floor(model_shape, gc_off, results["trl_dpo_gc_off"], a.batch, main_len),
                         "equal_settings": _equal(gc_off, results["trl_dpo_gc_off"])}
        out["prompt_equals_response"] = {**_ratios(wt, tt), "flop_floor": _floor(model_shape, wt, tt, a.batch, pe),
                                         "measured": pe, "equal_settings": _equal(wt, tt)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
