"""UNet: shapes, no BatchNorm, per-sample independence, input checks, documented sizes."""

import re

import pytest
import torch
from torch import nn

import dpseg.models.unet as unet_module
from dpseg.models import UNet


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("norm", ["group", "instance"])
@pytest.mark.parametrize("upsample", ["transpose", "interp"])
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape(spatial_dims, norm, upsample, batch):
    model = UNet(spatial_dims, 2, 3, channels=(4, 8, 16), norm=norm, upsample=upsample)
    size = (12, 8, 16)[:spatial_dims]  # non-cubic, divisible by 4
    x = torch.randn(batch, 2, *size)
    y = model(x)
    assert y.shape == (batch, 3, *size)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize(
    "channels,num_groups,convs",
    [((3, 5, 7), 8, 2), ((6, 12), 4, 1), ((5,), 8, 3), ((12, 10, 9, 6), 8, 2)],
)
def test_odd_channel_configs(channels, num_groups, convs):
    model = UNet(3, 1, 2, channels=channels, num_groups=num_groups, convs_per_level=convs)
    d = 2 ** (len(channels) - 1)
    x = torch.randn(2, 1, 2 * d, d, 3 * d)
    assert model(x).shape == (2, 2, 2 * d, d, 3 * d)
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0
            assert m.num_groups <= min(num_groups, m.num_channels)
    # Each conv block has convs_per_level convs.
    assert all(sum(isinstance(m, nn.Conv3d) for m in b) == convs for b in model.encoder)


@pytest.mark.parametrize("norm", ["group", "instance"])
@pytest.mark.parametrize("upsample", ["transpose", "interp"])
def test_no_batchnorm_and_affine_norms(norm, upsample):
    model = UNet(3, 1, 2, channels=(4, 8, 16), norm=norm, upsample=upsample)
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    assert not any(isinstance(m, bn) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.InstanceNorm3d))]
    assert norms and all(m.affine for m in norms)
    # No running statistics anywhere: nothing carried across samples or batches.
    assert not list(model.buffers())


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("norm", ["group", "instance"])
@pytest.mark.parametrize("upsample", ["transpose", "interp"])
def test_per_sample_independence(spatial_dims, norm, upsample):
    """Each sample's output (and its parameter gradient) is the same alone or in a batch."""
    model = UNet(spatial_dims, 1, 2, channels=(4, 8), norm=norm, upsample=upsample).double()
    size = (8, 6, 4)[:spatial_dims]
    x = torch.randn(3, 1, *size, dtype=torch.float64)
    model.train()
    batched = model(x)
    for b in range(3):
        alone = model(x[b : b + 1])
        torch.testing.assert_close(batched[b : b + 1], alone, rtol=1e-12, atol=1e-12)
    # Input gradient of sample b's output w.r.t. other samples is exactly zero.
    xg = x.clone().requires_grad_(True)
    model(xg)[1].sum().backward()
    assert xg.grad[1].abs().sum() > 0
    assert torch.count_nonzero(xg.grad[0]) == 0 and torch.count_nonzero(xg.grad[2]) == 0


def test_bad_spatial_size_message():
    model = UNet(3, 1, 2, channels=(4, 8, 16))
    with pytest.raises(ValueError, match=r"divisible by 4.*\(16, 10, 16\)"):
        model(torch.randn(1, 1, 16, 10, 16))
    with pytest.raises(ValueError, match="input channel"):
        model(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="5 dims"):
        model(torch.randn(1, 16, 16, 16))


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="BatchNorm"):
        UNet(norm="batch")
    with pytest.raises(ValueError, match="upsample"):
        UNet(upsample="nearest")
    with pytest.raises(ValueError, match="spatial_dims"):
        UNet(spatial_dims=1)


def test_deterministic_init():
    torch.manual_seed(123)
    a = UNet(3, 1, 2, channels=(4, 8))
    torch.manual_seed(456)
    b = UNet(3, 1, 2, channels=(4, 8))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    c = UNet(3, 1, 2, channels=(4, 8), seed=1)
    assert not torch.equal(a.encoder[0][0].weight, c.encoder[0][0].weight)


def _conv_block_params(d: int, cin: int, cout: int, n: int) -> int:
    k = 3**d
    total = 0
    for i in range(n):
        c = cin if i == 0 else cout
        total += c * cout * k + cout + 2 * cout  # conv weight + bias + norm affine
    return total


def _expected_params(d: int, cin: int, cout: int, channels, upsample="transpose", n=2) -> int:
    """Closed-form count, independent of the module code."""
    total, c_prev = 0, cin
    for c in channels:
        total += _conv_block_params(d, c_prev, c, n)
        c_prev = c
    for i in range(len(channels) - 1):
        lo, hi = channels[i], channels[i + 1]
        up_k = 2**d if upsample == "transpose" else 1
        total += hi * lo * up_k + lo
        total += _conv_block_params(d, 2 * lo, lo, n)
    return total + channels[0] * cout + cout


@pytest.mark.parametrize("upsample", ["transpose", "interp"])
@pytest.mark.parametrize("d,channels", [(3, (16, 32, 64)), (2, (5, 7, 9)), (3, (3, 6))])
def test_parameter_count_formula(d, channels, upsample):
    model = UNet(d, 1, 2, channels=channels, upsample=upsample)
    assert _n_params(model) == _expected_params(d, 1, 2, channels, upsample)


def test_docstring_parameter_counts():
    doc = unet_module.__doc__ + UNet.__doc__
    for channels in [(16, 32, 64), (32, 64, 128, 256)]:
        n = _expected_params(3, 1, 2, channels)
        assert n == _n_params(UNet(3, 1, 2, channels=channels, norm="group"))
        text = f"{n:,}"
        spelled = ", ".join(map(str, channels))
        hits = re.findall(rf"\({re.escape(spelled)}\).*?([\d,]{{5,}})", doc)
        assert hits and all(h.rstrip(",") == text for h in hits), (channels, text, hits)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_interp_upsample_equals_interpolate_then_conv(spatial_dims):
    """The "interp" block runs conv-then-interpolate; it must equal interpolate-then-conv."""
    up = unet_module.Up(spatial_dims, 6, 4, "interp").double()
    with torch.no_grad():
        up.proj.bias.normal_()
    x = torch.randn(2, 6, *(5, 3, 4)[:spatial_dims], dtype=torch.float64)
    mode = "trilinear" if spatial_dims == 3 else "bilinear"
    ref = up.proj(torch.nn.functional.interpolate(x, scale_factor=2.0, mode=mode))
    torch.testing.assert_close(up(x), ref, rtol=1e-12, atol=1e-12)
