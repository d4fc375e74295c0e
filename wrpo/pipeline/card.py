"""The fused model's card: a Hugging Face model card (README.md with YAML metadata) naming the run's
lineage - target, sources and their share of y_ws, reward model, hyper-parameters, spec and stage hashes,
and the eval table when there is one (docs/eval.md, "Model card and export").

The wrpo stage writes it beside the fused model (`wrpo/model/README.md`); the eval stage writes the same
card with its table (`eval/README.md`), which `wrpo export` ships. The YAML header is what the Hugging Face
Hub expects, built with huggingface_hub's own `ModelCardData`: `base_model` is the target's Hub id when it
has one, `license` is inherited from the target's card, `datasets` lists Hub ids only, the sources are in
`fusion`, and `model-index` carries the eval results (docs/eval.md, "Model card and export"). A path, a
bucket or a folder name never enters the header. `model_card` is pure and torch-free (the table comes in as
Markdown, the stages' numbers as dicts); `read_target_card` is the one function that reads files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from wrpo.pipeline.spec import FusionSpec
from wrpo.storage import S3Options, StorageError, read_uri_bytes

log = logging.getLogger(__name__)
TAGS = ("wrpo", "model-fusion", "implicit-model-fusion", "preference-optimization", "dpo")
#: The license fields of a card that the fused model inherits from its target's card.
LICENSE_KEYS = ("license", "license_name", "license_link")
#: Eval win rates in the model-index: (comparison, judge in results.json, key, metric type, what it is).
EVAL_METRICS = (("fused_vs_target", "rm", "win_rate", "win_rate", "Win rate vs the target (reward model)"),
                ("fused_vs_target", "rm", "lc_win_rate", "lc_win_rate",
                 "Length-controlled win rate vs the target (reward model)"),
                ("fused_vs_target", "judge", "win_rate", "judge_win_rate", "Win rate vs the target (LLM judge)"),
                ("fused_vs_sft", "rm", "win_rate", "win_rate_vs_sft", "Win rate vs Target-SFT (reward model)"),
                ("fused_vs_sft", "judge", "win_rate", "judge_win_rate_vs_sft", "Win rate vs Target-SFT (LLM judge)"))


def hub_id(text: str | None) -> str | None:
    """`text` when it is a Hub repo id `owner/name` (not a path, URI or bare folder name), else None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not text or text.count("/") != 1 or text.startswith((".", "~")) or "://" in text:
        return None
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def _given_hub_id(model: str) -> str | None:
    """A spec's model string when it names a Hub model (transformers loads an existing folder first)."""
    return None if model.startswith("s3://") or Path(model).exists() else hub_id(model)


def cache_id(path: str, kind: str = "models") -> str | None:
    """The repo id of a file or folder in the Hugging Face cache (`.../models--owner--name/snapshots/...`)."""
    m = re.search(rf"(?:^|/){kind}--([^/]+?)--([^/]+?)(?:/|$)", path)
    return hub_id(f"{m.group(1)}/{m.group(2)}") if m else None


@dataclass(frozen=True)
class TargetCard:
    """What the fused model's card inherits from its target: the Hub id (None when unknown) and the license
    fields of the target's own card."""

    hub_id: str | None = None
    license: dict[str, str] = field(default_factory=dict)


def read_target_card(uri: str, s3: S3Options | None = None) -> TargetCard:
    """The target's Hub id and license: a Hub id as given; a local or s3:// folder by its Hugging Face cache
    path or its config.json's `_name_or_path` when that is a Hub id (never the folder's name); the license
    from its README.md's YAML header (for a Hub id: the cached or downloaded card, when it can be had)."""
    folder = uri.rstrip("/")
    given = _given_hub_id(uri)
    if given:
        return TargetCard(given, _license(_hub_readme(given), given))

    def read(name: str) -> str:
        try:
            return read_uri_bytes(f"{folder}/{name}", s3).decode("utf-8", "replace")
        except (StorageError, OSError):
            return ""

    try:
        recorded = json.loads(read("config.json") or "{}").get("_name_or_path")
    except ValueError:
        recorded = None
    found = cache_id(folder) or hub_id(recorded if isinstance(recorded, str) else None)
    return TargetCard(found, _license(read("README.md"), found))


def _hub_readme(repo_id: str) -> str:
    """A Hub model's README.md from the local cache or the Hub; "" when it cannot be had (offline, gated)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "README.md")).read_text(encoding="utf-8", errors="replace")
    except Exception as e:  # noqa: BLE001 - any failure only means no inherited license
        log.info("model card: no README.md of %s (%s); the card names no license", repo_id, e)
        return ""


def _license(readme: str, repo_id: str | None) -> dict[str, str]:
    """The license fields of a card's header. A relative `license_link` (a file of the target's repo, which
    the fused model does not ship) points into the target's Hub repo, or is dropped when that is unknown."""
    try:
        meta = parse_front_matter(readme) if readme else {}
    except (ValueError, yaml.YAMLError):
        return {}
    out = {k: str(meta[k]) for k in LICENSE_KEYS if isinstance(meta, dict) and meta.get(k)}
    link = out.get("license_link")
    if link and "://" not in link:
        out.pop("license_link")
        if repo_id:
            out["license_link"] = f"https://huggingface.co/{repo_id}/blob/main/{link.lstrip('./')}"
    return out


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


def _source_entry(source: Any) -> dict[str, str]:
    entry = {"name": source.name}
    if source.model is not None:
        found = cache_id(source.model) or _given_hub_id(source.model)
        if found:
            entry["model"] = found
    else:
        entry["endpoint_model"] = source.endpoint.model
    return entry


def _eval_results(results: dict[str, Any], dataset: str | None) -> list[Any]:
    """huggingface_hub EvalResults (win rates in %) of an eval stage's results.json."""
    from huggingface_hub import EvalResult

    source = results.get("source") or "eval prompts"
    where = "held-out eval split" if source == "the held-out eval split" else public_name(source)
    out = []
    for comparison, judge, key, metric, label in EVAL_METRICS:
        value = ((results.get("comparisons", {}).get(comparison) or {}).get(judge) or {}).get(key)
        if value is not None:
            out.append(EvalResult(task_type="text-generation", task_name="Text Generation",
                                  dataset_type=dataset or "custom", dataset_name=where or "eval prompts",
                                  metric_type=metric, metric_value=round(100 * value, 1), metric_name=label))
    return out


def front_matter(spec: FusionSpec, target: TargetCard | None = None, eval_results: dict[str, Any] | None = None,
                 name: str = "Fused model") -> dict[str, Any]:
    """The card's YAML header, through huggingface_hub's ModelCardData (see the module docstring)."""
    from huggingface_hub import ModelCardData

    target = target or TargetCard()
    dataset = cache_id(spec.dataset.uri, "datasets")
    results = _eval_results(eval_results, dataset) if eval_results else []
    data = ModelCardData(base_model=target.hub_id, library_name="transformers", pipeline_tag="text-generation",
                         tags=list(TAGS), datasets=[dataset] if dataset else None, **target.license,
                         model_name=name if results else None, eval_results=results or None,
                         fusion={"method": "WRPO", "sources": [_source_entry(s) for s in spec.sources]})
    return data.to_dict()


def model_card(spec: FusionSpec, hashes: dict[str, str], contributions: dict[str, Any] | None = None,
               training: dict[str, Any] | None = None, eval_table: str | None = None,
               name: str = "Fused model", target: TargetCard | None = None,
               eval_results: dict[str, Any] | None = None) -> str:
    """The card's Markdown (see the module docstring). `contributions`: select-sources' shares
    (`{"counts": .., "shares": ..}`); `training`: the wrpo stage's summary; `eval_table`: Markdown;
    `target`: `read_target_card`'s; `eval_results`: the eval stage's results.json (the model-index)."""
    meta = yaml.safe_dump(front_matter(spec, target, eval_results, name), sort_keys=False, allow_unicode=True)
    w, s = spec.wrpo, spec.sft
    lines = [f"---\n{meta}---", "", f"# {name}", "",
             f"`{(target and target.hub_id) or public_name(spec.target.model)}` fused with {len(spec.sources)} "
             "source LLM(s) by WRPO "
             "(Weighted-Reward Preference Optimization for implicit model fusion, ICLR 2025): Target-SFT on the "
             "sources' best answers, then preference optimisation whose chosen answer moves from the target's "
             "own best answer to the sources' best answer.", "",
             "## Sources", "", "| source | model | share of y_ws |", "|---|---|---|"]
    shares = (contributions or {}).get("shares", {})
    for src in spec.sources:
        share = shares.get(src.name)
        lines.append(f"| {src.name} | `{_source_model(src)}` | {'' if share is None else f'{100 * share:.1f}%'} |")
    lines += ["", f"Reward model: `{_reward_name(spec)}`. Prompts: `{public_name(spec.dataset.uri)}`.", "",
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
