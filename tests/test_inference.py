"""Sliding-window inference: equals whole-volume prediction for a pointwise model."""

import numpy as np
import pytest
import torch
from torch import nn

from dpseg.models import UNet
from dpseg.train.inference import (
    gaussian_importance_map,
    sliding_window_inference,
    window_starts,
)


def _pointwise(spatial_dims: int, cin: int, cout: int) -> nn.Module:
    """A 1x1 conv with fixed random weights: its output at a voxel depends on that voxel only,
    so every window agrees with the whole-volume prediction."""
    conv = (nn.Conv3d if spatial_dims == 3 else nn.Conv2d)(cin, cout, 1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    return conv.double().eval()


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize(
    "size,patch,overlap,batch_size",
    [
        ((2, 13, 11, 9), (8, 6, 4), 0.5, 1),
        ((2, 17, 15, 7), 5, 0.25, 4),
        ((2, 21, 19), (8, 6), 0.5, 3),
        ((2, 9, 9, 9), (9, 9, 9), 0.5, 2),  # exactly one window
        ((2, 3, 5, 4), (8, 8, 8), 0.5, 1),  # smaller than the patch on every axis
        ((2, 5, 20), (8, 6), 0.6, 2),  # smaller on one axis only
    ],
)
def test_pointwise_model_matches_full_volume(size, patch, overlap, batch_size, mode):
    nd = len(size) - 1
    model = _pointwise(nd, size[0], 3)
    volume = torch.randn(size, dtype=torch.float64)
    full = model(volume[None])[0]
    out = sliding_window_inference(
        volume, model, patch, overlap=overlap, batch_size=batch_size, mode=mode
    )
    assert out.shape == (3, *size[1:])
    torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)
    probs = sliding_window_inference(volume, model, patch, overlap=overlap, softmax=True)
    torch.testing.assert_close(probs, torch.softmax(full, 0), rtol=1e-12, atol=1e-12)


def test_windows_cover_volume_and_weights_blend():
    """A model that outputs each window's start index: the result is the weighted average of
    the windows covering a voxel, computed here directly."""
    size, patch, overlap = 11, 4, 0.5
    starts = window_starts(size, patch, overlap)
    assert starts[0] == 0 and starts[-1] == size - patch
    assert all(0 < b - a <= patch * (1 - overlap) for a, b in zip(starts, starts[1:], strict=False))

    calls = []

    def model(x):
        calls.append(x.shape[0])
        # Tag each window with the value of its first input voxel (the volume holds indices).
        return x[:, :1, :1].expand(-1, 1, *x.shape[2:]).clone()

    volume = torch.arange(size, dtype=torch.float64)[None, None, :].expand(1, 3, size).clone()
    volume = volume.permute(0, 2, 1).contiguous()  # (1, 11, 3): axis 0 varies
    out = sliding_window_inference(volume, model, (patch, 3), overlap=overlap, batch_size=2)
    w = gaussian_importance_map((patch,), dtype=torch.float64)
    num = torch.zeros(size, dtype=torch.float64)
    den = torch.zeros(size, dtype=torch.float64)
    for s in starts:
        num[s : s + patch] += w * s
        den[s : s + patch] += w
    torch.testing.assert_close(out[0, :, 0], num / den)
    assert sum(calls) == len(starts) and max(calls) <= 2


def test_gaussian_map_properties():
    w = gaussian_importance_map((7, 8, 5))
    assert w.shape == (7, 8, 5) and w.max() == 1.0 and (w > 0).all()
    torch.testing.assert_close(w, w.flip(0).flip(1).flip(2))


def test_unet_whole_volume_runs():
    model = UNet(3, 1, 2, channels=(4, 8)).eval()
    volume = torch.randn(1, 11, 9, 7)
    out = sliding_window_inference(volume, model, (8, 8, 8), overlap=0.5, softmax=True)
    assert out.shape == (2, 11, 9, 7)
    torch.testing.assert_close(out.sum(0), torch.ones(11, 9, 7))


def test_bad_arguments():
    model = _pointwise(3, 1, 2)
    v = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="volume must be"):
        sliding_window_inference(v[None], model, 4)
    with pytest.raises(ValueError, match="patch_size"):
        sliding_window_inference(v, model, (4, 4))
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(v, model, 4, overlap=1.0)
    with pytest.raises(ValueError, match="mode"):
        sliding_window_inference(v, model, 4, mode="mean")


def test_2d_slices_of_the_patch_size_are_predicted_in_batches_as_one_by_one():
    from dpseg.models import UNet
    from dpseg.train.inference import sliding_window_inference
    from dpseg.train.loop import predict_volume

    torch.manual_seed(0)
    model = UNet(2, 1, 3, channels=(4, 8)).eval()
    image = np.random.default_rng(0).normal(size=(16, 16, 70)).astype(np.float32)  # 2 chunks
    fast = predict_volume(model, image, 16, spatial_dims=2, softmax=True)
    x = torch.from_numpy(image)[None]
    with torch.no_grad():
        slow = torch.stack(
            [sliding_window_inference(x[..., z], model, 16, softmax=True) for z in range(70)], -1
        )
    assert fast.shape == (3, 16, 16, 70)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
