"""The code paths that compile at run time work in this environment (docs/images.md, "JIT compilers").

    python jit_check.py

Triton builds the launcher of every GPU kernel (and its driver utilities) as a Python C extension with
the C compiler and Python's headers the first time it runs: without them a vLLM server on CUDA or a
`torch.compile`d model fails with "Failed to find C compiler". That build is the same with or without a
GPU, so it is checked here through Triton's own entry point (`triton.runtime.build`) with a small C
extension. `torch.compile` on the CPU (TorchInductor's C++ backend) needs the C++ compiler and the same
headers. Exits non-zero, naming what failed, when either cannot compile; images/smoke.sh runs it in
every image with torch (and once with no compiler on PATH, to see it fail).
"""

from __future__ import annotations

import sys
import tempfile
import time

EXTENSION = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(6 * 7); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "wrpo_jit_check", NULL, -1, methods};
PyMODINIT_FUNC PyInit_wrpo_jit_check(void) { return PyModule_Create(&module); }
"""


def triton_extension() -> str:
    """A C extension built and loaded as Triton builds its kernel launchers."""
    from triton.runtime.build import compile_module_from_src

    module = compile_module_from_src(EXTENSION, "wrpo_jit_check")
    if module.answer() != 42:
        raise AssertionError(f"the compiled extension answered {module.answer()}")
    return "built and loaded a C extension"


def inductor_cpu() -> str:
    """`torch.compile` of a small function with TorchInductor's C++ (CPU) backend."""
    import torch

    def f(x):
        return torch.sin(x) * 2 + x.cumsum(0)

    x = torch.randn(257)
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))
    return f"compiled a function on the CPU (torch {torch.__version__})"


def main() -> int:
    failed = []
    for check in (triton_extension, inductor_cpu):
        t0 = time.monotonic()
        try:
            note = check()
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit code says it
            failed.append(check.__name__)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"jit-check {check.__name__}: FAILED: {type(e).__name__}: {first[:300]}", file=sys.stderr)
        else:
            print(f"jit-check {check.__name__}: ok, {note} in {time.monotonic() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    # Fresh caches: a kernel compiled by an earlier run must not hide a missing compiler.
    import os

    with tempfile.TemporaryDirectory(prefix="wrpo-jit-") as cache:
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "inductor")
        sys.exit(main())
