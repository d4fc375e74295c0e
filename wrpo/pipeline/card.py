"""The fused model's card: a Hugging Face model card (README.md with YAML metadata) naming the run's
lineage - target, sources and their share of y_ws, reward model, hyper-parameters, spec and stage hashes,
and the eval table when there is one (docs/eval.md, "Model card and export").

The wrpo stage writes it beside the fused model (`wrpo/model/README.md`); the eval stage writes the same
card with its table (`eval/README.md`), which `wrpo export` ships. Pure and torch-free: the table comes in
as Markdown, the stages' numbers as dicts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath
from typing import Any

import yaml

from wrpo.pipeline.spec import FusionSpec

TAGS = ("wrpo", "model-fusion", "implicit-model-fusion", "preference-optimization", "dpo")


def spec_digest(spec: FusionSpec) -> str:
    """sha256 of the whole spec (camelCase JSON, sorted keys)."""
    blob = json.dumps(spec.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def public_name(uri: str | None) -> str | None:
    """A model or dataset reference fit for a published card: hub ids as they are, paths and URIs by their
    last component (no machine paths or bucket names)."""
    if not uri:
        return None
    if uri.startswith(("/", "./", "../", "s3://", "file://", "~")):
        return PurePosixPath(uri.rstrip("/")).name or uri
    return uri


def _source_model(source: Any) -> str:
    return public_name(source.model) or f"{source.endpoint.model} (endpoint)"


def _reward_name(spec: FusionSpec) -> str:
    r = spec.reward
    if r.type == "judge" and r.judge is not None:
        j = r.judge
        judge = j.endpoint.model if j.endpoint else public_name(j.model)
        return f"LLM judge {judge} (1-10 grade)"
    return f"{public_name(r.model) or r.endpoint} ({r.type})"


def front_matter(spec: FusionSpec) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "base_model": public_name(spec.target.model),
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": list(TAGS),
        "datasets": [public_name(spec.dataset.uri)],
    }
    return meta


def model_card(spec: FusionSpec, hashes: dict[str, str], contributions: dict[str, Any] | None = None,
               training: dict[str, Any] | None = None, eval_table: str | None = None,
               name: str = "Fused model") -> str:
    """The card's Markdown (see the module docstring). `contributions`: select-sources' shares
    (`{"counts": .., "shares": ..}`); `training`: the wrpo stage's summary; `eval_table`: Markdown."""
    meta = yaml.safe_dump(front_matter(spec), sort_keys=False, allow_unicode=True)
    w, s = spec.wrpo, spec.sft
    lines = [f"---\n{meta}---", "", f"# {name}", "",
             f"`{public_name(spec.target.model)}` fused with {len(spec.sources)} source LLM(s) by WRPO "
             "(Weighted-Reward Preference Optimization for implicit model fusion, ICLR 2025): Target-SFT on the "
             "sources' best answers, then preference optimisation whose chosen answer moves from the target's "
             "own best answer to the sources' best answer.", "",
             "## Sources", "", "| source | model | share of y_ws |", "|---|---|---|"]
    shares = (contributions or {}).get("shares", {})
    for src in spec.sources:
        share = shares.get(src.name)
        lines.append(f"| {src.name} | `{_source_model(src)}` | {'' if share is None else f'{100 * share:.1f}%'} |")
    lines += ["", f"Reward model: `{_reward_name(spec)}`.", "",
              "## Hyper-parameters", "", "| stage | setting | value |", "|---|---|---|",
              f"| SFT | learning rate, epochs, batch | {s.learning_rate:g}, {s.epochs:g}, {s.batch_size} |",
              f"| WRPO | objective, β, α (schedule) | {w.objective}, {w.beta:g}, {w.alpha:g} ({w.alpha_schedule}) |",
              f"| WRPO | learning rate, epochs, batch | {w.learning_rate:g}, {w.epochs:g}, {w.batch_size} |",
              f"| sampling | N, temperature, top-p | {spec.sampling.n}, {spec.sampling.temperature:g}, "
              f"{spec.sampling.top_p:g} |"]
    if training:
        numbers = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in training.items()
                            if isinstance(v, int | float) and not isinstance(v, bool))
        lines += ["", f"Training: {numbers}."]
    lines += ["", "## Evaluation", ""]
    lines += [eval_table.strip()] if eval_table else [
        "Not evaluated yet: the run's `eval` stage writes this card with its table (`wrpo export` ships it)."]
    lines += ["", "## Lineage", "", f"- spec sha256: `{spec_digest(spec)}`"]
    lines += [f"- stage `{stage}`: `{h[:16]}`" for stage, h in hashes.items() if stage in ("wrpo", "eval", "sft")]
    return "\n".join(lines) + "\n"


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata of a card (between the leading `---` lines)."""
    if not text.startswith("---\n"):
        raise ValueError("a model card starts with '---' and its YAML metadata")
    head, sep, _ = text[4:].partition("\n---")
    if not sep:
        raise ValueError("the card's YAML metadata has no closing '---'")
    return yaml.safe_load(head) or {}
