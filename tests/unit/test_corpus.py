"""The corpus of wrong input (tests/corpus/README.md) through the command line a user types: every wrong
spec gives exactly its expected lines from `wrpo spec validate` and from `wrpo run --until prepare`, exit
code 2, and writes nothing; every wrong prompt file stops prepare with its expected line and commits
nothing. The same spec cases go to the apiserver in tests/cluster/test_spec_corpus.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
from corpus import ROOT, data_cases, spec_cases, valid_cases  # noqa: E402

from wrpo.cli.main import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SPEC_CASES = spec_cases()
DATA_CASES = data_cases()
VALID_CASES = valid_cases()


def cli(capsys, *args: str) -> tuple[int, list[str], str]:
    """`wrpo ARGS` in this process: (exit code, stderr lines, stdout)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.err.splitlines(), out.out


def test_the_corpus_is_as_large_as_promised():
    assert len(SPEC_CASES) >= 60 and len(DATA_CASES) >= 15 and len(VALID_CASES) >= 8
    assert len({c.name for c in SPEC_CASES}) == len(SPEC_CASES)


@pytest.mark.parametrize("path", [ROOT / "valid-spec.yaml", ROOT / "valid-run.yaml"], ids=lambda p: p.name)
def test_the_cases_start_from_valid_specs(capsys, path):
    """The cases change one thing in these: each fails for its own mistake only."""
    code, err, out = cli(capsys, "spec", "validate", str(path))
    assert code == 0 and err == [f"{path}: valid (2 sources)"], err
    assert out.splitlines()[0].startswith("prepare ")


@pytest.mark.parametrize("case", VALID_CASES, ids=lambda c: c.name)
def test_valid_spec_passes_with_the_cluster_rules(capsys, case):
    """Valid things once refused (Secret names with dots, generateName) and the edges of the rules."""
    code, err, out = cli(capsys, "spec", "validate", "--cluster", str(case.path))
    assert code == 0 and err == [f"{case.path}: valid (2 sources)"], err
    assert out.splitlines()[0].startswith("prepare ")


@pytest.mark.parametrize("case", SPEC_CASES, ids=lambda c: c.name)
def test_wrong_spec_is_refused_with_its_message(capsys, tmp_path, case):
    expected = case.expected_lines(str(case.path))
    code, err, out = cli(capsys, "spec", "validate", str(case.path))
    assert (code, err, out) == (2, expected, "")
    run = tmp_path / "run"
    code, err, out = cli(capsys, "run", str(case.path), "--until", "prepare", "--run-uri", str(run))
    assert (code, err, out) == (2, expected, "")
    assert not run.exists()  # nothing written


def test_the_console_script_prints_markup_as_text_and_no_traceback():
    """The real process: brackets in a message are shown as written (rich read `[/bold]` as a closing tag
    and crashed, and mangled patterns such as `[prefix/]`), one `error:` line per problem, exit 2."""
    for name in ("key-markup", "annotation-key"):
        case = next(c for c in SPEC_CASES if c.name == name)
        proc = subprocess.run([sys.executable, "-m", "wrpo.cli", "spec", "validate", str(case.path)],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == case.expected_lines(str(case.path))
        assert "[" in proc.stderr and "Traceback" not in proc.stderr


def _spec_for(tmp_path: Path, uri: Path, dataset: dict) -> Path:
    spec = {"target": {"model": "t"}, "sources": [{"name": "a", "model": "m"}], "reward": {"model": "r"},
            "dataset": {"uri": str(uri), **dataset}}
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


@pytest.mark.parametrize("case", DATA_CASES, ids=lambda c: c.name)
def test_wrong_prompt_file_stops_prepare_with_its_message(capsys, tmp_path, case):
    run = tmp_path / "run"
    spec = _spec_for(tmp_path, case.path, case.dataset)
    code, err, _ = cli(capsys, "run", str(spec), "--until", "prepare", "--run-uri", str(run))
    assert code == 2
    expected = f"error: {case.expect.replace('{file}', str(case.path))}"
    assert [line for line in err if line.startswith("error:")] == [expected]
    assert not any("Traceback" in line for line in err)
    assert not (run / "prepare").exists() or not any((run / "prepare").rglob("*"))  # nothing committed or written


def test_bom_and_crlf_prompt_files_are_read_like_plain_ones(capsys, tmp_path):
    """UTF-8 with a byte-order mark and Windows line endings (what Notepad writes) prepares the same splits
    as the plain file; a run URI with brackets is printed as text in the summary table."""
    rows = [json.dumps({"prompt_id": f"p{i}", "prompt": f"Question {i}: café?"}, ensure_ascii=False)
            for i in range(12)]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("\n".join(rows) + "\n", encoding="utf-8")
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(rows) + "\r\n").encode("utf-8"))
    splits = {}
    for name, data in (("plain", plain), ("windows", windows)):
        run = tmp_path / f"run-[/x]-{name}"
        spec = _spec_for(tmp_path, data, {"sftFraction": 0.5, "evalSize": 1})
        code, err, out = cli(capsys, "run", str(spec), "--until", "prepare", "--run-uri", str(run))
        assert code == 0, err
        assert json.loads(out)["stages"] == {"prepare": "done"}
        assert any("run-[/x]" in line for line in err)  # the summary shows the URI as written
        splits[name] = [(run / "prepare" / f"{s}.jsonl").read_text() for s in ("sft", "po", "eval")]
    assert splits["plain"] == splits["windows"]
    assert all(splits["plain"]) and "café" in splits["plain"][0] + splits["plain"][1]


@pytest.mark.parametrize("args", [["run", "SPEC", "--run-uri", "gs://b/runs/x"], ["stage", "prepare", "--spec", "SPEC",
                                                                                "--run-uri", "s3://"],
                                  ["report", "ftp://host/runs/x"]])
def test_a_run_uri_on_the_command_line_is_checked_like_storage_run_uri(capsys, tmp_path, monkeypatch, args):
    """`--run-uri gs://...` used to become the local folder ./gs:/..."""
    monkeypatch.chdir(tmp_path)
    args = [str(ROOT / "valid-spec.yaml") if a == "SPEC" else a for a in args]
    code, err, _ = cli(capsys, *args)
    uri = next(a for a in args if "://" in a)
    assert (code, err) == (2, [f"error: run URI '{uri}': must be a local path or s3://bucket/prefix (no other scheme)"])
    assert list(tmp_path.iterdir()) == []
