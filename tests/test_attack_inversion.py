"""The attack's simulation matches what a dpseg site sends; the attack beats its baseline."""

import pytest
import torch
import torch.nn.functional as F

from dpseg.attack import defences as dfn
from dpseg.attack.inversion import (
    InversionConfig,
    ThreatModel,
    gradient_distance,
    reconstruct,
    simulate_update,
    soft_dice_ce,
    total_variation,
)
from dpseg.attack.metrics import ssim
from dpseg.models import UNet
from dpseg.train.losses import DiceCELoss


@pytest.fixture(autouse=True)
def _one_thread():
    # Double backward of small convs: 1 thread is the fast setting on a loaded 2-core box.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def planted(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth organ-like image in [0, 1] (ellipse with an inner disc) and its mask."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    organ = ((yy - 0.45 * size) / (0.3 * size)) ** 2 + ((xx - 0.55 * size) / (0.35 * size)) ** 2 < 1
    disc = (yy - 0.3 * size) ** 2 + (xx - 0.35 * size) ** 2 < (0.12 * size) ** 2
    x = (0.2 + 0.5 * organ.float() + 0.25 * disc.float()).clamp(0, 1)
    return x[None, None], organ.long()[None]


def batch(b=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, size, size, generator=g), (
        torch.rand(b, size, size, generator=g) > 0.5
    ).long()


def test_soft_dice_ce_equals_dice_ce_on_one_hot():
    x, y = batch(3)
    logits = torch.randn(3, 2, 16, 16)
    for loss in (DiceCELoss(), DiceCELoss(include_background=True, lambda_dice=0.3)):
        onehot = F.one_hot(y, 2).movedim(-1, 1).float()
        torch.testing.assert_close(soft_dice_ce(logits, onehot, loss), loss.per_sample(logits, y))


@pytest.mark.parametrize(
    "spec, local_steps", [("none", 0), ("none", 2), ("clip:0.05", 0), ("clip:0.05", 2)]
)
def test_simulation_matches_the_site(spec, local_steps):
    """The attacker's differentiable replay equals the engine's (noise-free) update."""
    model, loss = UNet(2, 1, 2, channels=(4, 8), seed=1), DiceCELoss()
    x, y = batch(2)
    d = dfn.parse_defence(spec)
    site = dfn.shared_update(model, loss, x, y, d, local_steps=local_steps, local_lr=0.1)
    onehot = F.one_hot(y, 2).movedim(-1, 1).float()
    threat = ThreatModel(local_steps=local_steps, local_lr=0.1, clip=d.max_grad_norm)
    sim = simulate_update(model, x, onehot, loss, threat)
    for a, b in zip(sim, site, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=2e-4, atol=2e-6)


def test_distance_and_prior():
    g = [torch.randn(3, 4), torch.randn(5)]
    assert float(gradient_distance(g, [2.5 * t for t in g])) == pytest.approx(0.0, abs=1e-6)
    assert float(gradient_distance(g, [-t for t in g])) == pytest.approx(2.0, abs=1e-6)
    flat = torch.ones(1, 1, 4, 5, 6)
    assert float(total_variation(flat, 3)) == 0.0
    ramp = torch.arange(6.0).expand(1, 1, 4, 5, 6)
    assert float(total_variation(ramp, 3)) == pytest.approx(1.0)


def test_attack_recovers_planted_input_far_better_than_baseline():
    x, y = planted(16)
    model, loss = UNet(2, 1, 2, channels=(4, 8), seed=0), DiceCELoss()
    shared = dfn.shared_update(model, loss, x, y, dfn.parse_defence("none"))
    cfg = InversionConfig(iterations=150, restarts=1, lr=0.03, tv_weight=0.03, seed=0)
    found = reconstruct(model, loss, shared, x.shape, labels=y, config=cfg)
    base = reconstruct(
        model, loss, dfn.random_update(shared, seed=1), x.shape, labels=y, config=cfg
    )
    s_attack, s_base = ssim(found.images[0, 0], x[0, 0], 1.0), ssim(base.images[0, 0], x[0, 0], 1.0)
    assert found.images.min() >= 0 and found.images.max() <= 1  # the box
    assert found.distance < base.distance
    assert s_attack > s_base + 0.3, (s_attack, s_base)


def test_joint_mask_and_restarts_keep_the_best():
    x, y = batch(2)
    model, loss = UNet(2, 1, 2, channels=(4, 8)), DiceCELoss()
    shared = dfn.shared_update(model, loss, x, y, dfn.parse_defence("none"))
    cfg = InversionConfig(iterations=4, restarts=3, mask="joint")
    res = reconstruct(model, loss, shared, x.shape, config=cfg)
    assert res.labels.shape == y.shape and res.labels.dtype == torch.int64
    assert len(res.distances) == 3 and res.distance == min(res.distances)
    with pytest.raises(ValueError, match="needs labels"):
        reconstruct(model, loss, shared, x.shape, config=InversionConfig(iterations=1))
