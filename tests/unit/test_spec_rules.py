"""The spec's rules that keep a run from failing after its GPUs start (docs/spec.md, "Validation"): one
checked type for every URI or path field, S3 bucket names, relative paths on the cluster, cross-field rules,
integer and seed bounds, Kubernetes' own rules for tolerations, volumes, mounts, annotations, Secret keys and
images, `metadata.generateName`, and the YAML limits. The corpus (tests/corpus) holds one wrong spec per
kind through the CLI; these tests pin each rule's edges."""

from __future__ import annotations

import copy
import typing

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from wrpo.errors import SpecError
from wrpo.pipeline import checks
from wrpo.pipeline import spec as spec_module
from wrpo.pipeline.plan import STAGE_NAMES
from wrpo.pipeline.spec import (
    OPERATOR_MOUNT_PATHS,
    OPERATOR_VOLUMES,
    FusionSpec,
    load_spec_text,
    parse_spec,
)
from wrpo.pipeline.strict_yaml import MAX_ALIASES, MAX_CHARS, MAX_DEPTH, MAX_VALUES, load_yaml

MINIMAL = {
    "target": {"model": "org/target"},
    "sources": [{"name": "a", "model": "org/a"}, {"name": "b", "model": "s3://bucket/models/b"}],
    "dataset": {"uri": "s3://bucket/prompts.jsonl"},
    "storage": {"runUri": "s3://bucket/runs/x"},
    "cluster": {"training": {"gpus": 1, "procsPerNode": 1}},
}


def with_(path: str, value, data=None) -> dict:
    data = copy.deepcopy(data or MINIMAL)
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    node[int(last) if last.isdigit() else last] = value
    return data


def problems(data, **kw) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec(data, "f.yaml", **kw)
    return str(e.value).splitlines()


# ---------------------------------------------------------------------------------------------- URIs and paths

#: Every field that names a place to read or write, and the checked type it must have. A new path field
#: must be added here (the walk below finds string fields whose name says they are one).
PATH_FIELDS = {
    ("TargetSpec", "model"): checks.ModelUri,
    ("SourceSpec", "model"): checks.ModelUri,
    ("JudgeSpec", "model"): checks.ModelUri,
    ("RewardSpec", "model"): checks.ModelUri,
    ("DatasetSpec", "uri"): checks.StorageUri,
    ("EvalSpec", "prompts"): checks.StorageUri,
    ("StorageSpec", "run_uri"): checks.StorageUri,
    ("EndpointSpec", "api_key_file"): checks.LocalFile,
}
NOT_PATHS = {("EndpointSpec", "model")}  # the model name an API expects, not a place


def _models(model: type[BaseModel], seen: set) -> set:
    if model not in seen:
        seen.add(model)
        for f in model.model_fields.values():
            for t in (f.annotation, *typing.get_args(f.annotation)):
                for inner in (t, *typing.get_args(t)):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        _models(inner, seen)
    return seen


def _checks(annotation) -> list:
    """The Check objects of an annotation (Annotated, also under Optional)."""
    out = [m for m in getattr(annotation, "__metadata__", ()) if isinstance(m, checks.Check)]
    return out + [c for arg in typing.get_args(annotation) for c in _checks(arg)]


def test_every_uri_or_path_field_has_the_one_checked_type():
    found = {}
    for model in _models(FusionSpec, set()):
        for name, f in model.model_fields.items():
            if {"model", "uri", "prompts", "file", "path", "dir"} & set(
                name.split("_")
            ) and spec_module.unwrap_optional(f.annotation) is str:
                found[(model.__name__, name)] = [m for m in f.metadata if isinstance(m, checks.Check)] + _checks(
                    f.annotation
                )
    assert set(found) - NOT_PATHS == set(PATH_FIELDS)
    for key, expected in PATH_FIELDS.items():
        assert found[key] == _checks(expected) and found[key], key


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (
            "StorageUri",
            ["s3://abc/x", "s3://my.team-bucket.2024", "s3://" + "a" * 63 + "/x", "s3://a1b/", "/x", "x/y"],
            [
                "s3://ab/x",
                "s3://" + "a" * 64 + "/x",
                "s3://192.168.1.1/x",
                "s3://my..bucket/x",
                "s3://xn--abc/x",
                "s3://sthree-abc/x",
                "s3://abc-s3alias/x",
                "s3://abc--ol-s3/x",
                "s3://my_bucket/x",
                "s3://abc-/x",
                "s3://.abc/x",
                "s3://ABC/x",
            ],
        ),
        ("LocalFile", ["/var/run/secrets/key", "key.txt"], ["s3://abc/key", "https://x/key", ""]),
        ("SecretKey", ["api-key", "HF_TOKEN", ".dotfile", "a.b"], [".", "..", "..data", "a/b", "a b", "", "a" * 254]),
        (
            "ImageRef",
            [
                "ghcr.io/wrpo/wrpo-vllm:0.1.0",
                "wrpo-runtime",
                "localhost:5000/a/b:tag",
                "a/b@sha256:" + "0" * 64,
                "[::1]:5000/a:b",
                "docker.io/library/ubuntu:24.04",
                "a__b/c---d:V1.0_x",
            ],
            ["ghcr.io/WRPO/x:1", "x:1 ", " x", "x:tag/cpu", "x:", "x@sha256:12", "-x", "x:" + "a" * 129, ""],
        ),
        (
            "VllmArgs",
            [
                ["--enable-prefix-caching"],
                ["--max-num-seqs", "8"],
                ["--seed-x"],
                ["--hostname"],
                [],
                ["--max-model-len", "1024"],
                ["--gpu-memory-utilization=0.5"],
            ],  # the target has no field for them
            [
                ["--port", "1"],
                ["--port=1"],
                ["--host"],
                ["--model", "x"],
                ["--served-model-name", "x"],
                ["--served_model_name=x"],
                ["-tp", "2"],
                ["--tensor-parallel-size=2"],
                ["--seed", "1"],
                ["--tensor_parallel_size", "1"],
            ],
        ),
    ],
)
def test_field_checks_accept_and_refuse(check, good, bad):
    adapter = TypeAdapter(getattr(checks, check))
    for value in good:
        adapter.validate_python(value)
    for value in bad:
        with pytest.raises(ValidationError):
            adapter.validate_python(value)


def test_relative_paths_are_refused_on_the_cluster_only():
    rel = "a relative path means nothing in a pod"
    data = with_("eval.prompts", "questions/q.jsonl", with_("eval.judge", {"model": "./judge"}))
    data = with_(
        "sources.1", {"name": "b", "endpoint": {"url": "https://x/v1", "model": "m", "apiKeyFile": "keys/api"}}, data
    )
    assert parse_spec(data)  # `wrpo run` resolves them
    lines = problems(data, cluster=True)
    assert [line.split(": ")[1] for line in lines] == [
        "eval.judge.model",
        "eval.prompts",
        "sources[1].endpoint.apiKeyFile",
    ]
    assert all(rel in line for line in lines)
    assert parse_spec(
        with_("eval.prompts", "s3://bucket/q.jsonl", with_("eval.judge", {"model": "org/judge"})), cluster=True
    )


# ---------------------------------------------------------------------------------------------- cross-field rules


def test_procs_per_node_fit_the_gpus():
    assert problems(with_("cluster.training", {"gpus": 2, "procsPerNode": 3})) == [
        "f.yaml: cluster.training.procsPerNode: procsPerNode (3) must not exceed gpus (2): torchrun starts one "
        "training process per GPU"
    ]
    assert parse_spec(with_("cluster.training", {"gpus": 0, "procsPerNode": 4}))  # CPU training: any count
    assert parse_spec(with_("cluster.training", {"gpus": 4, "procsPerNode": 4}))


def test_the_gang_fits_the_training_pods():
    data = with_("cluster.schedulingPolicy", {"minAvailable": 3})
    assert problems(data)[0].startswith(
        "f.yaml: cluster.schedulingPolicy.minAvailable: minAvailable (3) exceeds the 1 pods"
    )
    data = with_("cluster.training", {"gpus": 1, "procsPerNode": 1, "nodes": 3}, data)
    data = with_("cluster.checkpoints", {"accessModes": ["ReadWriteMany"]}, data)
    assert parse_spec(data)


@pytest.mark.parametrize(
    ("max_prompts", "eval_size", "ok"), [(1, 0, False), (2, 0, True), (3, 2, False), (4, 2, True), (None, 100, True)]
)
def test_no_split_is_necessarily_empty(max_prompts, eval_size, ok):
    data = with_("dataset.evalSize", eval_size, with_("dataset.maxPrompts", max_prompts))
    if ok:
        assert parse_spec(data)
    else:
        assert "leaves a split empty" in problems(data)[0]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("training.seed", -1, "training.seed: Input should be greater than or equal to 0"),
        ("dataset.seed", 2**32, "dataset.seed: Input should be less than or equal to 4294967295"),
        ("eval.seed", 2**32, "eval.seed: Input should be less than or equal to 4294967295"),
        ("cluster.backoffLimit", 2**31, "cluster.backoffLimit: Input should be less than or equal to 2147483647"),
        ("cluster.training.nodes", 2**31, "cluster.training.nodes: Input should be less than or equal to 2147483647"),
        (
            "sampling.maxTokens",
            2**63,
            "sampling.maxTokens: Input should be a 64-bit integer (at most 9223372036854775807)",
        ),
        ("wrpo.maxSteps", 2**64, "wrpo.maxSteps: Input should be a 64-bit integer (at most 9223372036854775807)"),
        (
            "sampling.concurrency",
            -(2**63) - 1,
            "sampling.concurrency: Input should be a 64-bit integer (at least -9223372036854775808)",
        ),
    ],
)
def test_integer_bounds(path, value, message):
    assert problems(with_(path, value)) == [f"f.yaml: {message}"]


def test_the_largest_values_pass():
    data = with_("training.seed", 2**32 - 1, with_("sampling.seed", 0, with_("sampling.maxTokens", 2**63 - 1)))
    assert parse_spec(with_("cluster.backoffLimit", 2**31 - 1, data)).training.seed == 2**32 - 1


# ---------------------------------------------------------------------------------------------- pod-level settings


@pytest.mark.parametrize(
    ("toleration", "problem"),
    [
        ({"operator": "Exists"}, None),
        ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}, None),
        ({"key": "pool", "value": "a"}, None),  # operator Equal by default
        ({"key": "pool", "operator": "Equal", "value": ""}, None),
        ({"key": "pool", "operator": "", "value": "a", "effect": ""}, None),  # '' is the default, as in Kubernetes
        ({"key": "x", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": -5}, None),
        ({}, "[0].operator: operator must be Exists when key is empty"),
        ({"value": "a"}, "[0].operator: operator must be Exists when key is empty"),
        ({"key": "k", "operator": "Exists", "value": "v"}, "[0].value: value must be empty when operator is Exists"),
        ({"key": "k", "operator": "Exists", "tolerationSeconds": 1}, "[0].effect: effect must be NoExecute"),
        ({"key": "k", "operator": "In"}, "[0].operator: Input should be 'Exists', 'Equal' or ''"),
        ({"key": "k", "value": "a b"}, "[0].value: must be a label value"),
        ({"key": "-k", "operator": "Exists"}, "[0].key: must be a label key"),
    ],
)
def test_tolerations_follow_kubernetes(toleration, problem):
    for path in ("cluster.tolerations", "cluster.pods.scoring.tolerations"):
        data = with_(path, [toleration])
        if problem is None:
            assert parse_spec(data)
        else:
            assert problems(data)[0].startswith(f"f.yaml: {path}{problem}"), problems(data)


def test_tolerations_reach_the_pods_as_written():
    from wrpo_operator.builders import stage_children

    spec = parse_spec(
        with_(
            "cluster.tolerations",
            [{"key": "k", "value": "v"}, {"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 9}],
        )
    )
    runner = stage_children("r", "ns", spec, "prepare", "s3://bucket/runs/x").runners[0]
    assert runner["spec"]["template"]["spec"]["tolerations"] == [
        {"key": "k", "value": "v"},
        {"operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 9},
    ]


def test_the_operators_own_volumes_and_mounts_are_the_ones_the_spec_protects():
    """OPERATOR_VOLUMES and OPERATOR_MOUNT_PATHS against what the builders put into every stage's pods."""
    from wrpo_operator.builders import pod_templates, stage_children

    data = with_("cluster.modelsPvc", "models", with_("sources.0.model", "s3://bucket/models/a"))
    spec = parse_spec(with_("eval.judge", {"model": "s3://bucket/judge"}, with_("dataset.evalSize", 2, data)))
    names, paths = set(), set()
    for stage in STAGE_NAMES:
        for obj in stage_children("r", "ns", spec, stage, "s3://bucket/runs/x").all():
            for template in pod_templates(obj):
                pod = template["spec"]
                names |= {v["name"] for v in pod.get("volumes", [])}
                paths |= {
                    m["mountPath"]
                    for c in [*pod["containers"], *pod.get("initContainers", [])]
                    for m in c.get("volumeMounts", [])
                }
    assert names == set(OPERATOR_VOLUMES)
    checkpoints = {p for p in paths if p not in OPERATOR_MOUNT_PATHS}
    assert len(checkpoints) == 1 and next(iter(checkpoints)).startswith("/work/")  # under the scratch volume
    assert set(OPERATOR_MOUNT_PATHS) <= paths


@pytest.mark.parametrize(
    ("pods", "problem"),
    [
        (
            {
                "volumes": [{"name": "cache", "emptyDir": {}}],
                "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
            },
            None,
        ),
        ({"volumes": [{"emptyDir": {}}]}, "volumes[0].name: must be a DNS label"),
        ({"volumes": [{"name": "a" * 64, "emptyDir": {}}]}, "volumes[0].name: must be a DNS label"),
        (
            {"volumes": [{"name": "models", "emptyDir": {}}]},
            "volumes[0].name: 'models' is a volume of the operator's own",
        ),
        ({"volumes": [{"name": "x"}, {"name": "x"}]}, "volumes[1].name: 'x' names two volumes"),
        (
            {"volumes": [{"name": "x"}], "volumeMounts": [{"name": "x", "mountPath": "/work/"}]},
            "volumeMounts[0].mountPath: '/work/' is a mount path of the operator's own",
        ),
        (
            {
                "volumes": [{"name": "x"}],
                "volumeMounts": [{"name": "x", "mountPath": "/a"}, {"name": "x", "mountPath": "/a"}],
            },
            "volumeMounts[1].mountPath: '/a' is mounted twice",
        ),
        (
            {"volumes": [{"name": "x"}], "volumeMounts": [{"name": "x", "mountPath": "rel"}]},
            "volumeMounts[0].mountPath: a mount needs an absolute mountPath",
        ),
        (
            {"volumeMounts": [{"name": "scratch", "mountPath": "/s"}]},
            "volumeMounts[0].name: 'scratch' names no volume in cluster.pods.vllm.volumes",
        ),
    ],
)
def test_volumes_and_mounts(pods, problem):
    data = with_("cluster.pods.vllm", pods)
    if problem is None:
        assert parse_spec(data)
    else:
        assert problems(data)[0].startswith(f"f.yaml: cluster.pods.vllm.{problem}"), problems(data)


def test_annotations_of_a_pod_total_at_most_256_kib():
    half = {"a": "x" * (128 * 1024)}
    data = with_("cluster.podAnnotations", half, with_("cluster.pods.training.annotations", {"b": "y" * 10}))
    assert parse_spec(data)
    data = with_("cluster.pods.training.annotations", {"b": "y" * (128 * 1024)}, data)
    assert problems(data) == [
        "f.yaml: cluster.pods.training.annotations: the annotations of the training pods (cluster.podAnnotations and "
        "cluster.pods.training.annotations) total 262146 bytes; Kubernetes allows 262144 (256 KiB)"
    ]
    assert parse_spec(with_("cluster.pods.training.annotations", {"b": "y" * (128 * 1024 - 2)}, data))


def test_secret_names_are_dns_subdomains():
    env = [{"name": "T", "secretKeyRef": {"name": "team.tokens", "key": "api.key"}}]
    spec = parse_spec(with_("cluster.hfTokenSecret", "hf.token", with_("cluster.env", env)))
    assert spec.cluster.env[0].secret_key_ref.name == "team.tokens"
    assert "must be a DNS subdomain" in problems(with_("cluster.hfTokenSecret", "HF_token"))[0]


# ---------------------------------------------------------------------------------------------- the manifest

MANIFEST = (
    "apiVersion: fusion.wrpo.io/v1alpha1\nkind: FusionRun\nmetadata:\n  META\nspec:\n"
    "  target: {model: s3://bucket/t}\n  sources: [{name: a, model: s3://bucket/a}]\n"
    "  dataset: {uri: s3://bucket/p.jsonl}\n  storage: {runUri: s3://bucket/runs/x}\n"
    "  cluster: {training: {gpus: 1, procsPerNode: 1}}\n"
)


@pytest.mark.parametrize(
    ("meta", "ok"),
    [
        ("generateName: fusion-", True),
        ("generateName: " + "a" * 35, True),
        ("generateName: " + "a" * 36, False),
        ("generateName: Fusion-", False),
        ("generateName: 1a", False),
        ("labels: {a: b}", False),
        ("{name: x, generateName: ignored-}", True),
    ],
)
def test_generate_name(meta, ok):
    text = MANIFEST.replace("META", meta)
    if ok:
        assert load_spec_text(text, "run.yaml")
    else:
        with pytest.raises(SpecError, match="run.yaml:[34]: metadata.(generateName|name): a FusionRun"):
            load_spec_text(text, "run.yaml")


# ---------------------------------------------------------------------------------------------- YAML limits


def _refused(text: str) -> str:
    with pytest.raises(SpecError) as e:
        load_yaml(text, "f.yaml")
    assert len(str(e.value).splitlines()) == 1
    return str(e.value)


def test_input_size():
    assert _refused("a: " + "x" * MAX_CHARS + "\n") == (
        f"f.yaml:1: longer than {MAX_CHARS} characters; a spec is a few kilobytes"
    )
    assert load_yaml("a: " + "x" * (MAX_CHARS - 10) + "\n", "f")[0]["a"]


def test_nesting_depth():
    assert (
        _refused("a: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH)
        == f"f.yaml:1:{4 + MAX_DEPTH - 1}: nesting deeper than 64 levels"
    )
    assert load_yaml("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1), "f")
    assert _refused("[" * 5000 + "]" * 5000).startswith("f.yaml:1:")  # libyaml's own limit (1000) says the same
    assert "nesting deeper than 64 levels" in _refused("[" * 5000 + "]" * 5000)
    block = "".join(f"{'  ' * i}k{i}:\n" for i in range(70)) + "  " * 70 + "v\n"
    assert _refused(block).startswith("f.yaml:65:")
    # aliases nest too: 40 levels inside an alias of 40 levels
    deep = "a: &d " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 30 + "*d" + "]" * 30 + "\n"
    assert _refused(deep) == "f.yaml:2:34: nesting deeper than 64 levels (alias *d expanded)"


def test_alias_count_and_expansion():
    many = "a: &a x\nb: [" + ", ".join(["*a"] * (MAX_ALIASES + 1)) + "]\n"
    assert _refused(many) == f"f.yaml:2:{5 + 4 * MAX_ALIASES}: more than {MAX_ALIASES} aliases; write the values out"
    laughs = "a: &a [" + ", ".join(["x"] * 200) + "]\nb: [" + ", ".join(["*a"] * 200) + "]\n"
    assert _refused(laughs).endswith(
        f"aliases expand to more than {MAX_VALUES} values (here: alias *a); write the values out"
    )
    shared = "a: &a {k: v}\nb: *a\nc: [*a, *a]\n"
    assert load_yaml(shared, "f")[0]["c"] == [{"k": "v"}, {"k": "v"}]
