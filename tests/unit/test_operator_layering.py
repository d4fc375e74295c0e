"""docs/architecture.md, "Layers": the operator imports wrpo.pipeline.spec/plan and Kubernetes
libraries, never torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "deepspeed", "vllm", "boto3", "datasets")


@pytest.mark.parametrize("module", ["wrpo_operator", "wrpo_operator.handlers", "wrpo_operator.crd"])
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
