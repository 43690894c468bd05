"""The update's Jacobian against finite differences and against GroupNorm's scale invariance."""

import torch

from dpseg.attack.identifiability import direction_singular_values, update_jacobian
from dpseg.models import UNet
from dpseg.train.losses import DiceCELoss


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = UNet(2, 1, 2, channels=(4, 8), seed=seed).double()
    x = torch.rand(1, 1, 8, 8, generator=g, dtype=torch.float64)
    y = (torch.rand(1, 8, 8, generator=g) > 0.5).long()
    return model, DiceCELoss(), x, y


def _update(model, loss, x, y):
    model.zero_grad(set_to_none=True)
    loss.per_sample(model(x), y).mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_jacobian_matches_central_differences():
    model, loss, x, y = _setup()
    u, jac = update_jacobian(model, loss, x, y, chunk=16)
    assert jac.shape == (u.numel(), x.numel())
    torch.testing.assert_close(u, _update(model, loss, x, y), rtol=1e-10, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        h = 1e-6  # small enough that no LeakyReLU or max-pool switches in float64
        fd = (_update(model, loss, x + h * v, y) - _update(model, loss, x - h * v, y)) / (2 * h)
        torch.testing.assert_close(jac @ v.flatten(), fd, rtol=1e-5, atol=1e-7)


def test_the_original_is_a_null_direction():
    # The first conv feeds a GroupNorm with one channel per group: U(a x) = U(x), so
    # J x = 0 up to GroupNorm's eps, while a generic direction moves the update.
    model, loss, x, y = _setup(seed=2)
    u, jac = update_jacobian(model, loss, x, y, chunk=64)
    along_x = (jac @ x.flatten()).norm() / x.norm()
    generic = (jac @ torch.randn(x.numel(), dtype=torch.float64)).norm() / x.numel() ** 0.5
    assert along_x < 1e-4 * generic
    s = direction_singular_values(u, jac)
    assert s.shape == (x.numel(),) and bool((s[:-1] >= s[1:]).all())
    assert s[-1] < 1e-4 * s[0] < s[-2]  # exactly one direction it cannot see


def test_direction_ignores_the_update_scale():
    model, loss, x, y = _setup()
    u, jac = update_jacobian(model, loss, x, y, chunk=64)
    s = direction_singular_values(u, jac)
    torch.testing.assert_close(direction_singular_values(3.0 * u, 3.0 * jac), s)
