"""The LLM judge against a real vLLM server (the vLLM env; a tiny model): every verdict is asked with vLLM's
structured outputs (`judge.constrained`), so even a random tiny model must answer in the template's format
and the parser is exercised on real server output - pairwise in both orders, 1-10 grades of a multi-turn
conversation, and the judge reward (`reward.type: judge`)."""

from __future__ import annotations

import asyncio

import pytest

from wrpo.data.judge import Dialogue, Judge, parse_grade, parse_pairwise
from wrpo.data.sampling import ChatClient
from wrpo.data.scoring import JudgeScorer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def judge_server(vllm_python, tiny_models, tmp_path_factory):
    from wrpo.data.serving import VLLMServer

    log = tmp_path_factory.mktemp("vllm-judge") / "judge.log"
    with VLLMServer(str(tiny_models / "target"), "judge", python=vllm_python, max_model_len=2048,
                    startup_timeout_s=420, log_path=log) as server:
        yield server


DIALOGUES = [
    Dialogue([{"role": "user", "content": "What is the capital of France?"}], (), ("Paris.",)),
    Dialogue([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
             ("And another one?",), ("Blue.", "Green.")),
]
OTHER = [Dialogue(d.context, d.followups, tuple("I do not know." for _ in d.answers)) for d in DIALOGUES]


def _judge(server, coro_factory, constrained=True):
    async def go():
        async with ChatClient(server.base_url, "judge", max_retries=2, timeout_s=120) as client:
            return await coro_factory(Judge(client, max_tokens=48, constrained=constrained))
    return asyncio.run(go())


def test_constrained_verdicts_of_a_real_server_always_parse(judge_server):
    async def everything(judge: Judge):
        grades = [judge.grade(d.turn(k)) for d in DIALOGUES for k in range(len(d.answers))]
        pairs = [judge.compare_both(a, b) for a, b in zip(DIALOGUES, OTHER, strict=True)]
        return await asyncio.gather(*grades), await asyncio.gather(*pairs)

    grades, pairs = _judge(judge_server, everything)
    assert len(grades) == 3  # one grade per turn: 1 + 2
    for v in grades:
        assert v.error is None and v.raw.rstrip().endswith("]]")
        assert v.value == parse_grade(v.raw) and 1.0 <= v.value <= 10.0, v.raw
    for outcome, first, second in pairs:
        assert first.value == parse_pairwise(first.raw) in ("A", "B", "C"), first.raw
        assert second.value in ("A", "B", "C"), second.raw
        assert outcome in ("win", "loss", "tie", "inconsistent")


def test_unconstrained_verdicts_of_a_tiny_model_are_counted_not_guessed(judge_server):
    grade = _judge(judge_server, lambda j: j.grade(DIALOGUES[0]), constrained=False)
    assert grade.value == parse_grade(grade.raw)  # whatever it wrote: parsed or None, never a default


def test_the_judge_reward_grades_through_the_server(judge_server):
    scorer = JudgeScorer(ChatClient(judge_server.base_url, "judge", max_retries=2), "judge", max_tokens=48,
                         constrained=True)
    scores = scorer.score([(d.context, d.answers[0]) for d in DIALOGUES])
    assert scorer.unparsed == 0 and all(1.0 <= s.value <= 10.0 for s in scores)
    assert [s.value for s in scores] == [parse_grade(v["raw"]) for v in scorer.verdicts]


def test_expected_grades_from_the_servers_logprobs(judge_server):
    """With `expected_grade` the grade is weighed over the grade token's alternatives: not just the digit."""
    async def both(judge: Judge):
        judge.expected_grade = True
        return await asyncio.gather(*(judge.grade(d.turn(0)) for d in DIALOGUES))

    for v in _judge(judge_server, both):
        assert v.written == parse_grade(v.raw) and 1.0 <= v.value <= 10.0
        assert v.value != v.written  # a tiny model is never that sure of one digit
