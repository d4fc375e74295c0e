"""The train-step benchmark end to end on a CPU with a tiny random model, through `benchmarks/gpu_check.sh cpu`
(the script a GPU machine runs in bf16 on a 0.5B model; docs/training.md, "Benchmark"). No timing is asserted:
the test checks that both contenders ran equal work and that the JSON line carries what it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def line() -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_check.sh"), "cpu"], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_headline_compares_equal_work_and_has_its_flop_floor(line):
    for key in (
        "step_time_vs_trl_dpo",
        "flop_floor_vs_trl_dpo",
        "step_time_vs_trl_dpo_defaults",
        "flop_floor_vs_trl_dpo_defaults",
        "cpu_time_vs_trl_dpo",
        "token_throughput_vs_own_dpo",
        "peak_memory_vs_trl_dpo",
    ):
        assert line[key] > 0, key
    # TRL's reference forward in every step costs more than reading precomputed log-probs
    assert line["flop_floor_vs_trl_dpo_defaults"] < line["flop_floor_vs_trl_dpo"]
    settings = line["settings"]
    assert settings["trl_dpo"]["precompute_ref_log_probs"] is True
    assert settings["trl_dpo"]["reference_model_loaded"] is False
    assert settings["trl_dpo_defaults"]["precompute_ref_log_probs"] is False
    assert settings["trl_dpo_defaults"]["reference_model_loaded"] is True
    assert line["equal_settings"] is True  # read back from both trainers, not the requested values
    for name in ("wrpo", "trl_dpo", "trl_dpo_defaults", "own_dpo"):
        assert settings[name]["gradient_checkpointing"] is True and settings[name]["dtype"] == "float32", name
    assert settings["wrpo"]["layout"] == "shared" and settings["trl_dpo"]["layout"] == "padded"
    assert line["reference_precompute_s"]["wrpo"] > 0 and line["reference_precompute_s"]["trl_dpo"] > 0
    assert all(c["steps_timed"] == 2 for c in line["contenders"].values())


def test_the_lengths_are_measured_from_the_records_fed(line):
    measured, requested = line["workload"]["measured"], line["workload"]["requested"]
    assert measured["prompt_tokens_range"] == [requested["prompt_tokens"]] * 2  # chat template included
    assert measured["response_tokens_range"] == [requested["response_tokens"]] * 2
    # what the contenders' collators saw: y_ws, y_wt, y_l (+ end of turn) for WRPO; y_wt, y_l for DPO
    assert line["contenders"]["wrpo"]["response_tokens_per_step"] == 3 * (requested["response_tokens"] + 1)


def test_shared_prompt_packing_gives_the_padded_step(line):
    check = line["layout_check"]
    # fp32 (the benchmark's CPU mode): the packed and padded layouts sum the same terms in another order; a
    # reduction of n terms differs by at most ~n·u32 relative (u32 = 2^-24), and the step's longest reductions
    # (a sequence's log-probs, a gradient over the batch's tokens) have n ≤ 10^3: n·u32 ≈ 6·10^-5 < 10^-4
    # (measured: 4·10^-6)
    assert check["ok"] is True and check["grad_rel_diff"] < 1e-4 and check["loss_rel_diff"] < 1e-4
    assert abs(check["loss_shared"] - 0.6931) > 0.01  # the reference is moved off the policy: not log 2
