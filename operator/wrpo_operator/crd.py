"""Generate the FusionRun CRD from the pydantic models: `python -m wrpo_operator.crd --write`.

`.spec` is `wrpo.pipeline.spec.FusionSpec` and `.status` is `wrpo_operator.status.FusionRunStatus`; both
schemas are generated, never hand-written (docs/architecture.md, "One source, generated copies"). The
generator turns pydantic's JSON schema into a structural OpenAPI v3 schema: `$defs` inlined, `anyOf [X, null]`
→ `nullable: true`, numeric `exclusiveMinimum` → OpenAPI 3.0's boolean form, `additionalProperties: true`
(free-form dicts such as tolerations) → `x-kubernetes-preserve-unknown-fields`. Field constraints bring their
CEL rules along in the JSON schema (`wrpo.pipeline.checks.Check`); the pydantic cross-field validators have CEL
twins below (`CEL_RULES`), and so do the cluster-only rules (`CLUSTER_CEL`, on `.spec`). Unit tests fail when a
validator or cluster rule has no twin or the files drift; tests/cluster/test_spec_corpus.py feeds the same
wrong specs to `wrpo spec validate` and to the apiserver (docs/spec.md, "Validation")."""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from wrpo.pipeline.checks import LOOPBACK_URL_RE, S3_URI_RE, cel_matches
from wrpo.pipeline.spec import (
    POD_VALIDATORS,
    TYPE_VALIDATORS,
    DatasetSpec,
    FusionSpec,
    RewardSpec,
    SFTSpec,
    WRPOSpec,
    spec_json_schema,
    unwrap_optional,
)
from wrpo_operator import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from wrpo_operator.status import FusionRunStatus

ROOT = Path(__file__).resolve().parents[2]
CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_PATHS = (
    ROOT / "manifests" / "crd" / f"{CRD_NAME}.yaml",
    ROOT / "charts" / "wrpo-operator" / "crds" / f"{CRD_NAME}.yaml",
)
HEADER = (
    "# Generated from wrpo/pipeline/spec.py and operator/wrpo_operator/status.py by\n"
    "#   python -m wrpo_operator.crd --write\n"
    "# Do not edit: tests/unit/test_operator_crd.py fails when this file drifts from the models.\n"
)

#: Bounds the CRD adds so that the apiserver can estimate the cost of the CEL rules (an unbounded
#: list makes `all(exists_one)` too expensive to admit). Keyed by (model title, property).
CLUSTER_BOUNDS: dict[tuple[str, str], dict[str, Any]] = {
    ("FusionSpec", "sources"): {"maxItems": 64},
    ("TargetSpec", "servedName"): {"maxLength": 63},
}


def _cel_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    return f"'{v}'" if isinstance(v, str) else repr(v)


def _field(model: type[BaseModel], alias: str) -> tuple[str, Any]:
    for name, f in model.model_fields.items():
        if (f.alias or name) == alias:
            return name, f
    raise KeyError(f"{model.__name__} has no field '{alias}'")


def _attr(obj: Any, chain: list[str]) -> Any:
    for alias in chain:
        obj = getattr(obj, _field(type(obj), alias)[0])
    return obj


def get(model: type[BaseModel], path: str, expr: str = "self") -> str:
    """CEL for the value at dotted camelCase `path` under `expr` (an object of `model`), or pydantic's
    default where the apiserver has none. The apiserver fills in leaf defaults of present objects, but an
    absent section (a pydantic default_factory) stays absent: CEL then uses the factory's value, e.g.
    cluster.training.procsPerNode is 8 without cluster.training and 1 inside a cluster.training that
    omits it. has() is false for an absent field and for an explicit null, as pydantic's None."""
    key, *rest = path.split(".")
    name, field = _field(model, key)
    sub = f"{expr}.{key}"
    absent = field.get_default(call_default_factory=True)
    present = get(unwrap_optional(field.annotation), ".".join(rest), sub) if rest else sub
    if absent is PydanticUndefined:  # a required field: the schema guarantees it
        return present
    return f"(has({sub}) ? {present} : {_cel_value(_attr(absent, rest))})"


def _set(field: str) -> str:
    # has() is false for an absent field and for an explicit null (the apiserver drops nulls of
    # nullable fields before CEL sees them), matching pydantic's "None = not given".
    return f"has(self.{field})"


#: GPUs of one model's servers: `cluster.vllm.gpus` (else the tensor-parallel size) × replicas.
_SERVER_GPUS = ("((has(self.cluster.vllm) && has(self.cluster.vllm.gpus)) ? self.cluster.vllm.gpus"
                " : (has({s}.tensorParallelSize) ? {s}.tensorParallelSize : 1))"
                " * (has({s}.replicas) ? {s}.replicas : 1)")


def _batch_rule(model: type[BaseModel]) -> dict[str, str]:
    return {"rule": f"{get(model, 'batchSize')} % {get(model, 'perDeviceBatchSize')} == 0",
            "message": "batchSize must be a multiple of perDeviceBatchSize (gradient accumulation makes up the rest)",
            "fieldPath": ".batchSize"}


_HAS_GROUPS = "has(self.selection) && has(self.selection.sourceGroups)"
_IN_GROUPS = "self.selection.sourceGroups.exists(g, g == s.name || (has(s.group) && s.group == g))"
_SELECTED = f"({_HAS_GROUPS} ? size(self.sources.filter(s, {_IN_GROUPS})) : size(self.sources))"
_KEYED = "has(self.apiKeyEnv) || has(self.apiKeyFile) || has(self.apiKeySecret)"

#: GPUs of one unreplicated server (a judge, the reward model's pooling server, whose tensorParallelSize is 1).
_JUDGE_GPUS = ("((has(self.cluster.vllm) && has(self.cluster.vllm.gpus)) ? self.cluster.vllm.gpus"
               " : (has({j}.tensorParallelSize) ? {j}.tensorParallelSize : 1))")

#: cluster.scoring.gpus and cluster.small.gpus with their defaults (1 and 0: `ClusterSpec`).
_SCORING_GPUS = ("(!has(self.cluster.scoring) ? 1"
                 " : (has(self.cluster.scoring.gpus) ? self.cluster.scoring.gpus : 0))")
_SMALL_GPUS = "((has(self.cluster.small) && has(self.cluster.small.gpus)) ? self.cluster.small.gpus : 0)"

#: The CEL twin of every pydantic cross-field validator, keyed by (model title, validator name).
CEL_RULES: dict[tuple[str, str], list[dict[str, str]]] = {
    ("SourceSpec", "_one_of"): [{
        "rule": f"{_set('model')} != {_set('endpoint')}",
        "message": "a source needs exactly one of 'model' and 'endpoint'",
    }],
    ("EnvVar", "_one_source"): [{
        "rule": f"{_set('value')} != {_set('secretKeyRef')}",
        "message": "an env entry needs exactly one of 'value' and 'secretKeyRef'",
    }],
    ("ClusterSpec", "_shared_checkpoints"): [{
        "rule": "!has(self.training) || !has(self.training.nodes) || self.training.nodes <= 1 "
        "|| (has(self.checkpoints) && has(self.checkpoints.enabled) && !self.checkpoints.enabled) "
        "|| (has(self.checkpoints) && has(self.checkpoints.accessModes) "
        "&& self.checkpoints.accessModes.exists(m, m == 'ReadWriteMany'))",
        "message": "'checkpoints.accessModes' needs ReadWriteMany when 'training.nodes' > 1",
        "fieldPath": ".checkpoints.accessModes",
    }],
    ("EndpointSpec", "_secret_needs_env"): [{
        "rule": f"!{_set('apiKeySecret')} || {_set('apiKeyEnv')}",
        "message": "'apiKeySecret' needs 'apiKeyEnv': the variable the Secret's key is exposed as",
        "fieldPath": ".apiKeyEnv",
    }],
    ("JudgeSpec", "_one_of"): [{
        "rule": f"{_set('model')} != {_set('endpoint')}",
        "message": "a judge needs exactly one of 'model' and 'endpoint'",
    }],
    ("EndpointSpec", "_one_key_source"): [{
        "rule": f"!({_set('apiKeyEnv')} && {_set('apiKeyFile')})",
        "message": "set one of 'apiKeyEnv' and 'apiKeyFile', not both",
        "fieldPath": ".apiKeyFile",
    }],
    ("EndpointSpec", "_key_over_https"): [{
        "rule": f"!({_KEYED}) || !self.url.startsWith('http://') || (has(self.allowHttp) && self.allowHttp) "
        f"|| {cel_matches(LOOPBACK_URL_RE, 'self.url')}",
        "message": "an API key is sent only over https:// (or to a loopback host); set allowHttp: true to send it "
        "over plain http",
        "fieldPath": ".url",
    }],
    ("RewardSpec", "_needs"): [{
        "rule": f"{get(RewardSpec, 'type')} == 'judge' ? {_set('judge')} : {_set('model')}",
        "message": "reward: type 'judge' needs 'judge'; every other type needs 'model' (a remote scorer "
        "tokenises with it)",
        "fieldPath": ".model",
    }],
    ("DatasetSpec", "_sizes"): [{
        "rule": f"!{_set('maxPrompts')} || {get(DatasetSpec, 'evalSize')} + 2 <= self.maxPrompts",
        "message": "evalSize leaves a split empty: maxPrompts must be at least evalSize + 2 (a prompt each for the "
        "SFT and preference splits)",
        "fieldPath": ".evalSize",
    }],
    ("Toleration", "_kubernetes_rules"): [
        {"rule": "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
         "message": "operator must be Exists when key is empty (it then tolerates every taint)",
         "fieldPath": ".operator"},
        {"rule": "!(has(self.operator) && self.operator == 'Exists' && has(self.value) && self.value != '')",
         "message": "value must be empty when operator is Exists", "fieldPath": ".value"},
        {"rule": "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
         "message": "effect must be NoExecute when tolerationSeconds is set", "fieldPath": ".effect"},
    ],
    ("ClusterSpec", "_procs_fit_gpus"): [{
        "rule": "!has(self.training) || !has(self.training.gpus) || self.training.gpus == 0 "
        "|| (has(self.training.procsPerNode) ? self.training.procsPerNode : 1) <= self.training.gpus",
        "message": "procsPerNode must not exceed gpus: torchrun starts one training process per GPU",
        "fieldPath": ".training.procsPerNode",
    }],
    ("ClusterSpec", "_gang_fits_pods"): [{
        "rule": "!has(self.schedulingPolicy) || !has(self.schedulingPolicy.minAvailable) "
        "|| self.schedulingPolicy.minAvailable <= ((has(self.training) && has(self.training.nodes)) "
        "? self.training.nodes : 1)",
        "message": "minAvailable exceeds the pods of a training job (cluster.training.nodes): the gang would never "
        "be scheduled",
        "fieldPath": ".schedulingPolicy.minAvailable",
    }],
    ("SFTSpec", "_batch_multiple"): [_batch_rule(SFTSpec)],
    ("WRPOSpec", "_batch_multiple"): [_batch_rule(WRPOSpec)],
    ("WRPOSpec", "_lengths"): [{
        "rule": f"{get(WRPOSpec, 'maxPromptLength')} < {get(WRPOSpec, 'maxLength')}",
        "message": "'maxPromptLength' must be smaller than 'maxLength'",
        "fieldPath": ".maxPromptLength",
    }],
    ("FusionSpec", "_unique_sources"): [{
        "on": "sources",  # a field validator: the rule sits on the list itself
        "rule": "self.all(x, self.exists_one(y, y.name == x.name))",
        "message": "source names must be unique",
    }],
    ("FusionSpec", "_fits_the_gpu_budget"): [{
        "rule": "!has(self.cluster) || !has(self.cluster.gpuBudget) || ("
        f"self.sources.all(s, !has(s.model) || {_SERVER_GPUS.format(s='s')} <= self.cluster.gpuBudget)"
        f" && (!has(self.target) || {_SERVER_GPUS.format(s='self.target')} <= self.cluster.gpuBudget)"
        " && (!has(self.cluster.training) ? 8 : (has(self.cluster.training.gpus) ? self.cluster.training.gpus : 0)"
        " * (has(self.cluster.training.nodes) ? self.cluster.training.nodes : 1)) <= self.cluster.gpuBudget"
        " && (!has(self.cluster.scoring) ? 1 : (has(self.cluster.scoring.gpus) ? self.cluster.scoring.gpus : 0))"
        " <= self.cluster.gpuBudget)",
        "message": "cluster.gpuBudget is smaller than what one server or job needs",
        "fieldPath": ".cluster.gpuBudget",
    }],
    ("FusionSpec", "_eval_fits_the_gpu_budget"): [{
        "rule": "!has(self.cluster) || !has(self.cluster.gpuBudget)"
        " || ((!has(self.eval) || !has(self.eval.prompts))"
        " && (!has(self.dataset.evalSize) || self.dataset.evalSize == 0))"
        f" || 3 * {_SERVER_GPUS.format(s='self.target')}"
        " + (!has(self.cluster.scoring) ? 1 : (has(self.cluster.scoring.gpus) ? self.cluster.scoring.gpus : 0))"
        f" + ((has(self.eval) && has(self.eval.judge) && has(self.eval.judge.model))"
        f" ? {_JUDGE_GPUS.format(j='self.eval.judge')} : 0)"
        " + ((has(self.eval) && has(self.eval.rewardModel) && !self.eval.rewardModel) || !has(self.reward) ? 0"
        " : ((has(self.reward.type) && self.reward.type == 'remote' && !has(self.reward.endpoint))"
        " ? ((has(self.cluster.vllm) && has(self.cluster.vllm.gpus)) ? self.cluster.vllm.gpus : 1)"
        " : ((has(self.reward.type) && self.reward.type == 'judge' && has(self.reward.judge)"
        f" && has(self.reward.judge.model)) ? {_JUDGE_GPUS.format(j='self.reward.judge')} : 0)))"
        " <= self.cluster.gpuBudget",
        "message": "cluster.gpuBudget is smaller than the GPUs the eval stage holds at once (3 × the target's "
        "servers, a local judge, a served reward model, cluster.scoring.gpus)",
        "fieldPath": ".cluster.gpuBudget",
    }],
    ("FusionSpec", "_stages_fit_the_gpu_budget"): [{
        # FusionSpec.stage_gpu_parts: a reward stage's server + its scoring Job, sample-target's server + its
        # Job, and each source's server + its sampling Job
        "rule": "!has(self.cluster) || !has(self.cluster.gpuBudget) || ("
        "(!has(self.reward) ? 0 : ((has(self.reward.type) && self.reward.type == 'remote'"
        " && !has(self.reward.endpoint))"
        " ? ((has(self.cluster.vllm) && has(self.cluster.vllm.gpus)) ? self.cluster.vllm.gpus : 1)"
        " : ((has(self.reward.type) && self.reward.type == 'judge' && has(self.reward.judge)"
        f" && has(self.reward.judge.model)) ? {_JUDGE_GPUS.format(j='self.reward.judge')} : 0)))"
        f" + {_SCORING_GPUS} <= self.cluster.gpuBudget"
        f" && {_SERVER_GPUS.format(s='self.target')} + {_SMALL_GPUS} <= self.cluster.gpuBudget"
        f" && self.sources.all(s, !has(s.model) || {_SERVER_GPUS.format(s='s')} + {_SMALL_GPUS}"
        " <= self.cluster.gpuBudget))",
        "message": "a stage's servers and the Job beside them need more GPUs at once than cluster.gpuBudget "
        "(a served reward model + cluster.scoring.gpus, or a server + cluster.small.gpus)",
        "fieldPath": ".cluster.gpuBudget",
    }],
    ("FusionSpec", "_names_distinct"): [{
        "rule": f"!self.sources.exists(s, s.name == {get(FusionSpec, 'target.servedName')})",
        "message": "target.servedName collides with a source name",
        "fieldPath": ".target.servedName",
    }],
    ("FusionSpec", "_selection"): [
        {"rule": f"!({_HAS_GROUPS}) || self.selection.sourceGroups.all(g, "
         "self.sources.exists(s, s.name == g || (has(s.group) && s.group == g)))",
         "message": "every entry of selection.sourceGroups must name a source or a source group",
         "fieldPath": ".selection.sourceGroups"},
        {"rule": f"{get(FusionSpec, 'selection.sourceRank')} <= {_SELECTED}",
         "message": "selection.sourceRank exceeds the number of selected sources",
         "fieldPath": ".selection.sourceRank"},
        {"rule": f"{_SELECTED} == 0 || {get(FusionSpec, 'selection.topKSources')} <= "
         f"{get(FusionSpec, 'sampling.n')} * {_SELECTED}",
         "message": "selection.topKSources exceeds the source answers per prompt (sampling.n × selected sources)",
         "fieldPath": ".selection.topKSources"},
        *({"rule": f"!{get(FusionSpec, f'{a}.rejectedSource')} || {get(FusionSpec, f'{b}.rejectedSource')}",
           "message": "selection.rejectedSource and wrpo.rejectedSource must be equal: selection keeps y_ls exactly "
           "when WRPO's Eq. 9 term trains on it",
           "fieldPath": f".{a}.rejectedSource"} for a, b in (("selection", "wrpo"), ("wrpo", "selection"))),
    ],
    ("FusionSpec", "_serving_lengths"): [{
        "rule": f"self.sources.all(s, !has(s.maxModelLen) || s.maxModelLen > {get(FusionSpec, 'sampling.maxTokens')})",
        "message": "sources[].maxModelLen must exceed sampling.maxTokens: the prompt and the answer share the context",
        "fieldPath": ".sources",
    }],
}


def _devices() -> str:
    return f"{get(FusionSpec, 'cluster.training.nodes')} * {get(FusionSpec, 'cluster.training.procsPerNode')}"


def _fits(section: str) -> dict[str, str]:
    return {"rule": f"{get(FusionSpec, f'{section}.batchSize')} % ({get(FusionSpec, f'{section}.perDeviceBatchSize')}"
            f" * {_devices()}) == 0",
            "message": f"{section}.batchSize must be a multiple of perDeviceBatchSize × the training devices "
            "(cluster.training.nodes × procsPerNode)",
            "fieldPath": f".{section}.batchSize"}


def _not_relative(expr: str) -> str:
    """A model: not ./ or ../ (a bare org/name is a hub id)."""
    return f"!({expr}.startsWith('./') || {expr}.startsWith('../'))"


def _absolute(expr: str) -> str:
    """A data or file path: s3:// or absolute."""
    return f"({expr}.startsWith('/') || {expr}.startsWith('s3://'))"


def _judge_not_relative(section: str) -> dict[str, str]:
    j = f"self.{section}.judge"
    return {"rule": f"!has(self.{section}) || !has({j}) || !has({j}.model) || {_not_relative(j + '.model')}",
            "message": _RELATIVE, "fieldPath": f".{section}.judge.model"}


_RELATIVE = "a relative path means nothing in a pod: use s3://bucket/prefix, an absolute path (cluster.modelsPvc) " \
    "or a hub id"

#: The CEL twin of every rule in wrpo.pipeline.spec.CLUSTER_RULES, on `.spec`.
CLUSTER_CEL: dict[str, list[dict[str, str]]] = {
    "run_on_s3": [{
        "rule": f"has(self.storage) && has(self.storage.runUri) && {cel_matches(S3_URI_RE, 'self.storage.runUri')}",
        "message": "a FusionRun needs an s3://bucket/prefix run directory (its pods share no local disk)",
        "fieldPath": ".storage.runUri",
    }],
    "batches_fit_devices": [_fits("sft"), _fits("wrpo")],
    "no_relative_paths": [
        {"rule": _not_relative("self.target.model"), "message": _RELATIVE, "fieldPath": ".target.model"},
        {"rule": f"self.sources.all(s, !has(s.model) || {_not_relative('s.model')})", "message": _RELATIVE,
         "fieldPath": ".sources"},
        {"rule": f"!has(self.reward) || !has(self.reward.model) || {_not_relative('self.reward.model')}",
         "message": _RELATIVE, "fieldPath": ".reward.model"},
        {"rule": _absolute("self.dataset.uri"), "message": _RELATIVE, "fieldPath": ".dataset.uri"},
        _judge_not_relative("reward"),
        _judge_not_relative("eval"),
        {"rule": f"!has(self.eval) || !has(self.eval.prompts) || {_absolute('self.eval.prompts')}",
         "message": _RELATIVE, "fieldPath": ".eval.prompts"},
        {"rule": "self.sources.all(s, !has(s.endpoint) || !has(s.endpoint.apiKeyFile) || "
         f"{_absolute('s.endpoint.apiKeyFile')})",
         "message": "a relative path means nothing in a pod: use an absolute path (a mounted Secret)",
         "fieldPath": ".sources"},
    ],
}

#: Transition rules (docs/operator.md, "Spec changes"): what may not change once a run exists, keyed by
#: (model title, property or None for the model itself). The apiserver evaluates them on updates only.
IMMUTABLE_RULES: dict[tuple[str, str | None], list[dict[str, str]]] = {
    ("StorageSpec", None): [{
        "rule": "!has(oldSelf.runUri) || (has(self.runUri) && self.runUri == oldSelf.runUri)",
        "message": "storage.runUri is immutable: the run's stages are stored there (create a new FusionRun)",
        "fieldPath": ".runUri", "reason": "FieldValueForbidden",
    }],
    ("FusionSpec", "sources"): [{
        "rule": "oldSelf.all(o, self.exists(s, s.name == o.name))",
        "message": "the source names are immutable: samples are stored under them; sources may be added, "
                   "not renamed or removed (create a new FusionRun)",
        "reason": "FieldValueForbidden",
    }],
}

#: Rules on the whole object (only metadata.name is visible to CEL there).
ROOT_RULES = [{
    "rule": "size(self.metadata.name) <= 40 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
    "message": "a FusionRun name must be a DNS-1035 label of at most 40 characters "
    "(it prefixes the names of its Jobs, Services and Deployments)",
}]


def pydantic_validators(model: type[BaseModel] = FusionSpec) -> set[tuple[str, str]]:
    """(model title, validator name) of every model and field validator reachable from `model`."""
    found: set[tuple[str, str]] = set()
    seen: set[type] = set()

    def walk(m: type[BaseModel]) -> None:
        if m in seen:
            return
        seen.add(m)
        decorators = m.__pydantic_decorators__
        for name in [*decorators.model_validators, *decorators.field_validators]:
            if name not in TYPE_VALIDATORS | POD_VALIDATORS:  # POD_VALIDATORS: validate-only (no CEL form)
                found.add((m.__name__, name))
        for f in m.model_fields.values():
            for t in _model_types(f.annotation):
                walk(t)

    walk(model)
    return found


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in getattr(annotation, "__args__", ()) for t in _model_types(arg)]


def structural(schema: dict[str, Any], rules: dict[tuple[str, str], list[dict[str, str]]] | None = None,
               bounds: dict[tuple[str, str], dict[str, Any]] | None = None,
               immutable: dict[tuple[str, str | None], list[dict[str, str]]] | None = None) -> dict[str, Any]:
    """A pydantic JSON schema as a Kubernetes structural schema (see the module docstring)."""
    defs = schema.get("$defs", {})
    rules = CEL_RULES if rules is None else rules
    bounds = CLUSTER_BOUNDS if bounds is None else bounds
    immutable = IMMUTABLE_RULES if immutable is None else immutable

    def by_title(title: str, prop: str | None = None) -> list[dict[str, str]]:
        return [{"reason": "FieldValueInvalid", **{k: v for k, v in r.items() if k != "on"}}
                for (model, _), rs in rules.items() if model == title for r in rs if r.get("on") == prop
                ] + list(immutable.get((title, prop), []))

    def conv(node: dict[str, Any]) -> dict[str, Any]:
        node = copy.deepcopy(node)
        if "anyOf" in node:  # Optional[X]: X, nullable
            options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot express anyOf {options} structurally")
            node = {**options[0], **node, "nullable": True}
        if "$ref" in node:  # inline; the referring property's description/default win
            node = {**defs[node.pop("$ref").split("/")[-1]], **node}
        title = node.pop("title", None)
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "default" and value is None:
                continue
            if key == "const":
                out["enum"] = [value]
            elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
                # A CEL rule, not OpenAPI's `exclusiveMaximum: true`: kube-apiserver 1.35 compares an
                # integer value with a truncated bound (0 is "not less than 0.5").
                op, word = (">", "greater") if key == "exclusiveMinimum" else ("<", "less")
                out.setdefault("x-kubernetes-validations", []).append(
                    {"rule": f"self {op} {float(value)}", "message": f"must be {word} than {value}"})
            elif key == "properties":
                out[key] = {name: conv(sub) for name, sub in value.items()}
                for name in value:
                    out[key][name].update(bounds.get((title or "", name), {}))
                    field_rules = by_title(title, name) if title else []
                    if field_rules:
                        out[key][name].setdefault("x-kubernetes-validations", []).extend(field_rules)
            elif key == "items":
                out[key] = _without_defaults(conv(value))
            elif key == "additionalProperties":
                if value is True:
                    out["x-kubernetes-preserve-unknown-fields"] = True
                elif isinstance(value, dict):
                    out[key] = conv(value)
                # False: the apiserver prunes unknown fields and `kubectl --validate=strict` rejects them.
            else:
                out[key] = value
        if "type" not in out and "enum" in out:
            out["type"] = "string" if all(isinstance(v, str) for v in out["enum"]) else "integer"
        if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
            out["x-kubernetes-preserve-unknown-fields"] = True
        if title and out.get("type") == "object" and by_title(title):
            out.setdefault("x-kubernetes-validations", []).extend(by_title(title))
        return out

    return conv({k: v for k, v in schema.items() if k != "$defs"})


def _without_defaults(node: Any) -> Any:
    """A list item's schema without `default`s. The apiserver would fill them into each item, and a list is
    replaced whole by `kubectl apply` and compared whole by GitOps tools: the stored list would never equal
    the applied one (a perpetual diff). pydantic fills the same defaults when the operator parses the spec,
    so the spec means the same (docs/operator.md, "CRD generation")."""
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


def status_schema() -> dict[str, Any]:
    return structural(FusionRunStatus.model_json_schema(by_alias=True, mode="serialization"), {}, {}, {})


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition of FusionRun, as a dict."""
    spec = structural(spec_json_schema())
    spec.setdefault("x-kubernetes-validations", []).extend(
        {"reason": "FieldValueInvalid", **r} for rules in CLUSTER_CEL.values() for r in rules)
    spec["description"] = "A FusionSpec (wrpo/pipeline/spec.py): the whole fusion pipeline of this run."
    root = {
        "type": "object",
        "description": "A WRPO implicit model fusion run: its pipeline stages as Kubernetes children.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status_schema(),
        },
        "x-kubernetes-validations": ROOT_RULES,
    }
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Phase of the run."},
        {"name": "Stage", "type": "string", "jsonPath": ".status.stage", "description": "Current stage."},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress",
         "description": "Committed stages / all stages."},
        {"name": "Units", "type": "string", "jsonPath": ".status.units",
         "description": "The current stage's units done / all (sample-sources: one per source)."},
        {"name": "Fused-vs-Target", "type": "number", "jsonPath": ".status.eval.fusedVsTarget",
         "description": "Win rate (%) of the fused model against the original target (eval stage): the reward "
                        "model's, or the LLM judge's when there is no reward model."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},

        {"name": "Output", "type": "string", "jsonPath": ".status.outputUri", "priority": 1,
         "description": "Where the fused model lands."},
        {"name": "Backend", "type": "string", "jsonPath": ".status.training.backend", "priority": 1,
         "description": "What runs the SFT/WRPO stages: pytorchjob or trainjob (cluster.training.backend)."},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "wrpo"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": list(SHORT_NAMES), "categories": ["wrpo"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": root},
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
            }],
        },
    }


#: Words that YAML 1.1 parsers (Go's yaml.v2 in helm and kubectl) read as booleans.
_YAML11_BOOLS = {"y", "yes", "n", "no", "true", "false", "on", "off"}


class _Dumper(yaml.SafeDumper):
    """Quotes strings a YAML 1.1 parser would take for booleans: the sampling field `n` must stay `n`. Writes
    shared parts of the schema out each time (no `&id001` anchors)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "'" if value.lower() in _YAML11_BOOLS else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def render() -> str:
    """The CRD file's text: header + YAML (key order kept, long lines not folded)."""
    return HEADER + yaml.dump(build_crd(), Dumper=_Dumper, sort_keys=False, width=100000, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wrpo_operator.crd", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="write the CRD into manifests/ and the chart")
    g.add_argument("--check", action="store_true", help="exit 1 if a checked-in copy differs")
    args = p.parse_args(argv)
    text = render()
    if not (args.write or args.check):
        sys.stdout.write(text)
        return 0
    stale = 0
    for path in CRD_PATHS:
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        old = path.read_text() if path.exists() else ""
        if old == text:
            continue
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {shown}")
        else:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(True), text.splitlines(True), str(shown), "generated", n=2))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
