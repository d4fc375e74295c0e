"""What SFT and WRPO share below the trainer: precision, layout, model loading, the distributed set-up
(TrainingArguments), checkpoints and the final save. The trainer skeleton itself is `wrpo.engine.trainer`."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from wrpo.engine.collate import Layout
from wrpo.engine.config import ConfigError, TrainCommon


def use_bf16(precision: str) -> bool:
    """bf16 when asked, or on `auto` when a CUDA device supports it; fp32 otherwise (CPU)."""
    if precision == "bf16":
        return True
    return precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def model_dtype(precision: str) -> torch.dtype:
    """The weights' dtype: bf16 (`use_bf16`), fp64 when asked (CPU exactness tests, docs/training.md), else fp32."""
    if precision == "fp64":
        return torch.float64
    return torch.bfloat16 if use_bf16(precision) else torch.float32


def attn_implementation(cfg: TrainCommon) -> str:
    return cfg.attn_implementation or "sdpa"


def resolve_layout(cfg: TrainCommon, model: Any, responses: int) -> Layout:
    """The batch layout (wrpo.engine.collate): `auto` is packed with flash attention (varlen kernels make it
    free), else shared-prompt packing for several responses per prompt where the model supports it, else
    padded. An explicit `shared` the model cannot take is an error naming the reason."""
    from wrpo.engine.logps import supports_shared_prompt

    if cfg.layout == "shared":
        why = supports_shared_prompt(model)
        if why:
            raise ConfigError(f"layout 'shared' is not supported by {cfg.model}: {why} (use padded or packed)")
        return "shared"
    if cfg.layout != "auto":
        return cfg.layout
    if "flash" in attn_implementation(cfg):
        return "packed"
    if responses > 1 and supports_shared_prompt(model) is None:
        return "shared"
    return "padded"


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.chat_template is None:
        raise ConfigError(f"the tokenizer in {model_dir} has no chat template")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(model_dir: Path, cfg: TrainCommon) -> Any:
    """The model in the run's precision. Call it after `training_arguments`: under ZeRO-3 the DeepSpeed
    config that TrainingArguments registers makes from_pretrained load each rank's partition only."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=model_dtype(cfg.precision),
                                                attn_implementation=attn_implementation(cfg))


def launcher_world_size() -> int:
    """Processes started by the launcher (torchrun, accelerate launch, a PyTorchJob): WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_config_path(stage: int) -> str | None:
    """The packaged ZeRO-2/3 config (all batch and precision values `auto`, filled by the HF integration)."""
    if stage == 0:
        return None
    return str(resources.files("wrpo.engine").joinpath(f"configs/zero{stage}.json"))


def training_arguments(cfg: TrainCommon, has_eval: bool) -> Any:
    """TrainingArguments from a config: accumulation makes up `batch_size` over all processes.

    Raises ConfigError unless the Trainer sees as many processes as the launcher started (see
    `_adopt_launcher_world`): a mismatch would train every rank on the same examples.
    """
    from transformers import TrainingArguments

    world = launcher_world_size()
    per_step = cfg.per_device_batch_size * world
    if cfg.batch_size % per_step:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be a multiple of per_device_batch_size × "
                          f"processes ({cfg.per_device_batch_size} × {world})")
    eval_strategy = "steps" if has_eval and cfg.eval_steps else "no"
    # without an accelerator, plain data parallelism is accelerate's multi-CPU mode (gloo)
    cpu_ddp = cfg.deepspeed_stage == 0 and not torch.accelerator.is_available()
    args = TrainingArguments(
        output_dir=str(cfg.output_dir / "checkpoints"),
        per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.batch_size // per_step,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, seed=cfg.seed, data_seed=cfg.seed,
        bf16=use_bf16(cfg.precision),
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        report_to=cfg.report_to or "none", remove_unused_columns=False,
        deepspeed=deepspeed_config_path(cfg.deepspeed_stage), eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps, dataloader_num_workers=cfg.dataloader_num_workers,
        use_cpu=cpu_ddp, ddp_backend="gloo" if cpu_ddp and world > 1 else None,
        disable_tqdm=True,
    )
    _adopt_launcher_world(args, world)
    return args


def _adopt_launcher_world(args: Any, world: int) -> None:
    """Make the Trainer's process count the launcher's, or fail.

    accelerate only knows DeepSpeed on a CUDA-like device: on DeepSpeed's CPU accelerator it initialises
    the process group but records no backend, hence one process, and every rank would train the same
    micro-batches while DeepSpeed averages their gradients (a halved global batch, every metric line and
    model written by every rank). The process group itself is right, so its rank and size are adopted.
    """
    import torch.distributed as dist

    seen = args.world_size  # the first access sets up the distributed state
    if seen != world and args.deepspeed and dist.is_initialized() and dist.get_world_size() == world:
        state = args.distributed_state  # accelerate's PartialState: its attributes are shared
        state.backend = dist.get_backend()
        state.num_processes, state.process_index = world, dist.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", "0"))
    if args.world_size != world:
        raise ConfigError(f"the launcher started {world} processes (WORLD_SIZE) but the trainer sees "
                          f"{args.world_size}: every rank would train the same examples")


def last_checkpoint(cfg: TrainCommon) -> str | None:
    """The newest complete checkpoint to resume from, if resuming is on and one exists. A pod killed while
    saving leaves a `checkpoint-N` without `trainer_state.json` (the Trainer writes it after the weights
    and optimizer): resuming from it would fail on every restart, so it is skipped."""
    folder = cfg.output_dir / "checkpoints"
    if not cfg.resume or not folder.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    complete = [p for _, p in steps if (p / "trainer_state.json").is_file()]
    return str(complete[-1]) if complete else None


def save_final(trainer: Any, tokenizer: Any, out: Path) -> Path:
    """<output>/model/: safetensors weights, config, generation config, tokenizer and the training arguments
    as JSON (rank 0 writes; under ZeRO-3 every rank takes part in gathering the weights). The Trainer's
    `training_args.bin` is a pickle: it is replaced by `training_args.json` (no pickle in a published model,
    docs/eval.md)."""
    target = out / "model"
    trainer.save_model(str(target))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(target))
        (target / "training_args.json").write_text(trainer.args.to_json_string())
        (target / "training_args.bin").unlink(missing_ok=True)
    return target


