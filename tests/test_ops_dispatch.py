"""The op boundary: backend choice, the missing-extension fallback, and input checks."""

import warnings

import pytest
import torch

import dpseg.ops.dispatch as dispatch
from dpseg.ops import (
    KNOWN_BACKENDS,
    available_backends,
    clip_accumulate_noise,
    gaussian_noise,
    per_sample_sq_norms,
)


def grads(batch=3):
    return [torch.randn(batch, 4, 2), torch.randn(batch, 5)]


def test_available_backends_lists_torch_last():
    names = available_backends()
    assert names[-1] == "torch" and set(names) <= set(KNOWN_BACKENDS)


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: auto, triton, cuda, cpp, torch"):
        per_sample_sq_norms(grads(), backend="cuda_fast")


def test_missing_extension_auto_warns_once_and_cpp_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "BACKENDS", {"torch": dispatch.BACKENDS["torch"]})
    monkeypatch.setattr(dispatch, "_warned_missing_ext", False)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ extension not loaded"):
        a = per_sample_sq_norms(grads())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = per_sample_sq_norms(grads())  # no second warning
    assert a.shape == b.shape == (3,)
    with pytest.raises(RuntimeError, match="setup.py build_ext"):
        gaussian_noise(4, 0, 0, backend="cpp")
    with pytest.raises(RuntimeError, match="not available"):
        gaussian_noise(4, 0, 0, backend="triton")


@pytest.mark.skipif("cpp" not in available_backends(), reason="dpseg C++ extension not built")
def test_cpp_refuses_other_devices():
    with pytest.raises(ValueError, match="does not run on meta"):
        per_sample_sq_norms([torch.empty(2, 3, device="meta")], backend="cpp")


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: per_sample_sq_norms([]), ValueError, "non-empty list"),
        (lambda: per_sample_sq_norms([torch.randn(2, 3), torch.randn(3, 3)]), ValueError,
         "batch size 3 but grads\\[0\\] has 2"),
        (lambda: per_sample_sq_norms([torch.randn(2, 3).half()]), TypeError, "float32 or float64"),
        (lambda: per_sample_sq_norms([torch.tensor(1.0)]), ValueError, "leading batch"),
        (lambda: per_sample_sq_norms([torch.randn(2, 3), torch.empty(2, 3, device="meta")]),
         ValueError, "is on meta"),
        (lambda: clip_accumulate_noise(grads(), torch.ones(2), 1.0, 1.0, 0, 0), ValueError,
         "shape \\(3,\\)"),
        (lambda: clip_accumulate_noise(grads(), torch.ones(3, dtype=torch.long), 1.0, 1.0, 0, 0),
         ValueError, "floating point"),
        (lambda: clip_accumulate_noise(grads(), torch.ones(3), 1.0, 1.0, 0, -1), ValueError,
         "step must be in"),
        (lambda: clip_accumulate_noise(grads(), torch.ones(3), 1.0, 1.0, 0, 0, draws=0),
         ValueError, "draws must be in"),
        (lambda: clip_accumulate_noise(grads(), torch.ones(3), 1.0, 1.0, -1, 0), ValueError,
         "seed must be in"),
        (lambda: clip_accumulate_noise(grads(), torch.ones(3), 1.0, 1.0, 2**64, 0), ValueError,
         "seed must be in"),
        (lambda: clip_accumulate_noise(grads(), torch.ones(3), -1.0, 1.0, 0, 0), ValueError,
         "noise_std must be >= 0"),
        (lambda: clip_accumulate_noise(grads(), torch.ones(3), float("nan"), 1.0, 0, 0),
         ValueError, "finite"),
        (lambda: clip_accumulate_noise(grads(), torch.ones(3), 1.0, 1.0, 0, 0, offsets=[0]),
         ValueError, "1 offsets for 2 tensors"),
        (lambda: clip_accumulate_noise(grads(), torch.ones(3), 1.0, 1.0, 0, 0, 4, [0, 2**62]),
         ValueError, "overflow"),
        (lambda: gaussian_noise(4, 0, 0, dtype=torch.float16), TypeError, "torch.float32 or"),
        (lambda: gaussian_noise(4, 0, 1.5), TypeError, "step must be an int"),
    ],
)  # fmt: skip
def test_bad_inputs_fail_with_a_clear_message(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_float32_clip_factors_are_widened_exactly():
    g = grads()
    c32 = torch.rand(3)
    a = clip_accumulate_noise(g, c32, 0.5, 1.0, 1, 2)
    b = clip_accumulate_noise(g, c32.double(), 0.5, 1.0, 1, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_inputs_that_require_grad_are_accepted():
    g = [t.requires_grad_() for t in grads()]
    out = clip_accumulate_noise(g, torch.ones(3, dtype=torch.float64), 0.0, 1.0, 0, 0)
    assert not out[0].requires_grad
    assert not per_sample_sq_norms(g).requires_grad
