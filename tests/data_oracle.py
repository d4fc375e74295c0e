"""The whole-file implementation of select-sources and build-pairs that the streamed stages replaced
(docs/data.md, "Scale"), kept verbatim - apart from returning its objects instead of writing them - as
the oracle of tests/unit/test_data_stream.py and tests/integration/test_data_pipeline.py: the streamed
stages must give the same bytes."""

from __future__ import annotations

import json

from wrpo.data.selection import SourceChoice, build_pairs, choose_sources, contributions, join_candidates, source_names
from wrpo.errors import DataError
from wrpo.records import PromptRecord, SampleRecord, ScoreRecord, dump_jsonl, parse_jsonl

SPLITS = ("sft", "po", "eval")


def _read(run, stage, name, model):
    sd = run.stage(stage)
    return parse_jsonl(sd.read_text(name), model, sd.uri(name))


def _candidates(run, sample_stage, score_stage, file):
    samples = _read(run, sample_stage, file, SampleRecord)
    scores = {s.prompt_id: s for s in _read(run, score_stage, file, ScoreRecord)}
    out = {}
    for s in samples:
        if s.prompt_id not in scores:
            raise DataError(run.stage(score_stage).uri(file), f"no scores for prompt '{s.prompt_id}'")
        out[s.prompt_id] = join_candidates(s, scores[s.prompt_id], run.stage(score_stage).uri(file))
    return out


def oracle_select(spec, run) -> dict[str, bytes]:
    splits = {name: _read(run, "prepare", f"{name}.jsonl", PromptRecord) for name in SPLITS}
    names = source_names(spec.sources, spec.selection.source_groups)
    cands = {}
    for name in names:
        for pid, cs in _candidates(run, "sample-sources", "score-sources", f"{name}.jsonl").items():
            cands.setdefault(pid, []).extend(cs)
    ids = [p.prompt_id for split in SPLITS for p in splits[split]]
    choices, dropped = choose_sources(ids, cands, names, spec.selection)
    by_id = {c.prompt_id: c for c in choices}
    sft = [{"prompt_id": p.prompt_id, "prompt": [m.model_dump() for m in p.prompt],
            "response": by_id[p.prompt_id].chosen.text, "source_model": by_id[p.prompt_id].chosen.model,
            "score": by_id[p.prompt_id].chosen.score} for p in splits["sft"] if p.prompt_id in by_id]
    report = {"sources": names, "all": contributions(choices, names)}
    for split in SPLITS:
        ids_split = {p.prompt_id for p in splits[split]}
        report[split] = contributions([c for c in choices if c.prompt_id in ids_split], names)
    return {"sft.jsonl": dump_jsonl(sft).encode(),
            "chosen_source.jsonl": dump_jsonl(c.to_json() for c in choices).encode(),
            "contributions.json": (json.dumps(report, indent=2) + "\n").encode()}


def oracle_pairs(spec, run) -> dict[str, bytes]:
    choices = {c["prompt_id"]: SourceChoice.from_json(c)
               for c in (json.loads(line) for line in
                         run.stage("select-sources").read_text("chosen_source.jsonl").splitlines() if line)}
    target = _candidates(run, "sample-target", "score-target", "target.jsonl")
    stats, out = {}, {}
    for split, file in (("po", "train.jsonl"), ("eval", "eval.jsonl")):
        prompts = _read(run, "prepare", f"{split}.jsonl", PromptRecord)
        records, st = build_pairs(prompts, choices, target, spec.selection.min_reward_gap)
        out[file] = dump_jsonl(records).encode()
        stats[file.removesuffix(".jsonl")] = st.to_json()
    out["stats.json"] = (json.dumps(stats, indent=2) + "\n").encode()
    return out


