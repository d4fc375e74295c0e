"""Typed configs of the trainers, defaults from the paper (Sec. 4 "Training Details", App. A).

Every field has a help text (used by the CLI) and is validated once in `__post_init__`; a bad value raises
ConfigError naming the field. Field names mirror `wrpo.pipeline.spec.SFTSpec`, `WRPOSpec` and `TrainingSpec`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from wrpo.errors import WrpoError


class ConfigError(WrpoError):
    """A training option is invalid; the message names the option."""


def check_choices(cfg: object) -> None:
    """Every Literal-typed field holds one of its choices."""
    for name, hint in typing.get_type_hints(type(cfg)).items():
        if typing.get_origin(hint) is Literal and getattr(cfg, name) not in typing.get_args(hint):
            choices = ", ".join(str(c) for c in typing.get_args(hint))
            raise ConfigError(f"{name} must be one of {choices}; got {getattr(cfg, name)!r}")


def _f(default, help: str, **kw):  # noqa: A002 - mirrors argparse/typer vocabulary
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainCommon:
    """Options shared by SFT and WRPO."""

    model: Path = _f(Path("."), "Folder of the model to train (safetensors + tokenizer).")
    data: Path = _f(Path("train.jsonl"), "Training JSONL.")
    output_dir: Path = _f(Path("out"), "Output folder: model/, metrics.jsonl, checkpoints/.")
    eval_data: Path | None = _f(None, "Optional evaluation JSONL.")
    learning_rate: float = _f(3e-7, "Peak learning rate.")
    epochs: float = _f(1.0, "Training epochs.")
    batch_size: int = _f(128, "Global batch size: examples per optimizer step over all processes.")
    per_device_batch_size: int = _f(2, "Micro-batch per process; accumulation makes up the rest.")
    max_length: int = _f(2048, "Maximum tokens of prompt + one response.")
    max_prompt_length: int = _f(1024, "Prompt kept from its end up to this many tokens.")
    warmup_ratio: float = _f(0.1, "Warm-up share of the optimizer steps.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = _f("cosine", "Learning-rate schedule.")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs).")
    layout: Literal["auto", "padded", "packed", "shared"] = _f(
        "auto", "Batch layout: shared (a prompt once per example, its responses after it), packed "
        "(padding-free, varlen attention) or padded; auto = packed with flash attention, else shared where the "
        "model supports it (WRPO), else padded.")
    attn_implementation: str | None = _f(None, "Attention kernel (sdpa, flash_attention_2...); default sdpa.")
    logps_chunk_size: int = _f(1024, "Response tokens per LM-head chunk in the log-prob computation.")
    deepspeed_stage: Literal[0, 2, 3] = _f(0, "DeepSpeed ZeRO stage (0 = off; the paper used 3).")
    gradient_checkpointing: bool = _f(True, "Trade compute for activation memory.")
    precision: Literal["auto", "bf16", "fp32", "fp64"] = _f(
        "auto", "auto = bf16 on a GPU that has it, else fp32; fp64 for exactness checks on CPU.")
    seed: int = _f(42, "Training seed.")
    save_steps: int = _f(500, "Checkpoint every this many optimizer steps.")
    save_total_limit: int | None = _f(2, "Keep at most this many checkpoints.")
    eval_steps: int | None = _f(None, "Evaluate every this many steps (None: at the end only).")
    resume: bool = _f(True, "Resume from the newest checkpoint in output_dir/checkpoints if there is one.")
    report_to: list[str] = field(default_factory=list, metadata={
        "help": "Trainer report_to integrations (e.g. tensorboard, wandb)."})
    logging_steps: int = _f(1, "Trainer logging interval in optimizer steps (metrics.jsonl has every step).")
    dataloader_num_workers: int = _f(0, "Data-loader worker processes.")

    def __post_init__(self):
        check_choices(self)
        self.model, self.data, self.output_dir = Path(self.model), Path(self.data), Path(self.output_dir)
        self.eval_data = Path(self.eval_data) if self.eval_data else None
        self.report_to = list(self.report_to or [])
        positive = ("learning_rate", "epochs", "batch_size", "per_device_batch_size", "max_length",
                    "max_prompt_length", "logps_chunk_size", "save_steps", "logging_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length ({self.max_prompt_length}) must be smaller than "
                              f"max_length ({self.max_length})")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size % self.per_device_batch_size:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of per_device_batch_size "
                              f"({self.per_device_batch_size})")


@dataclass
class SFTConfig(TrainCommon):
    """Target-SFT on y_ws (paper: lr 7e-6, 1 epoch, cosine, warmup 0.1, batch 128, max length 2048)."""

    learning_rate: float = _f(7e-6, "Peak learning rate (paper: 7e-6).")
    completion_only: bool = _f(True, "Loss on response tokens only (False: on the prompt too).")
    packing: bool = _f(False, "Pack several examples into each row (padding-free, position ids restart).")

    def __post_init__(self):
        super().__post_init__()
        if self.layout == "shared" and not self.completion_only:
            raise ConfigError("layout 'shared' trains response tokens only: it needs completion_only")


@dataclass
class WRPOConfig(TrainCommon):
    """WRPO (Eq. 6; Table 5 variants; paper: lr 3e-7, β 0.01, α 0→0.1 linear, batch 128, 1 epoch)."""

    objective: Literal["dpo", "ipo", "simpo"] = _f("dpo", "Base objective (Table 5).")
    beta: float = _f(0.01, "β of DPO/SimPO (paper WRPO_DPO: 0.01; SimPO: 10).")
    gamma: float = _f(0.0, "SimPO target margin γ.")
    tau: float = _f(0.01, "IPO τ (paper WRPO_IPO: 0.01).")
    label_smoothing: float = _f(0.0, "Conservative-DPO label smoothing ε for the sigmoid objectives.")
    alpha: float = _f(0.1, "Target fusion coefficient α of the source answer y_ws (paper: 0.1).")
    alpha_schedule: Literal["linear", "constant", "cosine"] = _f(
        "linear", "α from 0 at the first optimizer step to `alpha` at the last (constant: always alpha).")
    baseline: Literal["none", "target", "source"] = _f(
        "none", "none = WRPO; target / source = the plain objective on (y_wt, y_l) / (y_ws, y_l).")
    rejected_source: bool = _f(False, "Eq. 9: also push down y_ls, weighted α (needs rejected_source data).")
    top_k_sources: int = _f(1, "Source answers used as chosen: y_ws plus top_k-1 from extra_chosen_source.")
    reference: Literal["precomputed", "on-the-fly"] = _f(
        "precomputed", "Reference log-probs read from ref_logps (no reference model) or computed each step.")
    ref_logps: Path | None = _f(None, "Stored reference log-probs (default: <data>.ref_logps.jsonl).")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        for name in ("beta", "tau"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.top_k_sources < 1:
            raise ConfigError(f"top_k_sources must be >= 1, got {self.top_k_sources}")
        if self.baseline != "none" and (self.rejected_source or self.top_k_sources > 1):
            raise ConfigError("baseline runs take one chosen and one rejected response: "
                              "rejected_source and top_k_sources > 1 are WRPO options")
        self.ref_logps = Path(self.ref_logps) if self.ref_logps else default_ref_path(self.data)

    @property
    def needs_reference(self) -> bool:
        return self.objective != "simpo"


def default_ref_path(data: Path) -> Path:
    """Where `wrpo ref-logps` stores a dataset's reference log-probs: beside it."""
    data = Path(data)
    return data.with_name(data.name.removesuffix(".jsonl") + ".ref_logps.jsonl")
