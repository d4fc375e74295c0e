"""What a training step computes, against closed forms on a real batch (docs/training.md, "The loss").

The policy is the tiny target; the stored reference log-probs come from another model with the same
tokenizer (source-qwen), so policy ≠ reference from the first step. The expected values are computed here
without the engine: one sequence per forward, a full log-softmax, and each objective's formula written out
(Table 5, Eq. 6, Eq. 9). The engine trains with its defaults: shared-prompt packing and the chunked head.

Everything runs in float64 (`precision="fp64"`), so that the comparisons hold on any CPU, thread count and
`ATEN_CPU_CAPABILITY`: the engine and the closed form differ only in summation order (packing, chunking,
batch shapes pick other BLAS kernels). A sum of n terms computed in two orders differs by at most
2·γ_n·Σ|terms| with γ_n ≈ n·u (u = 2^-53 in float64). The longest chain of reductions here is below
n = 4·10^3 (2 layers × (hidden 64 + 160 positions of attention + MLP 128) + a 1000-token logsumexp + ≤ 160
response tokens + 8 examples), and the terms of the log-prob sums are at most ~10^3 times the loss they end in
(κ ≤ 10^3), so the relative difference is below 2·n·u·κ ≈ 9·10^-10: REL. In float32 (u = 2^-24) the same
bound is 0.5, which is why a float32 tolerance can only be tuned to one machine (1e-5 failed on AMD, rel 3e-5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from wrpo.engine.collate import Limits, encode_example

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "tiny"
LIMITS = {"max_length": 160, "max_prompt_length": 80}
REL = 1e-9  # the bound derived in the module docstring
NAMES = ("chosen_source", "chosen_target", "rejected", "rejected_source", "extra_chosen_source[0]")


@pytest.fixture(scope="module")
def data(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """8 quadruples (one per record has every response), reference log-probs of source-qwen beside them."""
    from wrpo.engine.ref_logps import compute_reference_logps

    folder = tmp_path_factory.mktemp("exact")
    records = [json.loads(x) for x in (EXAMPLES / "quadruples.jsonl").read_text().splitlines()[:8]]
    for i, r in enumerate(records):  # a second source answer for top-k: another record's y_ws
        r["extra_chosen_source"] = [records[(i + 1) % len(records)]["chosen_source"]]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    compute_reference_logps(tiny_models / "source-qwen", path, **LIMITS, batch_size=8, precision="fp64")
    return {"path": path, "records": records, "policy": _naive(tiny_models / "target", records),
            "reference": _naive(tiny_models / "source-qwen", records)}


def _naive(model_dir: Path, records: list[dict]) -> dict[str, list[tuple[float, int]]]:
    """name → [(Σ log π(y|x), |y|) per record]: each prompt + response alone through the model, full softmax."""
    import torch
    from transformers import AutoModelForCausalLM

    from wrpo.engine.common import load_tokenizer
    from wrpo.engine.data import record_responses

    tok, model = load_tokenizer(model_dir), AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out: dict[str, list[tuple[float, int]]] = {n: [] for n in NAMES}
    with torch.no_grad():
        for r in records:
            texts = record_responses(_record(r))
            for name in NAMES:
                ex = encode_example(tok, r["prompt"], [texts[name]], Limits(**LIMITS))
                ids = torch.tensor([ex.prompt_ids + ex.response_ids[0]])
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                tokens = logp.gather(-1, ids[0, 1:, None])[len(ex.prompt_ids) - 1:, 0]
                out[name].append((tokens.sum().item(), len(ex.response_ids[0])))
    return out


def _record(r: dict):
    from wrpo.records import PreferenceRecord

    return PreferenceRecord.model_validate(r)


def _cfg(fixture: dict, tiny_models: Path, out: Path, **kw):
    from wrpo.engine.config import WRPOConfig

    base = dict(model=tiny_models / "target", data=fixture["path"], output_dir=out, batch_size=8,
                per_device_batch_size=4, learning_rate=1e-3, beta=0.5, alpha=0.3, max_steps=1, save_steps=1,
                warmup_ratio=0.0, lr_scheduler="constant", gradient_checkpointing=False, precision="fp64", **LIMITS)
    return WRPOConfig(**{**base, **kw})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def expected_loss(data: dict, n: int, objective: str, baseline: str, alpha: float, beta: float, gamma: float = 0.0,
                  tau: float = 0.01, rejected_source: bool = False, top_k: int = 1) -> float:
    """Mean over the first `n` records of each objective's formula (Table 5, Eq. 6, Eq. 9, top-k shares)."""
    pol, ref = data["policy"], data["reference"]
    losses = []
    for i in range(n):
        def r(name: str, i: int = i) -> float:
            logp, length = pol[name][i]
            if objective == "simpo":
                return beta * logp / length  # r = β/|y|·log πθ
            scale = beta if objective == "dpo" else 1.0  # IPO: log-ratio without β
            return scale * (logp - ref[name][i][0])

        if baseline == "target":
            h = r("chosen_target") - r("rejected")
        elif baseline == "source":
            h = r("chosen_source") - r("rejected")
        else:
            sources = ["chosen_source"] + [f"extra_chosen_source[{k}]" for k in range(top_k - 1)]
            h = sum(alpha / len(sources) * r(s) for s in sources) + (1 - alpha) * r("chosen_target")
            h -= ((1 - alpha) * r("rejected") + alpha * r("rejected_source")) if rejected_source else r("rejected")
        match objective:
            case "dpo":
                losses.append(-_logsig(h))
            case "simpo":
                losses.append(-_logsig(h - gamma))
            case "ipo":
                losses.append((h - 1 / (2 * tau)) ** 2)
    return sum(losses) / n


CASES = {
    "wrpo-dpo": {},
    "dpo-target": {"baseline": "target"},
    "dpo-source": {"baseline": "source"},
    "wrpo-simpo": {"objective": "simpo", "beta": 2.0, "gamma": 0.5},
    "wrpo-ipo-eq9": {"objective": "ipo", "tau": 0.5, "rejected_source": True},
    "wrpo-top2": {"top_k_sources": 2},
    "wrpo-padded": {"layout": "padded"},
}


@pytest.mark.parametrize("case", CASES)
def test_step_loss_equals_the_closed_form(data, tiny_models, tmp_path, case):
    """One optimizer step over all 8 records (2 micro-batches of 4): the logged loss is the objective's
    mean over the 8, α of a one-step run is the target."""
    from wrpo.engine.wrpo_trainer import run_wrpo

    options = CASES[case]
    cfg = _cfg(data, tiny_models, tmp_path / "out", **options)
    summary = run_wrpo(cfg)
    assert summary["layout"] == options.get("layout", "shared")
    m = _metrics(tmp_path / "out")[0]
    want = expected_loss(data, 8, cfg.objective, cfg.baseline, cfg.alpha, cfg.beta, cfg.gamma, cfg.tau,
                         cfg.rejected_source, cfg.top_k_sources)
    assert m["loss"] == pytest.approx(want, rel=REL)
    assert abs(want - math.log(2)) > 1e-2  # policy ≠ reference: not DPO's log 2 at the start


def test_ragged_step_weighs_every_example_equally(data, tiny_models, tmp_path):
    """6 records, batch 8 = 4 × 2: the step's micro-batches hold 4 and 2 examples. The loss is the mean over
    the 6 (micro-batch means averaged would weigh the last 2 by 1/4 each); the Trainer's own logged loss
    (what report_to sees) is the same number; α and the learning rate are that step's exact values; and
    the update equals one micro-batch of all 6."""
    import torch
    from safetensors.torch import load_file

    from wrpo.engine.wrpo_trainer import run_wrpo

    six = tmp_path / "six.jsonl"
    six.write_text("".join(json.dumps(r) + "\n" for r in data["records"][:6]))
    ref = data["path"].with_name("train.ref_logps.jsonl")
    (tmp_path / "six.ref_logps.jsonl").write_text(ref.read_text())
    (tmp_path / "six.ref_logps.meta.json").write_text(ref.with_name("train.ref_logps.meta.json").read_text())
    run_wrpo(_cfg(data, tiny_models, tmp_path / "ragged", data=six))
    run_wrpo(_cfg(data, tiny_models, tmp_path / "whole", data=six, batch_size=6, per_device_batch_size=6))
    ragged, whole = _metrics(tmp_path / "ragged"), _metrics(tmp_path / "whole")
    assert len(ragged) == 1
    want = expected_loss(data, 6, "dpo", "none", 0.3, 0.5)
    assert ragged[0]["loss"] == pytest.approx(want, rel=REL)
    assert whole[0]["loss"] == pytest.approx(want, rel=REL)
    state = json.loads((tmp_path / "ragged" / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())
    logged = next(h for h in state["log_history"] if "loss" in h)
    # the Trainer keeps its running loss in a float32 tensor: its value is ours after ≤ 3 float32 roundings
    assert logged["loss"] == pytest.approx(ragged[0]["loss"], rel=3 * 2**-24)
    assert ragged[0]["alpha"] == 0.3 and ragged[0]["learning_rate"] == 1e-3
    a, b = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("ragged", "whole"))
    for key in b:  # norm-wise (see test_train_multirank._relative): AdamW amplifies rounding in ~0 gradients
        assert a[key].dtype == torch.float64
        assert ((a[key] - b[key]).norm() / b[key].norm()).item() < REL, key


def test_on_the_fly_reference_equals_stored_when_they_differ(data, tiny_models, tmp_path):
    """The reference of `--reference on-the-fly` is the starting model; stored log-probs of that same model
    must train identically. Steps 2 and 3 run on a moved policy (loss ≠ log 2), where a reference that
    drifted with the policy or a swapped column would show."""
    from wrpo.engine.ref_logps import compute_reference_logps
    from wrpo.engine.wrpo_trainer import run_wrpo

    own = tmp_path / "own.jsonl"
    own.write_text(data["path"].read_text())
    compute_reference_logps(tiny_models / "target", own, **LIMITS, batch_size=8, precision="fp64")
    kw = dict(data=own, batch_size=4, per_device_batch_size=2, max_steps=3, save_steps=10)
    run_wrpo(_cfg(data, tiny_models, tmp_path / "stored", **kw))
    run_wrpo(_cfg(data, tiny_models, tmp_path / "fly", reference="on-the-fly", **kw))
    stored, fly = _metrics(tmp_path / "stored"), _metrics(tmp_path / "fly")
    assert [m["loss"] for m in fly] == pytest.approx([m["loss"] for m in stored], rel=REL)
    # a margin is β × a difference of log-prob sums of size ≤ 10^3: near 0 (step 1) its error is REL × 10^3
    margins = [m["margins/hybrid"] for m in stored]
    assert [m["margins/hybrid"] for m in fly] == pytest.approx(margins, rel=REL, abs=REL * 1e3)
    assert all(abs(m["loss"] - math.log(2)) > 1e-2 for m in stored[1:])
