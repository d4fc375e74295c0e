"""Stage graph and hashes: a change re-runs exactly the stages that read it, and their dependants."""

from __future__ import annotations

import copy

import pytest

from wrpo.pipeline.plan import STAGE_NAMES, STAGES, plan_hashes, select_range, stage_hashes
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
        ({"target": {"model": "t", "replicas": 4}}, []),
        ({"sources": [{"name": "a", "model": "m", "replicas": 3}, {"name": "b", "model": "n"}]}, []),
        ({"cluster": {"nodeSelector": {"gpu": "a100"}}}, []),
        ({"storage": {"runUri": "s3://bkt/r"}}, []),
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


def unit_changes(before: dict, after: dict) -> dict[str, list[str]]:
    """stage -> the units whose hash differs (or is new) between two specs."""
    a, b = plan_hashes(parse_spec(before)).units, plan_hashes(parse_spec(after)).units
    return {stage: sorted(u for u in b[stage] if a[stage].get(u) != b[stage][u]) for stage in b}


def test_changing_one_source_changes_only_its_units():
    data = copy.deepcopy(BASE)
    data["sources"][1]["model"] = "n2"
    assert unit_changes(BASE, data) == {"sample-sources": ["b"], "score-sources": ["b"]}
    assert changed({"sources": data["sources"]})[:3] == ["sample-sources", "score-sources", "select-sources"]


def test_adding_a_source_adds_its_units_and_keeps_the_others():
    data = copy.deepcopy(BASE)
    data["sources"].append({"name": "c", "model": "o"})
    assert unit_changes(BASE, data) == {"sample-sources": ["c"], "score-sources": ["c"]}


@pytest.mark.parametrize(("patch", "units"), [
    ({"sampling": {"n": 3}}, ["a", "b"]),  # every source is sampled again
    ({"reward": {"maxLength": 1024}}, []),  # sampling units keep their hash; scoring redoes all
])
def test_stage_wide_sections_change_every_unit_of_the_stages_that_read_them(patch, units):
    data = copy.deepcopy(BASE)
    for section, values in patch.items():
        data.setdefault(section, {}).update(values)
    got = unit_changes(BASE, data)
    assert got["sample-sources"] == units
    assert got["score-sources"] == ["a", "b"]


def test_a_new_optional_field_at_its_default_changes_no_hash():
    """What an operator upgrade that adds a field does to a running FusionRun: nothing."""
    from pydantic import Field, create_model

    from wrpo.pipeline import spec as spec_module

    sampling = create_model("SamplingV2", __base__=spec_module.SamplingSpec,
                            min_p=(float, Field(default=0.0, description="a field of a later release")))
    fusion = create_model("FusionV2", __base__=spec_module.FusionSpec,
                          sampling=(sampling, Field(default_factory=sampling)))
    old, new = parse_spec(BASE), fusion.model_validate(BASE)
    assert new.sampling.min_p == 0.0
    assert plan_hashes(new) == plan_hashes(old)
    assert stage_hashes(fusion.model_validate({**BASE, "sampling": {"minP": 0.05}})) != stage_hashes(old)


def test_a_value_written_at_its_default_is_the_same_spec():
    data = copy.deepcopy(BASE)
    data["sampling"] = {"n": 5, "temperature": 0.8}  # the paper's defaults, written out
    assert stage_hashes(parse_spec(data)) == stage_hashes(parse_spec(BASE))


def test_identical_servers_of_a_stage_are_started_once():
    """An eval judge that is also the reward judge (same model, same settings) is one server playing both
    roles and answering to both served names; a different setting keeps two."""
    from wrpo.pipeline.plan import servers

    judge = {"model": "j", "maxModelLen": 2048}
    data = {**copy.deepcopy(BASE), "dataset": {"uri": "p.jsonl", "evalSize": 8}, "eval": {"judge": judge},
            "reward": {"type": "judge", "judge": {**judge, "servedName": "grader"}}}
    found = servers(parse_spec(data), "eval", "s3://b/r")
    assert [s.key for s in found] == ["eval-target", "eval-sft", "eval-fused", "judge"]
    (one,) = [s for s in found if s.plays("reward")]
    assert one.key == "judge" and one.plays("judge") and one.aliases == ("grader",) and one.roles == ("reward",)
    data["reward"]["judge"]["maxModelLen"] = 4096
    assert [s.key for s in servers(parse_spec(data), "eval", "s3://b/r")][-2:] == ["judge", "reward"]
    # scoring alone serves the reward judge under its own key; sources stay one server per unit
    assert [s.key for s in servers(parse_spec(data), "score-sources", "s3://b/r")] == ["reward"]
    same = {**copy.deepcopy(BASE), "sources": [{"name": "a", "model": "m"}, {"name": "b", "model": "m"}]}
    assert [s.key for s in servers(parse_spec(same), "sample-sources", "s3://b/r")] == ["src-a", "src-b"]

