"""The eval table in the layout of the paper's Table 2 (rows target / Target-SFT / fused; columns: reward-model
win rate against the target with its 95% CI, LC win rate, LLM-judge win rate, MT-style score, mean answer
length), as Markdown for the report and the model card, and as a plot (docs/eval.md, "Results")."""

from __future__ import annotations

from typing import Any

from wrpo.pipeline.card import public_name

ROLE_LABELS = {"target": "target", "sft": "Target-SFT", "fused": "fused (WRPO)"}


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _with_ci(c: dict[str, Any] | None) -> str:
    if not c or c.get("win_rate") is None:
        return "–"
    lo, hi = c["ci"]
    return f"{_pct(c['win_rate'])} [{_pct(lo)}, {_pct(hi)}]"


def _judge(c: dict[str, Any] | None) -> str:
    if not c:
        return "–"
    text = _pct(c.get("win_rate"))
    notes = [f"{c[k]} {k}" for k in ("unparsed", "inconsistent") if c.get(k)]
    return f"{text} ({', '.join(notes)})" if notes else text


def _score(s: dict[str, Any] | None) -> str:
    if not s or s.get("mean") is None:
        return "–" if not s or not s.get("unparsed") else f"– ({s['unparsed']} unparsed)"
    text = f"{s['mean']:.2f}"
    return f"{text} ({s['unparsed']} unparsed)" if s.get("unparsed") else text


def table_markdown(results: dict[str, Any]) -> str:
    """The Markdown table (and a line for fused vs Target-SFT) of an eval stage's results.json."""
    if not results.get("prompts"):
        return f"No evaluation prompts: {results.get('note', 'set dataset.evalSize or eval.prompts')}."
    comps = results.get("comparisons", {})
    rm, judge = public_name(results.get("reward_model")) or "–", public_name(results.get("judge")) or "–"
    lines = [f"{results['prompts']} prompts ({results.get('source', 'eval split')}); win rates in % against the "
             f"original target, 95% bootstrap CI in brackets; reward model `{rm}`, LLM judge `{judge}`.", "",
             "| model | RM win rate [95% CI] | LC win rate | judge win rate | MT-style score | mean length |",
             "|---|---|---|---|---|---|"]
    for role, label in ROLE_LABELS.items():
        m = results["models"].get(role, {})
        c = comps.get(f"{role}_vs_target", {})
        baseline = role == "target"
        rm = "50.0 (baseline)" if baseline and results.get("reward_model") else _with_ci(c.get("rm"))
        lc = "50.0" if baseline and results.get("reward_model") else _pct((c.get("rm") or {}).get("lc_win_rate"))
        judge = "50.0 (baseline)" if baseline and results.get("judge") and results.get("pairwise") \
            else _judge(c.get("judge"))
        length = m.get("mean_length")
        lines.append(f"| {label} | {rm} | {lc} | {judge} | {_score(m.get('judge_score'))} | "
                     f"{'–' if length is None else f'{length:.0f}'} |")
    fs = comps.get("fused_vs_sft", {})
    parts = []
    if fs.get("rm"):
        parts.append(f"RM win rate {_with_ci(fs['rm'])}, LC {_pct(fs['rm'].get('lc_win_rate'))}")
    if fs.get("judge"):
        parts.append(f"judge win rate {_judge(fs['judge'])}")
    if parts:
        lines += ["", f"Fused vs Target-SFT: {'; '.join(parts)}."]
    return "\n".join(lines) + "\n"


def plot_eval(results: dict[str, Any], path: Any) -> list[str]:
    """Bars of the win rates (RM with CI error bars, LC, judge) per comparison; returns the bars drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = results.get("comparisons", {})
    names = [n for n in ("sft_vs_target", "fused_vs_target", "fused_vs_sft") if n in comps]
    kinds = (("RM", "rm", "win_rate"), ("RM, length-controlled", "rm", "lc_win_rate"),
             ("LLM judge", "judge", "win_rate"))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    drawn = []
    width = 0.8 / len(kinds)
    for k, (label, judge, key) in enumerate(kinds):
        xs, ys, errs = [], [], [[], []]
        for i, name in enumerate(names):
            c = comps[name].get(judge) or {}
            if c.get(key) is None:
                continue
            xs.append(i + (k - 1) * width)
            ys.append(100 * c[key])
            lo, hi = c["ci"] if key == "win_rate" and c.get("ci") else (c[key], c[key])
            errs[0].append(100 * (c[key] - lo))
            errs[1].append(100 * (hi - c[key]))
            drawn.append(f"{name}/{label}")
        if xs:
            ax.bar(xs, ys, width, yerr=errs, capsize=3, label=label)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), [n.replace("_vs_", " vs ").replace("sft", "SFT") for n in names])
    ax.set_ylabel("win rate (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.set_title(f"Did the fusion help? ({results.get('prompts', 0)} prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn
