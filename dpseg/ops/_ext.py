"""The C++ backend: loads dpseg._C (csrc/), registers fakes for its ops, and wraps them.

The fakes give each op's output metadata without running it, so the ops trace under
torch.compile / FakeTensor and pass torch.library.opcheck.
"""

from __future__ import annotations

import torch

try:
    from dpseg import _C  # noqa: F401  (loading the library registers torch.ops.dpseg.*)

    LOAD_ERROR: Exception | None = None
except ImportError as err:  # not built: dispatch falls back to the torch backend
    LOAD_ERROR = err

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext "
    "--inplace`) in the dpseg checkout, with a C++17 compiler and the installed torch"
)


def available() -> bool:
    return LOAD_ERROR is None


def as_int64(seed: int) -> int:
    """A uint64 seed in the two's complement int64 the op schema carries."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _has_kernel(name: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"dpseg::{name}", key)
    except RuntimeError:  # no such schema
        return False


if LOAD_ERROR is None:

    @torch.library.register_fake("dpseg::per_sample_sq_norms")
    def _per_sample_sq_norms_fake(grads):
        return grads[0].new_empty((grads[0].shape[0],), dtype=torch.float64)

    @torch.library.register_fake("dpseg::clip_accumulate_noise")
    def _clip_accumulate_noise_fake(
        grads, clip_factors, noise_std, scale, seed, step, draws, offsets
    ):
        return [g.new_empty(g.shape[1:]) for g in grads]

    @torch.library.register_fake("dpseg::gaussian_noise_")
    def _gaussian_noise_fake(out, seed, step, offset, draws):
        return None

    @torch.library.register_fake("dpseg::philox4x32_10")
    def _philox_fake(counter, key):
        return counter.new_empty(counter.shape)

    if _has_kernel("group_norm_backward_per_sample", "CPU"):

        @torch.library.register_fake("dpseg::group_norm_backward_per_sample")
        def _gn_backward_fake(grad_out, x, mean, rstd, weight, groups, input_grad=True):
            n, c = x.shape[0], x.shape[1]
            dx = x.new_empty(x.shape) if input_grad else x.new_empty((0,))
            return dx, x.new_empty((n, c)), x.new_empty((n, c))

    if _has_kernel("conv_weight_grad_per_sample", "CPU"):

        @torch.library.register_fake("dpseg::conv_weight_grad_per_sample")
        def _conv_weight_grad_fake(grad_out, x, kernel, stride, dilation):
            return x.new_empty((x.shape[0], grad_out.shape[1], x.shape[1], *kernel))


if LOAD_ERROR is None and _has_kernel("clip_accumulate_noise_sgd_", "CPU"):

    @torch.library.register_fake("dpseg::clip_accumulate_noise_sgd_")
    def _sgd_fake(params, momentum_buffers, grads, clip_factors, *args):
        return [p.new_empty(p.shape) for p in params]

    @torch.library.register_fake("dpseg::clip_accumulate_noise_adam_")
    def _adam_fake(params, exp_avgs, exp_avg_sqs, grads, clip_factors, *args):
        return [p.new_empty(p.shape) for p in params]


def has_op(name: str, device_type: str = "cpu") -> bool:
    """Whether the loaded extension has dpseg::name for the device (an older build may not)."""
    return LOAD_ERROR is None and _has_kernel(name, device_type.upper())


def per_sample_sq_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.ops.dpseg.per_sample_sq_norms(grads)


def clip_accumulate_noise(grads, clip_factors, noise_std, scale, seed, step, draws, offsets):
    return torch.ops.dpseg.clip_accumulate_noise(
        grads, clip_factors, noise_std, scale, as_int64(seed), step, draws, offsets
    )


def gaussian_noise(numel, seed, step, offset, draws, dtype, device) -> torch.Tensor:
    out = torch.empty(numel, dtype=dtype, device=device)
    torch.ops.dpseg.gaussian_noise_(out, as_int64(seed), step, offset, draws)
    return out


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Raw Philox blocks: int64 (N, 4) counters and (N, 2) keys of 32-bit words -> (N, 4)."""
    return torch.ops.dpseg.philox4x32_10(counter, key)
