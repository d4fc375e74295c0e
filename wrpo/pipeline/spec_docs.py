"""docs/spec.md, generated from FusionSpec (`wrpo spec docs`); a test fails when it drifts."""

from __future__ import annotations

import json
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from wrpo.pipeline.spec import FusionSpec

HEADER = """# FusionSpec reference

Generated from `wrpo/pipeline/spec.py` by `wrpo spec docs > docs/spec.md`; do not edit by hand.
Keys are camelCase; the same document is the `.spec` of a `FusionRun`. Defaults are the paper's.
"""


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
    """One table per model: key, type, default, description."""
    models: list[type[BaseModel]] = []
    _models(FusionSpec, models)
    out = [HEADER]
    for model in models:
        out += [f"## {model.__name__}", "", (model.__doc__ or "").strip(), "",
                "| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            key = field.alias or name
            out.append(f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | "
                       f"{(field.description or '').replace('|', '/')} |")
        out.append("")
    return "\n".join(out)
