"""Data parallelism for real: `wrpo train` and `wrpo sft` under torchrun with 2 ranks (gloo on CPU), ZeRO-2
and ZeRO-3 (DeepSpeed's CPU accelerator), against one process on the same global batches.

The ranks see records of different response lengths and the log-prob chunk is 8 tokens, so each rank's
number of LM-head chunks differs: under ZeRO-3 every chunk is a gathered call, and a rank that made fewer
would stall or mismatch the others' collectives. What must hold (docs/training.md, "Distributed"):
the loss of steps 1–3 and the final weights equal a single-process run with the same global batch
(accumulation making up the missing rank), rank 0 alone writes metrics.jsonl (one line per step), and
under ZeRO-3 every rank loads its partition of each model.

The single-process reference trains in float64 (`--precision fp64`), so that the comparisons hold on any
CPU, thread count and ATEN_CPU_CAPABILITY. DDP (stage 0) runs in float64 too: the runs differ in summation
order only (other batch shapes, gradients summed over ranks), by at most 2·n·u·κ relative with n < 4·10^3
terms in the longest chain of sums, u = 2^-53 and κ ≤ 10^3 (derived in test_train_exact's docstring): REL.
DeepSpeed's CPU accelerator computes in float32 only (fp32/bf16), so the ZeRO runs are compared with the
exact float64 result at float32's own accuracy: a chain of n roundings with random signs grows like √n·u
(probabilistic error analysis, Higham & Mary 2019), u = 2^-24, n < 4·10^3, and a conditioning of at most 10^2
(κ: the terms' magnitudes over the result's) gives 10^2·√(4·10^3)·2^-24 ≈ 3.8·10^-4: REL32. The three steps
move the weights by more than 10^-3 (asserted; measured 2.3·10^-3), above it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from wrpo.data.serving import free_port

# Timeouts are hang detectors (README.md, "Testing"): a run took 210 s on a loaded 2-core machine
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "tiny"
LIMITS = ["--max-length", "160", "--max-prompt-length", "80"]
# global batch 8 = 2 per rank × 2 ranks × 2 accumulation (single process: 2 × 4); 3 steps cross an epoch
# for WRPO (16 records = 2 steps per epoch)
SCHEDULE = ["--batch-size", "8", "--per-device-batch-size", "2", "--max-steps", "3", "--learning-rate", "1e-4",
            "--warmup-ratio", "0", "--lr-scheduler", "constant", "--logps-chunk-size", "8",
            "--no-gradient-checkpointing", "--save-steps", "100"]
REL, REL32 = 1e-9, 3.8e-4  # float64 and float32 bounds (module docstring)


def _env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo", "TOKENIZERS_PARALLELISM": "false",
            "TRANSFORMERS_VERBOSITY": "info",  # from_pretrained says when it loads ZeRO-3 partitions (below)
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _wrpo_cli(*args: str, nproc: int | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m wrpo.cli ARGS`, under torchrun with `nproc` ranks when given."""
    launch = [sys.executable]
    # torchrun's own folder (it makes /tmp/torchelastic_* otherwise and leaves it), removed afterwards
    with tempfile.TemporaryDirectory(prefix="torchrun-") as logs:
        if nproc:
            launch += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                       "--master-port", str(free_port()), "--log-dir", logs]
        # a session of its own: a hang (collective mismatch) is ended rank by rank, not just the launcher
        proc = subprocess.Popen([*launch, "-m", "wrpo.cli", *args], env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"timed out after {timeout}s (a collective mismatch hangs):\n{out[-2000:]}\n{err[-4000:]}")
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def wrpo_data(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wrpo.engine.ref_logps import compute_reference_logps

    folder = tmp_path_factory.mktemp("multirank-wrpo")
    data = folder / "train.jsonl"
    data.write_text("".join(x + "\n" for x in (EXAMPLES / "quadruples.jsonl").read_text().splitlines()[:16]))
    compute_reference_logps(tiny_models / "target", data, max_length=160, max_prompt_length=80, precision="fp64")
    return data


def _train_args(kind: str, tiny_models: Path, data: Path, out: Path, extra: tuple[str, ...]) -> list[str]:
    command = "train" if kind == "wrpo" else "sft"
    args = [command, "--model", str(tiny_models / "target"), "--data", str(data), "--output-dir", str(out),
            *LIMITS, *SCHEDULE, *extra]
    return [*args, "--beta", "0.5", "--alpha", "0.5"] if kind == "wrpo" else args


@pytest.fixture(scope="module")
def single(tiny_models: Path, wrpo_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """The single-process runs (no DeepSpeed, in this process) every multi-rank run is compared with:
    the same options as the command lines, parsed by the same CLI."""
    from typer.testing import CliRunner

    from wrpo.cli.main import app

    folder = tmp_path_factory.mktemp("multirank-single")
    runs = {}
    for kind, data in (("wrpo", wrpo_data), ("sft", EXAMPLES / "sft.jsonl")):
        out = folder / kind
        result = CliRunner().invoke(app, _train_args(kind, tiny_models, data, out, ("--precision", "fp64")))
        assert result.exit_code == 0, result.output
        runs[kind] = out
    return runs


CASES = [  # (trainer, ZeRO stage (0: plain DDP over gloo), extra options)
    ("wrpo", 0, ()),
    ("wrpo", 2, ()),
    ("wrpo", 3, ()),
    ("wrpo", 3, ("--reference", "on-the-fly")),
    ("sft", 2, ()),
    ("sft", 3, ()),
]


@pytest.mark.parametrize(("kind", "stage", "extra"), CASES,
                         ids=["wrpo-ddp", "wrpo-zero2", "wrpo-zero3", "wrpo-zero3-reference-on-the-fly", "sft-zero2",
                              "sft-zero3"])
def test_two_ranks_equal_one_process(kind, stage, extra, tiny_models, wrpo_data, single, tmp_path):
    import torch

    data = wrpo_data if kind == "wrpo" else EXAMPLES / "sft.jsonl"
    out = tmp_path / "out"
    precision, rel = ("fp64", REL) if stage == 0 else ("fp32", REL32)  # DeepSpeed on CPU: fp32 (docstring)
    args = ("--deepspeed-stage", str(stage), "--precision", precision, *extra)
    proc = _wrpo_cli(*_train_args(kind, tiny_models, data, out, args), nproc=2)
    # ZeRO-3: each rank loads its partition of the policy, which needs the DeepSpeed config registered before
    # from_pretrained (docs/training.md, "Distributed and GPU"); the on-the-fly reference is loaded the same
    # way once the Trainer exists, when it has turned rank 1's log level down to warnings: one line more
    loads = (2 + ("on-the-fly" in extra)) if stage == 3 else 0
    assert proc.stderr.count("Detected DeepSpeed ZeRO-3: activating zero.init() for this model") == loads
    ours, reference = _metrics(out), _metrics(single[kind])
    first = {m["step"]: m for m in reversed(ours)}  # the losses first: they say more than a doubled line
    assert [first[s]["loss"] for s in (1, 2, 3)] == pytest.approx([m["loss"] for m in reference], rel=rel)
    assert [m["step"] for m in ours] == [1, 2, 3]  # rank 0 alone writes, once per step
    if kind == "wrpo":
        assert [m["alpha"] for m in ours] == [0.0, 0.25, 0.5]
    trained, expected = _weights(out / "model"), _weights(single[kind] / "model")
    initial = _weights(tiny_models / "target")
    assert set(expected) <= set(trained)  # DeepSpeed also saves a tied head (lm_head = embed_tokens)
    for key in expected:  # norm-wise relative error of each tensor (see _relative)
        assert _relative(trained[key], expected[key]) < rel, key
    moved = _relative(torch.cat([expected[k].flatten() for k in expected]),
                      torch.cat([initial[k].flatten() for k in expected]))
    assert moved > 1e-3  # the three updates moved the weights more than either tolerance (REL32: 2.6× less)


def _relative(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64. Element-wise comparison would be noise: AdamW divides each gradient by its
    own running magnitude, so a float rounding difference in a near-zero gradient (summed in another
    order over two ranks) becomes an update of up to the learning rate in that one element."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
