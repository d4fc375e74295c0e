"""Stage graph and hashes: a change re-runs exactly the stages that read it, and their dependants."""

from __future__ import annotations

import copy

import pytest

from wrpo.pipeline.plan import STAGE_NAMES, STAGES, select_range, stage_hashes
from wrpo.pipeline.spec import parse_spec

BASE = {
    "target": {"model": "t"},
    "sources": [{"name": "a", "model": "m"}, {"name": "b", "model": "n"}],
    "dataset": {"uri": "p.jsonl"},
}


def changed(patch: dict) -> list[str]:
    data = copy.deepcopy(BASE)
    for section, values in patch.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    before, after = stage_hashes(parse_spec(BASE)), stage_hashes(parse_spec(data))
    return [n for n in STAGE_NAMES if before[n] != after[n]]


def test_graph_is_ordered_and_closed():
    seen = set()
    for st in STAGES:
        assert set(st.needs) <= seen, f"{st.name} needs a later stage"
        seen.add(st.name)


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"wrpo": {"beta": 0.1}}, ["ref-logps", "wrpo", "eval"]),
        ({"sft": {"learningRate": 1e-5}},
         ["sft", "sample-target", "score-target", "build-pairs", "ref-logps", "wrpo", "eval"]),
        ({"selection": {"minRewardGap": 0.5}},
         ["select-sources", "sft", "sample-target", "score-target", "build-pairs", "ref-logps", "wrpo", "eval"]),
        ({"eval": {"maxTokens": 64, "judge": {"model": "j"}}}, ["eval"]),
        ({"eval": {"shardSize": 4}}, []),
        ({"sampling": {"concurrency": 4, "requestTimeoutS": 5}}, []),
        ({"cluster": {"nodeSelector": {"gpu": "a100"}}}, []),
        ({"storage": {"runUri": "s3://b/r"}}, []),
        ({"dataset": {"seed": 7}}, list(STAGE_NAMES)),
    ],
)
def test_a_change_invalidates_only_dependants(patch, expected):
    assert changed(patch) == expected


def test_hashes_are_stable():
    assert stage_hashes(parse_spec(BASE)) == stage_hashes(parse_spec(copy.deepcopy(BASE)))


def test_select_range():
    assert select_range("sft", "score-target") == ["sft", "sample-target", "score-target"]
    assert select_range(None, "prepare") == ["prepare"]
    with pytest.raises(KeyError, match="unknown stage 'sfx'"):
        select_range("sfx", None)
    with pytest.raises(ValueError):
        select_range("wrpo", "prepare")
