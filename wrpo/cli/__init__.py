"""The command line (`wrpo ...`, typer): the top layer, which may import every other layer.

`main.py` wires the command groups (`pipeline.py`: run/stage/spec/report/...; `data.py`: batch files and
serving; `engine.py`: tiny-models/sft/ref-logps/train) and prints user errors without a traceback.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (`wrpo`)."""
    from wrpo.cli.main import main as run

    run(argv)
