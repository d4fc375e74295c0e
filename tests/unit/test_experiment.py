"""The margins experiment's arithmetic, by hand."""

import pytest

from wrpo.analysis.experiment import final_margins, objective_margin


def test_objective_margin_is_eq7():
    # α=0.25: 0.25·2.0 + 0.75·0.4 = 0.5 + 0.3 = 0.8
    assert objective_margin({"alpha": 0.25, "margins/hybrid": 2.0, "margins/on_policy": 0.4}) == pytest.approx(0.8)


def test_final_margins_average_the_last_window():
    rows = [{"alpha": 0.0, "margins/hybrid": h, "margins/on_policy": o} for h, o in [(9, 9), (1, 2), (3, 4)]]
    # last two rows: margin = on-policy (α=0) → (2+4)/2 = 3; hybrid (1+3)/2 = 2
    assert final_margins(rows, window=2) == {"margin": 3.0, "hybrid": 2.0, "on_policy": 3.0}


def test_resume_skips_a_checkpoint_cut_short_while_saving(tmp_path):
    """A pod killed while saving leaves checkpoint-N without trainer_state.json: resume from the newest
    complete one (resuming from the cut one would fail on every restart)."""
    from types import SimpleNamespace

    from wrpo.engine.common import last_checkpoint

    folder = tmp_path / "checkpoints"
    for step, complete in ((2, True), (10, True), (12, False)):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (folder / "checkpoint-x").mkdir()
    cfg = SimpleNamespace(output_dir=tmp_path, resume=True)
    assert last_checkpoint(cfg) == str(folder / "checkpoint-10")  # numeric order: 10 after 2, 12 is cut
    assert last_checkpoint(SimpleNamespace(output_dir=tmp_path, resume=False)) is None
    (folder / "checkpoint-10" / "trainer_state.json").unlink()
    (folder / "checkpoint-2" / "trainer_state.json").unlink()
    assert last_checkpoint(cfg) is None
