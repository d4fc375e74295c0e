"""GPU schedule of the sampling stage: all servers at once (before) vs the budgeted sliding window (after).

A simulation of the paper's setup (Sec. 4: ten sources, 9B–236B, with the tensor-parallel sizes of
manifests/examples/paper-llama3-8b.yaml, 39 GPUs in all) sampling N answers for every prompt:

- before: the operator starts every source's vLLM server at once and one sampling Job samples the
  sources one after another; every server holds its GPUs until the whole stage ends. With fewer free
  GPUs than the sum, the stage never starts (the servers that did start idle forever).
- after: units as a sliding window under `cluster.gpuBudget` (the operator's own `admit`): a source's
  server starts when its GPUs fit, its sampling Job runs as soon as it is ready, and the server is
  deleted when the unit commits.

A GPU is *idle* while it is held by the run but not generating (model loading, waiting for the
sequential Job). Per-server throughput and load times are parameters (assumed, not measured: vLLM on
80 GB GPUs at high concurrency); the ratios depend on them only mildly. Prints one JSON line.

    python benchmarks/gpu_schedule.py [--prompts 61135] [--n 5] [--tokens 450] [--budgets 8,16,39]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from wrpo_operator.window import UnitNeed, admit  # noqa: E402


@dataclass(frozen=True)
class Source:
    name: str
    params_b: float  # billions of parameters (load time)
    tp: int  # GPUs per server
    tokens_per_s: float  # generated tokens per second of one server at full concurrency


PAPER = (  # name, size, tensor-parallel size as in the example manifest, assumed throughput
    Source("mistral-large", 123, 8, 2600), Source("gemma-2-27b", 27, 2, 2800), Source("qwen2-72b", 72, 4, 2400),
    Source("llama-3-70b", 70, 4, 2400), Source("gemma-2-9b", 9, 1, 4000), Source("internlm-2-5-20b", 20, 1, 2600),
    Source("deepseek-v2", 236, 8, 3000), Source("deepseek-coder-v2", 236, 8, 3000), Source("yi-1-5-34b", 34, 2, 2400),
    Source("phi-3-medium", 14, 1, 3600),
)


def load_hours(s: Source) -> float:
    """Startup: container + weights from a PVC at ~1 GB/s + CUDA graphs (assumed)."""
    return (3.0 + 2 * s.params_b / 60.0) / 60.0


def sample_hours(s: Source, prompts: int, n: int, tokens: int) -> float:
    return prompts * n * tokens / s.tokens_per_s / 3600.0


def before(sources: tuple[Source, ...], budget: int, work: dict[str, float]) -> dict:
    total = sum(s.tp for s in sources)
    if total > budget:  # the servers that fit start and wait forever for the others
        return {"gpu_idle_fraction_before": 1.0, "wall_hours_before": None, "deadlock_before": True}
    wall = max(load_hours(s) for s in sources) + sum(work.values())
    busy = sum(s.tp * work[s.name] for s in sources)
    return {"gpu_idle_fraction_before": round(1 - busy / (total * wall), 4), "wall_hours_before": round(wall, 2),
            "deadlock_before": False}


def after(sources: tuple[Source, ...], budget: int, work: dict[str, float]) -> dict:
    units = [UnitNeed(s.name, s.tp) for s in sources]
    by_name = {s.name: s for s in sources}
    t, ends, done = 0.0, {}, set()
    held = busy = 0.0
    while len(done) < len(sources):
        for name in admit(units, done, set(ends), budget):
            s = by_name[name]
            ends[name] = t + load_hours(s) + work[name]
            held += s.tp * (load_hours(s) + work[name])
            busy += s.tp * work[name]
        name = min(ends, key=ends.get)  # the next unit to commit frees its GPUs
        t = ends.pop(name)
        done.add(name)
    return {"gpu_idle_fraction_after": round(1 - busy / held, 4), "wall_hours_after": round(t, 2),
            "budget_utilisation_after": round(held / (budget * t), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=61135, help="UltraFeedback prompts (paper: ~61k)")
    ap.add_argument("--n", type=int, default=5, help="answers per prompt and source (paper: 5)")
    ap.add_argument("--tokens", type=int, default=450, help="mean generated tokens per answer (assumed)")
    ap.add_argument("--budgets", default="8,16,39")
    args = ap.parse_args()
    work = {s.name: sample_hours(s, args.prompts, args.n, args.tokens) for s in PAPER}
    results = []
    for budget in (int(b) for b in args.budgets.split(",")):
        results.append({"budget": budget, **before(PAPER, budget, work), **after(PAPER, budget, work)})
    print(json.dumps({"benchmark": "gpu_schedule", "sources": len(PAPER), "gpus_all_at_once": sum(s.tp for s in PAPER),
                      "prompts": args.prompts, "n": args.n, "tokens": args.tokens, "results": results}))


if __name__ == "__main__":
    main()
