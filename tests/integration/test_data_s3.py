"""The run directory on a real S3 server (SeaweedFS): commit, refusal, multipart, and a server restart
in the middle of a stage (retried, or failed cleanly without a manifest)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from wrpo.errors import StageNotCommitted
from wrpo.pipeline.rundir import RunDir
from wrpo.storage import S3Backend, S3Options, StorageError, download_uri_tree, read_uri_bytes

pytestmark = pytest.mark.integration


def run_dir(weed, name: str, **kw) -> RunDir:
    return RunDir(f"s3://{weed.bucket}/runs/{name}", S3Options(endpoint_url=weed.endpoint_url, **kw))


def test_stage_commit_and_read_on_s3(seaweedfs_running):
    run = run_dir(seaweedfs_running, "basic")
    out = run.stage("prepare").writer()
    out.put_text("sft.jsonl", '{"a": 1}\n')
    with pytest.raises(StageNotCommitted):
        run.stage("prepare").read_text("sft.jsonl")
    out.commit("hash", summary={"prompts": 1})
    fresh = run_dir(seaweedfs_running, "basic")
    assert fresh.stage("prepare").is_committed()
    assert fresh.stage("prepare").read_text("sft.jsonl") == '{"a": 1}\n'
    assert fresh.stage("prepare").manifest()["summary"] == {"prompts": 1}
    out.commit_shard("src", 0, b"x\n", key="k")
    assert fresh.stage("prepare").committed_shards("src")[0].key == "k"
    fresh.stage("prepare").reset(shards=True)
    assert not fresh.stage("prepare").is_committed()
    assert fresh.backend.list("prepare/") == {}


def test_multipart_upload_and_download(seaweedfs_running, tmp_path):
    from boto3.s3.transfer import TransferConfig

    run = run_dir(seaweedfs_running, "multipart")
    backend: S3Backend = run.backend
    mib5 = 5 * 1024 * 1024
    backend.transfer = TransferConfig(multipart_threshold=mib5, multipart_chunksize=mib5)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (11 * 1024 * 1024 // 256))
    out = run.stage("sft").writer()
    out.put_file("model/weights.bin", big)
    out.commit("h")
    got = run.stage("sft").download_tree("model", tmp_path / "dl")
    assert (got / "weights.bin").read_bytes() == big.read_bytes()
    uri = f"s3://{seaweedfs_running.bucket}/runs/multipart/sft/model"
    tree = download_uri_tree(uri, tmp_path / "tree", run.s3)
    assert (tree / "weights.bin").stat().st_size == big.stat().st_size
    assert json.loads(read_uri_bytes(f"s3://{seaweedfs_running.bucket}/runs/multipart/sft/_MANIFEST.json",
                                     run.s3))["spec_hash"] == "h"


def test_server_restart_mid_stage_is_retried(seaweedfs_running):
    """SeaweedFS goes down after the first object and comes back 3 s later: boto3's retries carry the
    stage through, and the manifest lists every object."""
    run = run_dir(seaweedfs_running, "restart-ok", max_attempts=12)
    out = run.stage("score-sources").writer()
    out.put_text("a.jsonl", "a\n")
    seaweedfs_running.stop()
    threading.Timer(3.0, seaweedfs_running.start).start()
    t0 = time.monotonic()
    out.put_text("b.jsonl", "b\n")
    out.commit("h")
    assert time.monotonic() - t0 > 2.0
    sd = run_dir(seaweedfs_running, "restart-ok").stage("score-sources")
    assert sd.read_text("a.jsonl") == "a\n" and sd.read_text("b.jsonl") == "b\n"


def test_server_down_fails_cleanly_without_a_manifest(seaweedfs_running):
    """With the server down for longer than the retry budget the stage fails with a StorageError naming
    the object, and no manifest exists once the server is back."""
    run = run_dir(seaweedfs_running, "restart-fail", max_attempts=2, connect_timeout_s=1)
    out = run.stage("score-sources").writer()
    out.put_text("a.jsonl", "a\n")
    seaweedfs_running.stop()
    try:
        with pytest.raises(StorageError, match=r"s3://wrpo-test/runs/restart-fail/score-sources/b.jsonl"):
            out.put_text("b.jsonl", "b\n")
        with pytest.raises(StorageError):
            out.commit("h")
    finally:
        seaweedfs_running.start()
    sd = run_dir(seaweedfs_running, "restart-fail").stage("score-sources")
    assert not sd.is_committed()
    with pytest.raises(StageNotCommitted):
        sd.read_text("a.jsonl")


def test_streamed_writes_and_reads_on_s3(seaweedfs_running):
    """StageWriter.open uploads in 16 MiB parts as they fill (one PUT for a small object), a failed
    write leaves no object, and StageDir.iter_lines streams it back checked against the manifest
    (docs/data.md, "Scale")."""
    from wrpo.records import split_lines

    run = run_dir(seaweedfs_running, "streamed")
    out = run.stage("score-sources").writer()
    line = b'{"prompt_id":"p","text":"' + b"x" * 1000 + b'"}\n'
    lines = 40 * 1024  # ~40 MiB: three parts
    with out.open("big.jsonl") as f:
        for _ in range(lines):
            f.write(line)
    with out.open("small.jsonl") as f:
        f.write(b"a\n")
    with pytest.raises(RuntimeError), out.open("failed.jsonl") as f:
        f.write(line * 20000)  # past one part: a multipart upload was started, then aborted
        raise RuntimeError("writer died")
    out.commit("h")
    sd = run_dir(seaweedfs_running, "streamed").stage("score-sources")
    assert sd.objects()["big.jsonl"]["size"] == len(line) * lines
    got = list(sd.iter_lines("big.jsonl"))
    assert len(got) == lines + 1 and got[0] == line.decode().rstrip("\n") and got[-1] == ""
    assert list(sd.iter_lines("small.jsonl")) == ["a", ""]
    assert "score-sources/failed.jsonl" not in run.backend.list("score-sources/")
    uploads = run.backend.client.list_multipart_uploads(Bucket=seaweedfs_running.bucket).get("Uploads", [])
    assert not [u for u in uploads if u["Key"].endswith("failed.jsonl")]
    # a corrupted copy streams to its end and then fails the manifest check, naming the object
    run.backend.put_bytes("score-sources/small.jsonl", b"b\n")
    with pytest.raises(StorageError, match="small.jsonl: content does not match the manifest"):
        list(split_lines(sd.iter_chunks("small.jsonl")))


def test_a_read_broken_off_by_a_restart_resumes_where_it_stopped(seaweedfs_running):
    """SeaweedFS goes down while an object is being streamed and comes back 3 s later: the reader asks
    again from the byte it stopped at (a ranged GET) and the whole object arrives, checked against the
    manifest."""
    run = run_dir(seaweedfs_running, "resume-read", max_attempts=12)
    out = run.stage("score-sources").writer()
    line = b"y" * 1023 + b"\n"
    with out.open("big.jsonl") as f:
        for _ in range(64 * 1024):  # 64 MiB: more than the sockets buffer
            f.write(line)
    out.commit("h")
    chunks = run_dir(seaweedfs_running, "resume-read", max_attempts=12).stage("score-sources").iter_chunks(
        "big.jsonl")
    got = [next(chunks)]
    seaweedfs_running.stop()
    threading.Timer(3.0, seaweedfs_running.start).start()
    got += list(chunks)
    data = b"".join(got)
    assert len(data) == 64 * 1024 * 1024 and data == line * (64 * 1024)


def test_a_stopped_server_leaves_nothing_in_the_machines_tmp(seaweedfs, tmp_path):
    """The harness's SeaweedFS keeps its logs and sockets in its own folders and removes the gRPC sockets
    weed puts in /tmp, so runs of the suite do not pile files up there."""
    from conftest import SeaweedFS, weed_ports

    server = SeaweedFS(seaweedfs.binary, tmp_path / "data", tmp_path / "weed.log", weed_ports())
    server.start()
    pid = server.proc.pid
    server.stop()
    ours = [p for p in Path("/tmp").iterdir()
            if p.name.endswith(f".{pid}") or any(f"-{port}.sock" in p.name for port in server.ports.values())]
    assert ours == [] and any(server.temp_dir.glob(f"weed.*.{pid}"))  # its log files went to its own TMPDIR
