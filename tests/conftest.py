"""Fixtures shared by every test layer. Nothing here reaches a network: hubs are switched off."""

from __future__ import annotations

import os
import signal
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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """The tiny models of `wrpo tiny-models`, written once per session.

    Returns the folder; sub-folders are named in `wrpo.models.tiny.MODEL_NAMES`."""
    from wrpo.models.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    write_tiny_models(root)
    return root
