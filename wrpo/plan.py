"""The stage graph and per-stage spec hashes. Pure and torch-free: the operator uses it too.

A stage's hash covers the spec sections it reads and, recursively, the hashes of the stages it reads.
A committed stage whose manifest records the same hash is never run again; a spec change re-runs only
the stages whose hash changed (those that read what changed, and everything downstream of them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache

from wrpo.spec import FusionSpec


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]  # stages whose outputs this one reads
    sections: tuple[str, ...]  # spec sections (camelCase keys of FusionSpec) that change its output
    kind: str  # "small" | "sampling" | "scoring" | "training": how the operator runs it
    outputs: tuple[str, ...]  # the main objects it writes, for humans and the summary table


STAGES: tuple[Stage, ...] = (
    Stage("prepare", (), ("dataset",), "small", ("sft.jsonl", "po.jsonl", "eval.jsonl")),
    Stage("sample-sources", ("prepare",), ("sources", "sampling"), "sampling", ("<source>.jsonl",)),
    Stage("score-sources", ("sample-sources",), ("reward",), "scoring", ("<source>.jsonl",)),
    Stage("select-sources", ("score-sources",), ("selection",), "small",
          ("sft.jsonl", "chosen_source.jsonl", "contributions.json")),
    Stage("sft", ("select-sources",), ("target", "sft", "training"), "training", ("model/",)),
    Stage("sample-target", ("sft", "prepare"), ("sampling",), "sampling", ("target.jsonl",)),
    Stage("score-target", ("sample-target",), ("reward",), "scoring", ("target.jsonl",)),
    Stage("build-pairs", ("select-sources", "score-target"), ("selection",), "small",
          ("train.jsonl", "eval.jsonl", "stats.json")),
    Stage("ref-logps", ("build-pairs", "sft"), ("wrpo",), "scoring", ("train.jsonl", "eval.jsonl")),
    Stage("wrpo", ("build-pairs", "ref-logps", "sft"), ("wrpo", "training"), "training",
          ("model/", "metrics.jsonl")),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}

# Fields that change how a stage runs but not what it produces: excluded from the hashes, so that
# e.g. raising the sampling concurrency does not re-sample everything.
_OPERATIONAL = {
    "sampling": {"concurrency", "requestTimeoutS", "maxRetries"},
    "training": {"saveSteps"},
    "reward": {"batchSize"},
}


def stage(name: str) -> Stage:
    """The stage called `name`; a clear error lists the valid names."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage '{name}'; stages: {', '.join(STAGE_NAMES)}") from None


def _section_blob(spec_json: dict, section: str) -> object:
    value = spec_json[section]
    drop = _OPERATIONAL.get(section)
    if drop and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in drop}
    return value


def stage_hashes(spec: FusionSpec) -> dict[str, str]:
    """sha256 per stage over its spec sections and its inputs' hashes (see module docstring)."""
    spec_json = spec.model_dump(mode="json", by_alias=True)

    @cache
    def h(name: str) -> str:
        st = BY_NAME[name]
        payload = {
            "stage": name,
            "sections": {s: _section_blob(spec_json, s) for s in st.sections},
            "needs": {n: h(n) for n in st.needs},
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    return {name: h(name) for name in STAGE_NAMES}


def select_range(start: str | None, until: str | None) -> list[str]:
    """Stage names from `start` to `until` inclusive, in pipeline order."""
    names = list(STAGE_NAMES)
    i = names.index(stage(start).name) if start else 0
    j = names.index(stage(until).name) if until else len(names) - 1
    if i > j:
        raise ValueError(f"--from {start} comes after --until {until}")
    return names[i : j + 1]
