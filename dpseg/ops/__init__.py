"""Fused DP-SGD ops: per-sample norms, and clip + accumulate + Philox noise in one pass.

    from dpseg.ops import per_sample_sq_norms, clip_accumulate_noise, gaussian_noise

Each op has a pure-PyTorch reference (dpseg.ops.reference) and compiled backends held to it
bit for bit; `backend="auto"` picks the fastest one for the tensors' device.
"""

from .dispatch import (
    BACKENDS,
    KNOWN_BACKENDS,
    Backend,
    available_backends,
    clip_accumulate_noise,
    gaussian_noise,
    per_sample_sq_norms,
    register_backend,
)
from .triton_backend import register as _register_compiled_backends

# "triton" where Triton can run (a GPU, or TRITON_INTERPRET=1), "cuda" where dpseg._C was
# built with its CUDA kernels. Done here, not in dispatch.py: triton_backend imports
# dispatch, and a module must not import the module that imports it.
_register_compiled_backends()

__all__ = [
    "BACKENDS",
    "KNOWN_BACKENDS",
    "Backend",
    "available_backends",
    "clip_accumulate_noise",
    "gaussian_noise",
    "per_sample_sq_norms",
    "register_backend",
]
