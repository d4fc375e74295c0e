#!/usr/bin/env bash
# Build (idempotently) the venv of one Kubeflow client SDK for the SDK test (tests/cluster/test_sdk_clients.py,
# docs/cluster-harness.md "Kubeflow SDK clients"): requirements/sdk/<name>.txt installed into
#   ${WRPO_CACHE:-~/.cache/wrpo}/sdk-envs/<name>-<hash of that file and the Python version>
# Each SDK gets its own venv because their pins clash with wrpo's (kubeflow-training: kubernetes<36).
# Two runs at once build one venv (the second waits on a lock); a complete venv is reused without
# touching the network. Prints the venv's python.
#
# Usage: scripts/setup-sdk-env.sh kubeflow|kubeflow-training
set -euo pipefail

name="${1:?usage: scripts/setup-sdk-env.sh NAME (a file requirements/sdk/NAME.txt)}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
reqs="$root/requirements/sdk/$name.txt"
[[ -f "$reqs" ]] || { echo "setup-sdk-env: no $reqs" >&2; exit 1; }
python="${WRPO_SDK_PYTHON:-python3.11}"
key="$( { cat "$reqs"; "$python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-12)"
cache="${WRPO_CACHE:-$HOME/.cache/wrpo}/sdk-envs"
venv="$cache/$name-$key"
mkdir -p "$cache"
exec 9>"$venv.lock"
flock 9
if [[ ! -x "$venv/bin/python" || ! -f "$venv/.complete" ]]; then
    echo "setup-sdk-env: creating $venv" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$reqs" >&2
    touch "$venv/.complete"
fi
echo "$venv/bin/python"
