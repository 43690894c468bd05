"""Per-sample gradients and the DP update against the float64 microbatch oracle."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpseg
from dpseg.privacy.capture import ForwardPasses, capture_layers, release_layers
from dpseg.privacy.private_module import PrivateModule
from tests.oracle import dp_sum, per_sample_grads

RTOL = 1e-9  # float64 throughout


def sum_sq(pred, _y):
    return (pred**2).sum() / 2


def assert_grad_samples(model, x, loss_fn=sum_sq, y=None, rtol=RTOL):
    expected = per_sample_grads(model, loss_fn, x, y)
    passes = ForwardPasses(strict=False)
    layers = capture_layers(model, passes=passes)
    try:
        with passes.running(batch=x.shape[0]):  # as PrivateModule runs a pass
            out = model(x)
        loss_fn(out, y).backward()
    finally:
        release_layers(layers)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert getattr(p, "grad_sample", None) is None and p.grad is None
            continue
        got = getattr(p, "grad_sample", None)
        if got is None:  # not used in this forward (UNETR's cross-attention norms): zeros
            assert not expected[name].any() and p.grad is None, name
            continue
        assert got.shape == expected[name].shape, name
        scale = expected[name].abs().max().clamp_min(1e-300)
        err = (got - expected[name]).abs().max() / scale
        assert err < rtol or (got - expected[name]).abs().max() < 1e-12, (name, float(err))
        assert p.grad is None, f"{name}: the summed gradient must not be computed"


def _input(batch, channels, spatial):
    return torch.randn(batch, channels, *spatial, dtype=torch.float64)


conv_cfg = st.fixed_dictionaries(
    {
        "dims": st.sampled_from([1, 2, 3]),
        "transposed": st.booleans(),
        "batch": st.integers(1, 3),
        "groups": st.sampled_from([1, 2]),
        "cin_per_group": st.integers(1, 3),
        "cout_per_group": st.integers(1, 3),
        "kernel": st.integers(1, 3),
        "stride": st.integers(1, 2),
        "padding": st.integers(0, 1),
        "dilation": st.integers(1, 2),
        "bias": st.booleans(),
        "size": st.integers(4, 7),
    }
)


@settings(max_examples=60, deadline=None)
@given(conv_cfg)
def test_conv_and_transposed_conv_per_sample_grads(cfg):
    dims, g = cfg["dims"], cfg["groups"]
    cin, cout = g * cfg["cin_per_group"], g * cfg["cout_per_group"]
    common = dict(
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        groups=g,
        bias=cfg["bias"],
    )
    if cfg["transposed"]:
        cls = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][dims - 1]
        # output_padding must be smaller than stride or dilation
        common["output_padding"] = min(cfg["stride"], cfg["dilation"]) - 1
        layer = cls(cin, cout, cfg["kernel"], **common)
    else:
        cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1]
        layer = cls(cin, cout, cfg["kernel"], **common)
    size = cfg["size"]
    if (
        not cfg["transposed"]
        and cfg["dilation"] * (cfg["kernel"] - 1) + 1 > size + 2 * cfg["padding"]
    ):
        size += cfg["dilation"] * cfg["kernel"]
    assert_grad_samples(layer.double(), _input(cfg["batch"], cin, [size] * dims))


@pytest.mark.parametrize("strategy", ["loop", "grouped", "fused", "patches"])
def test_both_conv_strategies(monkeypatch, strategy):
    monkeypatch.setenv("DPSEG_CONV_STRATEGY", strategy)
    first = nn.Conv3d(1, 5, 3, padding=2, dilation=2).double()  # a one-channel input layer
    assert_grad_samples(first, _input(3, 1, [6, 7, 5]))
    layer = nn.Conv3d(4, 6, 3, stride=2, padding=1, groups=2).double()
    assert_grad_samples(layer, _input(3, 4, [7, 6, 5]))
    up = nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2).double()
    assert_grad_samples(up, _input(3, 4, [3, 4, 5]))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv_padding_modes_and_same(padding_mode):
    layer = nn.Conv2d(2, 3, (3, 4), padding="same", dilation=(1, 2), padding_mode=padding_mode)
    assert_grad_samples(layer.double(), _input(2, 2, [6, 9]))


def test_conv_transpose_output_size_argument():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1)

        def forward(self, x):
            return self.up(x, output_size=[2 * x.shape[-2], 2 * x.shape[-1]])

    assert_grad_samples(Up().double(), _input(2, 2, [4, 5]))


class _Scale(nn.Module):
    """A leaf layer dpseg has no rule for: y = x * s[c] + s[c]^2."""

    def __init__(self, channels: int):
        super().__init__()
        self.s = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        s = self.s.view(1, -1, *([1] * (x.dim() - 2)))
        return x * s + s**2


@pytest.mark.parametrize(
    "layer,shape",
    [
        (nn.Linear(5, 3), (4, 5)),
        (nn.Linear(5, 3, bias=False), (2, 7, 5)),
        (nn.Linear(5, 3), (3, 2, 4, 5)),
        (nn.GroupNorm(3, 6), (3, 6, 4, 5)),
        (nn.GroupNorm(2, 4), (2, 4, 3, 3, 3)),
        (nn.GroupNorm(1, 5), (2, 5, 7)),
        (nn.InstanceNorm1d(3, affine=True), (2, 3, 9)),
        (nn.InstanceNorm2d(3, affine=True), (2, 3, 4, 5)),
        (nn.InstanceNorm3d(2, affine=True), (3, 2, 3, 4, 5)),
        (nn.InstanceNorm3d(2, affine=True, track_running_stats=True), (3, 2, 3, 4, 5)),
        (nn.LayerNorm(6), (3, 6)),
        (nn.LayerNorm((4, 6)), (2, 3, 4, 6)),
        (nn.PReLU(3), (3, 3, 4)),  # closed form, per channel
        (nn.PReLU(), (2, 3, 4, 5)),  # one slope
        (nn.PReLU(2), (2, 2, 3, 3, 3)),
        (_Scale(3), (3, 3, 4)),  # no rule: the torch.func fallback
    ],
)
def test_linear_norm_prelu_and_fallback_rules(layer, shape):
    layer = layer.double()
    with torch.no_grad():  # non-trivial affine parameters
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    # A following non-linearity makes the affine gradients non-trivial.
    model = nn.Sequential(layer, nn.Tanh())
    with (
        pytest.warns(UserWarning, match="no per-sample rule")
        if isinstance(layer, _Scale)
        else _nullcontext()
    ):
        assert_grad_samples(model, torch.randn(*shape, dtype=torch.float64))


class _Split(nn.Module):
    """A leaf with no rule whose output is structured: ({"scaled": x s, "parts": [x s^2]},
    and, when told to, extra(x s) beside it)."""

    def __init__(self, extra=None):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))
        self.extra = extra

    def forward(self, x):
        s = self.s.view(1, -1, 1)
        out = {"scaled": x * s, "parts": [x * s**2]}
        return (out, self.extra(x * s)) if self.extra else out


def test_a_fallback_with_a_structured_output_and_what_it_refuses():
    """The torch.func fallback takes an output of tuples, lists and dicts of per-sample
    tensors, and gives each its gradient; an output leaf that is not a floating-point
    tensor led by the batch is refused, saying what to return instead."""
    x = torch.randn(3, 3, 4, dtype=torch.float64)

    def loss(out, _y):
        return (out["scaled"].tanh() ** 2).sum() + out["parts"][0].sin().sum()

    with pytest.warns(UserWarning, match="no per-sample rule"):
        assert_grad_samples(_Split(), x, loss_fn=loss)

    # None beside the tensors (a block that keeps no attention map) passes through as None
    def loss_of_first(out, _y):
        assert out[1] is None
        return loss(out[0], _y)

    with pytest.warns(UserWarning, match="no per-sample rule"):
        assert_grad_samples(_Split(lambda x: None), x, loss_fn=loss_of_first)

    # ... anywhere: between tensors of a list, inside a dict, the loss reaching only one
    def loss_through_nones(out, _y):
        first, rest = out
        assert rest["none"] is None and rest["list"][1] is None
        return (rest["list"][2] ** 2).sum()

    extra = _Split(lambda x: {"none": None, "list": [x.sin(), None, x.cos() * 2.0]})
    with pytest.warns(UserWarning, match="no per-sample rule"):
        assert_grad_samples(extra, x, loss_fn=loss_through_nones)
    for extra, got in ((lambda x: x.shape[0], "int"), (lambda x: x.flatten(), "(36,)")):
        with pytest.warns(UserWarning), pytest.raises(TypeError) as refused:
            assert_grad_samples(_Split(extra), x, loss_fn=lambda out, _y: loss(out[0], _y))
        assert got in str(refused.value) and "leading dimension is the batch" in str(refused.value)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_module_called_twice_accumulates_and_frozen_params_are_ignored():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.norm = nn.GroupNorm(1, 3)
            self.head = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.head(torch.tanh(self.conv(torch.tanh(self.norm(self.conv(x))))))

    model = Twice().double()
    model.norm.weight.requires_grad_(False)
    model.head.bias.requires_grad_(False)
    assert_grad_samples(model, _input(3, 3, [5, 6]))


def test_a_parameter_registered_under_two_names_counts_once():
    """register_parameter("bias_alias", m.bias): one parameter, one gradient (the capture
    reads a leaf's own parameters once each, as named_parameters does)."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Linear(4, 3)).double()
    for layer in model:
        layer.register_parameter("bias_alias", layer.bias)
    assert_grad_samples(model, _input(3, 2, [5, 6]))


# ---------------------------------------------------------------------------------------
# The whole DP step: update = scale * (sum_b clip(g_b) + noise)


class SmallSegNet(nn.Module):
    """Every rule a 3D U-Net uses: conv, strided conv, GroupNorm, transposed conv, skip."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv3d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.down = nn.Conv3d(4, 6, 3, stride=2, padding=1)
        self.inorm = nn.InstanceNorm3d(6, affine=True)
        self.up = nn.ConvTranspose3d(6, 4, 2, stride=2)
        self.head = nn.Conv3d(8, 2, 1)

    def forward(self, x):
        a = F.leaky_relu(self.norm(self.enc(x)))
        b = F.leaky_relu(self.inorm(self.down(a)))
        return self.head(torch.cat([a, self.up(b)], dim=1))


def seg_loss_mean(pred, y):
    return F.cross_entropy(pred, y)


def seg_loss_sum(pred, y):
    return F.cross_entropy(pred, y, reduction="none").mean(dim=(1, 2, 3)).sum()


def _private_step(
    model, x, y, loss_fn, reduction, sigma, C, optimizer_cls=torch.optim.SGD, seed=7, n=8, batch=4
):
    data = TensorDataset(
        torch.randn(n, *x.shape[1:], dtype=x.dtype), torch.zeros(n, *y.shape[1:], dtype=y.dtype)
    )
    loader = DataLoader(data, batch_size=batch)
    engine = dpseg.PrivacyEngine(accountant="rdp")
    opt = optimizer_cls(model.parameters(), lr=1.0)
    pmodel, popt, _ = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=C,
        loss_reduction=reduction,
        noise_seed=seed,
    )
    popt.zero_grad()
    loss_fn(pmodel(x), y).backward()
    popt.step()
    return engine, popt


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("C", [1e-3, 1e3])  # every sample clipped / none clipped
def test_dp_update_matches_oracle_without_noise(reduction, C):
    torch.manual_seed(1)
    model = SmallSegNet().double()
    before = copy.deepcopy(model)
    x = torch.randn(3, 1, 6, 4, 2, dtype=torch.float64)
    y = torch.randint(0, 2, (3, 6, 4, 2))
    loss_fn = seg_loss_mean if reduction == "mean" else seg_loss_sum
    per_sample = per_sample_grads(before, seg_loss_mean, x, y)  # each sample's own loss
    norms, summed = dp_sum(per_sample, C)
    _, popt = _private_step(model, x, y, loss_fn, reduction, sigma=0.0, C=C)
    # n=8, batch 4 -> q = 1/2, expected batch 4
    scale = 1 / 4 if reduction == "mean" else 1.0
    torch.testing.assert_close(popt.last_per_sample_norms, norms, rtol=1e-9, atol=0)
    # One vector over all parameters: down.bias feeds an InstanceNorm, so its true gradient
    # is ~1e-17 and a per-tensor relative error would only compare rounding noise.
    expected = torch.cat([scale * summed[name].flatten() for name, _ in model.named_parameters()])
    got = torch.cat(
        [
            (p0 - p).detach().flatten()
            for p, p0 in zip(model.parameters(), before.parameters(), strict=True)
        ]
    )
    assert (got - expected).abs().max() / expected.abs().max() < RTOL


def test_clipped_contributions_are_bounded_by_C():
    model = SmallSegNet().double()
    x = torch.randn(1, 1, 4, 4, 4, dtype=torch.float64) * 100
    y = torch.randint(0, 2, (1, 4, 4, 4))
    before = copy.deepcopy(model)
    C = 0.05
    _private_step(model, x, y, seg_loss_sum, "sum", sigma=0.0, C=C)
    step = torch.cat(
        [
            (p0 - p).detach().flatten()
            for p, p0 in zip(model.parameters(), before.parameters(), strict=True)
        ]
    )
    assert step.norm() <= C * (1 + 1e-9)
    assert step.norm() > 0.99 * C  # it was clipped, not zeroed


def test_noise_is_the_philox_noise_scaled_by_sigma_C_over_batch():
    torch.manual_seed(2)
    x = torch.randn(2, 1, 4, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (2, 4, 4, 4))
    a = SmallSegNet().double()
    b = copy.deepcopy(a)
    sigma, C = 0.7, 0.3
    _private_step(a, x, y, seg_loss_mean, "mean", sigma=sigma, C=C, seed=11)
    _private_step(b, x, y, seg_loss_mean, "mean", sigma=0.0, C=C, seed=11)
    noise = torch.cat(
        [
            (pb - pa).detach().flatten()
            for pa, pb in zip(a.parameters(), b.parameters(), strict=True)
        ]
    )
    z = dpseg.ops.gaussian_noise(
        noise.numel(), seed=11, step=0, dtype=torch.float64, backend="torch"
    )
    torch.testing.assert_close(noise, sigma * C / 4 * z, rtol=1e-9, atol=1e-15)


def test_empty_batch_is_a_noise_only_step():
    model = SmallSegNet().double()
    before = copy.deepcopy(model)
    x = torch.empty(0, 1, 4, 4, 4, dtype=torch.float64)
    y = torch.empty(0, 4, 4, 4, dtype=torch.long)
    engine, popt = _private_step(model, x, y, lambda p, t: p.sum() * 0, "mean", sigma=1.0, C=1.0)
    assert popt.last_per_sample_norms.shape == (0,)
    delta = torch.cat(
        [
            (p0 - p).detach().flatten()
            for p, p0 in zip(model.parameters(), before.parameters(), strict=True)
        ]
    )
    assert delta.abs().min() > 0  # every parameter moved: noise
    assert engine.get_epsilon(1e-5) > 0


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_wrapped_optimizers_apply_the_dp_gradient(optimizer_cls):
    torch.manual_seed(3)
    x = torch.randn(3, 1, 4, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (3, 4, 4, 4))
    model = SmallSegNet().double()
    twin = copy.deepcopy(model)
    _, popt = _private_step(
        model, x, y, seg_loss_mean, "mean", sigma=0.5, C=0.1, optimizer_cls=optimizer_cls
    )
    # Same update by hand: the twin gets the DP gradient (oracle clip + same Philox noise).
    norms, summed = dp_sum(per_sample_grads(twin, seg_loss_mean, x, y), 0.1)
    numel = [p.numel() for p in twin.parameters()]
    z = dpseg.ops.gaussian_noise(
        sum(numel), seed=7, step=0, dtype=torch.float64, backend="torch"
    ).split(numel)
    opt = optimizer_cls(twin.parameters(), lr=1.0)
    for (name, p), zi in zip(twin.named_parameters(), z, strict=True):
        p.grad = (summed[name] + 0.5 * 0.1 * zi.view_as(p)) / 4
    opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("norm", ["group", "instance"])
@pytest.mark.parametrize("upsample", ["transpose", "interp"])
def test_whole_3d_unet_per_sample_grads(norm, upsample):
    from dpseg.models import UNet

    model = UNet(3, 1, 3, channels=(4, 8), norm=norm, upsample=upsample, num_groups=2).double()
    x = torch.randn(3, 1, 8, 6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 8, 6, 4))
    assert_grad_samples(model, x, loss_fn=seg_loss_sum, y=y)


def test_empty_batch_through_every_rule():
    model = SmallSegNet().double()
    x = torch.randn(0, 1, 4, 4, 4, dtype=torch.float64)
    layers = capture_layers(model)
    try:
        model(x).sum().backward()
    finally:
        release_layers(layers)
    for name, p in model.named_parameters():
        assert p.grad_sample.shape == (0, *p.shape), name


def test_an_input_of_another_dtype_than_the_weights_is_refused_saying_to_cast():
    """An int16 NIfTI handed on uncast: plain PyTorch says the types differ; the rule's own
    aten call said only "expected scalar type Long but found Float"."""
    for layer, x in (
        (nn.Conv3d(1, 2, 3), torch.randint(0, 9, (2, 1, 5, 5, 5))),
        (nn.Linear(3, 2), torch.randn(2, 3, dtype=torch.float64)),
    ):
        model = PrivateModule(nn.Sequential(layer))
        with pytest.raises(TypeError, match=r"Convert the batch \(images.to\(torch.float32\)\)"):
            model(x)
