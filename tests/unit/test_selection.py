"""Selection of y_ws / y_wt / y_l (Sec. 3.1), rank-k (Table 9), y_ls (App. F) on hand-made scores."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from wrpo.data.selection import (
    Candidate,
    SourceChoice,
    build_pairs,
    choose_source,
    choose_sources,
    choose_target,
    contributions,
    join_candidates,
    plot_contributions,
    source_names,
)
from wrpo.errors import DataError
from wrpo.records import PromptRecord, SampleRecord, ScoreRecord

ORDER = ["a", "b", "c"]


def cands(model: str, *pairs: tuple[str, float]) -> list[Candidate]:
    return [Candidate(model, i, t, s) for i, (t, s) in enumerate(pairs)]


def sel(**kw):
    base = dict(source_rank=1, top_k_sources=1, rejected_source=False, min_reward_gap=0.0, source_groups=None)
    return SimpleNamespace(**(base | kw))


def test_best_over_all_sources_is_y_ws():
    cs = cands("a", ("a0", 0.1), ("a1", 0.5)) + cands("b", ("b0", 0.9), ("b1", -1.0))
    choice = choose_source("p", cs, ORDER)
    assert choice.chosen == Candidate("b", 0, "b0", 0.9)
    assert choice.rejected is None and choice.extra == ()


def test_ties_break_by_source_order_then_index():
    cs = cands("b", ("b0", 0.5)) + cands("a", ("a0", 0.2), ("a1", 0.5))
    assert choose_source("p", cs, ORDER).chosen == Candidate("a", 1, "a1", 0.5)
    assert choose_source("p", cs, ["b", "a"]).chosen == Candidate("b", 0, "b0", 0.5)


def test_rank2_takes_the_best_answer_of_the_second_ranked_source():
    cs = cands("a", ("a0", 0.9), ("a1", 0.8)) + cands("b", ("b0", 0.3)) + cands("c", ("c0", 0.5))
    assert choose_source("p", cs, ORDER, rank=2).chosen.text == "c0"
    assert choose_source("p", cs, ORDER, rank=3).chosen.text == "b0"
    assert choose_source("p", cs, ORDER, rank=4) is None


def test_rejected_source_is_the_worst_answer_of_the_chosen_source():
    cs = cands("a", ("a0", 0.9), ("a1", 0.8), ("a2", 0.1)) + cands("b", ("b0", -5.0))
    choice = choose_source("p", cs, ORDER, with_rejected=True)
    assert choice.chosen.text == "a0" and choice.rejected.text == "a2"
    single = choose_source("p", cands("a", ("x", 1.0), ("x", 0.5)), ORDER, with_rejected=True)
    assert single.rejected is None  # same text as y_ws: no usable y_ls


def test_top_k_adds_distinct_next_best_answers():
    cs = cands("a", ("a0", 0.9), ("a0", 0.85)) + cands("b", ("b0", 0.8), ("b1", 0.7))
    choice = choose_source("p", cs, ORDER, top_k=3)
    assert [c.text for c in choice.extra] == ["b0", "b1"]


def test_target_best_and_worst():
    picked = choose_target(cands("t", ("t0", 0.2), ("t1", 0.7), ("t2", -0.3), ("t3", 0.7)))
    assert picked == (Candidate("t", 1, "t1", 0.7), Candidate("t", 2, "t2", -0.3))


@pytest.mark.parametrize(("answers", "reason"), [
    ([("x", 0.5), ("y", 0.5), ("z", 0.5)], "all_equal_score"),
    ([("same", 0.1), ("same", 0.9)], "all_equal_text"),
    ([("only", 0.1)], "no_target_answers"),
    ([], "no_target_answers"),
])
def test_degenerate_target_answers_are_dropped(answers, reason):
    assert choose_target(cands("t", *answers)) == reason


def test_min_reward_gap():
    cs = cands("t", ("x", 0.50), ("y", 0.45))
    assert choose_target(cs, min_gap=0.1) == "below_min_gap"
    assert isinstance(choose_target(cs, min_gap=0.04), tuple)


def test_build_pairs_counts_drops_and_fills_the_quadruple():
    prompts = [PromptRecord(prompt_id=f"p{i}", prompt=[{"role": "user", "content": f"q{i}"}])
               for i in range(4)]
    source = {pid: SourceChoice(pid, Candidate("b", 0, f"ws-{pid}", 1.0), Candidate("b", 1, "ls", -1.0))
              for pid in ("p0", "p1", "p2")}
    target = {
        "p0": cands("t", ("good", 0.8), ("bad", 0.1)),
        "p1": cands("t", ("same", 0.3), ("same", 0.3)),
        "p3": cands("t", ("good", 0.8), ("bad", 0.1)),
    }
    records, stats = build_pairs(prompts, source, target)
    assert [r.prompt_id for r in records] == ["p0"]
    r = records[0]
    assert (r.chosen_source, r.chosen_target, r.rejected, r.rejected_source) == ("ws-p0", "good", "bad", "ls")
    scores = (r.score_chosen_source, r.score_chosen_target, r.score_rejected)
    assert r.source_model == "b" and scores == (1.0, 0.8, 0.1)
    assert stats.to_json() == {"prompts": 4, "pairs": 1, "dropped_total": 3, "dropped": {
        "all_equal_text": 1, "no_source_choice": 1, "no_target_answers": 1}}


def test_choose_sources_drops_prompts_without_y_ls_when_asked():
    c = {"p": cands("a", ("a0", 1.0)), "q": cands("a", ("a0", 1.0), ("a1", 0.0))}
    choices, dropped = choose_sources(["p", "q", "r"], c, ORDER, sel(rejected_source=True))
    assert [x.prompt_id for x in choices] == ["q"]
    assert dropped == {"no_rejected_source": 1, "too_few_source_answers": 1}


def test_source_groups_select_by_name_or_group():
    sources = [SimpleNamespace(name="a", group="g1"), SimpleNamespace(name="b", group="g2"),
               SimpleNamespace(name="c", group=None)]
    assert source_names(sources, None) == ["a", "b", "c"]
    assert source_names(sources, ["g2", "c"]) == ["b", "c"]
    with pytest.raises(DataError, match="matches no source"):
        source_names(sources, ["nope"])


def test_join_candidates_skips_empty_answers_and_checks_lengths():
    s = SampleRecord(prompt_id="p", model="a", responses=["x", "  ", "y"])
    got = join_candidates(s, ScoreRecord(prompt_id="p", model="a", scores=[1.0, 2.0, 3.0]))
    assert [(c.index, c.text) for c in got] == [(0, "x"), (2, "y")]
    with pytest.raises(DataError, match="3 responses but 2 scores"):
        join_candidates(s, ScoreRecord(prompt_id="p", model="a", scores=[1.0, 2.0]))


def test_contributions_and_chart():
    choices = [SourceChoice(str(i), Candidate(m, 0, "x", 1.0)) for i, m in enumerate("aab")]
    report = contributions(choices, ORDER)
    assert report["counts"] == {"a": 2, "b": 1, "c": 0}
    assert report["shares"]["a"] == pytest.approx(2 / 3)
    png = plot_contributions(report)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_source_choice_json_round_trip():
    c = SourceChoice("p", Candidate("a", 2, "w", 0.5), Candidate("a", -1, "l", 0.1),
                     (Candidate("b", -1, "e", 0.4),))
    back = SourceChoice.from_json(c.to_json())
    assert back.chosen == c.chosen and back.rejected == c.rejected and back.extra == c.extra
