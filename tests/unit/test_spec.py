"""FusionSpec: paper defaults, field-naming errors, camelCase keys, relative paths."""

from __future__ import annotations

import copy
import json

import pytest

from wrpo.errors import SpecError
from wrpo.pipeline.spec import FusionSpec, load_spec, parse_spec, spec_json_schema

MINIMAL = {
    "target": {"model": "meta-llama/Meta-Llama-3-8B-Instruct"},
    "sources": [
        {"name": "gemma", "model": "google/gemma-2-27b-it", "tensorParallelSize": 2},
        {"name": "api", "endpoint": {"url": "https://api.example.com/v1", "model": "big", "apiKeyEnv": "KEY"}},
    ],
    "dataset": {"uri": "s3://data/ultrafeedback.jsonl"},
}


def with_(path: str, value):
    """MINIMAL with one dotted path set (ints index lists)."""
    data = copy.deepcopy(MINIMAL)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return data


def test_defaults_are_the_papers():
    spec = parse_spec(MINIMAL)
    assert (spec.sampling.n, spec.sampling.temperature, spec.sampling.top_p) == (5, 0.8, 0.95)
    assert spec.sft.learning_rate == 7e-6 and spec.wrpo.learning_rate == 3e-7
    assert spec.wrpo.beta == 0.01 and spec.wrpo.alpha == 0.1 and spec.wrpo.alpha_schedule == "linear"
    assert spec.wrpo.batch_size == 128 and spec.wrpo.max_length == 2048 and spec.wrpo.epochs == 1
    assert spec.wrpo.lr_scheduler == "cosine" and spec.wrpo.warmup_ratio == 0.1
    assert spec.training.deepspeed_stage == 3
    assert spec.dataset.sft_fraction == pytest.approx(1 / 3)
    assert spec.reward.type == "armorm"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (with_("wrpo.beta", "large"), "wrpo.beta: Input should be a valid number"),
        (with_("wrpo.alpha", 1.5), "wrpo.alpha: Input should be less than or equal to 1"),
        (with_("wrpo.alpha", -0.1), "wrpo.alpha: Input should be greater than or equal to 0"),
        (with_("wrpo.betta", 0.1), "wrpo.betta: unknown field"),
        (with_("sampling.topP", 0), "sampling.topP: Input should be greater than 0"),
        (with_("sources.1", {"name": "gemma", "model": "x"}), "sources: source names must be unique; repeated: gemma"),
        (with_("sources.0.endpoint", {"url": "http://h/v1", "model": "m"}),
         "sources[0]: a source needs exactly one of 'model' and 'endpoint'"),
        (with_("sources.0.name", "Not_A_DNS"), "sources[0].name: String should match pattern"),
        (with_("sources.1.endpoint.url", "ftp://x"), "sources[1].endpoint.url: String should match pattern"),
        (with_("wrpo.maxPromptLength", 4096), "'maxPromptLength' must be smaller than 'maxLength'"),
        ({k: v for k, v in MINIMAL.items() if k != "dataset"}, "dataset: Field required"),
    ],
)
def test_invalid_specs_name_the_field(data, fragment):
    with pytest.raises(SpecError) as e:
        parse_spec(data, "fusion.yaml")
    assert fragment in str(e.value)
    assert str(e.value).startswith("fusion.yaml: ")


def test_every_problem_is_reported_at_once():
    data = with_("wrpo.alpha", 2)
    data["sampling"] = {"n": 0}
    with pytest.raises(SpecError) as e:
        parse_spec(data, "f.yaml")
    assert "wrpo.alpha" in str(e.value) and "sampling.n" in str(e.value)


def test_snake_case_keys_are_accepted_and_dumped_as_camel_case():
    data = with_("wrpo.alpha_schedule", "cosine")
    spec = parse_spec(data)
    assert spec.wrpo.alpha_schedule == "cosine"
    assert "alphaSchedule" in spec.model_dump(by_alias=True)["wrpo"]


def test_load_spec_resolves_relative_paths_and_fusionrun_manifests(tmp_path):
    (tmp_path / "f.yaml").write_text(
        "apiVersion: fusion.wrpo.io/v1alpha1\nkind: FusionRun\nmetadata: {name: x}\nspec:\n"
        "  target: {model: ./models/target}\n  sources: [{name: a, model: ./models/a}]\n"
        "  dataset: {uri: ./prompts.jsonl}\n"
    )
    spec = load_spec(tmp_path / "f.yaml")
    assert spec.target.model == str(tmp_path / "models" / "target")
    assert spec.dataset.uri == str(tmp_path / "prompts.jsonl")


def test_yaml_errors_name_the_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("target:\n  model: x\nsources: [\n")
    with pytest.raises(SpecError, match=r"bad.yaml:\d+: not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_schema_is_camel_case_and_closed():
    schema = spec_json_schema()
    assert schema["additionalProperties"] is False
    assert "sftFraction" in schema["$defs"]["DatasetSpec"]["properties"]
    json.dumps(schema)  # serialisable
    assert FusionSpec.model_fields.keys() >= {"target", "sources", "wrpo", "cluster"}


def test_docs_spec_md_is_generated_from_the_model():
    from pathlib import Path

    from wrpo.pipeline.spec_docs import spec_markdown

    path = Path(__file__).resolve().parents[2] / "docs" / "spec.md"
    assert path.read_text() == spec_markdown(), "docs/spec.md drifted: run `wrpo spec docs > docs/spec.md`"
