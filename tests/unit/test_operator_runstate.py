"""The operator's read of the run directory: which units are committed with their current hash."""

from __future__ import annotations

import base64

from wrpo.pipeline.plan import plan_hashes
from wrpo.pipeline.rundir import RunDir
from wrpo.pipeline.spec import parse_spec
from wrpo_operator.runstate import committed_units, credentials


def spec_for(run_uri: str, model_b: str = "n"):
    return parse_spec({"target": {"model": "t"}, "dataset": {"uri": "p.jsonl"}, "storage": {"runUri": run_uri},
                       "sources": [{"name": "a", "model": "m"}, {"name": "b", "model": model_b}]})


def commit_unit(run: RunDir, stage: str, unit: str, unit_hash: str) -> None:
    out = run.stage(stage).writer()
    out.put_text(f"{unit}.jsonl", "{}\n")
    out.commit_unit(unit, unit_hash, out.written)


def test_units_committed_with_their_current_hash(tmp_path):
    spec = spec_for(str(tmp_path / "run"))
    run = RunDir(spec.storage.run_uri)
    units = plan_hashes(spec).units["sample-sources"]
    assert committed_units(spec, "sample-sources") == set()
    commit_unit(run, "sample-sources", "a", units["a"])
    commit_unit(run, "sample-sources", "b", "an older hash")
    assert committed_units(spec, "sample-sources") == {"a"}
    # b's model changed: its unit is not committed for this spec; a's still is
    changed = spec_for(spec.storage.run_uri, model_b="n2")
    commit_unit(run, "sample-sources", "b", plan_hashes(changed).units["sample-sources"]["b"])
    assert committed_units(changed, "sample-sources") == {"a", "b"}
    assert committed_units(spec, "sample-sources") == {"a"}
    assert committed_units(spec, "prepare") == set()  # a stage without units


def test_a_missing_object_means_not_committed(tmp_path):
    spec = spec_for(str(tmp_path / "run"))
    run = RunDir(spec.storage.run_uri)
    commit_unit(run, "sample-sources", "a", plan_hashes(spec).units["sample-sources"]["a"])
    (tmp_path / "run" / "sample-sources" / "a.jsonl").unlink()
    assert committed_units(spec, "sample-sources") == set()


def test_credentials_come_from_the_secret_and_never_show_in_repr():
    from wrpo.storage import S3Options

    secret = {"data": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"AKIDEXAMPLE").decode(),
                       "AWS_SECRET_ACCESS_KEY": base64.b64encode(b"s3cr3t-value").decode(), "other": "eA=="}}
    kw = credentials(secret)
    assert kw == {"access_key_id": "AKIDEXAMPLE", "secret_access_key": "s3cr3t-value"}
    assert "s3cr3t" not in repr(S3Options(**kw)) and "AKID" not in repr(S3Options(**kw))
    assert credentials(None) == {}
