"""Fixtures shared by every test layer. Nothing here reaches a network: hubs are switched off."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

# Subprocesses (`python -m wrpo.cli`, torchrun, the operator) import this checkout too, however pytest was
# started (pyproject's `pythonpath` covers this process only): README.md, "Testing".
_ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(_ROOT), str(_ROOT / "operator"), *filter(None, [os.environ.get("PYTHONPATH")])])


def _terminated(signum, frame):
    raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")


def pytest_configure(config):
    """SIGTERM (a cancelled CI job, `timeout`) ends the session as Ctrl-C does: fixtures tear down, so the
    servers and the control plane they started in sessions of their own are stopped, and the report (with
    --durations) is printed. Python's default would exit at once and leave all of them running."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
    # The runs' local work folders (wrpo.pipeline.workdir): this session's own, never the user's
    # ~/.cache/wrpo/work, which is keyed by run URI alone, so two sessions side by side (the runs scripts/test.sh
    # starts) running a run of the same URI against their own S3 servers would share one folder.
    if not os.environ.get("WRPO_WORKDIR"):
        work = tempfile.mkdtemp(prefix="wrpo-test-work-")
        os.environ["WRPO_WORKDIR"] = work
        config.add_cleanup(lambda: shutil.rmtree(work, ignore_errors=True))


SHARD_ENV = "WRPO_TEST_SHARD"


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: the shards split what that run selected
def pytest_collection_modifyitems(config, items):
    """$WRPO_TEST_SHARD=K/N keeps the tests of every N-th test file, starting at the K-th (0-based) in path
    order: scripts/test.sh runs the cluster tests as such shards side by side, each with its own control
    plane, since most of them wait on controllers and pods more than they compute. Whole files, so that a
    module's fixtures (an operator, a namespace) are set up once."""
    text = os.environ.get(SHARD_ENV, "").strip()
    if not text:
        return
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise pytest.UsageError(f"{SHARD_ENV}={text!r}: expected K/N with 0 <= K < N")
    files = sorted({item.path for item in items})
    mine = {f for i, f in enumerate(files) if i % int(n) == int(k)}
    kept = [item for item in items if item.path in mine]
    config.hook.pytest_deselected(items=[item for item in items if item.path not in mine])
    items[:] = kept


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """The tiny models of `wrpo tiny-models`, written once per session.

    Returns the folder; sub-folders are named in `wrpo.models.tiny.MODEL_NAMES`."""
    from wrpo.models.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    write_tiny_models(root)
    return root
