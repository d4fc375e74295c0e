"""docs/architecture.md, "Layers": the operator imports wrpo.pipeline (spec, plan, servers, gpus, ...), the
bottom modules and Kubernetes libraries, never torch; loading any of its modules loads no heavy library
(tests/unit/test_layering.py checks the imports it writes; this checks what importing really loads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "deepspeed", "vllm", "boto3", "datasets")


@pytest.mark.parametrize("module", ["wrpo_operator", "wrpo_operator.handlers", "wrpo_operator.crd",
                                    "wrpo_operator.reconcile", "wrpo_operator.decide", "wrpo_operator.builders",
                                    "wrpo_operator.status", "wrpo_operator.runstate"])
def test_operator_never_imports_heavy_libraries(module):
    code = (f"import sys, {module}; heavy = [m for m in {HEAVY!r} if m in sys.modules]; "
            "print(','.join(heavy)); sys.exit(1 if heavy else 0)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "operator")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, f"{module} imported {out.stdout.strip()} {out.stderr[-2000:]}"


def test_import_name_is_not_the_stdlib_operator_module():
    import operator

    import wrpo_operator

    assert hasattr(operator, "itemgetter") and Path(wrpo_operator.__file__).parent.parent.name == "operator"
