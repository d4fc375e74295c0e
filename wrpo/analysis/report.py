"""`wrpo report`: PNG plots and a Markdown summary of a run.

- reward_dynamics.png: α, the hybrid- and on-policy reward margins and accuracies per step (paper Fig. 3)
- contributions.png: share of y_ws per source model (paper Table 1)
- logp_shift.png: the target's average log-probs of y_ws, y_wt and y_l before and after WRPO (Fig. 1)
- eval.png: win rates of Target-SFT and the fused model with their CIs (the eval stage, docs/eval.md)
- summary.md: stages, key numbers, the eval table (the paper's Table 2 layout) and the plots
Only committed stages are read; a missing one leaves its plot out and says so in the summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from wrpo.errors import StageNotCommitted, WrpoError  # noqa: E402
from wrpo.pipeline.plan import STAGE_NAMES  # noqa: E402

RESPONSES = (("chosen_source", "y_ws (best source)"), ("chosen_target", "y_wt (best target)"),
             ("rejected", "y_l (worst target)"))


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_reward_dynamics(rows: list[dict[str, Any]], path: Path) -> list[str]:
    """Three panels over optimizer steps; returns the series drawn (for tests and the summary)."""
    panels = (
        ("alpha", ("alpha",)),
        ("reward margin", ("margins/hybrid", "margins/on_policy")),
        ("reward accuracy", ("accuracy/hybrid", "accuracy/on_policy")),
        ("internal reward", ("rewards/chosen_source", "rewards/chosen_target", "rewards/rejected")),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    drawn = []
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=key)
                drawn.append(key)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle("WRPO reward dynamics (cf. paper Fig. 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def plot_logp_shift(rows: list[dict[str, Any]], path: Path) -> list[str]:
    """Histograms of per-token average log-probs, before (reference) and after training."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    drawn = []
    for ax, phase in zip(axes, ("before", "after"), strict=True):
        for key, label in RESPONSES:
            values = [r[phase][key] for r in rows if r.get(phase, {}).get(key) is not None]
            if values:
                ax.hist(values, bins=20, alpha=0.5, label=label)
                drawn.append(f"{phase}/{key}")
        ax.set_title(f"{phase} WRPO")
        ax.set_xlabel("average log-prob per token")
        ax.legend(fontsize=7)
    fig.suptitle("Target log-probs of source and target responses (cf. paper Fig. 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def _jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _try(fn, default=None):
    try:
        return fn()
    except (StageNotCommitted, WrpoError, KeyError):
        return default


def default_out(run_uri: str) -> Path:
    if run_uri.startswith("s3://"):
        return Path("report-" + run_uri.rstrip("/").rsplit("/", 1)[-1])
    return Path(run_uri) / "report"


def write_report(run_uri: str, out: Path | None = None, s3=None) -> list[Path]:
    """Write the plots and summary.md for the run at `run_uri`; returns the files written."""
    from wrpo.data.selection import plot_contributions
    from wrpo.pipeline.rundir import RunDir
    from wrpo.pipeline.spec import StorageSpec
    from wrpo.storage import S3Options

    run = RunDir(run_uri, s3 or S3Options.from_spec(StorageSpec()))
    out = Path(out or default_out(run_uri))
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    notes: list[str] = []
    manifests = {n: _try(lambda n=n: run.stage(n).manifest()) for n in STAGE_NAMES}
    if not any(manifests.values()):
        raise WrpoError(f"{run_uri}: no committed stage found; is this a run directory?")

    metrics = _try(lambda: _jsonl(run.stage("wrpo").read_text("metrics.jsonl")), [])
    if metrics:
        drawn = plot_reward_dynamics(metrics, out / "reward_dynamics.png")
        written.append(out / "reward_dynamics.png")
        notes.append(f"reward dynamics: {len(metrics)} optimizer steps, series {', '.join(drawn)}")
    contrib = _try(lambda: json.loads(run.stage("select-sources").read_text("contributions.json")))
    if contrib and "all" in contrib:  # per-split breakdowns beside the overall shares
        contrib = contrib["all"]
    if contrib:
        (out / "contributions.png").write_bytes(plot_contributions(contrib))
        written.append(out / "contributions.png")
    logps = _try(lambda: _jsonl(run.stage("wrpo").read_text("logps.jsonl")), [])
    if logps:
        plot_logp_shift(logps, out / "logp_shift.png")
        written.append(out / "logp_shift.png")
    results = _try(lambda: json.loads(run.stage("eval").read_text("results.json")))
    if results and results.get("comparisons"):
        from wrpo.eval.table import plot_eval

        plot_eval(results, out / "eval.png")
        written.append(out / "eval.png")
    (out / "summary.md").write_text(_summary(run_uri, manifests, metrics, contrib, logps, written, results))
    written.append(out / "summary.md")
    return written


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def key_numbers(summary: dict[str, Any]) -> str:
    """A stage's manifest summary in one table cell. Scalars as they are; `finish_reasons` as counts (their
    total is the number of answers); an additive scoring summary (`answers`, `score_sum`) as its mean score;
    a stage made of units (`{"units": {unit: summary}}`: sample-sources, score-sources) unit by unit."""
    if "units" in summary:
        return "; ".join(f"**{unit}**: {key_numbers(s)}" for unit, s in summary["units"].items())
    parts = []
    for k, v in summary.items():
        if k == "finish_reasons" and isinstance(v, dict):
            parts.append(f"answers={sum(v.values())}")
            parts.append("finish " + " ".join(f"{reason}={n}" for reason, n in sorted(v.items())))
        elif k == "score_sum":
            if summary.get("answers"):
                parts.append(f"mean_score={_fmt(v / summary['answers'])}")
        elif isinstance(v, int | float | str):
            parts.append(f"{k}={_fmt(v)}")
    return ", ".join(parts)


def _summary(run_uri, manifests, metrics, contrib, logps, images, results=None) -> str:
    lines = [f"# WRPO run report\n\nRun: `{run_uri}`\n", "## Stages\n", "| stage | committed | key numbers |",
             "|---|---|---|"]
    for name, m in manifests.items():
        lines.append(f"| {name} | {m['created'] if m else 'no'} | {key_numbers((m or {}).get('summary', {}))} |")
    if metrics:
        last = metrics[-1]
        lines += ["", "## Training (last optimizer step)", "",
                  "| step | alpha | loss | margin hybrid | margin on-policy | acc hybrid | acc on-policy |",
                  "|---|---|---|---|---|---|---|",
                  "| " + " | ".join(_fmt(last.get(k)) for k in ("step", "alpha", "loss", "margins/hybrid",
                                                               "margins/on_policy", "accuracy/hybrid",
                                                               "accuracy/on_policy")) + " |"]
    if contrib:
        lines += ["", "## Source contributions (share of y_ws, cf. Table 1)", "", "| source | count | share |",
                  "|---|---|---|"]
        for m, share in contrib["shares"].items():
            lines.append(f"| {m} | {contrib['counts'][m]} | {100 * share:.1f}% |")
    if logps:
        lines += ["", "## Average log-prob per token (target policy)", "", "| response | before | after |",
                  "|---|---|---|"]
        for key, label in RESPONSES:
            before = _mean([r["before"][key] for r in logps if "before" in r])
            after = _mean([r["after"][key] for r in logps if "after" in r])
            lines.append(f"| {label} | {_fmt(before)} | {_fmt(after)} |")
    if results is not None:
        from wrpo.eval.table import table_markdown

        lines += ["", "## Evaluation (cf. paper Table 2)", "", table_markdown(results).rstrip()]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images if p.suffix == ".png"]
    return "\n".join(lines) + "\n"
