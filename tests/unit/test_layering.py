"""docs/architecture.md, "Layers": the folders are the layers, each imports only the layers below it,
and no module imports (directly or through others) a module that imports it back; the operator
(operator/wrpo_operator) sits beside the top and imports only the pipeline and the bottom; the bottom
modules (errors, storage, records) import nothing of wrpo above them. And "The plan": no stage name is
written outside the plan table in the pipeline and the operator (they read rows, never names).

The import graph is read from the source (every `import`, also inside functions; `if TYPE_CHECKING:`
blocks excluded), so a lazy import cannot hide a cycle or a layer violation.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from wrpo.pipeline.plan import STAGE_NAMES, STAGES

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "wrpo"
OPERATOR = ROOT / "operator" / "wrpo_operator"
BOTTOM = ("wrpo.errors", "wrpo.storage", "wrpo.records")

# layer -> wrpo layers it may import (besides itself and the bottom: `wrpo.errors`, `wrpo.storage`,
# `wrpo.records`, the JSONL contracts between stages)
ALLOWED = {
    "pipeline": set(),
    "data": {"pipeline"},
    "engine": set(),
    "models": set(),
    "eval": {"pipeline", "data"},
    "analysis": {"pipeline", "engine", "data", "eval"},
    "cli": {"pipeline", "engine", "data", "models", "analysis", "eval", "operator"},  # validate --server
}
EXCEPTIONS = {"wrpo.engine.stages": {"pipeline"}}  # the training stages' bodies bridge engine and pipeline
NEVER = {"pipeline": ("torch", "transformers", "deepspeed", "kubernetes", "kopf"),
         "operator": ("torch", "transformers", "deepspeed", "vllm", "datasets")}


def module_name(path: Path) -> str:
    parts = path.relative_to(OPERATOR.parent if OPERATOR in path.parents else ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in [*PACKAGE.rglob("*.py"), *OPERATOR.rglob("*.py")]}


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path) -> set[str]:
    """Every module `path` imports, including lazy imports inside functions."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)  # `from wrpo.cli import data`
            out.update(subs or {node.module})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


GRAPH = {m: {i for i in imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "wrpo_operator":
        return "operator"
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) and layer(m) != "operator"))
def test_each_layer_imports_only_the_layers_below(module):
    own = layer(module)
    allowed = ALLOWED[own] | EXCEPTIONS.get(module, set()) | {own}
    bad = sorted(i for i in GRAPH[module] if layer(i) and layer(i) not in allowed)
    assert not bad, f"{module} ({own}) imports {bad}; allowed layers: {sorted(allowed)}"
    everything = imports(MODULES[module])
    heavy = sorted(i for i in everything for lib in NEVER.get(own, ()) if i == lib or i.startswith(lib + "."))
    assert not heavy, f"{module} imports {heavy}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) == "operator"))
def test_the_operator_imports_only_the_pipeline_and_the_bottom(module):
    bad = sorted(i for i in GRAPH[module] if layer(i) not in ("operator", "pipeline") and i not in BOTTOM)
    assert not bad, f"{module} imports {bad}; the operator may import wrpo.pipeline and {BOTTOM}"
    everything = imports(MODULES[module])
    heavy = sorted(i for i in everything for lib in NEVER["operator"] if i == lib or i.startswith(lib + "."))
    assert not heavy, f"{module} imports {heavy}"


@pytest.mark.parametrize("module", BOTTOM)
def test_the_bottom_imports_nothing_above_it(module):
    above = sorted(i for i in GRAPH[module] if i not in BOTTOM)
    assert not above, f"{module} is at the bottom but imports {above}"


def test_the_graph_covers_the_operator_and_the_bottom():
    assert {"wrpo_operator.decide", "wrpo_operator.reconcile", *BOTTOM} <= set(MODULES)
    assert "wrpo.pipeline.plan" in GRAPH["wrpo_operator.builders"]


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                walk(n, [*path, n])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            walk(m, [m])


def test_every_row_names_a_body_that_exists_in_its_layer():
    for row in STAGES:
        module, _, attr = row.body.partition(":")
        assert module in MODULES, f"{row.name}: no module {module}"
        tree = ast.parse(MODULES[module].read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert attr in defined, f"{row.name}: {module} defines no function {attr}"
        assert layer(module) in ("data", "engine", "eval"), f"{row.name}: bodies live in data/, engine/ or eval/"


def test_no_stage_name_dispatch_in_the_runtime():
    """The runtime and the operator read rows; they never build a function name from a stage name."""
    for path in [PACKAGE / "pipeline" / "runtime.py", PACKAGE / "pipeline" / "runner.py",
                 OPERATOR / "builders.py", OPERATOR / "decide.py", OPERATOR / "reconcile.py"]:
        text = path.read_text()
        assert '"run_" +' not in text and "getattr(mod" not in text, path
        for name in ("ref-logps", "sample-sources", "sample-target", "score-sources", "score-target"):
            assert f'== "{name}"' not in text and f'!= "{name}"' not in text, f"{path} special-cases {name}"


# Where a stage's name may be written outside plan.py: words that are also something else. The spec's sections
# `sft`, `wrpo` and `eval` share their stages' names (spec.py's messages, crd.py's CEL rules name the section);
# `wrpo` is also the project (a distribution, a cache folder, the `wrpo` command, an app label, a CRD
# category) and an image registry's organisation.
NAMED_ELSEWHERE = {
    # spec.py also names the stages whose peak GPU need FusionSpec.stage_gpu_parts checks against
    # cluster.gpuBudget: the spec cannot import the plan (which imports it); tests/unit/test_spec_gpu_budget.py
    # checks that it agrees with what the builders build
    "wrpo/pipeline/spec.py": {"sft", "wrpo", "eval", "ghcr.io/wrpo/wrpo-runtime:0.1.0",
                              "ghcr.io/wrpo/wrpo-vllm:0.1.0",
                              "sample-sources", "score-sources", "score-target", "sample-target"},
    "operator/wrpo_operator/crd.py": {"sft", "wrpo", "eval"},  # the spec sections of those names
    "operator/wrpo_operator/builders.py": {"wrpo"},
    "wrpo/pipeline/rundir.py": {"wrpo"},
    "wrpo/pipeline/workdir.py": {"wrpo"},
    # the model card names the stages whose hashes it lists (card.py is being rewritten, issue 20 item 5)
    "wrpo/pipeline/card.py": {"wrpo", "eval", "sft"},
}


def _docstrings(tree: ast.AST) -> set[int]:
    """Docstrings and field descriptions (`Field(description=...)`, the CRD's documentation)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "description":
            out.update(id(c) for c in ast.walk(node.value) if isinstance(c, ast.Constant))
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def stage_names_written(path: Path) -> list[tuple[int, str]]:
    """String constants (f-string parts too; docstrings and field descriptions not) that are a stage name or
    a path through a stage's folder ("/<stage>/")."""
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
            and (node.value in STAGE_NAMES or any(f"/{n}/" in node.value for n in STAGE_NAMES))]


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in
                                        [*(PACKAGE / "pipeline").glob("*.py"), *OPERATOR.glob("*.py")]
                                        if p.name != "plan.py"))
def test_no_stage_name_outside_the_plan_table(path):
    """The pipeline and the operator read what they need about a stage from its row (`publishes`, `summary`,
    `servers`, `units`, ...); a stage's name written anywhere else is a special case of one stage."""
    allowed = NAMED_ELSEWHERE.get(path, set())
    found = [f"{path}:{line}: {value!r}" for line, value in stage_names_written(ROOT / path) if value not in allowed]
    assert not found, "stage names outside wrpo/pipeline/plan.py:\n" + "\n".join(found)


def test_the_stage_name_scan_finds_a_special_case(tmp_path):
    special = tmp_path / "x.py"
    special.write_text('"""Mentions eval in a docstring."""\nif stage == "eval":\n    uri = f"{run}/wrpo/model/"\n'
                       'x = Field(description="the sft stage\'s /sft/ folder")\n')
    assert [v for _, v in stage_names_written(special)] == ["eval", "/wrpo/model/"]


def test_stage_bodies_are_no_library():
    """A module of stage bodies (named by plan rows) is loaded by the runtime from the row; the layers that
    hold bodies (data, engine, eval) never import one another's bodies for helpers (servers, clients and
    scorers live in wrpo/data/serving.py and backends.py). The tools on top (cli, analysis) may."""
    bodies = {row.body.partition(":")[0] for row in STAGES}
    users = sorted(f"{m} imports {b}" for m, deps in GRAPH.items() for b in deps & bodies
                   if layer(m) in ("data", "engine", "eval"))
    assert not users, users


def test_no_two_test_files_share_a_name():
    """pytest imports the test files of tests/* by their basename (no packages): two files of one name in two
    tiers stop the whole collection with an 'import file mismatch'."""
    seen: dict[str, list[str]] = {}
    for f in sorted((ROOT / "tests").rglob("test_*.py")):
        seen.setdefault(f.name, []).append(str(f.relative_to(ROOT)))
    assert not {k: v for k, v in seen.items() if len(v) > 1}
