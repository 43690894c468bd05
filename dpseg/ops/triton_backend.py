"""The "triton" backend (dpseg.kernels) and the "cuda" backend (dpseg._C's CUDA kernels).

Triton runs on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 was set before the
kernels were first imported (that is how CI and GPU-less machines test it). The backend is
registered only where it can run, so ``available_backends()`` never lists one that fails.
"Cuda" is the same TORCH_LIBRARY ops as "cpp", registered when the extension was built with
its CUDA kernels (csrc/cuda/); both draw the same Philox noise bit for bit.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from . import _ext
from .dispatch import BACKENDS, Backend, register_backend

_KERNEL_MODULES = ("per_sample_sq_norms", "clip_accumulate_noise", "gaussian_noise")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels() -> ModuleType:
    """The dpseg.kernels package. pyproject maps it to the top-level kernels/ folder for
    installs; a source checkout on PYTHONPATH (or an editable install that predates the
    mapping) finds it beside dpseg/ instead."""
    try:
        return importlib.import_module("dpseg.kernels")
    except ModuleNotFoundError:
        path = Path(__file__).resolve().parents[2] / "kernels"
        spec = importlib.util.spec_from_file_location(
            "dpseg.kernels", path / "__init__.py", submodule_search_locations=[str(path)]
        )
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules["dpseg.kernels"] = module
        spec.loader.exec_module(module)
        import dpseg

        dpseg.kernels = module
        return module


def kernel(name: str) -> ModuleType:
    kernels()
    return importlib.import_module(f"dpseg.kernels.{name}")


def triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


def _per_sample_sq_norms(grads):
    return kernel("per_sample_sq_norms").per_sample_sq_norms(grads)


def _clip_accumulate_noise(grads, clip_factors, noise_std, scale, seed, step, draws, offsets):
    return kernel("clip_accumulate_noise").clip_accumulate_noise(
        grads, clip_factors, noise_std, scale, seed, step, draws, offsets
    )


def _gaussian_noise(numel, seed, step, offset, draws, dtype, device):
    return kernel("gaussian_noise").gaussian_noise(numel, seed, step, offset, draws, dtype, device)


TRITON = Backend(_per_sample_sq_norms, _clip_accumulate_noise, _gaussian_noise, triton_runs_on)


def cuda_kernels_built() -> bool:
    if not _ext.available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("dpseg::per_sample_sq_norms", "CUDA")


CUDA = Backend(
    _ext.per_sample_sq_norms,
    _ext.clip_accumulate_noise,
    _ext.gaussian_noise,
    runs_on=lambda device: device.type == "cuda",
)


def register(force_triton: bool = False) -> list[str]:
    """Registers what can run in this process; returns the names registered. Called on
    import of dpseg.ops; call again (force_triton=True in tests) after setting
    TRITON_INTERPRET=1 late."""
    names = []
    usable = torch.cuda.is_available() or interpreter_enabled()
    if triton_importable() and (usable or force_triton):
        register_backend("triton", TRITON)
        names.append("triton")
    if cuda_kernels_built():
        register_backend("cuda", CUDA)
        names.append("cuda")
    return names


def unregister(name: str) -> None:
    BACKENDS.pop(name, None)
