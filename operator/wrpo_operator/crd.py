"""Generate the FusionRun CRD from the pydantic models: `python -m wrpo_operator.crd --write`.

`.spec` is `wrpo.pipeline.spec.FusionSpec` and `.status` is `wrpo_operator.status.FusionRunStatus`; both
schemas are generated, never hand-written (docs/architecture.md, "One source, generated copies"). The
generator turns pydantic's JSON schema into a structural OpenAPI v3 schema: `$defs` inlined, `anyOf [X, null]`
→ `nullable: true`, numeric `exclusiveMinimum` → OpenAPI 3.0's boolean form, `additionalProperties: true`
(free-form dicts such as tolerations) → `x-kubernetes-preserve-unknown-fields`. The pydantic cross-field
validators have CEL twins below (`CEL_RULES`); a unit test fails when a validator has no twin or the files
drift."""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from wrpo.pipeline.spec import FusionSpec, RewardSpec, WRPOSpec, spec_json_schema
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


def _default(model: type[BaseModel], field: str) -> Any:
    return model.model_fields[field].default


def _cel_value(v: Any) -> str:
    return f"'{v}'" if isinstance(v, str) else str(v)


def _or_default(model: type[BaseModel], field: str, alias: str) -> str:
    """`self.x` or, when absent, the model's default (the apiserver defaults first; this is a guard)."""
    return f"(has(self.{alias}) ? self.{alias} : {_cel_value(_default(model, field))})"


def _set(field: str) -> str:
    # has() is false for an absent field and for an explicit null (the apiserver drops nulls of
    # nullable fields before CEL sees them), matching pydantic's "None = not given".
    return f"has(self.{field})"


#: GPUs of one model's servers: `cluster.vllm.gpus` (else the tensor-parallel size) × replicas.
_SERVER_GPUS = ("((has(self.cluster.vllm) && has(self.cluster.vllm.gpus)) ? self.cluster.vllm.gpus"
                " : (has({s}.tensorParallelSize) ? {s}.tensorParallelSize : 1))"
                " * (has({s}.replicas) ? {s}.replicas : 1)")

#: GPUs of one unreplicated server (a judge, the reward model's pooling server, whose tensorParallelSize is 1).
_JUDGE_GPUS = ("((has(self.cluster.vllm) && has(self.cluster.vllm.gpus)) ? self.cluster.vllm.gpus"
               " : (has({j}.tensorParallelSize) ? {j}.tensorParallelSize : 1))")

#: The CEL twin of every pydantic cross-field validator, keyed by (model title, validator name).
CEL_RULES: dict[tuple[str, str], list[dict[str, str]]] = {
    ("SourceSpec", "_one_of"): [{
        "rule": f"{_set('model')} != {_set('endpoint')}",
        "message": "a source needs exactly one of 'model' and 'endpoint'",
    }],
    ("EndpointSpec", "_secret_needs_env"): [{
        "rule": f"!{_set('apiKeySecret')} || {_set('apiKeyEnv')}",
        "message": "'apiKeySecret' needs 'apiKeyEnv': the variable the Secret's key is exposed as",
        "fieldPath": ".apiKeyEnv",
    }],
    ("RewardSpec", "_needs"): [{
        "rule": f"{_or_default(RewardSpec, 'type', 'type')} == 'remote' "
        f"? ({_set('endpoint')} || {_set('model')}) : ({_or_default(RewardSpec, 'type', 'type')} == 'judge' "
        f"? {_set('judge')} : {_set('model')})",
        "message": "reward: type 'remote' needs 'endpoint' (or 'model'); type 'judge' needs 'judge'; "
        "other types need 'model'",
    }],
    ("JudgeSpec", "_one_of"): [{
        "rule": f"{_set('model')} != {_set('endpoint')}",
        "message": "a judge needs exactly one of 'model' and 'endpoint'",
    }],
    ("WRPOSpec", "_lengths"): [{
        "rule": f"{_or_default(WRPOSpec, 'max_prompt_length', 'maxPromptLength')} < "
        f"{_or_default(WRPOSpec, 'max_length', 'maxLength')}",
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
    ("FusionSpec", "_names_distinct"): [{
        "rule": "!self.sources.exists(s, s.name == "
        "(has(self.target.servedName) ? self.target.servedName : 'target'))",
        "message": "target.servedName collides with a source name",
        "fieldPath": ".target.servedName",
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
               bounds: dict[tuple[str, str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """A pydantic JSON schema as a Kubernetes structural schema (see the module docstring)."""
    defs = schema.get("$defs", {})
    rules = CEL_RULES if rules is None else rules
    bounds = CLUSTER_BOUNDS if bounds is None else bounds

    def by_title(title: str, prop: str | None = None) -> list[dict[str, str]]:
        return [{"reason": "FieldValueInvalid", **{k: v for k, v in r.items() if k != "on"}}
                for (model, _), rs in rules.items() if model == title for r in rs if r.get("on") == prop]

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
                out[key] = conv(value)
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


def status_schema() -> dict[str, Any]:
    return structural(FusionRunStatus.model_json_schema(by_alias=True, mode="serialization"), {}, {})


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition of FusionRun, as a dict."""
    spec = structural(spec_json_schema())
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
        {"name": "Fused-vs-Target", "type": "number", "jsonPath": ".status.eval.fusedVsTarget",
         "description": "Reward-model win rate (%) of the fused model against the original target (eval stage)."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Output", "type": "string", "jsonPath": ".status.outputUri", "priority": 1,
         "description": "Where the fused model lands."},
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
    """Quotes strings a YAML 1.1 parser would take for booleans: the sampling field `n` must stay `n`."""


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
