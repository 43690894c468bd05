"""Where the Triton tests run: compiled on a GPU, else under TRITON_INTERPRET=1 on the CPU.

The interpreter is chosen by an environment variable that Triton reads when a kernel is
first decorated, so the fixture sets it before anything imports dpseg.kernels, registers the
"triton" backend for one test and undoes both afterwards (the kernels stay interpreted for
the rest of the process, which only the CPU tests meet). It is function-scoped: a module
scope left "triton" registered for every later test of the module, where "auto" then chose
the interpreter (hundreds of times slower) and CI ran out of time.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch


@pytest.fixture
def triton_device() -> str:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from dpseg.ops import BACKENDS, triton_backend

    if torch.cuda.is_available():
        triton_backend.register()
        yield "cuda"
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    had_triton = "triton" in BACKENDS
    triton_backend.register(force_triton=True)
    try:
        yield "cpu"
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
        if not had_triton:
            triton_backend.unregister("triton")


def kernel(name: str):
    from dpseg.ops import triton_backend

    return triton_backend.kernel(name)


@pytest.fixture
def no_tf32(monkeypatch):
    """fp32 tolerances hold cuDNN / matmul (and the Triton conv, which follows cuDNN's
    setting) to IEEE fp32, not TF32's 10-bit mantissa."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    matmul = torch.backends.cuda.matmul
    old = getattr(matmul, "allow_tf32", None)  # absent from the CPU build's stub
    if old is not None:
        matmul.allow_tf32 = False
    yield
    if old is not None:
        matmul.allow_tf32 = old
