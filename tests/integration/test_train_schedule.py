"""The α schedule as the real Trainer drives it (docs/training.md, "α schedule"): every micro-batch of an
optimizer step sees that step's α, through gradient accumulation with a short last step per epoch, across
epochs, under max_steps, and across a resume from a checkpoint.

A recording subclass of WRPOTrainer notes (global_step, α) for every micro-batch it trains on; the tiny
target model and 10 quadruples make each run a few seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from wrpo.engine.schedule import alpha_at

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "tiny"
LIMITS = {"max_length": 160, "max_prompt_length": 80}
TARGET = 0.1


@pytest.fixture(scope="module")
def data(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wrpo.engine.ref_logps import compute_reference_logps

    path = tmp_path_factory.mktemp("schedule") / "train.jsonl"
    path.write_text("".join(x + "\n" for x in (EXAMPLES / "quadruples.jsonl").read_text().splitlines()[:10]))
    compute_reference_logps(tiny_models / "target", path, **LIMITS, batch_size=10)
    return path


def _train(tiny_models: Path, data: Path, out: Path, **kw) -> list[tuple[int, float]]:
    """(global_step, α) of every micro-batch trained on, in order."""
    from wrpo.engine.config import WRPOConfig
    from wrpo.engine.trainer import run_training
    from wrpo.engine.wrpo_trainer import WRPOTrainer, wrpo_job

    seen: list[tuple[int, float]] = []

    class Recording(WRPOTrainer):
        def batch_loss(self, model, inputs):
            out = super().batch_loss(model, inputs)
            if model.training:
                seen.append((self.state.global_step, out.values["alpha"]))
            return out

    cfg = WRPOConfig(model=tiny_models / "target", data=data, output_dir=out, per_device_batch_size=2,
                     learning_rate=1e-4, alpha=TARGET, warmup_ratio=0.0, gradient_checkpointing=False,
                     **{"batch_size": 4, "save_steps": 100, **LIMITS, **kw})
    job = wrpo_job(cfg)
    job.trainer_class = Recording
    run_training(cfg, job)
    return seen


def _alphas_by_step(seen: list[tuple[int, float]]) -> dict[int, set[float]]:
    by_step: dict[int, set[float]] = {}
    for step, a in seen:
        by_step.setdefault(step, set()).add(a)
    return by_step


def test_accumulation_and_epochs_share_alpha_within_a_step(tiny_models, data, tmp_path):
    """10 records, micro-batches of 2, accumulation 2, 2 epochs: 5 micro-batches per epoch make 3 steps (the
    last with one micro-batch), 6 steps in all; α runs 0 → target exactly, one value per step."""
    seen = _train(tiny_models, data, tmp_path / "out", epochs=2.0)
    assert len(seen) == 10  # every micro-batch of both epochs
    assert [s for s, _ in seen] == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]
    by_step = _alphas_by_step(seen)
    assert all(len(v) == 1 for v in by_step.values())
    assert [by_step[s].pop() for s in range(6)] == [alpha_at(s, 6, TARGET) for s in range(6)]
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["alpha"] for m in metrics] == [alpha_at(s, 6, TARGET) for s in range(6)]
    assert metrics[-1]["alpha"] == TARGET


def test_max_steps_ends_at_the_target_and_spills_into_a_second_epoch(tiny_models, data, tmp_path):
    """max_steps 4 with 3 steps per epoch: the fourth step is the first of the second epoch, at α = target."""
    seen = _train(tiny_models, data, tmp_path / "out", max_steps=4)
    assert [s for s, _ in seen] == [0, 0, 1, 1, 2, 3, 3]
    assert seen[-1] == (3, TARGET) and seen[0] == (0, 0.0)


def test_resume_continues_the_same_alpha_sequence(tiny_models, data, tmp_path):
    """A run checkpointed at step 2 and killed after step 4 continues at step 2 with the same α per step."""
    full = _train(tiny_models, data, tmp_path / "full", epochs=2.0)
    out = tmp_path / "resumed"
    _train(tiny_models, data, out, epochs=2.0, save_steps=2, save_total_limit=None)
    for later in ("checkpoint-4", "checkpoint-6"):  # as if killed after step 4
        shutil.rmtree(out / "checkpoints" / later, ignore_errors=True)
    resumed = _train(tiny_models, data, out, epochs=2.0, save_steps=2, save_total_limit=None)
    assert resumed == [x for x in full if x[0] >= 2]
    assert resumed[0] == (2, alpha_at(2, 6, TARGET))
