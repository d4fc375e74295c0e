"""`wrpo ref-logps`, `wrpo train` and `wrpo sft` on the tiny models and the shipped example data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from wrpo.engine.config import ConfigError, SFTConfig, WRPOConfig
from wrpo.errors import DataError

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "tiny"
LIMITS = {"max_length": 160, "max_prompt_length": 80}
# Comparisons of two runs train in float64 (`precision="fp64"`) so that they hold on any CPU, thread count
# and ATEN_CPU_CAPABILITY: the runs differ in summation order only, by at most 2·n·u·κ relative with n < 4·10^3
# terms in the longest chain of sums, u = 2^-53 and κ ≤ 10^3 (derived in test_train_exact's docstring).
REL = 1e-9


def _small_data(folder: Path, n: int = 8) -> Path:
    lines = (EXAMPLES / "quadruples.jsonl").read_text().splitlines()[:n]
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def prepared(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from wrpo.engine.ref_logps import compute_reference_logps

    folder = tmp_path_factory.mktemp("wrpo-train")
    data = _small_data(folder)
    ref = compute_reference_logps(tiny_models / "target", data, **LIMITS, batch_size=8)
    return {"data": data, "ref": ref, "model": tiny_models / "target", "folder": folder}


def _cfg(prepared: dict[str, Path], out: Path, **kw) -> WRPOConfig:
    base = dict(model=prepared["model"], data=prepared["data"], output_dir=out, batch_size=4,
                per_device_batch_size=2, learning_rate=1e-4, beta=0.1, alpha=0.3, max_steps=4, save_steps=2,
                warmup_ratio=0.0, gradient_checkpointing=False, **LIMITS)
    return WRPOConfig(**{**base, **kw})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_ref_logps_are_stored_beside_the_data(prepared):
    rows = [json.loads(x) for x in prepared["ref"].read_text().splitlines()]
    assert prepared["ref"].parent == prepared["data"].parent and len(rows) == 8
    assert set(rows[0]["logps"]) >= {"chosen_source", "chosen_target", "rejected", "rejected_source"}
    meta = json.loads(prepared["ref"].with_name("train.ref_logps.meta.json").read_text())
    assert meta["max_length"] == 160



def test_an_empty_split_gets_an_empty_reference_file_with_the_same_settings(prepared, tmp_path):
    """No held-out prompts (`dataset.evalSize: 0`, the default) leaves build-pairs' eval.jsonl empty: the
    ref-logps stage writes an empty eval file with its meta instead of failing the run ("no records")."""
    from wrpo.engine.ref_logps import compute_reference_logps

    empty = tmp_path / "eval.jsonl"
    empty.write_text("\n")
    ref = compute_reference_logps(prepared["model"], empty, **LIMITS, batch_size=8)
    assert ref.read_text() == ""
    meta = json.loads(ref.with_name("eval.ref_logps.meta.json").read_text())
    full = json.loads(prepared["ref"].with_name("train.ref_logps.meta.json").read_text())
    assert meta["records"] == 0 and full["records"] == 8
    assert {k: v for k, v in meta.items() if k != "records"} == {k: v for k, v in full.items() if k != "records"}
    with pytest.raises(DataError, match="file not found"):  # a missing file is still an error
        compute_reference_logps(prepared["model"], tmp_path / "missing.jsonl", **LIMITS)

def test_train_writes_model_metrics_and_resumes_with_alpha(prepared, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wrpo.engine.wrpo_trainer import run_wrpo

    out = tmp_path / "out"
    summary = run_wrpo(_cfg(prepared, out, gradient_checkpointing=True, precision="fp64"))
    first = _metrics(out)
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    assert [m["alpha"] for m in first] == pytest.approx([0.0, 0.1, 0.2, 0.3])  # exactly α at the last step
    fields = {"step", "alpha", "loss", "learning_rate", "rewards/chosen_source", "rewards/chosen_target",
              "rewards/rejected", "margins/hybrid", "margins/on_policy", "accuracy/hybrid",
              "accuracy/on_policy"}
    assert fields <= set(first[0])
    assert all(0.0 <= m["accuracy/hybrid"] <= 1.0 for m in first)
    model_dir = Path(summary["model"])
    assert (model_dir / "model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)

    # resume: drop the last checkpoint; the run continues from step 2 with α where it was
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    summary = run_wrpo(_cfg(prepared, out, gradient_checkpointing=True, precision="fp64"))
    assert summary["resumed_from"].endswith("checkpoint-2")
    again = _metrics(out)
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    for a, b in zip(first[2:], again[2:], strict=True):
        assert b["alpha"] == a["alpha"]
        assert b["loss"] == pytest.approx(a["loss"], rel=REL)


def test_eval_split_reports_hybrid_accuracy(prepared, tmp_path):
    from wrpo.engine.wrpo_trainer import run_wrpo

    summary = run_wrpo(_cfg(prepared, tmp_path / "out", max_steps=1, eval_data=prepared["data"]))
    assert 0.0 <= summary["eval"]["eval_accuracy/hybrid"] <= 1.0
    assert (tmp_path / "out" / "eval_metrics.json").exists()


def test_sft_completion_only_with_packing(tiny_models, tmp_path):
    from wrpo.engine.sft import run_sft

    cfg = SFTConfig(model=tiny_models / "target", data=EXAMPLES / "sft.jsonl", output_dir=tmp_path / "sft",
                    batch_size=4, per_device_batch_size=2, max_steps=2, learning_rate=1e-4, packing=True,
                    gradient_checkpointing=False, **LIMITS)
    summary = run_sft(cfg)
    assert (Path(summary["model"]) / "model.safetensors").exists()
    assert [m["step"] for m in _metrics(tmp_path / "sft")] == [1, 2]


BAD = [
    ({"chosen_target": None}, "chosen_target"),
    ({"rejected": 3}, "rejected"),
    ({"chosen_source": "  "}, "chosen_source"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "prompt"),
]


@pytest.mark.parametrize(("change", "field"), BAD)
def test_bad_records_stop_before_training(prepared, tmp_path, change, field):
    from wrpo.engine.wrpo_trainer import run_wrpo

    lines = prepared["data"].read_text().splitlines()
    rec = json.loads(lines[2])
    rec.update(change)
    if change.get("chosen_target", "") is None:
        del rec["chosen_target"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines[:2], json.dumps(rec), *lines[3:]]) + "\n")
    with pytest.raises(DataError) as err:
        run_wrpo(_cfg(prepared, tmp_path / "out", data=bad, ref_logps=prepared["ref"]))
    assert f"{bad}:3" in str(err.value) and f"field '{field}" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_malformed_json_and_missing_y_ls_are_named(prepared, tmp_path):
    from wrpo.engine.wrpo_trainer import run_wrpo

    bad = tmp_path / "bad.jsonl"
    lines = prepared["data"].read_text().splitlines()
    bad.write_text("\n".join([lines[0], lines[1][:-3]]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        run_wrpo(_cfg(prepared, tmp_path / "out", data=bad))
    rec = json.loads(lines[0])
    del rec["rejected_source"]
    bad.write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'rejected_source'"):
        run_wrpo(_cfg(prepared, tmp_path / "out", data=bad, rejected_source=True))


def test_config_errors_name_the_option(prepared, tmp_path):
    with pytest.raises(ConfigError, match="alpha"):
        _cfg(prepared, tmp_path, alpha=1.5)
    with pytest.raises(ConfigError, match="objective"):
        _cfg(prepared, tmp_path, objective="kto")
    with pytest.raises(ConfigError, match="max_prompt_length"):
        _cfg(prepared, tmp_path, max_length=50, max_prompt_length=80)


def test_gradient_accumulation_4x2_equals_batch_8(prepared, tmp_path):
    """One optimizer step over the same 8 quadruples: micro-batches of 2 with 4 accumulation steps must
    give the same logged loss and metrics as one micro-batch of 8, and the same weights after the AdamW
    step, in float64 (REL; norm-wise per tensor: Adam's g/sqrt(v) turns rounding noise in a near-zero
    gradient into a difference of up to the lr in that one element)."""
    from safetensors.torch import load_file

    from wrpo.engine.wrpo_trainer import run_wrpo

    weights = {}
    for name, micro in (("accumulated", 2), ("full", 8)):
        out = tmp_path / name
        run_wrpo(_cfg(prepared, out, batch_size=8, per_device_batch_size=micro, max_steps=1, learning_rate=1e-3,
                      lr_scheduler="constant", save_steps=10, precision="fp64"))
        weights[name] = load_file(out / "model" / "model.safetensors")
        weights[name + "/metrics"] = _metrics(out)[0]
    for key in ("loss", "margins/hybrid", "margins/on_policy", "accuracy/hybrid"):
        # margins are β × differences of log-prob sums of size ≤ 10^3: near 0 their error is REL × 10^3
        assert weights["accumulated/metrics"][key] == pytest.approx(weights["full/metrics"][key], rel=REL,
                                                                    abs=REL * 1e3)
    before = load_file(prepared["model"] / "model.safetensors")
    moved = [k for k in before if not torch_equal(before[k].double(), weights["full"][k])]
    assert moved, "the step changed no weight: the comparison would prove nothing"
    for key in before:
        torch_close(weights["accumulated"][key], weights["full"][key])


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def torch_close(a, b) -> None:
    import torch

    assert a.dtype == torch.float64
    assert ((a - b).norm() / b.norm()).item() < REL


def test_fault_point_stops_after_the_checkpoint_and_the_resumed_run_goes_through(tiny_models, tmp_path):
    """WRPO_FAULT_AFTER_CHECKPOINT=sft:1 (wrpo.engine.trainer.FaultPoint, the cluster tests' way to stop a
    pod at a known point): the process waits after saving checkpoint 1 and writes nothing more; run again
    with the same setting, it resumes from checkpoint 1 and finishes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sft"
    argv = [sys.executable, "-m", "wrpo.cli", "sft", "--model", str(tiny_models / "target"), "--data",
            str(EXAMPLES / "sft.jsonl"), "--output-dir", str(out), "--batch-size", "2", "--per-device-batch-size",
            "2", "--max-steps", "2", "--save-steps", "1", "--no-gradient-checkpointing", "--max-length", "160",
            "--max-prompt-length", "80"]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "WRPO_FAULT_AFTER_CHECKPOINT": "sft:1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "first.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a hang detector: the step takes seconds
        while "WRPO_FAULT_AFTER_CHECKPOINT: sft saved checkpoint 1" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"exited ({proc.returncode}) before its fault point:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no fault point after 600 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        assert (out / "checkpoints" / "checkpoint-1" / "trainer_state.json").is_file()
        assert not (out / "checkpoints" / "checkpoint-2").exists() and proc.poll() is None  # it waits there
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "WRPO_FAULT_AFTER_CHECKPOINT" not in again.stderr
    assert [m["step"] for m in _metrics(out)] == [1, 2]
