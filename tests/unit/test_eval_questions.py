"""Question files in the public benchmarks' layouts (wrpo.eval.questions); errors name the file and line."""

from __future__ import annotations

import json

import pytest

from wrpo.errors import DataError
from wrpo.eval.questions import load_questions, parse_questions


def test_mt_bench_questions_are_multi_turn():
    text = "\n".join(json.dumps(q) for q in [
        {"question_id": 81, "category": "writing", "turns": ["Write a travel blog post.", "Now rewrite it."]},
        {"question_id": 82, "category": "math", "turns": ["What is 2+2?"]},
    ])
    first, second = parse_questions(text, "mt_bench.jsonl")
    assert first.prompt_id == "81" and first.category == "writing" and first.turns == 2
    assert first.messages == [{"role": "user", "content": "Write a travel blog post."}]
    assert first.followups == ["Now rewrite it."]
    assert second.turns == 1 and second.followups == []


def test_arena_hard_and_prompt_records():
    text = "\n".join(json.dumps(q) for q in [
        {"question_id": "ah1", "category": "arena-hard-v0.1", "turns": [{"content": "Explain CRDTs."}]},
        {"uid": "v2-7", "prompt": "Write a haiku.", "category": "creative"},
        {"prompt_id": "p3", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    ])
    ah, v2, rec = parse_questions(text, "q.jsonl")
    assert (ah.prompt_id, ah.messages[0]["content"]) == ("ah1", "Explain CRDTs.")
    assert (v2.prompt_id, v2.category, v2.messages[-1]["content"]) == ("v2-7", "creative", "Write a haiku.")
    assert [m["role"] for m in rec.messages] == ["system", "user"]


def test_alpaca_eval_json_array(tmp_path):
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps([
        {"instruction": "List three fruits.", "output": "...", "generator": "gpt4_turbo", "dataset": "helpful_base"},
        {"instruction": "Translate", "input": "Bonjour", "output": "...", "dataset": "koala"},
    ]))
    qs = load_questions(str(path), max_prompts=5)
    assert [q.prompt_id for q in qs] == ["1", "2"]
    assert qs[1].messages[0]["content"] == "Translate\n\nBonjour" and qs[0].category == "helpful_base"
    assert len(load_questions(str(path), max_prompts=1)) == 1


@pytest.mark.parametrize(("lines", "message"), [
    ([{"question_id": 1, "text": "no question field"}], r"q.jsonl:1: no question"),
    ([{"question_id": 1, "turns": []}], r"q.jsonl:1: field 'turns' expected a non-empty list"),
    ([{"question_id": 1, "turns": ["ok", ""]}], r"q.jsonl:1: field 'turns.1' expected a non-empty string"),
    ([{"question_id": 1, "turns": ["a"]}, {"question_id": 1, "turns": ["b"]}], r"q.jsonl:2: .*repeats"),
    ([{"prompt_id": "x", "prompt": [{"role": "assistant", "content": "hi"}]}], r"q.jsonl:1: field 'prompt'"),
])
def test_bad_questions_name_the_file_and_line(lines, message):
    with pytest.raises(DataError, match=message):
        parse_questions("\n".join(json.dumps(x) for x in lines), "q.jsonl")


def test_broken_json_names_the_line():
    with pytest.raises(DataError, match=r"q.jsonl:2"):
        parse_questions('{"turns": ["a"]}\n{"turns": [\n', "q.jsonl")
    with pytest.raises(DataError, match="q.json: no questions"):
        parse_questions("[]", "q.json")
