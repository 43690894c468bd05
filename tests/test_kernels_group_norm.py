"""dpseg::group_norm_backward_per_sample (C++ CPU) against autograd in float64 and against
the rule's fallback path (native backward + batched sums), and inside the GroupNorm rule."""

import pytest
import torch
from torch import nn

from dpseg.ops import _ext
from dpseg.privacy.rules import norm as norm_rule

needs_op = pytest.mark.skipif(
    not _ext.has_op("group_norm_backward_per_sample"), reason="C++ extension without the op"
)


def _forward(batch, channels, spatial, groups, dtype, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, channels, *spatial, generator=g, dtype=dtype) * 3 + 1).requires_grad_()
    w = torch.randn(channels, generator=g, dtype=dtype).requires_grad_() if affine else None
    b = torch.randn(channels, generator=g, dtype=dtype).requires_grad_() if affine else None
    return x, w, b


@needs_op
@pytest.mark.parametrize(
    "batch,channels,spatial,groups,affine",
    [(3, 6, (4, 5, 3), 3, True), (2, 4, (7,), 1, True), (1, 5, (2, 3), 5, False),
     (4, 8, (3, 3, 3), 2, True)],
)  # fmt: skip
def test_matches_autograd_float64(batch, channels, spatial, groups, affine):
    x, w, b = _forward(batch, channels, spatial, groups, torch.float64, affine)
    n = x.shape[0]
    s = x[0, 0].numel()
    out, mean, rstd = torch.ops.aten.native_group_norm(x, w, b, n, channels, s, groups, 1e-5)
    go = torch.randn_like(out)
    dx, dgamma, dbeta = torch.ops.dpseg.group_norm_backward_per_sample(
        go, x.detach(), mean, rstd, w, groups, True
    )
    want_dx = torch.autograd.grad(out, x, go, retain_graph=True)[0]
    torch.testing.assert_close(dx, want_dx, rtol=1e-9, atol=1e-12)
    if affine:  # each sample alone through autograd: the per-sample dgamma, dbeta
        for i in range(n):
            o_i = torch.nn.functional.group_norm(x[i : i + 1], groups, w, b, 1e-5)
            gw, gb = torch.autograd.grad(o_i, (w, b), go[i : i + 1])
            torch.testing.assert_close(dgamma[i], gw, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(dbeta[i], gb, rtol=1e-9, atol=1e-12)


@needs_op
def test_matches_the_fallback_path_float32_and_skips_dx():
    x, w, b = (t.detach() for t in _forward(2, 8, (5, 6, 7), 4, torch.float32))
    out, mean, rstd = torch.ops.aten.native_group_norm(x, w, b, 2, 8, 210, 4, 1e-5)
    go = torch.randn_like(out)
    dx, dgamma, dbeta = torch.ops.dpseg.group_norm_backward_per_sample(go, x, mean, rstd, w, 4)
    ref_dx = torch.ops.aten.native_group_norm_backward(
        go, x, mean, rstd, w, 2, 8, 210, 4, [True, False, False]
    )[0]
    g_sum, gx_sum = norm_rule._channel_sums(go, x, 2, 8)
    mean_c = mean.repeat_interleave(2, dim=1)
    rstd_c = rstd.repeat_interleave(2, dim=1)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dgamma, rstd_c * (gx_sum - mean_c * g_sum), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dbeta, g_sum, rtol=1e-5, atol=1e-4)
    no_dx = torch.ops.dpseg.group_norm_backward_per_sample(go, x, mean, rstd, w, 4, False)
    assert no_dx[0].numel() == 0 and torch.equal(no_dx[1], dgamma)


@needs_op
def test_opcheck_and_bad_inputs():
    x, w, b = (t.detach() for t in _forward(2, 4, (3, 3), 2, torch.float64))
    out, mean, rstd = torch.ops.aten.native_group_norm(x, w, b, 2, 4, 9, 2, 1e-5)
    go = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.dpseg.group_norm_backward_per_sample.default, (go, x, mean, rstd, w, 2, True)
    )
    with pytest.raises(RuntimeError, match="do not split into 3 groups"):
        torch.ops.dpseg.group_norm_backward_per_sample(go, x, mean, rstd, w, 3)


@needs_op
def test_rule_uses_the_fused_op(monkeypatch):
    """The rule's result is the same with and without the fused op (fallback forced)."""
    import dpseg

    results = []
    for fused in (True, False):
        monkeypatch.setattr(norm_rule, "_HAS_FUSED", fused)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.GroupNorm(2, 4)).double()
        engine = dpseg.PrivacyEngine(accountant="rdp")
        loader = torch.utils.data.DataLoader(torch.zeros(4, 1, 4, 4, 4), batch_size=2)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        pm, popt, _ = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                          noise_multiplier=0.0, max_grad_norm=1e3)  # fmt: skip
        x = torch.randn(2, 1, 4, 4, 4, dtype=torch.float64)
        pm(x).square().sum().backward()
        results.append([p.grad_sample.clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_op
@pytest.mark.parametrize(
    "batch,channels,groups,spatial",
    [(1, 6, 1, (9, 8, 7)), (1, 6, 3, (9, 8, 7)), (3, 8, 2, (9, 8, 7)), (2, 16, 8, (9, 8, 7)),
     (1, 3, 1, (4097,)), (2, 4, 2, (2049,))],  # planes past one float block (2048)
)  # fmt: skip
def test_the_same_bits_on_any_thread_count(batch, channels, groups, spatial):
    """Groups are shared out whole when there are enough of them (each group's two passes
    together, while it is in cache), planes otherwise: one thread takes the first schedule
    on every shape here, 2 and 3 threads the second on some. Both must give the same bits."""
    x, w, b = (t.detach() for t in _forward(batch, channels, spatial, groups, torch.float32))
    out, mean, rstd = torch.ops.aten.native_group_norm(
        x, w, b, batch, channels, x[0, 0].numel(), groups, 1e-5
    )
    go = torch.randn_like(out)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(
                torch.ops.dpseg.group_norm_backward_per_sample(go, x, mean, rstd, w, groups)
            )
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@needs_op
@pytest.mark.parametrize("offset", [100.0, 1000.0])
def test_float32_dgamma_keeps_its_precision_when_the_mean_dwarfs_the_spread(offset):
    """dgamma = sum dy (x - mean) rstd with the forward's saved mean and rstd: summed as
    dy*x minus db*mean it cancels (ATen's float backward: relative error 8e-3 at x = 100 +
    0.01 randn); centred it does not. The oracle is the same formula in float64 on the same
    float32 inputs and saved statistics."""
    g = torch.Generator().manual_seed(5)
    x = (offset + 0.01 * torch.randn(2, 4, 64, 64, generator=g, dtype=torch.float64)).float()
    w = torch.randn(4, generator=g)
    go = torch.randn(2, 4, 64, 64, generator=g)
    out, mean, rstd = torch.ops.aten.native_group_norm(x, w, None, 2, 4, 4096, 2, 1e-5)
    _, dgamma, dbeta = torch.ops.dpseg.group_norm_backward_per_sample(go, x, mean, rstd, w, 2)
    m64 = mean.double().repeat_interleave(2, dim=1)[..., None]  # per (sample, channel)
    r64 = rstd.double().repeat_interleave(2, dim=1)
    xs, gs = x.double().flatten(2), go.double().flatten(2)
    want = (gs * (xs - m64)).sum(-1) * r64
    err = (dgamma.double() - want).abs().max() / want.abs().max()
    assert err < 1e-5, f"dgamma relative error {err:.1e}"
    torch.testing.assert_close(dbeta.double(), gs.sum(-1), rtol=1e-5, atol=1e-3)
