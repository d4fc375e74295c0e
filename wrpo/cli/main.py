"""The `wrpo` typer app: wires the command groups and turns user errors (WrpoError, pydantic validation)
into plain lines on stderr, `error: <one problem>` each, and exit code 2 — never a traceback.

Messages are printed as text, never as rich markup: a pattern such as `[a-z0-9]` or a value containing
`[/x]` in a message is shown as it is (docs/spec.md, "Validation").
"""

from __future__ import annotations

import logging
import os
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
    """Under torchrun: end the process group before exit; a rank that succeeded first waits for its peers at a
    barrier and then leaves without the interpreter's teardown.

    After all its work was done and written, a rank sometimes aborted in the C++ teardown at interpreter exit
    ("terminate called without an active exception", exit -6, no Python frame left), while its peer was still
    saving the final model: seen about once in 15 runs of tests/integration/test_train_multirank.py's ZeRO-3
    case on a loaded machine, with and without destroy_process_group(). torchrun and the training operators
    read that exit code, so a finished stage was marked Failed and restarted. Hence: a barrier (no rank leaves
    while another is in the last collectives of the final save), the group ended, output flushed, and
    os._exit(0), which skips the static destructors where the abort happens. A rank that failed skips all of
    this: its peers are ended by torchrun."""
    dist = sys.modules.get("torch.distributed")  # never imports torch itself: the CLI shell is torch-free
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if not wait_for_peers:
        dist.destroy_process_group()
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun worker: nothing after this process but its exit code
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
