#!/usr/bin/env bash
# Install wrpo's dependencies with the given extras and the pinned constraints.
#
#   scripts/install.sh [EXTRAS] [--venv]
#
# EXTRAS: operator | train | all (default: all).
#
# With --venv, a virtualenv with the DEPENDENCIES ONLY is created (or reused) under
# ${WRPO_CACHE:-~/.cache/wrpo}/venvs/<extras>-<hash of the dependencies + constraints>, shared by every
# clone on the machine. The project itself is never installed into it: this checkout gets its own
# <checkout>/.wrpo/bin/python (the cached venv's python with this checkout, and its operator/, first on
# PYTHONPATH) and <checkout>/.wrpo/bin/wrpo (wrpo.cli:main on that python), so two clones on one machine never
# import each other's code (README.md, "Testing"). The last line printed is that python.
#
# Without --venv (container images), the package and its dependencies are installed, not editable, into
# the current python, and that python is printed. Progress goes to stderr.
set -euo pipefail

extras="${1:-all}"
use_venv="${2:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${WRPO_CACHE:-$HOME/.cache/wrpo}"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$cache/pip}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

python="${PYTHON:-python3.11}"
if [[ "$use_venv" != "--venv" ]]; then
    "$python" -m pip install -q -c "$root/requirements/constraints.txt" "$root[$extras]" >&2
    echo "$python"
    exit 0
fi

# The requirements of the extras (an extra naming wrpo[...] is expanded): what the venv holds and is keyed by.
requirements="$("$python" - "$root/pyproject.toml" "$extras" <<'EOF'
import re, sys, tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
optional, out, seen = project["optional-dependencies"], list(project["dependencies"]), set()

def add(extra: str) -> None:
    if extra in seen:
        return
    seen.add(extra)
    for req in optional[extra]:
        own = re.fullmatch(r"wrpo\[([^\]]+)\]", req.replace(" ", ""))
        if own:
            for name in own.group(1).split(","):
                add(name)
        else:
            out.append(req)

for extra in sys.argv[2].split(","):
    add(extra)
print("\n".join(dict.fromkeys(out)))
EOF
)"
# Keyed by what is installed (dependencies + pins), not by unrelated pyproject edits.
deps="$("$python" -c 'import json, sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(json.dumps([p["dependencies"], p["optional-dependencies"]], sort_keys=True))' "$root/pyproject.toml")"
key="$(printf '%s\n' "$deps" | cat - "$root/requirements/constraints.txt" | sha256sum | cut -c1-12)"
venv="$cache/venvs/$extras-$key"
mkdir -p "$cache/venvs"
# Two clones installing at once (a user's checkout and a CI clone) build one venv: the second waits for the
# first under a lock and then finds it complete.
exec 9>"$venv.lock"
flock 9
if [[ ! -x "$venv/bin/python" || ! -f "$venv/.complete" ]]; then
    echo "install.sh: creating $venv" >&2
    rm -rf "$venv"
    mkdir -p "$cache/venvs"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade "pip>=24" >&2
    printf '%s\n' "$requirements" >"$venv/requirements.txt"
    "$venv/bin/python" -m pip install -q -c "$root/requirements/constraints.txt" -r "$venv/requirements.txt" >&2
    touch "$venv/.complete"
fi
flock -u 9

# This checkout's commands: its code on the shared venv's dependencies.
bin="$root/.wrpo/bin"
mkdir -p "$bin"
write_wrapper() {  # NAME BODY: an executable script, replaced atomically (a running test may use it)
    local tmp
    tmp="$(mktemp "$bin/.$1.XXXXXX")"
    printf '#!/usr/bin/env bash\n# Made by scripts/install.sh: this checkout on the cached venv %s.\n%s\n' \
        "$venv" "$2" >"$tmp"
    chmod 755 "$tmp"
    mv -f "$tmp" "$bin/$1"
}
printf -v path_line 'export PYTHONPATH=%q${PYTHONPATH:+:$PYTHONPATH}' "$root:$root/operator"
printf -v python_line 'exec %q "$@"' "$venv/bin/python"
write_wrapper python "$path_line
$python_line"
printf -v wrpo_line 'exec %q -c %q "$@"' "$bin/python" \
    'import sys; from wrpo.cli import main; sys.argv[0] = "wrpo"; sys.exit(main())'
write_wrapper wrpo "$wrpo_line"
echo "$bin/python"
