"""Fixtures shared by every test layer. Nothing here reaches a network: hubs are switched off."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    """The tiny models of `wrpo tiny-models`, written once per session.

    Returns the folder; sub-folders are named in `wrpo.models.tiny.MODEL_NAMES`."""
    from wrpo.models.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    write_tiny_models(root)
    return root
