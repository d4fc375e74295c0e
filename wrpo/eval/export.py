"""`wrpo export RUN DEST`: the fused model, its card and checksums, to a folder or `s3://` (docs/eval.md).

Every file of `<run>/wrpo/model/` is copied through a local temporary file that is checked against the wrpo
stage's manifest (size and sha256) before it is uploaded. The card is the eval stage's `README.md` (with the
eval table) when the eval stage was committed from this same fused model, else the wrpo stage's own card.
`SHA256SUMS` lists every file (the `sha256sum -c` format) and is written last, so a DEST with it is complete.
No pickle is shipped (`*.bin`, `*.pt`, optimizer and scheduler state: loading one runs code): the training
arguments travel as `training_args.json`. A local DEST gets files 0644 and folders 0755 whatever the umask,
so a serving account can read it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from wrpo.errors import StageNotCommitted, WrpoError
from wrpo.pipeline.rundir import RunDir
from wrpo.storage import S3Options, open_backend, sha256_bytes

CHECKSUMS = "SHA256SUMS"
#: Pickle formats (torch.save, pickle) and trainer state that an export never ships.
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def shipped(name: str) -> bool:
    """Whether a file of the fused model goes into an export: no pickle, no optimizer/scheduler/RNG state."""
    base = name.rsplit("/", 1)[-1]
    return not base.endswith(PICKLES) and not base.startswith(("optimizer", "scheduler", "rng_state"))


def card_for(run: RunDir) -> tuple[bytes | None, str]:
    """The card to ship and where it came from: eval's (made from this wrpo model), else wrpo's, else None."""
    wrpo_hash = run.stage("wrpo").manifest()["spec_hash"]
    try:
        ev = run.stage("eval").manifest()
        if ev.get("inputs", {}).get("wrpo") == wrpo_hash and "README.md" in ev["objects"]:
            return run.stage("eval").read_bytes("README.md"), "eval"
    except StageNotCommitted:
        pass
    if "model/README.md" in run.stage("wrpo").objects():
        return run.stage("wrpo").read_bytes("model/README.md"), "wrpo"
    return None, "none"


def export_model(run_uri: str, dest: str, s3: S3Options | None = None) -> dict[str, Any]:
    """Copy the fused model with its card and SHA256SUMS to `dest`; returns what was written."""
    run = RunDir(run_uri, s3)
    try:
        objects = run.stage("wrpo").objects()
    except StageNotCommitted:
        raise WrpoError(f"{run_uri}: the wrpo stage is not committed; there is no fused model to export") from None
    files = sorted(n for n in objects if n.startswith("model/") and n != "model/README.md")
    names = [n for n in files if shipped(n)]
    if not any(n.endswith(".safetensors") for n in names):
        raise WrpoError(f"{run_uri}: the wrpo stage lists no safetensors weights under model/ "
                        "(wrpo export ships no pickles)")
    out = open_backend(dest.rstrip("/"), s3, public=True)
    sums: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="wrpo-export-") as tmp:
        for name in names:
            rel = name.removeprefix("model/")
            local = run.stage("wrpo").download(name, Path(tmp) / rel)  # checked against the manifest
            out.put_file(rel, local)
            sums[rel] = objects[name]["sha256"]
            local.unlink()
    card, origin = card_for(run)
    if card is not None:
        out.put_bytes("README.md", card)
        sums["README.md"] = sha256_bytes(card)
    text = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(sums.items()))
    out.put_bytes(CHECKSUMS, text.encode())
    return {"dest": dest, "files": len(sums) + 1, "card": origin,
            "left_out": [n.removeprefix("model/") for n in files if not shipped(n)],
            "bytes": sum(objects[n]["size"] for n in names) + (len(card) if card else 0)}


def verify_export(dest: str, s3: S3Options | None = None) -> list[str]:
    """Files of an export whose sha256 differs from SHA256SUMS (or that are missing); [] when intact."""
    backend = open_backend(dest.rstrip("/"), s3)
    bad = []
    for line in backend.get_bytes(CHECKSUMS).decode().splitlines():
        digest, _, rel = line.partition("  ")
        try:
            data = backend.get_bytes(rel)
        except WrpoError:
            bad.append(rel)
            continue
        if sha256_bytes(data) != digest:
            bad.append(rel)
    return bad
