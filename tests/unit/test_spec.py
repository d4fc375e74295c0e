"""FusionSpec: paper defaults, the strict parser (no coercion, camelCase only, YAML 1.1 ambiguities and
duplicate keys refused, lines named), field checks and their CEL twins, cross-field and cluster rules,
relative paths, the YAML that the pods read back. The corpus of wrong specs is in tests/test_corpus.py."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from wrpo.errors import DataError, SpecError
from wrpo.pipeline import checks
from wrpo.pipeline.spec import (
    API_VERSION,
    CLUSTER_RULES,
    FusionSpec,
    StorageSpec,
    dump_spec_yaml,
    load_spec,
    load_spec_text,
    parse_spec,
    spec_json_schema,
)
from wrpo.pipeline.strict_yaml import load_yaml

MINIMAL = {
    "target": {"model": "meta-llama/Meta-Llama-3-8B-Instruct"},
    "sources": [
        {"name": "gemma", "model": "google/gemma-2-27b-it", "tensorParallelSize": 2},
        {"name": "api", "endpoint": {"url": "https://api.example.com/v1", "model": "big", "apiKeyEnv": "KEY"}},
    ],
    "dataset": {"uri": "s3://data/ultrafeedback.jsonl"},
}


def with_(path: str, value, data=None):
    """MINIMAL (or `data`) with one dotted path set (ints index lists)."""
    data = copy.deepcopy(data or MINIMAL)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return data


def problems(data, **kw) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec(data, "fusion.yaml", **kw)
    return str(e.value).splitlines()


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
    ("data", "line"),
    [
        (with_("wrpo.beta", "large"), 'fusion.yaml: wrpo.beta: Input should be a valid number, got the string "large"'),
        (with_("wrpo.alpha", 1.5), "fusion.yaml: wrpo.alpha: Input should be less than or equal to 1"),
        (with_("wrpo.betta", 0.1), "fusion.yaml: wrpo.betta: unknown field; did you mean 'beta'?"),
        (with_("sampling.topP", 0), "fusion.yaml: sampling.topP: Input should be greater than 0"),
        (with_("sources.1", {"name": "gemma", "model": "x"}),
         "fusion.yaml: sources: source names must be unique; repeated: gemma"),
        (with_("sources.0.endpoint", {"url": "http://h/v1", "model": "m"}),
         "fusion.yaml: sources[0]: a source needs exactly one of 'model' and 'endpoint'"),
        (with_("sources.0.name", "Not_A_DNS"), f"fusion.yaml: sources[0].name: {checks.DNS_LABEL_MSG}"),
        (with_("wrpo.maxPromptLength", 4096),
         "fusion.yaml: wrpo.maxPromptLength: 'maxPromptLength' (4096) must be smaller than 'maxLength' (2048)"),
        ({k: v for k, v in MINIMAL.items() if k != "dataset"}, "fusion.yaml: dataset: required field is missing"),
    ],
)
def test_invalid_specs_name_the_field(data, line):
    assert problems(data) == [line]


def test_every_problem_is_reported_at_once_one_line_each():
    data = with_("wrpo.alpha", 2)
    data["sampling"] = {"n": 0, "maxTokens": "many"}
    data["selection"] = {"sourceRank": 5}
    lines = problems(data)
    assert len(lines) == 3 and all(line.startswith("fusion.yaml: ") for line in lines)
    assert {line.split(": ")[1] for line in lines} == {"wrpo.alpha", "sampling.n", "sampling.maxTokens"}


@pytest.mark.parametrize(("path", "value"), [
    ("sampling.n", "5"), ("sampling.topP", "0.5"), ("suspend", "yes"), ("suspend", 1), ("sampling.n", True),
    ("training.deepspeedStage", False), ("cluster.vllm.cpu", 2), ("cluster.vllm.env", {"A": 1}),
    ("sampling.stop", "</s>"), ("sampling.temperature", float("inf")), ("wrpo.beta", float("nan")),
])
def test_no_type_coercion(path, value):
    """What the CRD's schema refuses, validation refuses: pydantic's lax mode would have converted these."""
    (line,) = problems(with_(path, value))
    assert line.startswith(f"fusion.yaml: {path}")


def test_whole_floats_are_integers_as_on_the_apiserver():
    """JSON has one number type: the apiserver admits 5.0 for an integer field and stores 5."""
    spec = parse_spec(with_("sampling.n", 5.0))
    assert spec.sampling.n == 5 and isinstance(spec.sampling.n, int)
    assert parse_spec(with_("sampling.temperature", 1)).sampling.temperature == 1.0


def test_snake_case_keys_are_refused_naming_the_camel_case_key():
    assert problems(with_("wrpo.alpha_schedule", "cosine")) == [
        "fusion.yaml: wrpo.alpha_schedule: unknown field: keys are camelCase, write 'alphaSchedule'"]
    # Python code keeps using attribute names
    assert StorageSpec(s3_endpoint="http://127.0.0.1:8333").s3_endpoint == "http://127.0.0.1:8333"
    assert "alphaSchedule" in parse_spec(MINIMAL).model_dump(by_alias=True)["wrpo"]


def test_yaml_problems_name_file_line_and_column(tmp_path):
    text = ("target: {model: t}\nsources:\n  - {name: a, model: m, group: no}\ndataset: {uri: d.jsonl}\n"
            "sampling:\n  n: 4\n  seed: 1\n  seed: 2\n  maxTokens: 010\n")
    with pytest.raises(SpecError) as e:
        load_spec_text(text, "f.yaml")
    assert str(e.value).splitlines() == [
        "f.yaml:3:32: 'no' is the boolean false in YAML 1.1 (kubectl, helm) but a string in YAML 1.2 (kustomize); "
        "write false for a boolean, or quote it ('no') for a string",
        "f.yaml:6:3: the key 'n' is read as the boolean false by YAML 1.1 parsers (kubectl, helm); quote it: 'n':",
        "f.yaml:8:3: duplicate key 'seed' (first on line 7)",
        "f.yaml:9:14: '010' is read as different numbers by YAML 1.1 and 1.2 parsers; write it in plain decimal "
        "without leading zeros or '_', or quote it for a string",
    ]


def test_schema_errors_name_the_line(tmp_path):
    text = "target: {model: t}\nsources: [{name: a, model: m}]\ndataset:\n  uri: d.jsonl\n  evalSize: -1\n"
    with pytest.raises(SpecError, match=r"^f\.yaml:5: dataset\.evalSize: Input should be greater than or equal to 0$"):
        load_spec_text(text, "f.yaml")


def test_the_loader_reads_what_every_parser_reads_alike():
    data, lines = load_yaml(
        "a: 1e-4\nb: 5.0\nc: '5'\nd: 0x10\ne: 2024-01-01\nf: 1:20\ng: ~\nh: !!str 7\ni: true\n"
        "base: &b {x: 1, z: 2}\nj:\n  <<: *b\n  z: 3\n", "f.yaml")
    assert data == {"a": 1e-4, "b": 5, "c": "5", "d": 16, "e": "2024-01-01", "f": "1:20", "g": None, "h": "7",
                    "i": True, "base": {"x": 1, "z": 2}, "j": {"z": 3, "x": 1}}
    assert lines[("j", "z")] == 13
    for bad in ("a: !!python/name:os.system x\n", "a: &a [*a]\n", "1: x\n", "a: yes\n", "? [a]\n: 1\n"):
        with pytest.raises(SpecError):
            load_yaml(bad, "f.yaml")


def test_dumped_yaml_reads_back_unchanged_where_plain_pyyaml_does_not():
    """The spec ConfigMap the pods read: PyYAML writes the key n bare, which kubectl reads as false."""
    spec = parse_spec(with_("sources.0.vllmArgs", ["yes", "1e3", "010", "null", "on"]))
    text = dump_spec_yaml(spec)
    assert "'n': 5" in text
    assert load_spec_text(text, "cm.yaml") == spec
    with pytest.raises(SpecError, match="the key 'n'"):
        load_spec_text(yaml.safe_dump(spec.model_dump(mode="json", by_alias=True)), "cm.yaml")


def test_load_spec_resolves_relative_paths(tmp_path):
    (tmp_path / "f.yaml").write_bytes(
        b"\xef\xbb\xbftarget: {model: ./models/target}\r\nsources: [{name: a, model: ./models/a}]\r\n"
        b"dataset: {uri: ../prompts.jsonl}\r\n")  # a byte-order mark and CRLF are fine
    spec = load_spec(tmp_path / "f.yaml")
    assert spec.target.model == str(tmp_path / "models" / "target")
    assert spec.dataset.uri == str(tmp_path.parent / "prompts.jsonl")


def test_a_spec_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "f.yaml").write_bytes(b"target: {model: t}\nname: caf\xe9\n")
    with pytest.raises(DataError, match=r"f\.yaml:2: is not UTF-8: byte 0xE9 at byte offset 28 \(column 10 of the"):
        load_spec(tmp_path / "f.yaml")


MANIFEST = (f"apiVersion: {API_VERSION}\nkind: FusionRun\nmetadata: {{name: x}}\nspec:\n"
            "  target: {model: s3://bkt/models/target}\n  sources: [{name: a, model: s3://bkt/models/a}]\n"
            "  dataset: {uri: s3://bkt/prompts.jsonl}\n  storage: {runUri: RUN}\n"
            "  cluster: {training: {procsPerNode: 1}}\n")


def test_fusionrun_manifests_get_the_clusters_rules():
    assert load_spec_text(MANIFEST.replace("RUN", "s3://bkt/runs/x"), "run.yaml").storage.run_uri == "s3://bkt/runs/x"
    with pytest.raises(SpecError) as e:
        load_spec_text(MANIFEST.replace("RUN", "./runs/x"), "run.yaml")
    assert str(e.value) == ("run.yaml:8: spec.storage.runUri: a FusionRun needs an s3://bucket/prefix run "
                            "directory (its pods share no local disk); got './runs/x'")
    bare = MANIFEST.replace("RUN", "./runs/x").split("spec:\n", 1)[1].replace("\n  ", "\n").strip() + "\n"
    assert load_spec_text(bare, "spec.yaml").storage.run_uri == "./runs/x"  # fine for `wrpo run`
    with pytest.raises(SpecError, match="spec.yaml:4: storage.runUri"):
        load_spec_text(bare, "spec.yaml", cluster=True)  # `wrpo spec validate --cluster`
    with pytest.raises(SpecError, match="metadata.name: a FusionRun name must be a DNS-1035 label"):
        load_spec_text(MANIFEST.replace("name: x", "name: X_1").replace("RUN", "s3://bkt/r"), "run.yaml")


def test_cluster_batches_fit_the_training_devices():
    data = with_("storage.runUri", "s3://bkt/runs/x")
    data["sft"] = {"batchSize": 8, "perDeviceBatchSize": 2}
    assert parse_spec(data)  # locally one process: 8 = 2 × 4 accumulation steps
    assert problems(data, cluster=True) == [  # default cluster.training: 1 node × 8 processes
        "fusion.yaml: sft.batchSize: batchSize (8) must be a multiple of perDeviceBatchSize × the training "
        "devices (2 × 8: cluster.training.nodes 1 × procsPerNode 8)"]
    data["cluster"] = {"training": {"gpus": 4}}  # a cluster.training without procsPerNode means 1 process
    assert parse_spec(data, cluster=True)
    assert set(CLUSTER_RULES) == {"run_on_s3", "batches_fit_devices", "no_relative_paths"}


def test_cross_field_rules_that_used_to_fail_in_a_stage():
    two = with_("sources.1", {"name": "qwen", "model": "q", "group": "small"})
    assert problems(with_("selection.sourceGroups", ["small", "lama"], two)) == [
        "fusion.yaml: selection.sourceGroups: 'lama' names no source or source group (known: gemma, qwen, small)"]
    assert parse_spec(with_("selection.sourceGroups", ["small"], two)).selected_sources() == ["qwen"]
    assert problems(with_("wrpo.rejectedSource", True)) == [
        "fusion.yaml: wrpo.rejectedSource: selection.rejectedSource and wrpo.rejectedSource must be equal: "
        "selection keeps y_ls exactly when WRPO's Eq. 9 term trains on it"]
    both = with_("selection.rejectedSource", True, with_("wrpo.rejectedSource", True))
    assert parse_spec(both).wrpo.rejected_source
    assert problems(with_("sft.batchSize", 7)) == [
        "fusion.yaml: sft.batchSize: batchSize (7) must be a multiple of perDeviceBatchSize (2): gradient "
        "accumulation makes up the rest"]
    assert problems(with_("sources.0.maxModelLen", 1024)) == [
        "fusion.yaml: sources[0].maxModelLen: maxModelLen (1024) must exceed sampling.maxTokens (2048): the prompt "
        "and the answer share the context"]


@pytest.mark.parametrize(("url", "extra", "ok"), [
    ("https://api.example.com/v1", {}, True),
    ("http://127.0.0.1:8000/v1", {}, True),  # loopback
    ("http://localhost/v1", {}, True),
    ("http://vllm.ns.svc:8000/v1", {}, False),
    ("http://vllm.ns.svc:8000/v1", {"allowHttp": True}, True),  # opted in
    ("http://vllm.ns.svc:8000/v1", {"apiKeyEnv": None}, True),  # no key to send
])
def test_keys_go_over_https_unless_loopback_or_opted_in(url, extra, ok):
    data = with_("sources.1.endpoint", {"url": url, "model": "m", "apiKeyEnv": "KEY", **extra})
    if ok:
        assert parse_spec(data)
    else:
        assert problems(data)[0].startswith("fusion.yaml: sources[1].endpoint.url: an API key is sent only over")


@pytest.mark.parametrize(("check", "good", "bad"), [
    ("StorageUri", ["./runs/x", "/data/p.jsonl", "s3://bucket", "s3://my.bucket-1/a/b", "runs/x"],
     ["gs://b/x", "s3://", "s3:///x", "S3://b/x", "file:///x", "s3://k:s@b/x", ""]),
    ("ModelUri", ["org/name", "name", "/models/m", "s3://bkt/models/m"], ["hf://org/name", "https://x/m"]),
    ("HttpUrl", ["http://h", "https://h.example.com:443/v1/", "http://10.0.0.1:8000", "http://[::1]:80/v1",
                 "http://my_host:1/"], ["https://", "h:80", "https://h/v1?k=1", "https://h#f", "https://u:p@h",
                                        "https://h:0", "https://h:65536", "https://h/a b"]),
    ("Quantity", ["2", "500m", "1.5Gi", "8Gi", "1e3", "0.5", "+1"], ["0", "-1", "8GB", "1.5.1", "lots", ""]),
    ("DnsSubdomain", ["a", "my-sa", "a.b-c.d"], ["A", "a_b", "-a", "a.", "a b"]),
    ("EnvName", ["A", "_x", "VLLM_CPU_KVCACHE_SPACE"], ["1A", "A-B", "A B", ""]),
])
def test_field_checks_accept_and_refuse(check, good, bad):
    """The Python side of each Check (tests/cluster/test_spec_corpus.py holds the apiserver to the same)."""
    from pydantic import TypeAdapter, ValidationError

    adapter = TypeAdapter(getattr(checks, check))
    for value in good:
        adapter.validate_python(value)
    for value in bad:
        with pytest.raises(ValidationError):
            adapter.validate_python(value)


def test_field_checks_carry_their_cel_twin_into_the_schema():
    props = spec_json_schema()["$defs"]["VLLMResources"]["properties"]
    assert {"rule": "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))",
            "message": checks.QUANTITY_MSG} in props["memory"]["x-kubernetes-validations"]
    assert props["env"]["x-kubernetes-validations"][0]["rule"].startswith("self.all(k, k.matches(")


def test_schema_is_camel_case_and_closed():
    schema = spec_json_schema()
    assert schema["additionalProperties"] is False
    assert "sftFraction" in schema["$defs"]["DatasetSpec"]["properties"]
    json.dumps(schema)  # serialisable
    assert FusionSpec.model_fields.keys() >= {"target", "sources", "wrpo", "cluster"}


def test_api_version_is_the_operators():
    from wrpo_operator import API_VERSION as OPERATOR_API_VERSION

    assert API_VERSION == OPERATOR_API_VERSION


def test_docs_spec_md_is_generated_from_the_model():
    from pathlib import Path

    from wrpo.pipeline.spec_docs import spec_markdown

    path = Path(__file__).resolve().parents[2] / "docs" / "spec.md"
    assert path.read_text() == spec_markdown(), "docs/spec.md drifted: run `wrpo spec docs > docs/spec.md`"
