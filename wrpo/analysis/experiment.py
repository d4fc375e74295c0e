"""`wrpo experiment margins`: the paper's Fig. 3 fidelity check on your own pairs.

Trains from Target-SFT on the same quadruples and reference log-probs three times — α=0 (on-policy
DPO on (y_wt, y_l)), α=1 (hybrid DPO on (y_ws, y_l)) and the spec's WRPO schedule — and compares the
internal reward margin each one optimises, α·(r(y_ws)−r(y_l)) + (1−α)·(r(y_wt)−r(y_l)), averaged over
the last steps. The paper reports hybrid > WRPO > on-policy (≈1.0, ≈0.5, ≈0.2 on Llama-3-8B).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from wrpo.pipeline.spec import FusionSpec  # noqa: E402

VARIANTS = (  # name, α override, schedule override (None: the spec's)
    ("on-policy", 0.0, "constant"),
    ("hybrid", 1.0, "constant"),
    ("wrpo", None, None),
)
PAPER_ORDER = ["hybrid", "wrpo", "on-policy"]


def objective_margin(row: dict[str, Any]) -> float:
    """The margin inside the WRPO sigmoid at this step (Eq. 7), from the logged components."""
    a = row["alpha"]
    return a * row["margins/hybrid"] + (1 - a) * row["margins/on_policy"]


def final_margins(rows: list[dict[str, Any]], window: int) -> dict[str, float]:
    tail = rows[-window:]
    n = len(tail)
    return {"margin": sum(objective_margin(r) for r in tail) / n,
            "hybrid": sum(r["margins/hybrid"] for r in tail) / n,
            "on_policy": sum(r["margins/on_policy"] for r in tail) / n}


def margins_experiment(spec: FusionSpec, run_uri: str | None, out: Path, steps: int = 40,
                       learning_rate: float | None = None, window: int = 5) -> dict[str, Any]:
    """Run the three trainings (after the pipeline up to ref-logps, which is resumed/skipped if committed)."""
    from wrpo.engine.stages import fetch_pairs, fetch_sft_model, wrpo_config
    from wrpo.engine.wrpo_trainer import run_wrpo
    from wrpo.pipeline.runner import run_pipeline
    from wrpo.pipeline.runtime import open_run, workdir_of

    report = run_pipeline(spec, run_uri, until="ref-logps")
    if report.interrupted_at:
        raise KeyboardInterrupt
    run = open_run(spec, run_uri)
    work = workdir_of(run, None)
    data = fetch_pairs(run, work) / "train.jsonl"
    model = fetch_sft_model(run, work)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves: dict[str, list[dict[str, Any]]] = {}
    for name, alpha, schedule in VARIANTS:
        overrides: dict[str, Any] = {"max_steps": steps, "epochs": float(steps), "eval_data": None,
                                     "save_steps": steps + 1, "resume": False}
        if alpha is not None:
            overrides.update(alpha=alpha, alpha_schedule=schedule)
        if learning_rate:
            overrides["learning_rate"] = learning_rate
        cfg = wrpo_config(spec, model, data, out / name, **overrides)
        run_wrpo(cfg)
        curves[name] = [json.loads(x) for x in (cfg.output_dir / "metrics.jsonl").read_text().splitlines() if x]
    result = {name: final_margins(rows, window) for name, rows in curves.items()}
    ordering = sorted(result, key=lambda n: result[n]["margin"], reverse=True)
    summary = {"steps": steps, "margins": result, "ordering": ordering, "paper_ordering": PAPER_ORDER,
               "matches_paper": ordering == PAPER_ORDER}
    (out / "margins.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_margins(curves, out / "margins.png")
    return summary


def plot_margins(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, rows in curves.items():
        ax.plot([r["step"] for r in rows], [objective_margin(r) for r in rows], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("internal reward margin (Eq. 7)")
    ax.set_title("α=0 (on-policy) vs α=1 (hybrid) vs WRPO (cf. paper Fig. 3)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
