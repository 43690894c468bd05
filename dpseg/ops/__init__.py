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
