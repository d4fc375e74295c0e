"""The eval stage's body (docs/eval.md): did the fusion help?

1. prompts: `eval.prompts` (a question file, multi-turn included) or the held-out eval split;
2. answers of the original target, Target-SFT and the fused model (`answers/<role>.jsonl`), each from its
   server of the plan row (`wrpo.pipeline.plan.servers`: the operator's Services, or served here one after
   another), greedy by default, committed shard by shard;
3. the reward-model judge: the reward of each model's last answer per prompt, win rates against the target
   and Target-SFT with bootstrap CIs and the length-controlled win rate (`wrpo.eval.stats`);
4. the LLM judge (`eval.judge`): pairwise comparisons in both orders and 1-10 grades of every turn, every raw
   verdict in `verdicts.jsonl`, unparsed verdicts counted;
5. `results.json`, `records.jsonl` (one record per prompt) and `README.md` (the model card with the table).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from wrpo.data.backends import chat_backend, judge_backend, reward_scorer
from wrpo.data.judge import OUTCOME_POINTS, Dialogue, Judge, load_template
from wrpo.data.serving import given_endpoint
from wrpo.eval.answers import AnswerParams, answer_prompt, digest, run_sharded
from wrpo.eval.questions import EvalPrompt, from_records, load_questions
from wrpo.eval.stats import compare, points_from_scores
from wrpo.eval.table import table_markdown
from wrpo.pipeline.card import model_card, read_target_card
from wrpo.pipeline.context import StageContext
from wrpo.pipeline.plan import EVAL_ROLES, servers
from wrpo.records import PromptRecord, dump_jsonl, parse_jsonl
from wrpo.storage import S3Options

log = logging.getLogger(__name__)
#: The comparisons of the table: (model, baseline).
COMPARISONS = (("sft", "target"), ("fused", "target"), ("fused", "sft"))


def eval_prompts(ctx: StageContext) -> tuple[list[EvalPrompt], str]:
    """The prompts to answer and where they came from."""
    ev = ctx.spec.eval
    if ev.prompts:
        return load_questions(ev.prompts, S3Options.from_spec(ctx.spec.storage), ev.max_prompts), ev.prompts
    prepared = ctx.run.stage("prepare")
    records = parse_jsonl(prepared.read_text("eval.jsonl"), PromptRecord, prepared.uri("eval.jsonl"))
    return from_records(records[: ev.max_prompts] if ev.max_prompts else records), "the held-out eval split"


def dialogue(prompt: EvalPrompt, answers: list[str]) -> Dialogue:
    return Dialogue(prompt.messages, prompt.followups, answers)


def _model_dir(ctx: StageContext, role: str) -> str | None:
    """A local folder of the model of `role` (when no running server was given for it)."""
    if role == "target":
        return ctx.work.model(ctx.spec.target.model, S3Options.from_spec(ctx.spec.storage))
    return str(ctx.work.fetch(ctx.run, "sft" if role == "sft" else "wrpo", tree="model"))


def answer_all(ctx: StageContext, prompts: list[EvalPrompt]) -> dict[str, list[dict[str, Any]]]:
    """Every model's answers, one model at a time (locally, one server runs at a time)."""
    from tqdm.auto import tqdm

    served = {s.source: s for s in servers(ctx.spec, ctx.name, ctx.run.uri) if s.source}
    params = AnswerParams.from_spec(ctx.spec.eval)
    out: dict[str, list[dict[str, Any]]] = {}
    for role in EVAL_ROLES:
        server = served[role]
        model_dir = None if given_endpoint(ctx, server) else _model_dir(ctx, role)
        key = {"role": role, "made_from": _made_from(ctx, role), "params": params.__dict__}
        with chat_backend(ctx, server, model_dir) as backend, \
                tqdm(total=len(prompts), desc=f"eval answers {role}", unit="prompt") as bar:

            async def run(backend: Any = backend, role: str = role, key: Any = key, bar: Any = bar) -> Any:
                async with backend:
                    return await run_sharded(ctx.out, f"answers-{role}", prompts, ctx.spec.eval.shard_size, key,
                                             lambda p: answer_prompt(backend, p, params, role), bar.update)

            out[role] = asyncio.run(run())
        ctx.out.put_text(f"answers/{role}.jsonl", dump_jsonl(out[role]))
    return out


def _made_from(ctx: StageContext, role: str) -> str:
    """What the model of `role` is: the target's URI, or the hash its stage was committed with."""
    if role == "target":
        return ctx.spec.target.model
    return ctx.run.stage("sft" if role == "sft" else "wrpo").manifest()["spec_hash"]


def _length(record: dict[str, Any]) -> int:
    return sum(len(a) for a in record["answers"])


# ---------------------------------------------------------------------------------------------- judges


def reward_judge(ctx: StageContext, prompts: list[EvalPrompt], answers: dict[str, list[dict[str, Any]]]
                 ) -> tuple[dict[str, list[float]], str]:
    """The reward of each model's last answer per prompt (in its conversation), and the reward model's name."""
    rewards: dict[str, list[float]] = {}
    with reward_scorer(ctx) as scorer:
        for role in EVAL_ROLES:
            pairs = []
            for p, rec in zip(prompts, answers[role], strict=True):
                d = dialogue(p, rec["answers"])
                messages = list(d.context)
                for question, answer in zip(d.followups, d.answers[:-1], strict=False):
                    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
                pairs.append((messages, d.answers[-1]))
            rewards[role] = [s.value for s in scorer.score(pairs)]
        name = scorer.name
    return rewards, name


@contextmanager
def _judge(ctx: StageContext) -> Iterator[Judge]:
    j = ctx.spec.eval.judge
    served = [s for s in servers(ctx.spec, ctx.name, ctx.run.uri) if s.plays("judge")]
    with judge_backend(ctx, j, served) as backend:
        yield Judge(backend, j.max_tokens, j.temperature, ctx.spec.eval.seed, j.constrained,
                    expected_grade=j.expected_grade)


def llm_judge(ctx: StageContext, prompts: list[EvalPrompt], answers: dict[str, list[dict[str, Any]]]
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Raw verdicts (single grades of every turn, pairwise comparisons in both orders) and their tallies."""
    ev = ctx.spec.eval
    by_id = {p.prompt_id: p for p in prompts}
    texts = {role: {r["prompt_id"]: r["answers"] for r in rows} for role, rows in answers.items()}
    settings = {"judge": ev.judge.model_dump(mode="json"), "seed": ev.seed,
                "templates": [load_template(n).system + str(load_template(n).user.template)
                              for n in ("single", "pairwise")], "answers": digest(texts)}
    verdicts: list[dict[str, Any]] = []
    with _judge(ctx) as judge:

        async def grade(item: tuple[str, str, int]) -> dict[str, Any]:
            role, pid, turn = item
            v = await judge.grade(dialogue(by_id[pid], texts[role][pid]).turn(turn))
            return {"kind": "single", "prompt_id": pid, "model": role, "turn": turn + 1, **v.to_json()}

        async def pair(item: tuple[str, str, str]) -> dict[str, Any]:
            model, baseline, pid = item
            p = by_id[pid]
            outcome, first, second = await judge.compare_both(dialogue(p, texts[model][pid]),
                                                              dialogue(p, texts[baseline][pid]))
            return {"kind": "pairwise", "prompt_id": pid, "model": model, "baseline": baseline, "outcome": outcome,
                    "verdicts": [{"order": "model-first", **first.to_json()},
                                 {"order": "baseline-first", **second.to_json()}]}

        async def run() -> None:
            async with judge.backend:
                if ev.single:
                    items = [(role, p.prompt_id, t) for role in EVAL_ROLES for p in prompts for t in range(p.turns)]
                    verdicts.extend(await run_sharded(ctx.out, "judge-single", items, ev.shard_size, settings, grade))
                if ev.pairwise:
                    items = [(m, b, p.prompt_id) for m, b in COMPARISONS for p in prompts]
                    verdicts.extend(await run_sharded(ctx.out, "judge-pairwise", items, ev.shard_size, settings,
                                                      pair))

        asyncio.run(run())
    return verdicts, {"calls": judge.calls}


# ---------------------------------------------------------------------------------------------- results


def results_of(prompts: list[EvalPrompt], answers: dict[str, list[dict[str, Any]]],
               rewards: dict[str, list[float]] | None, verdicts: list[dict[str, Any]] | None,
               samples: int, seed: int) -> dict[str, Any]:
    """results.json: per model (mean length, mean reward, judge score) and per comparison (RM, judge)."""
    lengths = {role: [_length(r) for r in rows] for role, rows in answers.items()}
    models: dict[str, Any] = {}
    for role in EVAL_ROLES:
        m: dict[str, Any] = {"mean_length": sum(lengths[role]) / len(lengths[role]),
                             "finish_reasons": _count(str(f) for r in answers[role] for f in r["finish_reasons"])}
        if rewards:
            m["mean_reward"] = sum(rewards[role]) / len(rewards[role])
        if verdicts is not None:
            grades = [v for v in verdicts if v["kind"] == "single" and v["model"] == role]
            values = [v["value"] for v in grades if v["value"] is not None]
            if grades:
                m["judge_score"] = {"mean": sum(values) / len(values) if values else None, "n": len(values),
                                    "unparsed": len(grades) - len(values)}
        models[role] = m
    comparisons: dict[str, Any] = {}
    for model, baseline in COMPARISONS:
        c: dict[str, Any] = {}
        if rewards:
            pts = points_from_scores(rewards[model], rewards[baseline])
            c["rm"] = compare(pts, lengths[model], lengths[baseline], samples, seed).to_json()
        pairs = {v["prompt_id"]: v for v in verdicts or [] if v["kind"] == "pairwise" and v["model"] == model
                 and v["baseline"] == baseline}
        if pairs:
            outcomes = [pairs[p.prompt_id]["outcome"] for p in prompts]
            c["judge"] = compare([OUTCOME_POINTS[o] for o in outcomes], samples=samples, seed=seed,
                                 inconsistent=outcomes.count("inconsistent")).to_json()
        comparisons[f"{model}_vs_{baseline}"] = c
    return {"prompts": len(prompts), "turns": sum(p.turns for p in prompts), "models": models,
            "comparisons": comparisons}


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def per_prompt(prompts: list[EvalPrompt], answers: dict[str, list[dict[str, Any]]],
               rewards: dict[str, list[float]] | None, verdicts: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """records.jsonl: per prompt, its turns, each model's answers and reward, the judge's outcomes and grades."""
    out = []
    for i, p in enumerate(prompts):
        rec: dict[str, Any] = p.to_json() | {"answers": {role: answers[role][i]["answers"] for role in EVAL_ROLES}}
        if rewards:
            rec["rewards"] = {role: rewards[role][i] for role in EVAL_ROLES}
        mine = [v for v in verdicts or [] if v["prompt_id"] == p.prompt_id]
        if mine:
            rec["judge_outcomes"] = {f"{v['model']}_vs_{v['baseline']}": v["outcome"] for v in mine
                                     if v["kind"] == "pairwise"}
            rec["judge_grades"] = {f"{v['model']}/turn{v['turn']}": v["value"] for v in mine if v["kind"] == "single"}
        out.append(rec)
    return out


def status_summary(results: dict[str, Any]) -> dict[str, Any]:
    """The manifest summary (and the FusionRun's status.eval): win rates in %, one decimal. `<model>_vs_<baseline>`
    is the reward model's win rate, or the LLM judge's when there is no reward model (`eval.rewardModel: false`),
    and `<model>_vs_<baseline>_by` says which ("reward model" or "judge"): the FUSED-VS-TARGET column of
    `kubectl get fr` shows it (docs/eval.md, "Results")."""
    out: dict[str, Any] = {"prompts": results["prompts"]}
    for name, c in results.get("comparisons", {}).items():
        for judge, key, label in (("rm", "win_rate", ""), ("rm", "lc_win_rate", "lc_"),
                                  ("judge", "win_rate", "judge_")):
            value = (c.get(judge) or {}).get(key)
            if value is not None:
                out[f"{label}{name}"] = round(100 * value, 1)
        if name in out:
            out[f"{name}_by"] = "reward model"
        elif f"judge_{name}" in out:
            out[name], out[f"{name}_by"] = out[f"judge_{name}"], "judge"
    return out


def _card(ctx: StageContext, results: dict[str, Any]) -> str:
    from wrpo.errors import StageNotCommitted

    try:
        contrib = json.loads(ctx.run.stage("select-sources").read_text("contributions.json")).get("all")
    except StageNotCommitted:
        contrib = None
    training = ctx.run.stage("wrpo").manifest().get("summary")
    target = read_target_card(ctx.spec.target.model, S3Options.from_spec(ctx.spec.storage))
    return model_card(ctx.spec, ctx.hashes, contrib, training, table_markdown(results), target=target,
                      eval_results=results if results.get("prompts") else None)


def evaluate(ctx: StageContext) -> dict[str, Any]:
    """The eval stage (see the module docstring)."""
    ev = ctx.spec.eval
    prompts, source = eval_prompts(ctx)
    if not prompts:
        results: dict[str, Any] = {"prompts": 0, "source": source,
                                   "note": "no evaluation prompts: set dataset.evalSize or eval.prompts"}
        log.warning("eval: %s", results["note"])
        records: list[dict[str, Any]] = []
    else:
        answers = answer_all(ctx, prompts)
        rewards, rm_name = reward_judge(ctx, prompts, answers) if ev.reward_model else (None, None)
        verdicts = None
        if ev.judge is not None and (ev.single or ev.pairwise):
            verdicts, _ = llm_judge(ctx, prompts, answers)
            ctx.out.put_text("verdicts.jsonl", dump_jsonl(verdicts))
        results = results_of(prompts, answers, rewards, verdicts, ev.bootstrap, ev.seed)
        j = ev.judge
        results |= {"source": source, "reward_model": rm_name, "pairwise": ev.pairwise, "single": ev.single,
                    "judge": (j.endpoint.model if j.endpoint else j.model) if j else None}
        records = per_prompt(prompts, answers, rewards, verdicts)
    ctx.out.put_text("results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    ctx.out.put_text("records.jsonl", dump_jsonl(records))
    ctx.out.put_text("README.md", _card(ctx, results))
    return status_summary(results)
