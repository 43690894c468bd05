"""The op surface: input checks at the boundary, then one backend does the work.

Backends are a name -> implementation table; "torch" (dpseg.ops.reference) always exists,
"cpp" when the extension is built, and "triton" / "cuda" register themselves here when their
modules land. Every backend computes the same float64 expression in the same order and draws
the same Philox noise, so switching backend never changes the math (or the privacy
guarantee), only the speed.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import _ext, reference

KNOWN_BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
_AUTO_ORDER = ("cuda", "triton", "cpp", "torch")  # fastest first
_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class Backend:
    per_sample_sq_norms: Callable
    clip_accumulate_noise: Callable
    gaussian_noise: Callable
    runs_on: Callable[[torch.device], bool]  # which devices this backend handles


BACKENDS: dict[str, Backend] = {
    "torch": Backend(
        reference.per_sample_sq_norms,
        reference.clip_accumulate_noise,
        reference.gaussian_noise,
        runs_on=lambda device: True,
    )
}
if _ext.available():
    BACKENDS["cpp"] = Backend(
        _ext.per_sample_sq_norms,
        _ext.clip_accumulate_noise,
        _ext.gaussian_noise,
        runs_on=lambda device: device.type == "cpu",
    )


def register_backend(name: str, backend: Backend) -> None:
    """Adds (or replaces) an implementation, e.g. "triton" or "cuda" from their modules."""
    if name not in KNOWN_BACKENDS or name == "auto":
        raise ValueError(f"backend name must be one of {KNOWN_BACKENDS[1:]}, got {name!r}")
    BACKENDS[name] = backend


def available_backends() -> list[str]:
    """Backends usable in this process, fastest first (for some device)."""
    return [name for name in _AUTO_ORDER if name in BACKENDS]


_warned_missing_ext = False


def _select(backend: str, device: torch.device) -> Backend:
    global _warned_missing_ext
    if backend not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(KNOWN_BACKENDS)}")
    if backend == "auto":
        if device.type == "cpu" and "cpp" not in BACKENDS and not _warned_missing_ext:
            _warned_missing_ext = True
            warnings.warn(
                f"dpseg C++ extension not loaded ({_ext.LOAD_ERROR}); the fused ops run on the "
                f"slower pure-PyTorch backend (same results). To fix, {_ext.BUILD_HINT}.",
                RuntimeWarning,
                stacklevel=3,
            )
        return next(
            BACKENDS[n] for n in _AUTO_ORDER if n in BACKENDS and BACKENDS[n].runs_on(device)
        )
    if backend not in BACKENDS:
        if backend == "cpp":
            raise RuntimeError(
                f"backend='cpp': the dpseg C++ extension failed to load "
                f"({_ext.LOAD_ERROR}); {_ext.BUILD_HINT}"
            )
        raise RuntimeError(
            f"backend={backend!r} is not available here; available: {available_backends()}"
        )
    impl = BACKENDS[backend]
    if not impl.runs_on(device):
        raise ValueError(f"backend={backend!r} does not run on {device} tensors")
    return impl


def _check_grads(grads: Sequence[torch.Tensor], op: str) -> torch.device:
    if isinstance(grads, torch.Tensor) or len(grads) == 0:
        raise ValueError(
            f"{op}: grads must be a non-empty list of tensors shaped (B, *param_shape)"
        )
    first = grads[0]
    for i, g in enumerate(grads):
        if not isinstance(g, torch.Tensor) or g.dim() < 1:
            raise ValueError(f"{op}: grads[{i}] must be a tensor with a leading batch dimension")
        if g.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{op}: grads[{i}] must be float32 or float64, got {g.dtype}")
        if g.device != first.device:
            raise ValueError(f"{op}: grads[{i}] is on {g.device} but grads[0] on {first.device}")
        if g.shape[0] != first.shape[0]:
            raise ValueError(
                f"{op}: grads[{i}] has batch size {g.shape[0]} but grads[0] has "
                f"{first.shape[0]}; all per-sample gradients must share B"
            )
    return first.device


def _check_int(name: str, value: int, low: int, high: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # int, numpy and 0-dim integer tensors; not floats
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _check_noise_args(seed: int, step: int, draws: int) -> tuple[int, int, int]:
    return (
        _check_int("seed", seed, 0, (1 << 64) - 1),
        _check_int("step", step, 0, _INT64_MAX),
        _check_int("draws", draws, 1, 1 << 16),
    )


def _check_offset(name: str, offset: int, numel: int, draws: int) -> int:
    offset = _check_int(name, offset, 0, _INT64_MAX)
    if (offset + numel) * draws > _INT64_MAX:
        raise ValueError(f"{name}={offset}: element indices times draws overflow int64")
    return offset


def per_sample_sq_norms(grads: Sequence[torch.Tensor], backend: str = "auto") -> torch.Tensor:
    """||g_b||^2 summed over every tensor in grads: shape (B,), float64, accumulated in float64."""
    device = _check_grads(grads, "per_sample_sq_norms")
    grads = [g.detach() for g in grads]
    return _select(backend, device).per_sample_sq_norms(grads)


def clip_accumulate_noise(
    grads: Sequence[torch.Tensor],
    clip_factors: torch.Tensor,
    noise_std: float,
    scale: float,
    seed: int,
    step: int,
    draws: int = 1,
    offsets: Sequence[int] | None = None,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """scale * (sum_b c_b G_i[b] + noise_std * z) per tensor, in float64, rounded once.

    The noise of element j of tensor i is z(seed, step, offsets[i] + j, draws); offsets default
    to the running element count, so splitting tensors across calls (with matching offsets)
    draws the same noise as one call.
    """
    device = _check_grads(grads, "clip_accumulate_noise")
    batch = grads[0].shape[0]
    if not isinstance(clip_factors, torch.Tensor) or tuple(clip_factors.shape) != (batch,):
        got = tuple(clip_factors.shape) if isinstance(clip_factors, torch.Tensor) else clip_factors
        raise ValueError(f"clip_factors must be a tensor of shape ({batch},), got {got}")
    if not clip_factors.is_floating_point() or clip_factors.device != device:
        raise ValueError(
            f"clip_factors must be floating point on {device}, got "
            f"{clip_factors.dtype} on {clip_factors.device}"
        )
    for name, value in (("noise_std", noise_std), ("scale", scale)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    seed, step, draws = _check_noise_args(seed, step, draws)
    numels = [math.prod(g.shape[1:]) for g in grads]
    if offsets is None:
        offsets = [sum(numels[:i]) for i in range(len(numels))]
    if len(offsets) != len(grads):
        raise ValueError(f"got {len(offsets)} offsets for {len(grads)} tensors")
    offsets = [
        _check_offset(f"offsets[{i}]", offset, numel, draws)
        for i, (offset, numel) in enumerate(zip(offsets, numels, strict=True))
    ]
    impl = _select(backend, device)
    return impl.clip_accumulate_noise(
        [g.detach() for g in grads],
        clip_factors.detach().to(torch.float64),  # exact for float32 factors
        float(noise_std),
        float(scale),
        seed,
        step,
        draws,
        offsets,
    )


def gaussian_noise(
    numel: int,
    seed: int,
    step: int,
    offset: int = 0,
    draws: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> torch.Tensor:
    """The noise z of elements offset .. offset + numel - 1, shape (numel,), unit variance."""
    numel = _check_int("numel", numel, 0, _INT64_MAX)
    seed, step, draws = _check_noise_args(seed, step, draws)
    offset = _check_offset("offset", offset, numel, draws)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    device = torch.device(device)
    return _select(backend, device).gaussian_noise(numel, seed, step, offset, draws, dtype, device)
