"""`wrpo data ...`: helpers around the data stages (the stages themselves are `wrpo stage <name>`).

- `wrpo data batch-input`: a vLLM `run-batch` input file (OpenAI batch format) for one model over the
  prepared prompts, so the cluster can sample as a batch Job.
- `wrpo data batch-output`: turn a `run-batch` output file into sample records (`<source>.jsonl`).
- `wrpo data serve`: serve a model with vLLM on 127.0.0.1 until interrupted (what sampling does locally).
"""

from __future__ import annotations

from pathlib import Path

import typer

from wrpo.cli.pipeline import run_uri_option

data_app = typer.Typer(help="Data-pipeline helpers: vLLM batch files, local serving.", no_args_is_help=True)
SPLITS_HELP = "Prepared splits to include, comma-separated (sources: sft,po,eval; target: po,eval)."


def _spec_and_run(spec: str, run_uri: str | None):
    from wrpo.cli.pipeline import _load
    from wrpo.pipeline.runtime import open_run

    the_spec = _load(spec)
    return the_spec, open_run(the_spec, run_uri)


@data_app.command("batch-input")
def batch_input(
    spec: str = typer.Argument(..., help="FusionSpec YAML."),
    model: str = typer.Option(..., help="Model name the batch server serves (e.g. the source name)."),
    out: Path = typer.Option(..., help="Where to write the requests JSONL."),
    run_uri: str | None = typer.Option(None, "--run-uri", help="Run directory (default: storage.runUri).",
                                       callback=run_uri_option),
    splits: str = typer.Option("sft,po,eval", help=SPLITS_HELP),
) -> None:
    """Write a vLLM run-batch input file (one chat-completions request per prepared prompt, n=N)."""
    from wrpo.data.sampling import SamplingParams
    from wrpo.data.sampling_batch import batch_requests
    from wrpo.data.stages import read_prompts

    the_spec, run = _spec_and_run(spec, run_uri)
    prompts = read_prompts(run, tuple(s.strip() for s in splits.split(",")))
    out.write_text(batch_requests(prompts, SamplingParams.from_spec(the_spec.sampling), model))
    typer.echo(f"{len(prompts)} requests -> {out}")


@data_app.command("batch-output")
def batch_output(
    spec: str = typer.Argument(..., help="FusionSpec YAML."),
    results: Path = typer.Option(..., help="The run-batch output JSONL."),
    name: str = typer.Option(..., help="Source name recorded as the records' model."),
    out: Path = typer.Option(..., help="Where to write the sample records JSONL."),
    run_uri: str | None = typer.Option(None, "--run-uri", help="Run directory (default: storage.runUri).",
                                       callback=run_uri_option),
    splits: str = typer.Option("sft,po,eval", help=SPLITS_HELP),
) -> None:
    """Convert run-batch results to sample records, in prompt order; every prompt must have a result."""
    from wrpo.data.sampling import SamplingParams
    from wrpo.data.sampling_batch import read_batch_results
    from wrpo.data.stages import read_prompts
    from wrpo.records import dump_jsonl

    the_spec, run = _spec_and_run(spec, run_uri)
    order = [p.prompt_id for p in read_prompts(run, tuple(s.strip() for s in splits.split(",")))]
    records = read_batch_results(results.read_text(), SamplingParams.from_spec(the_spec.sampling), name,
                                 str(results), order)
    out.write_text(dump_jsonl(records))
    typer.echo(f"{len(records)} sample records -> {out}")


@data_app.command("serve")
def serve(
    model: str = typer.Argument(..., help="Model folder."),
    name: str = typer.Option(..., help="Served model name."),
    pooling: bool = typer.Option(False, help="Serve a reward model with --runner pooling."),
    max_model_len: int | None = typer.Option(None, help="vLLM --max-model-len."),
) -> None:
    """Serve MODEL with vLLM on 127.0.0.1 (a free port) until Ctrl-C."""
    import time

    from wrpo.data.serving import VLLMServer

    with VLLMServer(model, name, runner="pooling" if pooling else "generate",
                    max_model_len=max_model_len) as server:
        typer.echo(f"serving {name} at {server.base_url} (log {server.log_path}); Ctrl-C to stop")
        try:
            while server.proc is not None and server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


def register(app: typer.Typer) -> None:
    """Add this group's commands to the top-level app."""
    app.add_typer(data_app, name="data")
