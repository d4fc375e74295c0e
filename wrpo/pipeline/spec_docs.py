"""docs/spec.md, generated from FusionSpec (`wrpo spec docs`); a test fails when it drifts."""

from __future__ import annotations

import json
import types
import typing

import annotated_types as at
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from wrpo.pipeline.checks import Check
from wrpo.pipeline.spec import CLUSTER_RULES, FusionSpec

HEADER = """# FusionSpec reference

Generated from `wrpo/pipeline/spec.py` by `wrpo spec docs > docs/spec.md`; do not edit by hand.
Keys are camelCase; the same document is the `.spec` of a `FusionRun`. Defaults are the paper's.

## Validation

One strict parser reads every spec: `wrpo spec validate`, `wrpo run`, `wrpo stage` in the cluster's
pods and the operator; the FusionRun CRD (generated from the same models) refuses the same specs at
admission, with the same messages where a CEL rule can say it. A spec means the same thing everywhere:

- **No type coercion.** `"5"` is not a number, `"yes"` not a boolean, `2` not a string (`cpu: "2"`).
  A whole number written as a float (`5.0`) is the integer 5, as on the apiserver. Numbers are finite.
- **camelCase keys only.** An unknown key is an error; a snake_case key names its camelCase spelling,
  a misspelt one the closest key.
- **YAML that every parser reads alike.** Duplicate keys are errors. Unquoted `y n yes no on off` (any
  case) are refused as keys and values: kubectl and helm (YAML 1.1) read the key `n:` as `false` and the
  value `yes` as `true`, YAML 1.2 tools read strings; quote them (`'n': 4`) or write `true`/`false`.
  Numbers with a leading zero (`010`: 8 or 10?), `0o`/`0b` prefixes or `_` separators are refused too,
  and so are tags other than `!!str !!int !!float !!bool !!null`.
- **YAML that cannot hurt.** A spec is at most 256 KiB, nested at most 64 levels deep, with at most
  1000 aliases that expand to at most 20000 values ("billion laughs" is refused at its first alias over
  the limit, within milliseconds); each limit is one error line naming the file and the line.
- **Field checks** (the "rules" column below): Kubernetes quantities (`isQuantity`), object names (DNS
  labels and subdomains; Secret names may contain dots), Secret keys, environment variable names, label and
  annotation keys, image references (`[registry[:port]/]name[:tag][@digest]`, what the kubelet can pull),
  and URIs. Every URI or path field (models, judges, the dataset, eval prompts, `runUri`, `apiKeyFile`) has
  one checked type: local paths or `s3://bucket/prefix`, models also hub ids (`org/name`); nothing else
  (`gs://`, `https://`, `s3://` without a bucket), never credentials (`user:password@`), and bucket names
  as S3 allows them (3 to 63 lowercase letters, digits, `.` and `-`, starting and ending with a letter or
  digit, no IP address, no `..`, no `xn--`/`sthree-` prefix, no `-s3alias`/`--ol-s3` suffix). Endpoints
  are `http(s)://host[:port][/path]` without query or fragment. Integers are 64-bit; Kubernetes' int32
  fields (probes, `backoffLimit`, `nodes`, `minAvailable`, deadlines) at most 2147483647; seeds 0 to
  4294967295 (numpy's, which `vllm --seed` and the trainers' `set_seed` use). `vllmArgs` must not set
  what the operator sets (the model, `--served-model-name`, `--host`, `--port`, `--tensor-parallel-size`,
  `--seed`; `_` spellings too): the spec's fields set them. Tolerations follow Kubernetes' rules (operator
  `Exists` when the key is empty, no value with `Exists`, `tolerationSeconds` only with effect `NoExecute`).
- **Cross-field rules** a stage would otherwise trip over hours later: a global `batchSize` that
  `perDeviceBatchSize` divides; `wrpo.maxPromptLength < wrpo.maxLength`; every `selection.sourceGroups`
  entry names a source or a group; `selection.sourceRank` at most the selected sources;
  `selection.topKSources` at most `sampling.n` × the selected sources; `selection.rejectedSource` equal to
  `wrpo.rejectedSource`; a source's `maxModelLen` above `sampling.maxTokens`; `dataset.maxPrompts` at
  least `dataset.evalSize` + 2 (a prompt each for the SFT and preference splits beside the eval prompts);
  `sampling.n` ≥ 2 and `sampling.temperature` > 0 (y_wt and y_l are the best and worst of N different
  answers); 0 < `dataset.sftFraction` < 1; every reward type has a `model`; `cluster.training.procsPerNode`
  at most its `gpus` (one process per GPU); `cluster.schedulingPolicy.minAvailable` at most the training
  job's pods (`cluster.training.nodes`); under `cluster.gpuBudget`, every stage's peak: its servers plus the
  Job beside them (a served reward model + `cluster.scoring.gpus` in score-sources and score-target, the
  largest source's server + `cluster.small.gpus` in sample-sources, the target's in sample-target, the eval
  stage's servers + its scoring Job): a stage that needs more at once would wait forever
  (`score-sources needs 2 GPUs at once (reward server 1 + scoring Job 1) but cluster.gpuBudget is 1`).
- **Pod-level rules** that Kubernetes applies only when a stage pod is created, checked by `wrpo spec
  validate`, `wrpo run` and the operator (the CRD cannot express them, so the apiserver admits the
  FusionRun): `cluster.pods.*.volumes` are named by unique DNS labels unlike the operator's own volumes
  (`spec`, `scratch`, `dshm`, `models`, `weights`, `checkpoints`); each of `volumeMounts` mounts one of
  them at an absolute path that is not one of the operator's (`/etc/wrpo`, `/work`, `/dev/shm`, `/models`,
  `/weights`); a pod's annotations (`cluster.podAnnotations` with the component's own) total at most
  256 KiB.
- **The cluster's rules** apply to FusionRun manifests (`wrpo spec validate run.yaml`, `wrpo run
  run.yaml`), to `wrpo spec validate --cluster` and on the apiserver: RULES. A manifest may use
  `metadata.generateName` (at most 35 characters: the apiserver adds 5) instead of `metadata.name`.

- **The cluster itself**: `wrpo spec validate --server [--kubeconfig F] [--namespace N]` (implies
  `--cluster`; needs the Kubernetes client, `pip install 'wrpo[operator]'`) renders the FusionRun and every
  child the operator would create for it — with the operator's own renderer,
  `wrpo_operator.admission.run_children` — and creates each with a server-side dry run on a live apiserver
  (the kubeconfig's current context; the namespace from `--namespace`, the manifest, the context, or
  `default`). The apiserver's refusals are printed one line each with the spec field they map to, e.g.
  `run.yaml: cluster.pods.training.affinity: the apiserver refused PyTorchJob demo-sft: ...`, exit code 2.
  The operator asks the same questions before it starts a run (docs/operator.md, "Admission"); the
  cluster needs the FusionRun CRD and, for the training stages, the Kubeflow training-operator.
  Without `--server` nothing leaves the machine. docs/gitops.md uses it as the pre-merge check of a GitOps
  repository of FusionRuns.

Every problem is reported at once, one line each, naming the file, the line and the field path
(`fusion.yaml:23: sampling.n: Input should be greater than or equal to 2`); the command exits with code
2 and never prints a traceback. Messages are printed as text: brackets in them are not markup.

Prompt files are read as UTF-8 with or without a byte-order mark and with any line ending; other
encodings are an error naming the file, the line and the byte offset. `prepare` refuses to commit an
empty SFT, preference or (with `evalSize`) eval split and names the counts. `tests/corpus/` holds the
wrong specs and prompt files with the message each must produce; the tests run them through the CLI
and, for specs, through the harness apiserver.

## Secrets

Credentials never go into a spec: URIs with `user:password@` are refused, and endpoint keys come from
`apiKeyEnv`, `apiKeyFile` or (on the cluster) `apiKeySecret`. A key is sent only over `https://` or to a
loopback host, unless the endpoint sets `allowHttp: true` (e.g. an in-cluster Service). A provider's error
body reaches messages cut to 200 characters, with the key and anything that looks like one replaced by
`***`; URLs in messages lose credentials and query strings. A local vLLM server process gets an explicit
environment (Python, accelerator, vLLM and Hugging Face variables; `WRPO_VLLM_ENV_PASS` adds names), so
our API keys and S3 credentials never reach it.
"""

_CLUSTER_RULE_WORDS = {
    "run_on_s3": "`storage.runUri` is `s3://bucket/prefix` (the pods share no local disk)",
    "batches_fit_devices": "`sft.batchSize` and `wrpo.batchSize` are multiples of `perDeviceBatchSize` × "
    "`cluster.training.nodes` × `procsPerNode`",
    "no_relative_paths": "no `./` or `../` paths for models and judges, and only absolute or s3:// paths for "
    "the dataset, eval prompts and `apiKeyFile`",
}


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " or ".join(json.dumps(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "null")


def _default(field) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "**required**"
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{json.dumps(value)}`" if not isinstance(value, float) else f"`{value:.6g}`"


def _metadata(annotation) -> list:
    """Constraint metadata inside an annotation (Annotated, also under Optional)."""
    out = []
    if typing.get_origin(annotation) is typing.Annotated:
        out += list(annotation.__metadata__)
        for m in annotation.__metadata__:
            out += list(getattr(m, "metadata", []))
    for arg in typing.get_args(annotation):
        out += _metadata(arg)
    return out


def _rules(field) -> str:
    bounds = {at.Ge: ("≥", "ge"), at.Gt: (">", "gt"), at.Le: ("≤", "le"), at.Lt: ("<", "lt")}
    out: list[str] = []
    for m in [*field.metadata, *_metadata(field.annotation)]:
        for kind, (sign, attr) in bounds.items():
            if isinstance(m, kind):
                out.append(f"{sign} {getattr(m, attr)}")
        if isinstance(m, at.MinLen) and m.min_length > 0:
            out.append(f"at least {m.min_length} long")
        if isinstance(m, at.MaxLen):
            out.append(f"at most {m.max_length} long")
        if isinstance(m, Check):
            out.append(m.message)
    return "; ".join(dict.fromkeys(out)).replace("|", "/")


def _models(model: type[BaseModel], seen: list[type[BaseModel]]) -> None:
    if model in seen:
        return
    seen.append(model)
    for field in model.model_fields.values():
        for arg in typing.get_args(field.annotation) + (field.annotation,):
            for inner in (arg, *typing.get_args(arg)):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    _models(inner, seen)


def spec_markdown() -> str:
    """The validation rules, then one table per model: key, type, default, rules, description."""
    models: list[type[BaseModel]] = []
    _models(FusionSpec, models)
    rules = "; ".join(_CLUSTER_RULE_WORDS.get(name, name) for name in CLUSTER_RULES)
    out = [HEADER.replace("RULES", rules)]
    for model in models:
        out += [f"## {model.__name__}", "", (model.__doc__ or "").strip(), "",
                "| key | type | default | rules | description |", "|---|---|---|---|---|"]
        for name, field in model.model_fields.items():
            key = field.alias or name
            out.append(f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {_rules(field)} | "
                       f"{(field.description or '').replace('|', '/')} |")
        out.append("")
    return "\n".join(out)
