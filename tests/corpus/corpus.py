"""The corpus of wrong specs and prompt files (tests/corpus/README.md): reading its cases, for
tests/unit/test_corpus.py (`wrpo spec validate`, `wrpo run --until prepare`) and
tests/cluster/test_spec_corpus.py (the apiserver)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wrpo.pipeline.strict_yaml import load_yaml

ROOT = Path(__file__).resolve().parent
SPECS = ROOT / "specs"
VALID = ROOT / "valid"
DATA = ROOT / "data"
#: `# apiserver: accepted: validate-only: why`: a pod-level rule the CRD cannot express (docs/spec.md,
#: "Validation"); the apiserver admits the FusionRun and `wrpo spec validate` refuses it.
VALIDATE_ONLY = "accepted: validate-only: "


@dataclass(frozen=True)
class SpecCase:
    path: Path
    why: str
    expect: list[str]  # the exact error lines, `{file}` for the path (without the `error: ` prefix)
    apiserver: list[str]  # `field ~ message part`, a part of the apiserver's message, or `accepted: why`

    @property
    def name(self) -> str:
        return self.path.stem

    def expected_lines(self, shown_path: str) -> list[str]:
        return [f"error: {e.replace('{file}', shown_path)}" for e in self.expect]

    @property
    def is_manifest(self) -> bool:
        return "\nkind: FusionRun\n" in "\n" + self.path.read_text()

    @property
    def validate_only(self) -> bool:
        """A pod-level mistake only `validate` (and a pod's creation) can see: the CRD admits it."""
        return any(a.startswith(VALIDATE_ONLY) for a in self.apiserver)


def spec_cases() -> list[SpecCase]:
    cases = []
    for path in sorted(SPECS.glob("*.yaml")):
        header = [line for line in path.read_text().splitlines() if line.startswith("# ")]
        expect = [line.removeprefix("# expect: ") for line in header if line.startswith("# expect: ")]
        api = [line.removeprefix("# apiserver: ") for line in header if line.startswith("# apiserver: ")]
        assert expect and api, f"{path}: a case needs '# expect:' and '# apiserver:' lines"
        cases.append(SpecCase(path, header[0].removeprefix("# "), expect, api))
    return cases


@dataclass(frozen=True)
class ValidCase:
    path: Path
    why: str

    @property
    def name(self) -> str:
        return self.path.stem


def valid_cases() -> list[ValidCase]:
    """Specs that must pass everywhere (`wrpo spec validate --cluster` and the apiserver): valid things a
    rule once refused, and the edges of the rules."""
    return [ValidCase(path, path.read_text().splitlines()[0].removeprefix("# "))
            for path in sorted(VALID.glob("*.yaml"))]


@dataclass(frozen=True)
class DataCase:
    path: Path
    why: str
    dataset: dict
    expect: str  # the one error line, `{file}` for the path (without the `error: ` prefix)

    @property
    def name(self) -> str:
        return self.path.name


def data_cases() -> list[DataCase]:
    index, _ = load_yaml((DATA / "cases.yaml").read_text(), str(DATA / "cases.yaml"))
    return [DataCase(DATA / name, case["why"], case.get("dataset", {}), case["expect"])
            for name, case in index.items()]


def as_fusionrun(text: str, name: str, namespace: str) -> str:
    """A case as the YAML body of a FusionRun create: manifests get the namespace, bare specs are indented
    under `spec:` unchanged (so YAML-level mistakes reach the apiserver as written)."""
    if "\nkind: FusionRun\n" in "\n" + text:
        return text.replace("metadata:\n", f"metadata:\n  namespace: {namespace}\n", 1)
    indented = "".join(f"  {line}\n" if line else "\n" for line in text.splitlines())
    return (f"apiVersion: fusion.wrpo.io/v1alpha1\nkind: FusionRun\nmetadata:\n  name: {name}\n"
            f"  namespace: {namespace}\nspec:\n{indented}")
