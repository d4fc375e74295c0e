"""The stage plan: one table whose rows say everything about a stage (docs/architecture.md, "The plan").

A row names the stage's body (an importable function `module:function`, called with a StageContext),
the stages it reads, the spec sections that change its output, its resource class (which `cluster.*`
section sizes its pods and whether it runs as a Job or a PyTorchJob) and the vLLM servers it needs
while it runs. The local runner (`wrpo.pipeline.runtime`), the stage pods (`wrpo stage`) and the
operator read these same rows: nothing dispatches on a stage's name.

A stage's hash covers the spec sections it reads and, recursively, the hashes of the stages it reads.
A committed stage whose manifest records the same hash is never run again; a spec change re-runs only
the stages whose hash changed (those that read what changed, and everything downstream of them).
Stages with `units="sources"` consist of one unit per source, each with its own hash (its source's
entry, the stage's other sections, the same source's unit of the stage it reads): adding or changing
one source redoes only that source's units (docs/architecture.md, "Units and shards"). Hashes are
taken over the values that differ from the defaults, so a release that adds an optional field changes
no hash (changing a default is a breaking change: bump HASH_VERSION).

Pure and torch-free: the operator imports it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from typing import Any, Literal

from wrpo.pipeline.servers import Server
from wrpo.pipeline.spec import EndpointSpec, FusionSpec

ResourceClass = Literal["small", "sampling", "scoring", "training"]
ServerKind = Literal["none", "sources", "target", "reward", "eval"]
UnitKind = Literal["stage", "sources"]
HASH_VERSION = 2  # part of every hash: bump it when the meaning of a spec value or default changes


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]  # stages whose outputs this one reads
    sections: tuple[str, ...]  # spec sections (camelCase keys of FusionSpec) that change its output
    body: str  # "module:function" taking a StageContext and returning a summary dict
    resource_class: ResourceClass  # small/sampling: cluster.small; scoring: cluster.scoring; training: PyTorchJob
    servers: ServerKind  # the vLLM servers it needs while it runs (see `servers`)
    outputs: tuple[str, ...]  # the main objects it writes, for humans and the summary table
    units: UnitKind = "stage"  # "sources": one unit per source, committed and hashed on its own
    shards: bool = False  # its work splits into shards that commit on their own (`--shard i/K`)
    assemble: str | None = None  # "module:function" making a unit's objects from its K parts (default: the
    # parts' JSONL objects concatenated in part order; a stage sharded by prompt hash merges them instead)
    publishes: str | None = None  # its folder that is the run's result (the operator's status.outputUri)
    summary: str | None = None  # the FusionRun status field its pod's summary fills (e.g. status.eval)

    def function(self) -> Callable[..., dict[str, Any]]:
        """The body, imported on first use (the operator never calls it, so never imports torch)."""
        return _imported(self.body)

    def assembler(self) -> Callable[..., dict[str, Any]] | None:
        """The function that assembles a sharded unit's parts (`assemble`), None for concatenation."""
        return _imported(self.assemble) if self.assemble else None

    @property
    def distributed(self) -> bool:
        """Runs under torchrun (a PyTorchJob on the cluster); only global rank 0 commits."""
        return self.resource_class == "training"


def _imported(path: str) -> Callable[..., Any]:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


_DATA, _ENGINE, _EVAL = "wrpo.data.stages", "wrpo.engine.stages", "wrpo.eval.stages"
STAGES: tuple[Stage, ...] = (
    Stage("prepare", (), ("dataset",), f"{_DATA}:prepare", "small", "none",
          ("sft.jsonl", "po.jsonl", "eval.jsonl")),
    Stage("sample-sources", ("prepare",), ("sources", "sampling"), f"{_DATA}:sample_sources", "sampling",
          "sources", ("<source>.jsonl",), units="sources"),
    Stage("score-sources", ("sample-sources",), ("reward",), f"{_DATA}:score_sources", "scoring", "reward",
          ("<source>.jsonl",), units="sources", shards=True),
    Stage("select-sources", ("score-sources",), ("selection",), f"{_DATA}:select_sources", "small", "none",
          ("sft.jsonl", "chosen_source.jsonl", "contributions.json"), shards=True,
          assemble=f"{_DATA}:assemble_select_sources"),
    Stage("sft", ("select-sources",), ("target", "sft", "training"), f"{_ENGINE}:sft", "training", "none",
          ("model/",)),
    Stage("sample-target", ("sft", "prepare"), ("sampling",), f"{_DATA}:sample_target", "sampling", "target",
          ("target.jsonl",)),
    Stage("score-target", ("sample-target",), ("reward",), f"{_DATA}:score_target", "scoring", "reward",
          ("target.jsonl",), shards=True),
    Stage("build-pairs", ("select-sources", "score-target"), ("selection",), f"{_DATA}:build_pairs", "small",
          "none", ("train.jsonl", "eval.jsonl", "stats.json"), shards=True, assemble=f"{_DATA}:assemble_build_pairs"),
    Stage("ref-logps", ("build-pairs", "sft"), ("wrpo",), f"{_ENGINE}:ref_logps", "scoring", "none",
          ("train.ref_logps.jsonl", "eval.ref_logps.jsonl"), shards=True),
    Stage("wrpo", ("build-pairs", "ref-logps", "sft"), ("wrpo", "training"), f"{_ENGINE}:wrpo", "training",
          "none", ("model/", "metrics.jsonl"), publishes="model/"),
    Stage("eval", ("prepare", "sft", "wrpo"), ("eval", "reward", "target"), f"{_EVAL}:evaluate", "scoring", "eval",
          ("results.json", "records.jsonl", "README.md"), summary="eval"),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}

# Fields that change how a stage runs but not what it produces: excluded from the hashes, so that
# e.g. raising the sampling concurrency does not re-sample everything.
_OPERATIONAL = {
    "sampling": {"concurrency", "requestTimeoutS", "maxRetries"},
    "training": {"saveSteps"},
    "reward": {"batchSize"},
    "target": {"replicas"},
    "source": {"replicas"},  # an entry of `sources`
    "eval": {"shardSize"},
}


def stage(name: str) -> Stage:
    """The stage called `name`; a clear error lists the valid names."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage '{name}'; stages: {', '.join(STAGE_NAMES)}") from None


def _section_blob(spec_json: dict, section: str) -> object:
    value = spec_json.get(section, {})
    drop = _OPERATIONAL.get(section)
    if drop and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in drop}
    return value


def _digest(payload: dict[str, Any]) -> str:
    blob = json.dumps({"v": HASH_VERSION, **payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def unit_names(spec: FusionSpec, name: str) -> list[str]:
    """The units of stage `name`: one per source for `units="sources"`, else the stage itself."""
    return [s.name for s in spec.sources] if stage(name).units == "sources" else [name]


@dataclass(frozen=True)
class Hashes:
    """Every stage's hash and, for stages made of units, every unit's hash."""

    stages: dict[str, str]
    units: dict[str, dict[str, str]]  # stage -> unit -> hash (only stages with units="sources")


def plan_hashes(spec: FusionSpec) -> Hashes:
    """The hashes of every stage and unit of `spec` (see module docstring)."""
    spec_json = spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    sources = {s["name"]: {k: v for k, v in s.items() if k not in _OPERATIONAL["source"]}
               for s in spec_json.get("sources", [])}

    @cache
    def unit(name: str, u: str) -> str:
        st = BY_NAME[name]
        return _digest({
            "stage": name, "unit": u, "source": sources.get(u, {}),
            "sections": {s: _section_blob(spec_json, s) for s in st.sections if s != "sources"},
            "needs": {n: unit(n, u) if BY_NAME[n].units == "sources" else h(n) for n in st.needs},
        })

    @cache
    def h(name: str) -> str:
        st = BY_NAME[name]
        if st.units == "sources":
            return _digest({"stage": name, "units": {u: unit(name, u) for u in unit_names(spec, name)}})
        return _digest({
            "stage": name,
            "sections": {s: _section_blob(spec_json, s) for s in st.sections},
            "needs": {n: h(n) for n in st.needs},
        })

    return Hashes({n: h(n) for n in STAGE_NAMES},
                  {n: {u: unit(n, u) for u in unit_names(spec, n)} for n in STAGE_NAMES
                   if BY_NAME[n].units == "sources"})


def stage_hashes(spec: FusionSpec) -> dict[str, str]:
    """sha256 per stage over its spec sections (or units) and its inputs' hashes."""
    return plan_hashes(spec).stages


def select_range(start: str | None, until: str | None) -> list[str]:
    """Stage names from `start` to `until` inclusive, in pipeline order."""
    names = list(STAGE_NAMES)
    i = names.index(stage(start).name) if start else 0
    j = names.index(stage(until).name) if until else len(names) - 1
    if i > j:
        raise ValueError(f"--from {start} comes after --until {until}")
    return names[i : j + 1]


# ---------------------------------------------------------------------------------------------- servers


def target_model_uri(run_uri: str) -> str:
    """Where Target-SFT is committed in a run directory."""
    return f"{run_uri.rstrip('/')}/sft/model/"


def fused_model_uri(run_uri: str) -> str:
    """Where the fused model is committed in a run directory: the folder of the row that `publishes` it (the
    run's result, the operator's status.outputUri)."""
    (row,) = [s for s in STAGES if s.publishes]
    return f"{run_uri.rstrip('/')}/{row.name}/{row.publishes}"


#: The models the eval stage compares (docs/eval.md), in table order: role -> where its weights are.
EVAL_ROLES = ("target", "sft", "fused")


def has_eval_prompts(spec: FusionSpec) -> bool:
    """The eval stage has prompts to answer: a question file, or a held-out eval split."""
    return spec.eval.prompts is not None or spec.dataset.eval_size > 0


def _reward_servers(spec: FusionSpec) -> list[Server]:
    """The reward model's server: a pooling server (type remote without an endpoint) or the judge model
    whose grades are the reward (type judge with a model)."""
    r = spec.reward
    if r.type == "remote" and r.endpoint is None:
        return [Server("reward", r.served_name, r.model or "", "pooling", 1, r.max_length)]
    if r.type == "judge" and r.judge is not None and r.judge.model:
        j = r.judge
        return [Server("reward", j.served_name, j.model, "generate", j.tensor_parallel_size, j.max_model_len,
                       args=tuple(j.vllm_args))]
    return []


def _eval_servers(spec: FusionSpec, run_uri: str) -> list[Server]:
    """The eval stage's servers: the three compared models (`source` = their role, the --endpoint key),
    the local LLM judge and the reward model's server, if any."""
    if not has_eval_prompts(spec):
        return []
    t = spec.target
    models = {"target": t.model, "sft": target_model_uri(run_uri), "fused": fused_model_uri(run_uri)}
    out = [Server(f"eval-{role}", role, models[role], "generate", t.tensor_parallel_size, args=tuple(t.vllm_args),
                  source=role, replicas=t.replicas) for role in EVAL_ROLES]
    j = spec.eval.judge
    if j is not None and j.model:
        out.append(Server("judge", j.served_name, j.model, "generate", j.tensor_parallel_size, j.max_model_len,
                          args=tuple(j.vllm_args), source="judge"))
    if spec.eval.reward_model:
        out += _reward_servers(spec)
    return out


def servers(spec: FusionSpec, name: str, run_uri: str) -> list[Server]:
    """The vLLM servers stage `name` needs while it runs (external endpoints need none), each with the engine
    seed `sampling.seed`. Servers of one stage that are the same process (`Server.identity`: e.g. an eval
    judge that is also the reward judge) are started once: the first one plays the others' roles and
    answers to their served names (`Server.roles`, `Server.aliases`). A stage made of source units keeps
    one server per source: each unit holds its own."""
    kind = stage(name).servers
    if kind == "sources":
        found = [Server(f"src-{s.name}", s.name, s.model, "generate", s.tensor_parallel_size, s.max_model_len,
                        s.gpu_memory_utilization, tuple(s.vllm_args), source=s.name, replicas=s.replicas)
                 for s in spec.sources if s.model]
    elif kind == "target":
        t = spec.target
        found = [Server("target", t.served_name, target_model_uri(run_uri), "generate", t.tensor_parallel_size,
                        args=tuple(t.vllm_args), replicas=t.replicas)]
    elif kind == "reward":
        found = _reward_servers(spec)
    elif kind == "eval":
        found = _eval_servers(spec, run_uri)
    else:
        found = []
    found = [replace(s, seed=spec.sampling.seed) for s in found]
    return found if kind == "sources" else _started_once(found)


def _started_once(found: list[Server]) -> list[Server]:
    """`found` with every server that is the same process as an earlier one merged into that one."""
    out: list[Server] = []
    for s in found:
        same = next((i for i, o in enumerate(out) if o.identity() == s.identity()), None)
        if same is None:
            out.append(s)
            continue
        o = out[same]
        names = tuple(n for n in dict.fromkeys((*o.aliases, s.served_name, *s.aliases)) if n != o.served_name)
        out[same] = replace(o, aliases=names, roles=(*o.roles, s.key, *s.roles))
    return out


def external_endpoints(spec: FusionSpec, name: str) -> list[EndpointSpec]:
    """The external OpenAI-compatible endpoints stage `name` calls (their API keys reach its pod)."""
    kind = stage(name).servers
    found: list[EndpointSpec | None] = []
    if kind == "sources":
        found = [s.endpoint for s in spec.sources]
    judge_reward = spec.reward.judge if spec.reward.type == "judge" else None
    if kind == "reward" or (kind == "eval" and spec.eval.reward_model):
        found.append(judge_reward.endpoint if judge_reward else None)
    if kind == "eval" and spec.eval.judge is not None:
        found.append(spec.eval.judge.endpoint)
    return [e for e in found if e is not None]
