"""The LLM judge (wrpo.data.judge) and the judge reward (JudgeScorer): strict parsing, both orders, and a
STAND-IN server (tests/openai_standin.py) that returns malformed, empty and inconsistent verdicts. The
judge against a real vLLM server is in tests/integration/test_eval_judge.py."""

from __future__ import annotations

import asyncio
import re

import pytest
from openai_standin import StandIn

from wrpo.data.judge import Dialogue, Judge, combine, load_template, parse_grade, parse_pairwise, single_values
from wrpo.data.sampling import ChatClient
from wrpo.data.scoring import UNPARSED_GRADE, JudgeScorer
from wrpo.eval.questions import EvalPrompt
from wrpo.eval.stages import results_of, status_summary


@pytest.mark.parametrize(("text", "verdict"), [
    ("A is more accurate. [[A]]", "A"), ("[[B]]", "B"), ("Both fine. [[C]]", "C"),
    ("I said [[A]] before and [[A]] again", "A"), ("[[ B ]]", "B"),
    ("[[A]] ... on reflection [[B]]", None), ("A is better", None), ("", None), (None, None), ("[[D]]", None),
])
def test_pairwise_verdicts_parse_strictly(text, verdict):
    assert parse_pairwise(text) == verdict


@pytest.mark.parametrize(("text", "grade"), [
    ("Good answer. Rating: [[7]]", 7.0), ("[[10]]", 10.0), ("[[ 8.5 ]]", 8.5), ("[[1]]", 1.0),
    ("Rating: [[11]]", None), ("[[0]]", None), ("[[3]] then [[4]]", None), ("Rating: 7", None), ("", None),
])
def test_grades_parse_strictly(text, grade):
    assert parse_grade(text) == grade


def test_both_orders_combine_and_disagreement_is_inconsistent():
    assert combine("A", "B") == "win" and combine("B", "A") == "loss" and combine("C", "C") == "tie"
    assert combine("A", "A") == combine("B", "B") == combine("A", "C") == "inconsistent"  # position bias
    assert combine(None, "B") == combine("A", None) == "unparsed"


def test_templates_render_multi_turn_conversations():
    d = Dialogue([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}], ["Q2"],
                 ["A1", "A2"])
    values = single_values(d)
    assert values["answer"] == "A2"
    assert values["conversation"].index("Q1") < values["conversation"].index("A1") < values["conversation"].index("Q2")
    assert single_values(d.turn(0)) == {"conversation": "[System]\nBe brief.\n\n[User]\nQ1", "answer": "A1"}
    messages = load_template("pairwise").messages(conversation="C", answer_a="X", answer_b="Y")
    assert [m["role"] for m in messages] == ["system", "user"] and "[[A]]" in messages[0]["content"]


@pytest.fixture
def standin():
    server = StandIn().start()
    yield server
    server.stop()


def _shown(body: dict, which: str) -> str:
    text = body["messages"][-1]["content"]
    return text.split(f"[Assistant {which}]\n", 1)[1].split("\n[End", 1)[0]


def _run(server: StandIn, coro_factory):
    async def go():
        async with ChatClient(server.base_url, "judge", max_retries=0) as client:
            return await coro_factory(Judge(client, max_tokens=64))
    return asyncio.run(go())


def test_a_fair_judge_a_position_biased_one_and_broken_ones(standin):
    good = Dialogue([{"role": "user", "content": "Q"}], (), ("a good answer",))
    bad = Dialogue([{"role": "user", "content": "Q"}], (), ("meh",))
    # fair: prefers the answer that says "good", wherever it is shown
    standin.reply = lambda b: "[[A]]" if "good" in _shown(b, "A") else "[[B]]"
    assert _run(standin, lambda j: j.compare_both(good, bad))[0] == "win"
    assert _run(standin, lambda j: j.compare_both(bad, good))[0] == "loss"
    # position-biased: always the first answer -> the orders disagree -> inconsistent (a tie)
    standin.reply = lambda b: "Assistant A is better. [[A]]"
    outcome, first, second = _run(standin, lambda j: j.compare_both(good, bad))
    assert outcome == "inconsistent" and first.value == second.value == "A"
    # malformed, empty, contradictory: unparsed, never guessed; the raw text is kept
    for reply in ("A is clearly better", "", "[[A]] no wait [[B]]"):
        standin.reply = lambda b, reply=reply: reply
        outcome, first, _ = _run(standin, lambda j: j.compare_both(good, bad))
        assert outcome == "unparsed" and first.value is None and first.raw == reply


def test_grades_and_the_constrained_request(standin):
    d = Dialogue([{"role": "user", "content": "Q"}], (), ("an answer",))
    standin.reply = lambda b: "Decent. Rating: [[6]]"
    v = _run(standin, lambda j: j.grade(d))
    assert v.value == 6.0 and v.raw == "Decent. Rating: [[6]]"
    assert "structured_outputs" not in standin.bodies[-1]

    async def constrained(judge: Judge):
        judge.constrained = True
        return await judge.grade(d)

    _run(standin, constrained)
    regex = standin.bodies[-1]["structured_outputs"]["regex"]
    assert re.fullmatch(regex, "Fine answer. Rating: [[10]]") and not re.fullmatch(regex, "Rating: [[11]]")
    # an empty answer is not sent: it is an unparsed grade with a reason
    calls = len(standin.bodies)
    empty = _run(standin, lambda j: j.grade(Dialogue([{"role": "user", "content": "Q"}], (), ("  ",))))
    assert empty.value is None and "empty answer" in empty.error and len(standin.bodies) == calls


def test_a_failed_request_is_an_unparsed_verdict(standin):
    standin.fail_statuses = [400]
    v = _run(standin, lambda j: j.grade(Dialogue([{"role": "user", "content": "Q"}], (), ("x",))))
    assert v.value is None and "HTTP 400" in v.error


def test_judge_reward_scores_grades_and_ranks_unparsed_last(standin):
    replies = {"best": "Rating: [[9]]", "ok": "Rating: [[4]]", "garbled": "no idea"}
    standin.reply = lambda b: replies[single_answer(b)]
    scorer = JudgeScorer(ChatClient(standin.base_url, "judge", max_retries=0), "judge")
    pairs = [([{"role": "user", "content": "Q"}], a) for a in ("best", "ok", "garbled")]
    assert [s.value for s in scorer.score(pairs)] == [9.0, 4.0, UNPARSED_GRADE]
    assert scorer.unparsed == 1 and [v["raw"] for v in scorer.verdicts] == list(replies.values())


def single_answer(body: dict) -> str:
    return body["messages"][-1]["content"].split("[Answer to grade]\n", 1)[1].split("\n[End", 1)[0]


def test_results_count_judge_outcomes_and_grades():
    prompts = [EvalPrompt(f"p{i}", [{"role": "user", "content": "Q"}]) for i in range(4)]
    answers = {r: [{"prompt_id": p.prompt_id, "answers": ["x" * (i + 1)], "finish_reasons": ["stop"]}
                   for i, p in enumerate(prompts)] for r in ("target", "sft", "fused")}
    outcomes = ["win", "win", "inconsistent", "unparsed"]
    verdicts = [{"kind": "pairwise", "prompt_id": p.prompt_id, "model": m, "baseline": b, "outcome": o}
                for m, b in (("sft", "target"), ("fused", "target"), ("fused", "sft"))
                for p, o in zip(prompts, outcomes, strict=True)]
    verdicts += [{"kind": "single", "prompt_id": p.prompt_id, "model": "fused", "turn": 1, "value": v}
                 for p, v in zip(prompts, (8.0, 6.0, None, 7.0), strict=True)]
    res = results_of(prompts, answers, None, verdicts, samples=200, seed=0)
    judge = res["comparisons"]["fused_vs_target"]["judge"]
    assert judge["n"] == 3 and judge["unparsed"] == 1 and judge["inconsistent"] == 1
    assert judge["win_rate"] == pytest.approx(2.5 / 3)  # win, win, inconsistent = tie
    assert res["models"]["fused"]["judge_score"] == {"mean": 7.0, "n": 3, "unparsed": 1}
    assert "rm" not in res["comparisons"]["fused_vs_target"]


def test_without_a_reward_model_the_fused_vs_target_figure_is_the_judges():
    """eval.rewardModel: false: the summary's fused_vs_target (the FUSED-VS-TARGET column, read by the
    operator from the eval pod's termination message) is the judge's win rate, and says so."""
    import json

    from wrpo_operator.status import eval_summary

    judge = {"win_rate": 0.625}
    summary = status_summary({"prompts": 8, "comparisons": {"fused_vs_target": {"judge": judge}}})
    assert summary == {"prompts": 8, "judge_fused_vs_target": 62.5, "fused_vs_target": 62.5,
                       "fused_vs_target_by": "judge"}
    both = status_summary({"prompts": 8, "comparisons": {"fused_vs_target": {"judge": judge,
                                                                             "rm": {"win_rate": 0.5}}}})
    assert both["fused_vs_target"] == 50.0 and both["fused_vs_target_by"] == "reward model"
    pod = {"status": {"containerStatuses": [{"state": {"terminated": {
        "exitCode": 0, "message": json.dumps({"stage": "eval", "summary": summary})}}}]}}
    assert eval_summary([pod], "h")["fusedVsTarget"] == 62.5


def test_the_eval_stage_judges_in_shards_and_a_rerun_asks_nothing_again(standin, tmp_path):
    """`llm_judge` of the eval stage with an endpoint judge (the stand-in): single grades of every turn and
    both orders of every comparison, committed shard by shard; a rerun reuses the committed shards."""
    from wrpo.eval.stages import COMPARISONS, llm_judge
    from wrpo.pipeline.rundir import RunDir
    from wrpo.pipeline.runtime import context_for
    from wrpo.pipeline.spec import parse_spec

    spec = parse_spec({"target": {"model": "t"}, "sources": [{"name": "a", "model": "m"}],
                       "dataset": {"uri": "p.jsonl", "evalSize": 3},
                       "eval": {"shardSize": 2, "judge": {"endpoint": {"url": standin.base_url, "model": "j"}}}})
    prompts = [EvalPrompt("p0", [{"role": "user", "content": "Q0"}], ["follow-up"]),
               EvalPrompt("p1", [{"role": "user", "content": "Q1"}]),
               EvalPrompt("p2", [{"role": "user", "content": "Q2"}])]
    answers = {role: [{"prompt_id": p.prompt_id, "answers": [f"{role} answer"] * p.turns} for p in prompts]
               for role in ("target", "sft", "fused")}

    def reply(body):
        text = body["messages"][-1]["content"]
        if "[Assistant A]" not in text:
            return "Rating: [[8]]" if "fused answer" in text.split("[Answer to grade]")[1] else "Rating: [[3]]"
        return "[[A]]" if "fused" in _shown(body, "A") else "[[B]]" if "fused" in _shown(body, "B") else "[[C]]"

    standin.reply = reply
    ctx = context_for(spec, RunDir(str(tmp_path / "run")), "eval")
    verdicts, _ = llm_judge(ctx, prompts, answers)
    asked = len(standin.bodies)
    assert asked == 3 * 4 + 2 * len(COMPARISONS) * 3  # 4 turns per model, both orders of 3 comparisons
    grades = {(v["model"], v["prompt_id"], v["turn"]): v["value"] for v in verdicts if v["kind"] == "single"}
    assert grades[("fused", "p0", 2)] == 8.0 and grades[("target", "p0", 2)] == 3.0 and len(grades) == 12
    outcomes = {(v["model"], v["baseline"], v["prompt_id"]): v["outcome"] for v in verdicts if v["kind"] == "pairwise"}
    assert {outcomes[("fused", "target", p.prompt_id)] for p in prompts} == {"win"}
    assert {outcomes[("sft", "target", p.prompt_id)] for p in prompts} == {"tie"}
    assert all(len(v["verdicts"]) == 2 and v["verdicts"][0]["raw"] for v in verdicts if v["kind"] == "pairwise")
    again, _ = llm_judge(ctx, prompts, answers)
    assert again == verdicts and len(standin.bodies) == asked  # every shard was committed: nothing re-asked
    answers["fused"][1]["answers"] = ["a changed answer"]  # new answers: the verdicts are made again
    llm_judge(ctx, prompts, answers)
    assert len(standin.bodies) > asked


def test_expected_grade_weighs_the_grade_tokens_alternatives():
    import math

    from wrpo.data.judge import expected_grade

    def tok(text, alts=None):
        top = [{"token": t, "logprob": math.log(p) if p else -9999.0} for t, p in (alts or {}).items()]
        return {"token": text, "logprob": 0.0, "top_logprobs": top}

    content = [tok("Fine"), tok(" [3]"), tok(". Rating:"), tok(" [["),
               tok("7", {"7": 0.5, "8": 0.3, "x": 0.15, "11": 0.04, "2": 0.0}), tok("]]")]
    # only the token after "[[" counts; alternatives that are not grades 1-10 (or masked) are left out:
    # (7 × .5 + 8 × .3) / (.5 + .3) = 7.375
    assert expected_grade(content) == pytest.approx(7.375)
    assert expected_grade([tok("Rating: [["), tok("x")]) is None and expected_grade(None) is None
