"""Two clones on one machine never import each other's code (README.md, "Testing"): scripts/install.sh puts
only the dependencies into the shared cached venv and gives each checkout its own `.wrpo/bin/python` and
`.wrpo/bin/wrpo`. The repository at HEAD is cloned twice and both are installed against the cached venv
this suite runs in (seconds: nothing is downloaded); each clone's python and `wrpo` must run its own code,
also after the other one was installed last."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _cache() -> Path:
    """The cache of the venv running this suite (<cache>/venvs/all-<key>), where install.sh finds it."""
    prefix = Path(sys.prefix)
    if prefix.parent.name != "venvs" or not prefix.name.startswith("all-") or not (prefix / ".complete").exists():
        pytest.skip(f"not run from a cached venv of scripts/install.sh ({prefix})")
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "pyproject.toml",
                              "requirements/constraints.txt"], capture_output=True, text=True, check=True).stdout
    if changed.strip():  # the clones (HEAD) would be keyed to another venv, which install.sh would create
        pytest.skip(f"uncommitted dependency changes: {changed.strip()}")
    return prefix.parents[1]


def _run(*argv: str | Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, cwd="/",
                          env={**env, **kw.pop("env", {})}, **kw)


def test_two_clones_each_import_their_own_code(tmp_path):
    cache = _cache()
    clones = {name: tmp_path / name for name in ("a", "b")}
    for name, clone in clones.items():
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=300)
        # a difference the `wrpo` command shows: clone b's CLI stops with its name
        if name == "b":
            with (clone / "wrpo" / "cli" / "main.py").open("a") as fh:
                fh.write('\nraise SystemExit("this is clone b")\n')
    pythons = {}
    for name, clone in clones.items():  # b is installed last: a must still run a's code
        out = _run("bash", clone / "scripts" / "install.sh", "all", "--venv", env={"WRPO_CACHE": str(cache)})
        assert out.returncode == 0, out.stderr
        assert "creating" not in out.stderr  # the cached venv was reused
        pythons[name] = Path(out.stdout.strip().splitlines()[-1])
        assert pythons[name] == clone / ".wrpo" / "bin" / "python"
    for name, clone in clones.items():
        code = "import wrpo, wrpo_operator, sys; print(wrpo.__file__); print(wrpo_operator.__file__); print(sys.prefix)"
        out = _run(pythons[name], "-c", code)
        assert out.returncode == 0, out.stderr
        wrpo_file, operator_file, prefix = out.stdout.split()
        assert Path(wrpo_file) == clone / "wrpo" / "__init__.py"
        assert Path(operator_file) == clone / "operator" / "wrpo_operator" / "__init__.py"
        assert Path(prefix) == Path(sys.prefix)  # one shared environment of dependencies
        # its own `wrpo`, called by path and found on PATH
        on_path = {"PATH": f"{clone / '.wrpo' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        for argv in ([clone / ".wrpo" / "bin" / "wrpo", "--help"], ["wrpo", "--help"]):
            out = _run(*argv, env=on_path)
            if name == "a":
                assert out.returncode == 0 and "Usage: wrpo" in out.stdout, out.stderr[-2000:]
            else:
                assert out.returncode == 1 and "this is clone b" in out.stderr, (out.stdout, out.stderr[-2000:])
