"""Choosing y_ws, y_wt, y_l (and y_ls, extra source answers) from scored samples: pure functions.

Sec. 3.1 of the paper: y_ws is the highest-reward answer over all sources' N answers; y_wt / y_l are the
best / worst of the target's N answers. Table 9's "Rank2" uses the answer of the second-ranked source
(sources ranked per prompt by their best answer); App. F's y_ls is the worst answer of the source that
gave y_ws. Ties are broken deterministically: by score, then by the sources' order in the spec, then by
the answer's index. Empty answers are never chosen.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wrpo.errors import DataError
from wrpo.records import PreferenceRecord, PromptRecord, SampleRecord, ScoreRecord


@dataclass(frozen=True)
class Candidate:
    """One scored answer: the model that wrote it, its index among that model's N answers, text, score."""

    model: str
    index: int
    text: str
    score: float


@dataclass(frozen=True)
class SourceChoice:
    """The source side of one prompt: y_ws, optionally y_ls and further good source answers."""

    prompt_id: str
    chosen: Candidate
    rejected: Candidate | None = None
    extra: tuple[Candidate, ...] = ()

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SourceChoice:
        """Inverse of `to_json` (chosen_source.jsonl)."""
        chosen = Candidate(obj["source_model"], obj.get("index", 0), obj["response"], obj["score"])
        rejected = None
        if obj.get("rejected_source") is not None:
            rejected = Candidate(obj["source_model"], -1, obj["rejected_source"],
                                 obj["score_rejected_source"])
        extra = tuple(Candidate(e["source_model"], -1, e["response"], e["score"])
                      for e in obj.get("extra", []))
        return cls(obj["prompt_id"], chosen, rejected, extra)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_id": self.prompt_id, "source_model": self.chosen.model,
                               "response": self.chosen.text, "score": self.chosen.score,
                               "index": self.chosen.index}
        if self.rejected is not None:
            out |= {"rejected_source": self.rejected.text, "score_rejected_source": self.rejected.score}
        if self.extra:
            out["extra"] = [{"source_model": c.model, "response": c.text, "score": c.score}
                            for c in self.extra]
        return out


@dataclass
class PairStats:
    """Counts of what build-pairs kept and dropped (written to stats.json)."""

    prompts: int = 0
    pairs: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "pairs": self.pairs, "dropped": dict(sorted(self.dropped.items())),
                "dropped_total": sum(self.dropped.values())}


def join_candidates(sample: SampleRecord, score: ScoreRecord, source: str = "<scores>") -> list[Candidate]:
    """Align a sample record with its scores; empty answers are left out."""
    if len(sample.responses) != len(score.scores):
        raise DataError(source, f"prompt '{sample.prompt_id}' of model '{sample.model}' has "
                        f"{len(sample.responses)} responses but {len(score.scores)} scores", field="scores")
    return [Candidate(sample.model, i, text, s)
            for i, (text, s) in enumerate(zip(sample.responses, score.scores, strict=True)) if text.strip()]


def ranked(cands: Iterable[Candidate], model_order: Sequence[str]) -> list[Candidate]:
    """Best first: higher score, then earlier model in `model_order`, then lower answer index."""
    order = {m: i for i, m in enumerate(model_order)}
    return sorted(cands, key=lambda c: (-c.score, order.get(c.model, len(order)), c.model, c.index))


def choose_source(prompt_id: str, cands: Sequence[Candidate], model_order: Sequence[str], rank: int = 1,
                  top_k: int = 1, with_rejected: bool = False) -> SourceChoice | None:
    """y_ws from the `rank`-th best source (sources ranked by their best answer); None if too few sources.

    With `with_rejected`, y_ls is that source's worst answer (None if it has only one distinct answer).
    `top_k` > 1 adds the next best answers over all sources (distinct texts) as extra chosen answers."""
    best = ranked(cands, model_order)
    sources = list(dict.fromkeys(c.model for c in best))  # ranked by each source's best answer
    if len(sources) < rank:
        return None
    model = sources[rank - 1]
    own = [c for c in best if c.model == model]
    chosen = own[0]
    rejected = own[-1] if with_rejected and own[-1].text != chosen.text else None
    extra: list[Candidate] = []
    seen = {chosen.text}
    for c in best:
        if len(extra) >= top_k - 1:
            break
        if c.text not in seen:
            extra.append(c)
            seen.add(c.text)
    return SourceChoice(prompt_id, chosen, rejected, tuple(extra))


def choose_target(cands: Sequence[Candidate], min_gap: float = 0.0) -> tuple[Candidate, Candidate] | str:
    """(y_wt, y_l) = best and worst target answers, or the reason the prompt is dropped.

    Reasons: `no_target_answers`, `all_equal_score`, `all_equal_text`, `below_min_gap`."""
    if len(cands) < 2:
        return "no_target_answers"
    if len({c.text for c in cands}) == 1:
        return "all_equal_text"
    if len({c.score for c in cands}) == 1:
        return "all_equal_score"
    best = ranked(cands, [])
    chosen, rejected = best[0], best[-1]
    if chosen.text == rejected.text:
        return "all_equal_text"
    if chosen.score - rejected.score < min_gap:
        return "below_min_gap"
    return chosen, rejected


def source_names(sources: Sequence[Any], groups: Sequence[str] | None) -> list[str]:
    """Sources (in spec order) whose name or group is in `groups`; all of them when `groups` is None."""
    if groups is None:
        return [s.name for s in sources]
    wanted = set(groups)
    names = [s.name for s in sources if s.name in wanted or (s.group is not None and s.group in wanted)]
    if not names:
        raise DataError("spec", f"selection.sourceGroups {sorted(wanted)} matches no source",
                        field="selection.sourceGroups")
    return names


def choose_sources(prompt_ids: Iterable[str], cands: Mapping[str, list[Candidate]],
                   model_order: Sequence[str], selection: Any) -> tuple[list[SourceChoice], Counter[str]]:
    """SourceChoice per prompt (in order) under a SelectionSpec; counts prompts without one."""
    choices, dropped = [], Counter[str]()
    for pid in prompt_ids:
        choice = choose_one(pid, cands.get(pid, []), model_order, selection, dropped)
        if choice is not None:
            choices.append(choice)
    return choices, dropped


def choose_one(prompt_id: str, cands: Sequence[Candidate], model_order: Sequence[str], selection: Any,
               dropped: Counter[str]) -> SourceChoice | None:
    """`choose_sources` for one prompt (the streamed select-sources): its SourceChoice, or None with
    the reason counted in `dropped`."""
    choice = choose_source(prompt_id, cands, model_order, selection.source_rank, selection.top_k_sources,
                           selection.rejected_source)
    if choice is None:
        dropped["too_few_source_answers"] += 1
    elif selection.rejected_source and choice.rejected is None:
        dropped["no_rejected_source"] += 1
    else:
        return choice
    return None


def contributions(choices: Iterable[SourceChoice], model_order: Sequence[str]) -> dict[str, Any]:
    """Share of y_ws per source model (paper Table 1): counts and fractions, every source listed."""
    return contribution_counts(Counter(c.chosen.model for c in choices), model_order)


def contribution_counts(counts: Mapping[str, int], model_order: Sequence[str]) -> dict[str, Any]:
    """`contributions` from the number of y_ws per source model (counted while streaming)."""
    total = sum(counts.values())
    return {
        "total": total,
        "counts": {m: counts.get(m, 0) for m in model_order},
        "shares": {m: (counts.get(m, 0) / total if total else 0.0) for m in model_order},
    }


def build_pairs(prompts: Sequence[PromptRecord], source: Mapping[str, SourceChoice],
                target: Mapping[str, list[Candidate]], min_gap: float = 0.0,
                stats: PairStats | None = None) -> tuple[list[PreferenceRecord], PairStats]:
    """WRPO quadruples (x, y_ws, y_wt, y_l) for the prompts that have both sides; drop counts in stats."""
    stats = stats or PairStats()
    records = []
    for p in prompts:
        rec = pair_for(p, source.get(p.prompt_id), target.get(p.prompt_id, []), min_gap, stats)
        if rec is not None:
            records.append(rec)
    return records, stats


def pair_for(prompt: PromptRecord, choice: SourceChoice | None, target: Sequence[Candidate], min_gap: float,
             stats: PairStats) -> PreferenceRecord | None:
    """`build_pairs` for one prompt (the streamed build-pairs): its quadruple, or None with the reason
    counted in `stats`."""
    stats.prompts += 1
    if choice is None:
        stats.dropped["no_source_choice"] += 1
        return None
    picked = choose_target(target, min_gap)
    if isinstance(picked, str):
        stats.dropped[picked] += 1
        return None
    stats.pairs += 1
    return quadruple(prompt, choice, *picked)


def quadruple(prompt: PromptRecord, choice: SourceChoice, chosen: Candidate,
              rejected: Candidate) -> PreferenceRecord:
    """One PreferenceRecord from its parts."""
    return PreferenceRecord(
        prompt_id=prompt.prompt_id, prompt=prompt.prompt,
        chosen_source=choice.chosen.text, chosen_target=chosen.text, rejected=rejected.text,
        source_model=choice.chosen.model, score_chosen_source=choice.chosen.score,
        score_chosen_target=chosen.score, score_rejected=rejected.score,
        rejected_source=choice.rejected.text if choice.rejected else None,
        extra_chosen_source=[c.text for c in choice.extra],
    )


def plot_contributions(contrib: dict[str, Any], title: str = "Share of y_ws per source") -> bytes:
    """A PNG bar chart of `contributions(...)` (matplotlib, Agg backend)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(contrib["shares"])
    shares = [100 * contrib["shares"][n] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 3.5))
    bars = ax.bar(names, shares, color="#4C72B0")
    ax.bar_label(bars, labels=[f"{s:.1f}%" for s in shares], fontsize=8)
    ax.set_ylabel("% of prompts")
    ax.set_title(f"{title} (n={contrib['total']})")
    ax.set_ylim(0, max(shares + [1.0]) * 1.15)
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
