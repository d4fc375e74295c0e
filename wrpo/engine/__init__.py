"""The training engine: losses, α schedules, collation, log-probs, the SFT and WRPO trainers, and the
training stages' bodies.

`losses.py` and `schedule.py` are pure (torch only); `collate.py`, `logps.py`; `config.py` (typed trainer
configs, no torch), `common.py`, `data.py`, `trainer.py` (the skeleton SFT and WRPO share), `sft.py`,
`wrpo_trainer.py`, `ref_logps.py`; `stages.py` (the bodies of sft, ref-logps, wrpo: the only module here that
imports `wrpo.pipeline`).

Public entry points (local paths only): `run_sft(SFTConfig)`, `compute_reference_logps(...)`,
`run_wrpo(WRPOConfig)`; imported lazily. Never imports `wrpo.data`. See docs/architecture.md.
"""

from __future__ import annotations

from typing import Any

from wrpo.engine.config import ConfigError, SFTConfig, WRPOConfig, default_ref_path

_LAZY = {"run_sft": "wrpo.engine.sft", "run_wrpo": "wrpo.engine.wrpo_trainer",
         "compute_reference_logps": "wrpo.engine.ref_logps"}

__all__ = ["ConfigError", "SFTConfig", "WRPOConfig", "compute_reference_logps", "default_ref_path", "run_sft",
           "run_wrpo"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
