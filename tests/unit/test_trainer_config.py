"""One spec → trainer-config mapping: every training field of the spec reaches the trainer under its own name,
the defaults agree, and the shared optimiser fields are one definition (docs/training.md, "Commands")."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from wrpo.engine.config import SFTConfig, TrainCommon, WRPOConfig
from wrpo.engine.stages import trainer_config, wrpo_config
from wrpo.pipeline.spec import FusionSpec, SFTSpec, TrainingSpec, WRPOSpec

# on purpose different: the cluster trains under ZeRO-3 (the paper's), a local `wrpo train` without DeepSpeed
DIFFERENT_DEFAULTS = {("TrainingSpec", "deepspeed_stage")}


def _config_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(("section", "config"), [(SFTSpec, SFTConfig), (WRPOSpec, WRPOConfig),
                                                 (TrainingSpec, TrainCommon)])
def test_every_spec_field_is_a_config_field_with_the_same_default(section: type[BaseModel], config: type):
    fields = _config_fields(config)
    for name, info in section.model_fields.items():
        assert name in fields, f"{section.__name__}.{name} has no field in {config.__name__}: it would be dropped"
        if (section.__name__, name) not in DIFFERENT_DEFAULTS:
            assert fields[name].default == info.default, (section.__name__, name)


def test_shared_optimiser_fields_are_one_definition():
    """learningRate, epochs, ... are the same constraint and description in both sections."""
    for name in ("learning_rate", "epochs", "per_device_batch_size", "warmup_ratio", "lr_scheduler", "max_steps"):
        a, b = SFTSpec.model_fields[name], WRPOSpec.model_fields[name]
        assert (a.description, a.metadata, a.annotation) == (b.description, b.metadata, b.annotation), name
    assert typing.get_args(SFTSpec.model_fields["lr_scheduler"].annotation) == \
        typing.get_args(typing.get_type_hints(TrainCommon)["lr_scheduler"])


def _spec(**sections) -> FusionSpec:
    base = {"target": {"model": "t"}, "sources": [{"name": "a", "model": "a"}], "reward": {"model": "r"},
            "dataset": {"uri": "d.jsonl"}}
    return FusionSpec.model_validate({**base, **sections})


def test_non_default_spec_values_reach_the_trainer(tmp_path: Path):
    spec = _spec(selection={"rejectedSource": True},
                 sft={"learningRate": 1e-5, "epochs": 2, "batchSize": 16, "perDeviceBatchSize": 4, "maxLength": 512,
                      "warmupRatio": 0.2, "lrScheduler": "linear", "completionOnly": False, "packing": True,
                      "maxSteps": 7},
                 wrpo={"objective": "ipo", "beta": 0.2, "gamma": 0.3, "tau": 0.4, "labelSmoothing": 0.1,
                       "alpha": 0.6, "alphaSchedule": "cosine", "rejectedSource": True, "learningRate": 2e-6,
                       "epochs": 3, "batchSize": 32, "perDeviceBatchSize": 8, "maxLength": 1024,
                       "maxPromptLength": 256, "warmupRatio": 0.05, "lrScheduler": "constant",
                       "reference": "on-the-fly", "maxSteps": 9},
                 training={"deepspeedStage": 2, "gradientCheckpointing": False, "precision": "fp32", "seed": 7,
                           "saveSteps": 11})
    sft = trainer_config(SFTConfig, spec, spec.sft, model=tmp_path, data=tmp_path / "d.jsonl", output_dir=tmp_path,
                         max_prompt_length=256)
    wrpo = wrpo_config(spec, tmp_path, tmp_path / "train.jsonl", tmp_path / "out")
    for section, cfg in ((spec.sft, sft), (spec.wrpo, wrpo), (spec.training, sft), (spec.training, wrpo)):
        for name, value in section:
            assert getattr(cfg, name) == value, name
    assert wrpo.top_k_sources == spec.selection.top_k_sources


def test_a_trainer_that_sees_fewer_processes_than_the_launcher_started_refuses_to_train():
    """What accelerate reports for DeepSpeed on a CPU accelerator when no process group could be adopted:
    one process where torchrun started two. Training would run every rank on the same examples."""
    from types import SimpleNamespace

    from wrpo.engine.common import _adopt_launcher_world
    from wrpo.engine.config import ConfigError

    args = SimpleNamespace(world_size=1, deepspeed="zero3.json", distributed_state=None)
    with pytest.raises(ConfigError, match="launcher started 2 processes .* trainer sees 1"):
        _adopt_launcher_world(args, 2)
    _adopt_launcher_world(SimpleNamespace(world_size=2, deepspeed=None), 2)  # agreeing: nothing to say
