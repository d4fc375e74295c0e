"""The training stages' local copies follow the committed stage they were fetched from."""

from __future__ import annotations

from pathlib import Path

from wrpo.train_stages import _fetch_sft_model


class FakeStage:
    def __init__(self, run: FakeRun):
        self.run = run

    def manifest(self) -> dict:
        return {"spec_hash": self.run.version}

    def download_tree(self, prefix: str, dest: Path) -> Path:
        self.run.downloads += 1
        dest.mkdir(parents=True, exist_ok=True)
        (dest / f"weights-{self.run.version}.safetensors").write_text(self.run.version)
        return dest


class FakeRun:
    def __init__(self):
        self.version, self.downloads = "h1", 0

    def stage(self, name: str) -> FakeStage:
        assert name == "sft"
        return FakeStage(self)


def test_a_re_run_sft_stage_is_fetched_again_and_nothing_old_survives(tmp_path):
    run = FakeRun()
    model = _fetch_sft_model(run, tmp_path)
    _fetch_sft_model(run, tmp_path)
    assert run.downloads == 1  # same committed SFT: reused
    run.version = "h2"  # the spec changed and sft was committed again
    assert _fetch_sft_model(run, tmp_path) == model
    assert run.downloads == 2
    assert sorted(p.name for p in model.glob("weights-*")) == ["weights-h2.safetensors"]
