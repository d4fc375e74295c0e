"""The `wrpo` typer app: wires the command groups and turns user errors (WrpoError, pydantic validation
of specs) into a one-line message and exit code 2."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from wrpo.cli import data, engine, eval, pipeline
from wrpo.errors import WrpoError

app = typer.Typer(
    name="wrpo",
    help="WRPO implicit model fusion: sample sources, score, SFT, and weighted-reward preference optimisation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for group in (engine, data, pipeline, eval):
    group.register(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except WrpoError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
