"""Training engine: SFT, reference log-probs and WRPO on transformers' Trainer.

Public entry points (local paths only; the stage layer handles object storage):
`run_sft(SFTConfig)`, `compute_reference_logps(model_dir, data_path, out_path, ...)`, `run_wrpo(WRPOConfig)`.
`wrpo.train.config` needs neither torch nor transformers; the entry points import them when first used.
"""

from __future__ import annotations

from typing import Any

from wrpo.train.config import ConfigError, SFTConfig, WRPOConfig, default_ref_path

_LAZY = {"run_sft": "wrpo.train.sft", "run_wrpo": "wrpo.train.wrpo_trainer",
         "compute_reference_logps": "wrpo.train.ref_logps"}

__all__ = ["ConfigError", "SFTConfig", "WRPOConfig", "compute_reference_logps", "default_ref_path", "run_sft",
           "run_wrpo"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
