"""`wrpo run`: every stage of a FusionSpec on this machine, in order, resumable.

Each stage commits by its manifest, so an interrupted run (Ctrl-C, a crash, a killed process) loses
at most the stage in flight; the next `wrpo run` skips what is committed for the same spec and redoes
the rest. A changed spec re-runs only the stages whose hash changed (wrpo.pipeline.plan). When the last
stage is committed, the run's local workdir (input copies, downloaded models) is removed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wrpo.pipeline.context import StageOptions
from wrpo.pipeline.plan import STAGE_NAMES, select_range
from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.runtime import StageResult, open_run, run_stage, workdir_of
from wrpo.pipeline.spec import FusionSpec


@dataclass
class RunReport:
    run_uri: str
    results: list[StageResult] = field(default_factory=list)
    interrupted_at: str | None = None
    seconds: float = 0.0


def _key_numbers(summary: dict) -> str:
    items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
             if isinstance(v, int | float) and not isinstance(v, bool)]
    text = ", ".join(items)
    return text if len(text) <= 70 else text[:67] + "..."


def summary_table(report: RunReport) -> Table:
    """The final table: stage, status, time, output, key numbers."""
    table = Table(title=f"wrpo run - {escape(report.run_uri)}", title_justify="left")  # URIs are no markup
    for col in ("stage", "status", "time", "output", "key numbers"):
        table.add_column(col, overflow="fold")
    for r in report.results:
        table.add_row(r.name, r.status, f"{r.seconds:.1f}s", escape(r.uri), escape(_key_numbers(r.summary)))
    if report.interrupted_at:
        table.add_row(report.interrupted_at, "[red]interrupted[/]", "", "", "re-run to resume")
    return table


def run_pipeline(spec: FusionSpec, run_uri: str | None = None, start: str | None = None,
                 until: str | None = None, options: StageOptions | None = None,
                 console: Console | None = None) -> RunReport:
    """Run the stages from `start` to `until`; committed ones are skipped. Ctrl-C stops cleanly."""
    console = console or Console(stderr=True)
    run = open_run(spec, run_uri)
    report = RunReport(run.uri)
    t0 = time.monotonic()
    names = select_range(start, until)
    _write_spec(run, spec)
    options = options or StageOptions()
    for name in names:
        console.rule(f"[bold]{name}")

        def unit_done(unit: str, status: str, seconds: float, stage: str = name) -> None:
            console.print(f"{stage}: unit {unit} {status} in {seconds:.1f}s")

        try:
            _fault_point(name, console)
            result = run_stage(spec, run, name, replace(options, on_unit=unit_done))
        except KeyboardInterrupt:
            report.interrupted_at = name
            console.print(f"[yellow]interrupted in '{name}': committed stages are intact; "
                          "run the same command again to resume[/]")
            break
        report.results.append(result)
        verb = "already committed, skipped" if result.status == "skipped" else f"done in {result.seconds:.1f}s"
        units = _unit_counts(result.units)
        console.print(f"{name}: {verb}{units}")
    else:
        if names[-1] == STAGE_NAMES[-1]:
            workdir_of(run, options).clean()  # everything is committed: local copies are not needed
    report.seconds = time.monotonic() - t0
    console.print(summary_table(report))
    return report


def _fault_point(stage: str, console: Console) -> None:
    """Test hook (README.md, "Testing"): WRPO_FAULT_BEFORE_STAGE=NAME waits before stage NAME until stopped."""
    if os.environ.get("WRPO_FAULT_BEFORE_STAGE") == stage:
        console.print(f"WRPO_FAULT_BEFORE_STAGE: waiting before {stage}")
        while True:
            time.sleep(60)


def _unit_counts(states: dict[str, str]) -> str:
    """` (units: 1 done, 2 already committed)` for stages made of units."""
    if len(states) < 2:
        return ""
    done = sum(s == "done" for s in states.values())
    return f" (units: {done} done, {len(states) - done} already committed)"


def _write_spec(run: RunDir, spec: FusionSpec) -> None:
    """Keep the spec beside the stages (reports read it); it is not part of any stage's commit."""
    blob = json.dumps(spec.model_dump(mode="json", by_alias=True), indent=2)
    run.backend.put_bytes("spec.json", blob.encode())
