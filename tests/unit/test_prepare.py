"""Prompt preparation: formats, normalisation, drops, bad input, and the hash-based split."""

from __future__ import annotations

import json

import pytest

from wrpo.data.prepare import PrepareReport, check_splits, detect_format, load_rows, normalise, split_prompts
from wrpo.errors import DataError
from wrpo.records import PromptRecord


def rows(*objs):
    return list(enumerate(objs, start=1))


def test_strings_and_messages_are_normalised():
    prompts, report = normalise(rows(
        {"prompt_id": "a", "prompt": "Hi"},
        {"prompt_id": "b", "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "Q"}]},
    ), "d.jsonl")
    assert prompts[0].prompt[0].model_dump() == {"role": "user", "content": "Hi"}
    assert [m.role for m in prompts[1].prompt] == ["system", "user"]
    assert report.kept == 2


def test_empty_and_duplicate_prompts_are_dropped_and_counted():
    prompts, report = normalise(rows(
        {"prompt_id": "a", "prompt": "Hi"},
        {"prompt_id": "b", "prompt": "  "},
        {"prompt_id": "c", "prompt": []},
        {"prompt_id": "d", "prompt": "Hi"},  # same text, other id
        {"prompt_id": "a", "prompt": "Hi"},  # exact repeat
        {"prompt_id": "e", "prompt": [{"role": "user", "content": ""}]},
    ), "d.jsonl")
    assert [p.prompt_id for p in prompts] == ["a"]
    assert (report.dropped_empty, report.dropped_duplicates, report.rows) == (3, 2, 6)


def test_duplicate_id_with_another_prompt_is_an_error():
    with pytest.raises(DataError, match=r"d.jsonl:3: field 'prompt_id' duplicate prompt_id 'a'.*row 1"):
        normalise(rows({"prompt_id": "a", "prompt": "x"}, {"prompt_id": "b", "prompt": "y"},
                       {"prompt_id": "a", "prompt": "z"}), "d.jsonl")


def test_last_message_not_from_user_is_an_error():
    bad = {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'prompt' the last message must come from the us"):
        normalise(rows(bad), "d.jsonl")


def test_bad_roles_and_types_name_the_field():
    with pytest.raises(DataError, match=r"field 'prompt\[0\].role' Input should be .*, got \"robot\""):
        normalise(rows({"prompt": [{"role": "robot", "content": "q"}]}), "d.jsonl")
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'question' is missing \(dataset.promptField"):
        normalise(rows({"prompt": "q"}), "d.jsonl", prompt_field="question")
    with pytest.raises(DataError, match="expected a string or a list of messages, got a number"):
        normalise(rows({"prompt": 3}), "d.jsonl")


def test_missing_ids_are_content_hashes():
    prompts, _ = normalise(rows({"prompt": "Hi"}, {"text": "x", "prompt": "Ho"}), "d", id_field=None)
    again, _ = normalise(rows({"prompt": "Ho"}), "d", id_field=None)
    assert again[0].prompt_id == prompts[1].prompt_id and len(prompts[0].prompt_id) == 16


def test_max_prompts_keeps_the_first():
    prompts, report = normalise(rows(*({"prompt": f"q{i}"} for i in range(5))), "d", max_prompts=3)
    assert len(prompts) == 3 and report.dropped_over_max == 2


def make(n, start=0):
    return [PromptRecord(prompt_id=f"id{i}", prompt=[{"role": "user", "content": f"q{i}"}])
            for i in range(start, start + n)]


def test_split_fractions_and_determinism():
    prompts = make(3000)
    split = split_prompts(prompts, 1 / 3, eval_size=50, seed=7)
    assert len(split.eval) == 50
    assert abs(len(split.sft) / 3000 - 1 / 3) < 0.03
    assert len(split.sft) + len(split.po) + len(split.eval) == 3000
    assert split == split_prompts(prompts, 1 / 3, eval_size=50, seed=7)
    assert split.sft != split_prompts(prompts, 1 / 3, eval_size=50, seed=8).sft


def test_adding_prompts_never_moves_existing_ones_between_sft_and_po():
    before = split_prompts(make(500), 1 / 3, eval_size=0, seed=1)
    after = split_prompts(make(800), 1 / 3, eval_size=0, seed=1)
    after_sft = {p.prompt_id for p in after.sft}
    assert {p.prompt_id for p in before.sft} <= after_sft
    assert not ({p.prompt_id for p in before.po} & after_sft)


def test_jsonl_loading_names_the_bad_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: malformed JSON"):
        list(load_rows(str(f)))
    f.write_text('{"prompt": "a"}\n[1]\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: expected a JSON object"):
        list(load_rows(str(f)))


def test_parquet_and_datasets_folder(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "b", "prompt": "y"}]
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "d.parquet")
    assert [r for _, r in load_rows(str(tmp_path / "d.parquet"))] == data
    msgs = [{"prompt_id": "m", "prompt": [{"role": "user", "content": "hello"}]}]
    datasets.Dataset.from_list(msgs).save_to_disk(str(tmp_path / "ds"))
    got = list(load_rows(str(tmp_path / "ds")))
    assert got == [(1, msgs[0])]
    assert detect_format(str(tmp_path / "ds")) == "hf-disk"
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        detect_format(str(tmp_path / "nope.txt"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    assert [r for _, r in load_rows(str(tmp_path / "d.jsonl"))] == data


def _write(tmp_path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


def test_utf8_with_a_byte_order_mark_and_crlf_is_read(tmp_path):
    text = '{"prompt_id": "a", "prompt": "caf\u00e9"}\n{"prompt_id": "b", "prompt": "x"}\n'
    plain = list(load_rows(_write(tmp_path, "plain.jsonl", text.encode())))
    for name, data in (("bom.jsonl", b"\xef\xbb\xbf" + text.encode()),
                       ("crlf.jsonl", text.replace("\n", "\r\n").encode()),
                       ("both.jsonl", b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())):
        assert list(load_rows(_write(tmp_path, name, data))) == plain, name
    assert plain[0] == (1, {"prompt_id": "a", "prompt": "café"})


def test_a_line_separator_inside_a_json_string_is_not_a_line_break(tmp_path):
    """JSON allows U+2028 and U+0085 raw inside strings (json.dumps(ensure_ascii=False) writes them);
    str.splitlines() split the line there and the row became malformed."""
    rows_ = [{"prompt_id": "a", "prompt": "one\u2028two\x85three"}, {"prompt_id": "b", "prompt": "x"}]
    path = _write(tmp_path, "d.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_).encode())
    assert [r for _, r in load_rows(path)] == rows_


@pytest.mark.parametrize(("data", "message"), [
    (b'{"prompt": "a"}\n{"prompt": "caf' + b"\xe9" + b'"}\n',
     r"d.jsonl:2: is not UTF-8: byte 0xE9 at byte offset 31 \(column 16 of the line\); save the file as UTF-8"),
    ('{"prompt": "a"}\n'.encode("utf-16"), r"d.jsonl: is UTF-16 \(byte-order mark FF FE\); save it as UTF-8"),
    ('{"prompt": "a"}\n'.encode("utf-32"), r"d.jsonl: is UTF-32"),
    (b'{"prompt": "a", "prompt": "b"}\n', r"d.jsonl:1: duplicate key 'prompt' in one object"),
    (b'[{"prompt": "a"},\n{"prompt": "b"}]\n', r"d.jsonl:1: malformed JSON .*looks like one JSON document"),
])
def test_undecodable_files_name_file_line_and_offset(tmp_path, data, message):
    with pytest.raises(DataError, match=message):
        list(load_rows(_write(tmp_path, "d.jsonl", data)))


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    with pytest.raises(DataError, match=r"d.parquet: not a readable Parquet file"):
        load_rows(_write(tmp_path, "d.parquet", b'{"prompt": "a"}\n'))


def test_empty_splits_are_refused_with_the_counts():
    prompts = make(12)
    report = PrepareReport(rows=13, kept=12, dropped_duplicates=1)
    check_splits(split_prompts(prompts, 0.5, 2, 3), "d.jsonl", 0.5, 2, report)  # all three splits filled
    with pytest.raises(DataError) as e:
        check_splits(split_prompts(prompts, 0.01, 0, 3), "d.jsonl", 0.01, 0, report)
    assert str(e.value) == ("d.jsonl: 12 prompts (of 13 rows; 0 empty, 1 duplicates, 0 over maxPrompts) split into "
                            "sft=0, po=12, eval=0 by dataset.sftFraction 0.01 and dataset.evalSize 0: the SFT split "
                            "is empty; add prompts or change dataset.sftFraction / dataset.evalSize")
    with pytest.raises(DataError, match=r"po=0, eval=\d+ .*: the preference \(po\) split is empty"):
        check_splits(split_prompts(prompts, 0.5, 12, 3), "d.jsonl", 0.5, 12, report)
    with pytest.raises(DataError, match=r"the preference \(po\) and eval splits are empty"):
        check_splits(split_prompts(prompts, 0.99, 3, 3), "d.jsonl", 0.99, 3, report)
