"""docs/architecture.md, "Layers": the folders are the layers, each imports only the layers below it,
and no module imports (directly or through others) a module that imports it back.

The import graph is read from the source (every `import`, also inside functions; `if TYPE_CHECKING:`
blocks excluded), so a lazy import cannot hide a cycle or a layer violation.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from wrpo.pipeline.plan import STAGES

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "wrpo"

# layer -> wrpo layers it may import (besides itself and the bottom: `wrpo.errors`, `wrpo.storage`,
# `wrpo.records`, the JSONL contracts between stages)
ALLOWED = {
    "pipeline": set(),
    "data": {"pipeline"},
    "engine": set(),
    "models": set(),
    "eval": {"pipeline", "data"},
    "analysis": {"pipeline", "engine", "data", "eval"},
    "cli": {"pipeline", "engine", "data", "models", "analysis", "eval"},
}
EXCEPTIONS = {"wrpo.engine.stages": {"pipeline"}}  # the training stages' bodies bridge engine and pipeline
NEVER = {"pipeline": ("torch", "transformers", "deepspeed", "kubernetes", "kopf")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


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
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m)))
def test_each_layer_imports_only_the_layers_below(module):
    own = layer(module)
    allowed = ALLOWED[own] | EXCEPTIONS.get(module, set()) | {own}
    bad = sorted(i for i in GRAPH[module] if layer(i) and layer(i) not in allowed)
    assert not bad, f"{module} ({own}) imports {bad}; allowed layers: {sorted(allowed)}"
    everything = imports(MODULES[module])
    heavy = sorted(i for i in everything for lib in NEVER.get(own, ()) if i == lib or i.startswith(lib + "."))
    assert not heavy, f"{module} imports {heavy}"


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
    operator = ROOT / "operator" / "wrpo_operator"
    for path in [PACKAGE / "pipeline" / "runtime.py", PACKAGE / "pipeline" / "runner.py",
                 operator / "builders.py", operator / "reconcile.py"]:
        text = path.read_text()
        assert '"run_" +' not in text and "getattr(mod" not in text, path
        for name in ("ref-logps", "sample-sources", "sample-target", "score-sources", "score-target"):
            assert f'== "{name}"' not in text and f'!= "{name}"' not in text, f"{path} special-cases {name}"
