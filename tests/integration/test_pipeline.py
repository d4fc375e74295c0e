"""`wrpo run` end to end on tiny models: resume after a kill in every stage, spec changes re-run only
what depends on them, and the same pipeline with its run directory on a real S3 server (SeaweedFS).

Sampling uses the transformers backend here (vLLM is covered by the data tests and the demo test),
so each run takes well under a minute on 2 cores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wrpo.pipeline.plan import STAGE_NAMES
from wrpo.pipeline.strict_yaml import dump_yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def make_spec(tiny_models: Path, path: Path, **patch) -> Path:
    spec = yaml.safe_load((ROOT / "examples/tiny/fusion.yaml").read_text())
    spec["target"]["model"] = str(tiny_models / "target")
    spec["sources"][0]["model"] = str(tiny_models / "source-llama")
    spec["sources"][1]["model"] = str(tiny_models / "source-qwen")
    spec["reward"]["model"] = str(tiny_models / "reward")
    spec["dataset"]["uri"] = str(ROOT / "examples/tiny/prompts.jsonl")
    spec["sampling"].update(n=2, maxTokens=12)
    spec["sft"].update(maxSteps=2)
    spec["wrpo"].update(maxSteps=2)
    spec["storage"].pop("runUri")
    for section, values in patch.items():
        spec[section].update(values)
    path.write_text(dump_yaml(spec))  # quotes the key 'n' (a bare n: is refused as a YAML 1.1 boolean)
    return path


def wrpo(*args: str, env_extra: dict[str, str] | None = None, workdir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WRPO_VLLM_PYTHON"}
    env.update(PYTHONPATH=str(ROOT), WRPO_WORKDIR=str(workdir), HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "wrpo.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def manifests(run: Path) -> dict[str, bytes]:
    return {n: (run / n / "_MANIFEST.json").read_bytes() for n in STAGE_NAMES
            if (run / n / "_MANIFEST.json").exists()}


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_models, tmp_path_factory):
    """Crash once in every stage (SIGKILL after its outputs are written, before its manifest), resuming
    after each crash; returns (spec path, run dir, workdir, what each crash left)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    spec, run, wd = make_spec(tiny_models, tmp / "fusion.yaml"), tmp / "run", tmp / "work"
    observed = []
    committed: dict[str, bytes] = {}
    for name in STAGE_NAMES:
        proc = wrpo("run", str(spec), "--run-uri", str(run), workdir=wd,
                    env_extra={"WRPO_FAULT_BEFORE_COMMIT": name})
        now = manifests(run)
        observed.append((name, proc.returncode, set(now), committed == {k: now[k] for k in committed},
                         any(p.name != "_MANIFEST.json" for p in (run / name).glob("*"))))
        committed = now
    final = last_json(wrpo("run", str(spec), "--run-uri", str(run), workdir=wd))
    return spec, run, wd, observed, final


def test_a_kill_in_any_stage_loses_only_that_stage(killed_and_resumed):
    _, run, _, observed, final = killed_and_resumed
    for i, (name, rc, committed, earlier_untouched, left_outputs) in enumerate(observed):
        assert rc == -9, f"{name}: the process should have been killed"
        assert committed == set(STAGE_NAMES[:i]), f"after a kill in {name}"
        assert earlier_untouched, f"a kill in {name} changed an earlier committed stage"
        assert left_outputs, f"{name} wrote nothing before the kill: the test would prove nothing"
    # the run after the last crash redoes only the stage that was in flight
    assert final["stages"] == {**{n: "skipped" for n in STAGE_NAMES[:-1]}, STAGE_NAMES[-1]: "done"}
    assert (run / "wrpo" / "model" / "model.safetensors").exists()
    rows = [json.loads(x) for x in (run / "wrpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["alpha"] == pytest.approx(0.1)


def test_committed_outputs_match_their_manifests(killed_and_resumed):
    import hashlib

    _, run, *_ = killed_and_resumed
    for name in STAGE_NAMES:
        manifest = json.loads((run / name / "_MANIFEST.json").read_text())
        assert manifest["objects"], name
        for obj, entry in manifest["objects"].items():
            data = (run / name / obj).read_bytes()
            assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"], obj


def test_a_spec_change_reruns_only_the_dependent_stages(killed_and_resumed, tmp_path):
    spec, run, wd, *_ = killed_and_resumed
    before = manifests(run)
    data = yaml.safe_load(spec.read_text())
    data["wrpo"]["beta"] = 0.2
    changed = tmp_path / "changed.yaml"
    changed.write_text(dump_yaml(data))
    result = last_json(wrpo("run", str(changed), "--run-uri", str(run), workdir=wd))
    rerun = [n for n, status in result["stages"].items() if status == "done"]
    assert rerun == ["ref-logps", "wrpo", "eval"]
    after = manifests(run)
    assert all(after[n] == before[n] for n in STAGE_NAMES if n not in rerun)
    assert all(after[n] != before[n] for n in rerun)


def test_report_renders_the_plots(killed_and_resumed, tmp_path):
    import matplotlib.image as mpimg

    _, run, wd, *_ = killed_and_resumed
    proc = wrpo("report", str(run), "--out", str(tmp_path), workdir=wd)
    assert proc.returncode == 0, proc.stderr
    for png in ("reward_dynamics.png", "contributions.png", "logp_shift.png"):
        img = mpimg.imread(tmp_path / png)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.05, f"{png} is blank"
    summary = (tmp_path / "summary.md").read_text()
    assert "| llama |" in summary and "| qwen |" in summary
    assert "![reward_dynamics](reward_dynamics.png)" in summary
    # the key numbers of the stages made of units, source by source (answers, finish reasons, mean score)
    rows = {line.split(" | ")[0].strip("| "): line for line in summary.splitlines() if line.startswith("| ")}
    for source in ("llama", "qwen"):
        assert re.search(rf"\*\*{source}\*\*: prompts=\d+, .*answers=\d+, finish \w+=\d+", rows["sample-sources"])
        assert re.search(rf"\*\*{source}\*\*: answers=\d+, mean_score=-?\d", rows["score-sources"])


def test_eval_stage_judges_target_sft_and_fused_and_the_report_shows_the_table(killed_and_resumed, tmp_path):
    """The eval stage's figures follow from its per-prompt records; the report and the card carry the table."""
    import matplotlib.image as mpimg

    from wrpo.eval.stats import bootstrap_ci
    from wrpo.pipeline.card import parse_front_matter

    _, run, wd, *_ = killed_and_resumed
    results = json.loads((run / "eval" / "results.json").read_text())
    records = [json.loads(x) for x in (run / "eval" / "records.jsonl").read_text().splitlines()]
    prepared = [json.loads(x)["prompt_id"] for x in (run / "prepare" / "eval.jsonl").read_text().splitlines()]
    assert results["prompts"] == len(records) == len(prepared) > 0
    assert [r["prompt_id"] for r in records] == prepared
    for model, baseline in (("sft", "target"), ("fused", "target"), ("fused", "sft")):
        rm = results["comparisons"][f"{model}_vs_{baseline}"]["rm"]
        pts = [1.0 if r["rewards"][model] > r["rewards"][baseline] else
               0.5 if r["rewards"][model] == r["rewards"][baseline] else 0.0 for r in records]
        assert rm["win_rate"] == pytest.approx(sum(pts) / len(pts)) and rm["n"] == len(pts)
        assert rm["ci"] == pytest.approx(list(bootstrap_ci(pts, 1000, 42)))
        assert 0.0 <= rm["lc_win_rate"] <= 1.0
    lengths = [sum(len(a) for a in r["answers"]["fused"]) for r in records]
    assert results["models"]["fused"]["mean_length"] == pytest.approx(sum(lengths) / len(lengths))
    manifest = json.loads((run / "eval" / "_MANIFEST.json").read_text())
    assert manifest["summary"]["fused_vs_target"] == round(100 * results["comparisons"]["fused_vs_target"]["rm"]
                                                           ["win_rate"], 1)
    proc = wrpo("report", str(run), "--out", str(tmp_path), workdir=wd)
    assert proc.returncode == 0, proc.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "## Evaluation (cf. paper Table 2)" in summary and "![eval](eval.png)" in summary
    for row in ("| target | 50.0 (baseline) |", "| Target-SFT |", "| fused (WRPO) |"):
        assert row in summary
    assert mpimg.imread(tmp_path / "eval.png")[..., :3].std() > 0.05
    # the cards: the wrpo stage's beside the weights, the eval stage's with the table; export ships the latter
    from huggingface_hub import ModelCard

    for card in (run / "wrpo" / "model" / "README.md", run / "eval" / "README.md"):
        text = card.read_text()
        assert "base_model" not in parse_front_matter(text)  # a tiny local folder has no Hub id
        assert "| llama | `source-llama` |" in text and "| qwen | `source-qwen` |" in text
    assert "| fused (WRPO) |" in (run / "eval" / "README.md").read_text()
    evaluated = ModelCard((run / "eval" / "README.md").read_text()).data
    index = {r.metric_type: r.metric_value for r in evaluated.eval_results}
    assert index["win_rate"] == manifest["summary"]["fused_vs_target"]  # the model-index carries the eval
    exported = last_json(wrpo("export", str(run), str(tmp_path / "export"), workdir=wd))
    assert exported["card"] == "eval" and (tmp_path / "export" / "model.safetensors").exists()


def test_the_series_drawn_are_the_expected_ones(tmp_path):
    from wrpo.analysis.report import plot_logp_shift, plot_reward_dynamics

    rows = [{"step": s, "alpha": 0.05 * s, "margins/hybrid": 0.1 * s, "margins/on_policy": 0.02 * s,
             "accuracy/hybrid": 0.5, "accuracy/on_policy": 0.6, "rewards/chosen_source": 0.1,
             "rewards/chosen_target": 0.1, "rewards/rejected": -0.1} for s in (1, 2, 3)]
    drawn = plot_reward_dynamics(rows, tmp_path / "r.png")
    assert drawn == ["alpha", "margins/hybrid", "margins/on_policy", "accuracy/hybrid", "accuracy/on_policy",
                     "rewards/chosen_source", "rewards/chosen_target", "rewards/rejected"]
    shift = [{"before": {"chosen_source": -5.0, "chosen_target": -2.0, "rejected": -2.5},
              "after": {"chosen_source": -4.0, "chosen_target": -1.8, "rejected": -3.0}}]
    assert len(plot_logp_shift(shift, tmp_path / "l.png")) == 6


def test_the_run_directory_can_live_on_s3(seaweedfs, tiny_models, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=seaweedfs.endpoint_url)
    s3.create_bucket(Bucket="wrpo-pipeline")
    spec = make_spec(tiny_models, tmp_path / "fusion.yaml", storage={"s3Endpoint": seaweedfs.endpoint_url})
    uri = "s3://wrpo-pipeline/runs/tiny"
    result = last_json(wrpo("run", str(spec), "--run-uri", uri, workdir=tmp_path / "work"))
    assert set(result["stages"].values()) == {"done"}
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="wrpo-pipeline", Prefix="runs/tiny/")["Contents"]}
    assert {f"runs/tiny/{n}/_MANIFEST.json" for n in STAGE_NAMES} <= keys
    assert "runs/tiny/wrpo/model/model.safetensors" in keys
    again = last_json(wrpo("run", str(spec), "--run-uri", uri, workdir=tmp_path / "work2"))
    assert set(again["stages"].values()) == {"skipped"}
    proc = wrpo("report", uri, "--out", str(tmp_path / "report"), "--s3-endpoint", seaweedfs.endpoint_url,
                workdir=tmp_path / "work")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "report" / "reward_dynamics.png").stat().st_size > 1000


def test_margins_experiment_trains_three_variants_on_the_same_pairs(killed_and_resumed, tmp_path):
    spec, run, wd, *_ = killed_and_resumed
    proc = wrpo("experiment", "margins", str(spec), "--run-uri", str(run), "--out", str(tmp_path),
                "--steps", "3", "--learning-rate", "1e-3", workdir=wd)
    result = last_json(proc)
    assert set(result["margins"]) == {"on-policy", "hybrid", "wrpo"}
    for name in result["margins"]:
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3]
        alphas = {"on-policy": [0.0] * 3, "hybrid": [1.0] * 3, "wrpo": [0.0, 0.05, 0.1]}[name]
        assert [r["alpha"] for r in rows] == pytest.approx(alphas)
    assert sorted(result["ordering"]) == ["hybrid", "on-policy", "wrpo"]
    assert (tmp_path / "margins.png").stat().st_size > 1000


def test_ctrl_c_stops_cleanly_and_keeps_committed_stages(tiny_models, tmp_path):
    import signal
    import time

    spec, run = make_spec(tiny_models, tmp_path / "fusion.yaml"), tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "WRPO_VLLM_PYTHON"}
    # the run waits before sample-sources (a fault point, wrpo.pipeline.runner) until the SIGINT: no race
    env.update(PYTHONPATH=str(ROOT), WRPO_WORKDIR=str(tmp_path / "work"), HF_HUB_OFFLINE="1",
               WRPO_FAULT_BEFORE_STAGE="sample-sources")
    # SIGINT as a terminal delivers it, even when the suite itself runs in the background (a shell starts
    # background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt)
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "wrpo.cli", "run", str(spec), "--run-uri", str(run)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600  # a hang detector: prepare takes seconds
    while "WRPO_FAULT_BEFORE_STAGE: waiting before sample-sources" not in log.read_text():
        assert proc.poll() is None, f"exited ({proc.returncode}) before its fault point: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no fault point after 600 s: {log.read_text()[-2000:]}"
        time.sleep(0.2)
    committed = (run / "prepare" / "_MANIFEST.json").read_bytes()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=600)
    err = log.read_text()
    assert proc.returncode == 130, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stages"]["prepare"] == "done" and result["interrupted_at"] == "sample-sources"
    assert "committed stages are intact" in err
    assert (run / "prepare" / "_MANIFEST.json").read_bytes() == committed
    assert not (run / "sample-sources" / "_MANIFEST.json").exists()
