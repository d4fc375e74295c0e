"""The GPU budget's sliding window (operator/wrpo_operator/window.py) and the benchmark built on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wrpo_operator.window import UnitNeed, admit

ROOT = Path(__file__).resolve().parents[2]
PAPER = [UnitNeed(n, g) for n, g in (("mistral", 8), ("gemma27", 2), ("qwen72", 4), ("llama70", 4), ("gemma9", 1),
                                     ("internlm", 1), ("dsv2", 8), ("dscoder", 8), ("yi", 2), ("phi", 1))]


def test_first_fit_in_order_under_the_budget():
    assert admit(PAPER, set(), set(), 8) == ["mistral"]
    assert admit(PAPER, {"mistral"}, set(), 8) == ["gemma27", "qwen72", "gemma9", "internlm"]
    # nothing fits while qwen72 and the small ones hold 8: llama70 (4) and phi (1) wait
    assert admit(PAPER, {"mistral"}, {"gemma27", "qwen72", "gemma9", "internlm"}, 8) == []
    assert admit(PAPER, {"mistral", "qwen72"}, {"gemma27", "gemma9", "internlm"}, 8) == ["llama70"]


def test_no_budget_starts_everything_and_held_gpus_count():
    assert admit(PAPER, set(), set(), None) == [u.name for u in PAPER]
    assert admit(PAPER, {"mistral"}, set(), 8, held=7) == ["gemma9"]  # a server still being deleted
    assert admit([UnitNeed("ext", 0)], set(), set(), 1, held=1) == ["ext"]  # endpoints hold no GPU


def test_simulated_window_never_exceeds_the_budget_and_finishes_every_unit():
    running: dict[str, int] = {}
    done: set[str] = set()
    for _ in range(100):
        for name in admit(PAPER, done, set(running), 8):
            running[name] = next(u.gpus for u in PAPER if u.name == name)
        assert sum(running.values()) <= 8
        if not running:
            break
        first = sorted(running)[0]
        running.pop(first)
        done.add(first)
    assert done == {u.name for u in PAPER}


def test_the_benchmark_prints_one_line_within_its_physical_bounds():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_schedule.py"), "--prompts", "2000"],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    by_budget = {r["budget"]: r for r in result["results"]}
    assert set(by_budget) == {8, 16, 39}
    assert by_budget[8]["deadlock_before"] and not by_budget[39]["deadlock_before"]
    for r in result["results"]:
        assert 0 <= r["gpu_idle_fraction_after"] <= 1 and 0 < r["budget_utilisation_after"] <= 1
    assert by_budget[39]["gpu_idle_fraction_after"] < by_budget[39]["gpu_idle_fraction_before"]
    assert by_budget[39]["wall_hours_after"] <= by_budget[39]["wall_hours_before"]
    assert by_budget[8]["wall_hours_after"] >= by_budget[16]["wall_hours_after"] >= by_budget[39]["wall_hours_after"]


@pytest.mark.parametrize("budget", [0, -1])
def test_a_unit_larger_than_the_budget_is_never_admitted(budget):
    assert admit([UnitNeed("a", 1)], set(), set(), budget) == []
