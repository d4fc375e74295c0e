"""`wrpo report`'s stage table (wrpo.analysis.report) on a run directory committed as the runtime commits it."""

from __future__ import annotations

from wrpo.analysis.report import key_numbers, write_report
from wrpo.pipeline.rundir import RunDir

# the summaries the stages return (wrpo.data.sampling._assemble, wrpo.data.stages._score_file), per unit as
# wrpo.pipeline.runtime commits a stage made of units
SAMPLED = {
    "units": {
        "llama": {
            "prompts": 16,
            "shards": 1,
            "shards_reused": 0,
            "short_prompts": 0,
            "finish_reasons": {"stop": 20, "length": 12},
        },
        "qwen": {"prompts": 16, "shards": 1, "shards_reused": 1, "short_prompts": 1, "finish_reasons": {"length": 31}},
    }
}
SCORED = {
    "units": {"llama": {"answers": 32, "score_sum": -8.0}, "qwen": {"answers": 31, "score_sum": 6.2, "unparsed": 2}}
}


def test_unit_stages_show_answers_finish_reasons_and_mean_scores_per_source(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    for stage, summary in (
        ("sample-sources", SAMPLED),
        ("score-sources", SCORED),
        ("sample-target", SAMPLED["units"]["llama"]),
    ):
        out = run.stage(stage).writer()
        out.put_text("x.jsonl", "{}\n")
        out.commit("h", summary=summary)
    write_report(run.uri, tmp_path / "report")
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in (tmp_path / "report" / "summary.md").read_text().splitlines()
        if line.startswith("| ")
    }
    assert (
        "**llama**: prompts=16, shards=1, shards_reused=0, short_prompts=0, answers=32, finish length=12 "
        "stop=20; **qwen**: " in rows["sample-sources"]
    )
    assert (
        "**llama**: answers=32, mean_score=-0.25; **qwen**: answers=31, mean_score=0.2, unparsed=2 |"
        in rows["score-sources"]
    )
    assert "answers=32, finish length=12 stop=20 |" in rows["sample-target"]
    assert key_numbers({"score_sum": 1.0, "answers": 0}) == "answers=0"  # nothing scored: no mean
