"""The eval section and `reward.type: judge` in the spec: validation, paths, servers and the GPU budget."""

from __future__ import annotations

import copy

import pytest

from wrpo.errors import SpecError
from wrpo.pipeline.plan import external_endpoints, servers
from wrpo.pipeline.spec import parse_spec

BASE = {"target": {"model": "t", "tensorParallelSize": 2}, "sources": [{"name": "a", "model": "m"}],
        "dataset": {"uri": "p.jsonl", "evalSize": 4}, "cluster": {"gpuBudget": 8, "training": {"gpus": 8}}}


def spec(**over):
    data = copy.deepcopy(BASE)
    for key, value in over.items():
        data[key] = {**data.get(key, {}), **value}
    return parse_spec(data)


def test_judge_needs_exactly_one_of_model_and_endpoint():
    with pytest.raises(SpecError, match=r"eval.judge: a judge needs exactly one of 'model' and 'endpoint'"):
        spec(eval={"judge": {}})
    with pytest.raises(SpecError, match=r"reward.judge: type 'judge' needs 'judge'"):
        spec(reward={"type": "judge"})
    with pytest.raises(SpecError, match=r"reward.judge.endpoint.apiKeyEnv: 'apiKeySecret' needs 'apiKeyEnv'"):
        spec(reward={"type": "judge", "judge": {"endpoint": {"url": "https://x/v1", "model": "m",
                                                              "apiKeySecret": "s"}}})


def test_the_eval_stage_must_fit_the_gpu_budget_as_a_whole():
    spec()  # 3 × 2 + scoring 1 = 7 <= 8
    with pytest.raises(SpecError, match=r"cluster.gpuBudget 8 is smaller than the 9 GPUs the eval stage holds at "
                                        r"once .*eval.judge: 2"):
        spec(eval={"judge": {"model": "j", "tensorParallelSize": 2}})
    spec(eval={"judge": {"endpoint": {"url": "https://x/v1", "model": "m"}}})  # an endpoint holds no GPU
    with pytest.raises(SpecError, match="the reward model's pooling server: 1"):
        spec(reward={"type": "remote", "model": "rm"}, cluster={"gpuBudget": 7, "training": {"gpus": 4}})
    spec(reward={"type": "remote", "model": "rm"}, eval={"rewardModel": False},
         cluster={"gpuBudget": 7, "training": {"gpus": 4}})
    spec(dataset={"evalSize": 0}, cluster={"gpuBudget": 2, "training": {"gpus": 2}})  # no eval prompts: no servers


def test_eval_servers_and_endpoints_follow_the_spec():
    s = spec(eval={"judge": {"model": "j"}}, reward={"type": "judge", "judge": {"endpoint": {
        "url": "https://x/v1", "model": "m", "apiKeyEnv": "K"}}}, cluster={"gpuBudget": 16})
    got = {x.key: (x.served_name, x.model, x.source) for x in servers(s, "eval", "s3://b/run")}
    assert got == {"eval-target": ("target", "t", "target"), "eval-sft": ("sft", "s3://b/run/sft/model/", "sft"),
                   "eval-fused": ("fused", "s3://b/run/wrpo/model/", "fused"), "judge": ("judge", "j", "judge")}
    assert [e.api_key_env for e in external_endpoints(s, "eval")] == ["K"]  # the judge reward's endpoint
    assert [e.api_key_env for e in external_endpoints(s, "score-target")] == ["K"]
    assert servers(s, "score-sources", "s3://b/run") == []  # an endpoint judge: nothing to serve


def test_relative_judge_and_question_paths_resolve_against_the_spec_file(tmp_path):
    from wrpo.pipeline.spec import load_spec

    (tmp_path / "f.yaml").write_text(
        "target: {model: t}\nsources: [{name: a, model: m}]\ndataset: {uri: p.jsonl}\n"
        "eval: {prompts: ./q/mt_bench.jsonl, judge: {model: ./models/judge}}\n")
    s = load_spec(tmp_path / "f.yaml")
    assert s.eval.prompts == str(tmp_path / "q" / "mt_bench.jsonl")
    assert s.eval.judge.model == str(tmp_path / "models" / "judge")
