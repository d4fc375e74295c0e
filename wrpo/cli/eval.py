"""`wrpo export`: the fused model with its card and checksums, to a folder or s3:// (docs/eval.md)."""

from __future__ import annotations

import json

import typer


def export(
    run_uri: str = typer.Argument(..., help="Run directory (folder or s3://) with a committed wrpo stage."),
    dest: str = typer.Argument(..., help="Destination folder or s3://bucket/prefix."),
    s3_endpoint: str | None = typer.Option(
        None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL)."),
) -> None:
    """Copy the fused model, its model card (README.md, with the eval table when the eval stage ran) and
    SHA256SUMS to DEST; every file is checked against the run's manifest on the way."""
    from wrpo.eval.export import export_model
    from wrpo.pipeline.spec import StorageSpec
    from wrpo.storage import S3Options

    print(json.dumps(export_model(run_uri, dest, S3Options.from_spec(StorageSpec(s3_endpoint=s3_endpoint)))))


def register(app: typer.Typer) -> None:
    app.command("export")(export)
