"""Fixtures shared by every test layer. Nothing here reaches a network: hubs are switched off."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """The tiny models of `wrpo tiny-models`, written once per session.

    Returns the folder; sub-folders are named in `wrpo.models.tiny.MODEL_NAMES`."""
    from wrpo.models.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    write_tiny_models(root)
    return root
