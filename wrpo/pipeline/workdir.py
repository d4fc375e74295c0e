"""The one local workdir policy (docs/architecture.md, "Workdir").

Everything a stage keeps on local disk lives under `<root>/<run key>/`, where root is `--workdir`,
`$WRPO_WORKDIR` or `~/.cache/wrpo/work`, and the run key a hash of the run URI:

- `inputs/<stage>/<hash>/`: local copies of a committed stage's objects, keyed by the hash that stage
  was committed with: a re-run stage is fetched again, and copies of other hashes are removed.
- `models/<hash of uri>/`: s3:// models named in the spec, fetched once.
- `scratch/<stage>/<hash>/`: a running stage's own files (training checkpoints): the same stage re-run
  for the same spec finds them (a killed training resumes); other hashes are removed; the folder is
  removed once the stage commits, by the process that committed it (global rank 0).

Under torchrun the first process of each node downloads; the others wait for its marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from wrpo.errors import WrpoError
from wrpo.pipeline.context import is_local_rank_zero, is_rank_zero
from wrpo.storage import S3Options, download_uri_tree

DOWNLOAD_TIMEOUT_S = 3600
_MARKER = ".complete"


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_root() -> Path:
    return Path(os.environ.get("WRPO_WORKDIR") or Path.home() / ".cache" / "wrpo" / "work")


class Workdir:
    """The local folders of one run directory (see module docstring)."""

    def __init__(self, run_uri: str, root: str | Path | None = None):
        self.run_uri = run_uri
        self.base = Path(root) if root else default_root() / _short(run_uri.rstrip("/"))

    def _keyed(self, kind: str, name: str, key: str) -> Path:
        """`<base>/<kind>/<name>/<key>`, removing the folders of other keys of the same name."""
        parent = self.base / kind / name
        if is_local_rank_zero() and parent.is_dir():
            for old in parent.iterdir():
                if old.name != key[:16]:
                    shutil.rmtree(old, ignore_errors=True)
        path = parent / key[:16]
        path.mkdir(parents=True, exist_ok=True)
        return path

    def scratch(self, stage: str, stage_hash: str) -> Path:
        """The running stage's own folder (kept across restarts of the same stage and spec)."""
        return self._keyed("scratch", stage, stage_hash)

    def finish(self, stage: str) -> None:
        """The stage committed: its scratch is no longer needed. Removed by global rank 0, the process that
        committed, only: on a cluster with several training nodes the scratch folder is the run's one
        checkpoint PVC that every node mounts (docs/operator.md, "Volumes and the workdir"), and another
        node's first process, done before rank 0 has uploaded the model and metrics.jsonl from there, would
        remove them under it (docs/images.md, "End-to-end tests with the images"). A node-local scratch of
        another node goes with its pod's volume."""
        if is_rank_zero():
            shutil.rmtree(self.base / "scratch" / stage, ignore_errors=True)

    def fetch(self, run, stage: str, names: list[str] | None = None, tree: str | None = None) -> Path:
        """A local copy of committed objects of `stage` (by name, or every object under `tree/`), checked
        against its manifest; fetched once per committed hash of that stage."""
        sd = run.stage(stage)
        dest = self._keyed("inputs", stage, sd.manifest()["spec_hash"]) / (tree or "objects")

        def fetch(d: Path) -> None:
            if tree is not None:
                shutil.rmtree(d, ignore_errors=True)  # no file of an older copy may survive
                sd.download_tree(tree, d)
            for n in names or []:
                sd.download(n, d / n)

        return once(dest, fetch)

    def fetch_together(self, run, parts: dict[str, list[str]], label: str) -> Path:
        """Objects of several committed stages in one folder (e.g. pairs with their reference log-probs
        beside them), keyed by all of those stages' committed hashes."""
        made_from = {stage: run.stage(stage).manifest()["spec_hash"] for stage in parts}
        dest = self._keyed("inputs", label, _short(json.dumps(made_from, sort_keys=True))) / "objects"

        def fetch(d: Path) -> None:
            for stage, names in parts.items():
                for n in names:
                    run.stage(stage).download(n, d / n)

        return once(dest, fetch)

    def model(self, uri: str, s3: S3Options | None = None) -> str:
        """A local folder for a model given as a folder, hub id or s3:// prefix (fetched once)."""
        if not uri.startswith("s3://"):
            return uri
        dest = self.base / "models" / _short(uri.rstrip("/"))
        return str(once(dest, lambda d: download_uri_tree(uri, d, s3)))

    def clean(self) -> None:
        """Remove everything of this run (after a complete `wrpo run`)."""
        if is_local_rank_zero():
            shutil.rmtree(self.base, ignore_errors=True)


def once(dest: Path, fetch: Callable[[Path], object]) -> Path:
    """Run `fetch(dest)` on the node's first process unless `dest` is complete; the others wait."""
    marker = dest.parent / f"{dest.name}{_MARKER}"
    if is_local_rank_zero():
        if not marker.exists():
            dest.mkdir(parents=True, exist_ok=True)
            fetch(dest)
            marker.touch()
        return dest
    deadline = time.monotonic() + DOWNLOAD_TIMEOUT_S
    while not marker.exists():
        if time.monotonic() > deadline:
            raise WrpoError(f"timed out waiting for local rank 0 to download into {dest}")
        time.sleep(2)
    return dest
