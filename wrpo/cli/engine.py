"""`wrpo` commands of the training engine: `tiny-models`, `sft`, `ref-logps`, `train`.

torch and transformers are imported inside the command functions so that `wrpo --help` and the operator
image work without them. The options of `sft` and `train` are generated from the config dataclasses
(`wrpo.engine.config`), so flags, help texts and paper defaults cannot drift from the configs.
"""

from __future__ import annotations

import inspect
import json
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Literal

import typer

from wrpo.engine.config import SFTConfig, WRPOConfig


def _cli_type(hint: Any) -> Any:
    """The type typer parses for a config field (Literal → its values' type; Optional stays Optional)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0])
    if len(args) == 1 and type(None) in typing.get_args(hint):
        return _cli_type(args[0]) | None
    return hint


def _options(cls: type) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(cls)
    params = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        hint = hints[f.name]
        if typing.get_origin(hint) is Literal:
            help_text += f" [one of: {', '.join(str(c) for c in typing.get_args(hint))}]"
        flag = f"--{f.name.replace('_', '-')}"
        if hint is bool:
            flag = f"{flag}/--no-{f.name.replace('_', '-')}"
        option = typer.Option(default, flag, help=help_text)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=_cli_type(hint)))
    return params


def _config_command(cls: type, run: Any, doc: str) -> Any:
    """A typer command whose options are the fields of `cls`; it builds the config and calls `run`."""

    def command(**kwargs: Any) -> None:
        summary = run(cls(**kwargs))
        typer.echo(json.dumps(summary, default=str))

    command.__signature__ = inspect.Signature(_options(cls))  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command


def _run_sft(cfg: SFTConfig) -> dict:
    from wrpo.engine.sft import run_sft

    return run_sft(cfg)


def _run_wrpo(cfg: WRPOConfig) -> dict:
    from wrpo.engine.wrpo_trainer import run_wrpo

    return run_wrpo(cfg)


def ref_logps(
    model: Path = typer.Option(..., help="Reference model folder (Target-SFT)."),
    data: Path = typer.Option(..., help="Preference JSONL (quadruples)."),
    out: Path | None = typer.Option(None, help="Output JSONL (default: <data>.ref_logps.jsonl beside it)."),
    max_length: int = typer.Option(2048, help="Maximum tokens of prompt + one response (as in training)."),
    max_prompt_length: int = typer.Option(1024, help="Prompt kept from its end up to this many tokens."),
    batch_size: int = typer.Option(8, help="Sequences per forward pass."),
    precision: str = typer.Option("auto", help="auto = bf16 on a GPU that supports it, else fp32."),
) -> None:
    """Compute log πref(y|x) of every response once and store it beside the dataset."""
    from wrpo.engine.ref_logps import compute_reference_logps

    path = compute_reference_logps(model, data, out, max_length=max_length,
                                   max_prompt_length=max_prompt_length, batch_size=batch_size,
                                   precision=precision)
    typer.echo(str(path))


def tiny_models(
    out_dir: Path = typer.Argument(..., help="Folder to write the tiny models into (one sub-folder each)."),
    seed: int = typer.Option(1234, help="Random seed of the initialisation and the short pre-training."),
    pretrain_steps: int = typer.Option(80, help="LM steps on the packaged corpus (0: pure random weights)."),
) -> None:
    """Write tiny Qwen2/Llama models, their tokenizers and a tiny reward model (offline, deterministic)."""
    from wrpo.models.tiny import write_tiny_models

    for name, path in write_tiny_models(out_dir, seed=seed, pretrain_steps=pretrain_steps).items():
        typer.echo(f"{name}\t{path}")


def register(app: typer.Typer) -> None:
    """Add this group's commands to the top-level app."""
    app.command("tiny-models")(tiny_models)
    app.command("sft")(_config_command(SFTConfig, _run_sft, "Target-SFT on y_ws (completion-only loss)."))
    app.command("ref-logps")(ref_logps)
    app.command("train")(_config_command(
        WRPOConfig, _run_wrpo, "WRPO (or a DPO/IPO/SimPO baseline) with stored reference log-probs."))
