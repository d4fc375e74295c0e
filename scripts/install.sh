#!/usr/bin/env bash
# Install the wrpo package with the given extras and the pinned constraints.
#
#   scripts/install.sh [EXTRAS] [--venv]
#
# EXTRAS: operator | train | all (default: all). With --venv, a virtualenv is created (or reused)
# under ${WRPO_CACHE:-~/.cache/wrpo}/venvs/<extras>-<hash of pyproject.toml + constraints>, so that
# later runs and fresh clones reuse it; without --venv the current python is used (container images).
# The last line printed on stdout is the python to use; progress goes to stderr.
set -euo pipefail

extras="${1:-all}"
use_venv="${2:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${WRPO_CACHE:-$HOME/.cache/wrpo}"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$cache/pip}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

python="${PYTHON:-python3.11}"
if [[ "$use_venv" == "--venv" ]]; then
    # Keyed by what is installed (dependencies + pins), not by unrelated pyproject edits.
    deps="$("$python" -c 'import json, sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(json.dumps([p["dependencies"], p["optional-dependencies"]], sort_keys=True))' "$root/pyproject.toml")"
    key="$(printf '%s\n' "$deps" | cat - "$root/requirements/constraints.txt" | sha256sum | cut -c1-12)"
    venv="$cache/venvs/$extras-$key"
    if [[ ! -x "$venv/bin/python" || ! -f "$venv/.complete" ]]; then
        echo "install.sh: creating $venv" >&2
        rm -rf "$venv"
        mkdir -p "$cache/venvs"
        "$python" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade "pip>=24" >&2
        "$venv/bin/python" -m pip install -q -c "$root/requirements/constraints.txt" "$root[$extras]" >&2
        touch "$venv/.complete"
    fi
    python="$venv/bin/python"
else
    "$python" -m pip install -q -c "$root/requirements/constraints.txt" "$root[$extras]" >&2
fi
# The package itself is always (re)installed editable from this checkout: cheap, and a fresh clone
# in another folder must not run the code of an older clone.
installed="$(cd / && "$python" -c 'import os, wrpo; print(os.path.dirname(os.path.dirname(os.path.abspath(wrpo.__file__))))' 2>/dev/null || true)"
if [[ "$installed" != "$root" ]]; then
    "$python" -m pip install -q --no-deps -e "$root" >&2
fi
echo "$python"
