"""`FusionSpec.stage_gpu_parts` (what `_stages_fit_the_gpu_budget` checks against cluster.gpuBudget) counts
what the operator really builds: each stage's vLLM Deployments plus one pod of the Job beside them (for
sample-sources, the largest unit's), read from `builders.stage_children`. The spec module cannot import the
plan, so it mirrors it: this test keeps the mirror true (docs/operator.md, "GPU budget")."""

from __future__ import annotations

import pytest

from wrpo.pipeline.gpus import object_gpus, pod_gpus
from wrpo.pipeline.spec import parse_spec
from wrpo_operator.builders import pod_templates, stage_children

BASE = {"target": {"model": "s3://bkt/t", "tensorParallelSize": 2},
        "sources": [{"name": "a", "model": "s3://bkt/a", "tensorParallelSize": 4},
                    {"name": "b", "model": "s3://bkt/b", "replicas": 2},
                    {"name": "api", "endpoint": {"url": "https://api.example.com/v1", "model": "m"}}],
        "dataset": {"uri": "s3://bkt/p.jsonl"}, "storage": {"runUri": "s3://bkt/runs/x"}}


def _peak(spec, stage: str) -> int:
    kids = stage_children("x", "ns", spec, stage, "s3://bkt/runs/x")
    if kids.units:
        return max(u.gpus + pod_gpus(pod_templates(u.runner)[0]) for u in kids.units)
    servers = sum(object_gpus(o) for o in kids.servers)
    return servers + max(pod_gpus(t) for r in kids.runners for t in pod_templates(r))


@pytest.mark.parametrize("over", [
    {"reward": {"type": "remote", "model": "s3://bkt/r"}},
    {"reward": {"type": "judge", "judge": {"model": "s3://bkt/j", "tensorParallelSize": 2}},
     "cluster": {"small": {"gpus": 1}, "scoring": {"gpus": 2}}},
    {"cluster": {"vllm": {"gpus": 1}, "scoring": {"gpus": 0}}},
    {"reward": {"type": "remote", "model": "s3://bkt/r", "endpoint": "https://rm.example.com"}},
])
def test_the_parts_of_each_stage_add_up_to_what_the_operator_builds(over):
    spec = parse_spec({**BASE, **over, "cluster": {"training": {"gpus": 1}, **over.get("cluster", {})}})
    parts = spec.stage_gpu_parts()
    assert set(parts) == {"sample-sources", "score-sources", "score-target", "sample-target"}
    for stage, found in parts.items():
        assert sum(n for _, n in found) == _peak(spec, stage), (stage, found)
