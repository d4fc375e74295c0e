"""Run directory on a local folder: manifest last, readers refuse uncommitted stages, shards survive."""

from __future__ import annotations

import json
import os
import stat

import pytest

from wrpo.errors import StageNotCommitted
from wrpo.pipeline.rundir import MANIFEST, RunDir
from wrpo.storage import LocalBackend, StorageError, sha256_bytes


def test_commit_writes_manifest_last_with_sizes_and_hashes(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    out = run.stage("prepare").writer()
    out.put_text("a.jsonl", "{}\n")
    src = tmp_path / "b.bin"
    src.write_bytes(b"x" * 10)
    out.put_file("sub/b.bin", src)
    assert not run.stage("prepare").is_committed()
    manifest = out.commit("hash1", inputs={"x": "y"}, summary={"n": 1})
    sd = run.stage("prepare")
    assert sd.is_committed()
    assert manifest["objects"]["a.jsonl"] == {"size": 3, "sha256": sha256_bytes(b"{}\n")}
    assert manifest["objects"]["sub/b.bin"]["size"] == 10
    on_disk = json.loads((tmp_path / "run" / "prepare" / MANIFEST).read_text())
    assert on_disk["spec_hash"] == "hash1" and on_disk["summary"] == {"n": 1}
    assert "python" in on_disk["versions"] and on_disk["created"]
    assert sd.read_text("a.jsonl") == "{}\n"
    sd.download("sub/b.bin", tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == b"x" * 10


def test_readers_refuse_uncommitted_stage(tmp_path):
    run = RunDir(str(tmp_path))
    run.stage("s").writer().put_text("a.jsonl", "x")
    with pytest.raises(StageNotCommitted, match="stage 's' is not committed"):
        run.stage("s").read_text("a.jsonl")
    with pytest.raises(StageNotCommitted):
        run.stage("s").manifest()


def test_reader_checks_content_against_manifest(tmp_path):
    run = RunDir(str(tmp_path))
    out = run.stage("s").writer()
    out.put_text("a.jsonl", "hello")
    out.commit("h")
    (tmp_path / "s" / "a.jsonl").write_text("hellO")
    with pytest.raises(StorageError, match="does not match the manifest"):
        run.stage("s").read_text("a.jsonl")
    with pytest.raises(StorageError, match="not listed"):
        run.stage("s").read_text("other.jsonl")


def test_commit_refuses_a_missing_object(tmp_path):
    run = RunDir(str(tmp_path))
    out = run.stage("s").writer()
    out.put_text("a.jsonl", "hello")
    (tmp_path / "s" / "a.jsonl").unlink()
    with pytest.raises(StorageError, match="missing or truncated"):
        out.commit("h")
    assert not run.stage("s").is_committed()


def test_shards_need_their_marker_and_survive_reset(tmp_path):
    run = RunDir(str(tmp_path))
    out = run.stage("sample").writer()
    out.commit_shard("src", 0, b"line0\n", key="k0")
    out.commit_shard("src", 1, b"line1\n", key="k1")
    # a shard whose marker never got written (killed between the two PUTs) is not committed
    (tmp_path / "sample" / "_shards" / "src" / "000001.jsonl.done").unlink()
    shards = run.stage("sample").committed_shards("src")
    assert set(shards) == {0} and shards[0].key == "k0"
    assert run.stage("sample").read_shard(shards[0]) == b"line0\n"
    out.put_text("src.jsonl", "partial")
    run.stage("sample").reset()
    assert not (tmp_path / "sample" / "src.jsonl").exists()
    assert set(run.stage("sample").committed_shards("src")) == {0}
    run.stage("sample").reset(shards=True)
    assert run.stage("sample").committed_shards("src") == {}


def test_reset_drops_the_manifest_first(tmp_path):
    run = RunDir(str(tmp_path))
    out = run.stage("s").writer()
    out.put_text("a", "1")
    out.commit("h")
    run.stage("s").reset()
    assert not run.stage("s").is_committed()
    assert list((tmp_path / "s").rglob("*.*")) == []


def test_reserved_names_are_refused(tmp_path):
    out = RunDir(str(tmp_path)).stage("s").writer()
    for bad in (MANIFEST, "_shards/x", "../x", "/abs"):
        with pytest.raises(ValueError):
            out.put_text(bad, "x")


def test_no_partial_file_is_visible_after_a_failed_write(tmp_path):
    run = RunDir(str(tmp_path))
    out = run.stage("s").writer()

    class Boom(Exception):
        pass

    with pytest.raises(Boom), out.open("x.jsonl") as f:
        f.write(b"half" * (1 << 19))  # past the writer's buffer: bytes reach the temporary file
        raise Boom
    assert not (tmp_path / "s" / "x.jsonl").exists()
    assert list((tmp_path / "s").glob("*.partial")) == []
    assert out.written == {}


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_committed_objects_have_the_mode_a_plain_open_gives(tmp_path, umask, mask, mode):
    """A file renamed into place has 0666 & ~umask, as `open()` would give it, not mkstemp's 0600."""
    umask(mask)
    run = RunDir(str(tmp_path / "run"))
    out = run.stage("s").writer()
    out.put_text("a.jsonl", "{}\n")
    src = tmp_path / "b.bin"
    src.write_bytes(b"x")
    out.put_file("sub/b.bin", src)
    out.commit("h")
    for name in ("a.jsonl", "sub/b.bin", MANIFEST):
        assert stat.S_IMODE((tmp_path / "run" / "s" / name).stat().st_mode) == mode, name


def test_a_public_folder_has_0644_files_and_0755_folders_whatever_the_umask(tmp_path, umask):
    umask(0o077)
    (tmp_path / "pub").mkdir(mode=0o700)  # an existing folder keeps its mode: it is the user's
    backend = LocalBackend(tmp_path / "pub", public=True)
    backend.put_bytes("a/b/c.txt", b"x")
    assert stat.S_IMODE((tmp_path / "pub" / "a" / "b" / "c.txt").stat().st_mode) == 0o644
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "pub" / "a", tmp_path / "pub" / "a" / "b")} == {0o755}
    assert stat.S_IMODE((tmp_path / "pub").stat().st_mode) == 0o700
