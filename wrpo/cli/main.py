"""The `wrpo` typer app: wires the command groups and turns user errors (WrpoError, pydantic validation)
into plain lines on stderr, `error: <one problem>` each, and exit code 2 — never a traceback.

Messages are printed as text, never as rich markup: a pattern such as `[a-z0-9]` or a value containing
`[/x]` in a message is shown as it is (docs/spec.md, "Validation").
"""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

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


def error_lines(e: Exception) -> list[str]:
    """The problems of a user error, one per line."""
    if isinstance(e, ValidationError):
        return [f"{'.'.join(str(p) for p in err['loc']) or '<input>'}: {err['msg']}" for err in e.errors()]
    return str(e).splitlines() or [type(e).__name__]


def print_error(e: Exception) -> None:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    for line in error_lines(e):
        console.print(Text.assemble(("error: ", "bold red"), line), markup=False)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; `argv` (default: sys.argv[1:]) for calling it in-process."""
    succeeded = False
    try:
        try:
            app(args=argv)
        except SystemExit as e:  # typer ends every command with one; code 0/None is success
            succeeded = e.code in (None, 0)
            raise
        succeeded = True
    except (WrpoError, ValidationError) as e:
        print_error(e)
        sys.exit(2)
    finally:
        _end_process_group(wait_for_peers=succeeded)


def _end_process_group(wait_for_peers: bool) -> None:
    """Under torchrun: end the process group before exit, after a barrier when this rank succeeded.

    Without the barrier a rank that finished first tore its group down and exited while its peer was still
    in the last collectives of the final save; the peer then aborted at exit ("terminate called without an
    active exception", exit -6) although the work was done (tests/integration/test_train_multirank.py, on a
    loaded machine). A rank that failed skips the barrier: its peers are ended by torchrun."""
    dist = sys.modules.get("torch.distributed")  # never imports torch itself: the CLI shell is torch-free
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if wait_for_peers and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
