"""DiceCELoss against a numpy loop oracle; Dice and HD95 against set/point-set oracles."""

import itertools

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from dpseg.train.losses import DiceCELoss
from dpseg.train.metrics import dice_per_class, hausdorff95

# ---------------------------------------------------------------- loss


def _loss_oracle(logits, target, include_background, softmax, smooth, lam_d, lam_ce):
    """Per-sample loss, written voxel by voxel in numpy (float64)."""
    logits = np.asarray(logits, dtype=np.float64)
    target = np.asarray(target)
    b, c = logits.shape[:2]
    out = []
    for i in range(b):
        z = logits[i].reshape(c, -1)
        t = target[i].reshape(-1)
        n = z.shape[1]
        ce = 0.0
        for v in range(n):
            m = z[:, v].max()
            lse = m + np.log(np.exp(z[:, v] - m).sum())
            ce += lse - z[t[v], v]
        ce /= n
        if softmax:
            e = np.exp(z - z.max(0, keepdims=True))
            p = e / e.sum(0, keepdims=True)
        else:
            p = 1.0 / (1.0 + np.exp(-z))
        terms = []
        for k in range(0 if include_background else 1, c):
            inter = sum(p[k, v] for v in range(n) if t[v] == k)
            denom = p[k].sum() + (t == k).sum()
            terms.append(1.0 - (2 * inter + smooth) / (denom + smooth))
        out.append(lam_d * np.mean(terms) + lam_ce * ce)
    return np.array(out)


@pytest.mark.parametrize(
    "shape,include_background,softmax,smooth,lam",
    [
        ((3, 3, 5, 4, 3), False, True, 1e-5, (1.0, 1.0)),
        ((2, 4, 7, 5), True, True, 1.0, (0.7, 1.3)),
        ((1, 2, 3, 4, 5), True, False, 1e-3, (1.0, 0.5)),
        ((4, 3, 6, 6), False, False, 1e-5, (2.0, 0.0)),
    ],
)
def test_dice_ce_matches_oracle(shape, include_background, softmax, smooth, lam):
    logits = torch.randn(shape, dtype=torch.float64) * 2
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    ref = _loss_oracle(logits, target, include_background, softmax, smooth, *lam)
    kw = dict(include_background=include_background, softmax=softmax, smooth=smooth)
    kw.update(lambda_dice=lam[0], lambda_ce=lam[1])
    per = DiceCELoss(reduction="none", **kw)(logits, target)
    np.testing.assert_allclose(per.numpy(), ref, rtol=1e-10, atol=1e-12)
    mean = DiceCELoss(reduction="mean", **kw)(logits, target)
    total = DiceCELoss(reduction="sum", **kw)(logits, target)
    np.testing.assert_allclose(mean.item(), ref.mean(), rtol=1e-10)
    np.testing.assert_allclose(total.item(), shape[0] * mean.item(), rtol=1e-12)


def test_binary_single_channel():
    logits = torch.randn(2, 1, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 2, (2, 4, 5))
    loss = DiceCELoss(softmax=False, reduction="none")(logits, target)
    p = torch.sigmoid(logits)[:, 0]
    y = target.double()
    dice = (2 * (p * y).sum((1, 2)) + 1e-5) / (p.sum((1, 2)) + y.sum((1, 2)) + 1e-5)
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean((1, 2))
    torch.testing.assert_close(loss, 1 - dice + bce)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_gradient_independence(reduction):
    """d loss_b / d logits_b' == 0 for b != b' (no batch coupling)."""
    b = 3
    logits = torch.randn(b, 3, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (b, 4, 5, 3))
    per = DiceCELoss(reduction="none")(logits, target)
    for i in range(b):
        (g,) = torch.autograd.grad(per[i], logits, retain_graph=True)
        assert g[i].abs().sum() > 0
        for j in range(b):
            if j != i:
                assert torch.count_nonzero(g[j]) == 0
    # The batch loss's gradient for sample i is that of sample i alone (scaled by 1/B for mean).
    loss_fn = DiceCELoss(reduction=reduction)
    (g_batch,) = torch.autograd.grad(loss_fn(logits, target), logits)
    scale = 1.0 / b if reduction == "mean" else 1.0
    for i in range(b):
        li = logits[i : i + 1].detach().requires_grad_(True)
        (g_i,) = torch.autograd.grad(DiceCELoss(reduction="sum")(li, target[i : i + 1]), li)
        torch.testing.assert_close(g_batch[i : i + 1], scale * g_i, rtol=1e-12, atol=1e-14)


def test_perfect_prediction_dice_zero():
    target = torch.randint(0, 3, (2, 6, 5, 4))
    target[:, 0, 0, 0] = 1  # every class present in each sample
    target[:, 0, 0, 1] = 2
    logits = 50.0 * torch.nn.functional.one_hot(target, 3).movedim(-1, 1).double()
    dice_only = DiceCELoss(lambda_ce=0.0, include_background=True)(logits, target)
    assert dice_only.item() < 1e-12
    both = DiceCELoss()(logits, target)
    assert both.item() < 1e-12  # CE ~ 2 exp(-50)


def test_empty_batch_and_bad_shapes():
    logits = torch.randn(0, 3, 4, 4, requires_grad=True)
    target = torch.zeros(0, 4, 4, dtype=torch.long)
    for reduction in ("mean", "sum"):
        loss = DiceCELoss(reduction=reduction)(logits, target)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
    with pytest.raises(ValueError, match="target must be"):
        DiceCELoss()(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        DiceCELoss(reduction="batch")


def test_target_with_channel_dim():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    a = DiceCELoss()(logits, target)
    b = DiceCELoss()(logits, target[:, None])
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- Dice metric


def _dice_sets(pred, target, num_classes, ignore_background):
    """Dice from explicit sets of voxel coordinates."""
    out = []
    coords = list(itertools.product(*(range(s) for s in pred.shape)))
    for c in range(1 if ignore_background else 0, num_classes):
        p = {x for x in coords if pred[x] == c}
        t = {x for x in coords if target[x] == c}
        out.append(1.0 if not p and not t else 2 * len(p & t) / (len(p) + len(t)))
    return np.array(out)


@pytest.mark.parametrize("shape", [(5, 6, 4), (7, 9)])
@pytest.mark.parametrize("ignore_background", [True, False])
def test_dice_per_class_matches_sets(shape, ignore_background):
    rng = np.random.default_rng(7)
    pred = rng.integers(0, 4, shape)
    target = rng.integers(0, 3, shape)  # class 3 only in pred -> Dice 0
    ref = _dice_sets(pred, target, 5, ignore_background)  # class 4 in neither -> 1.0
    got = dice_per_class(pred, target, 5, ignore_background)
    np.testing.assert_allclose(got, ref, rtol=1e-15)
    assert got[-1] == 1.0 and got[-2] == 0.0
    got_t = dice_per_class(torch.from_numpy(pred), torch.from_numpy(target), 5, ignore_background)
    np.testing.assert_array_equal(got_t, got)


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        dice_per_class(np.zeros((3, 3)), np.zeros((3, 4)), 2)


# ---------------------------------------------------------------- HD95


def _surface_points(mask):
    """Foreground voxels with a face neighbour outside the mask (outside the array counts)."""
    padded = np.pad(mask, 1)
    pts = []
    for idx in zip(*np.nonzero(mask), strict=True):
        for ax in range(mask.ndim):
            for step in (-1, 1):
                nb = list(i + 1 for i in idx)
                nb[ax] += step
                if not padded[tuple(nb)]:
                    pts.append(idx)
                    break
            else:
                continue
            break
    return np.array(pts, dtype=np.float64)


def _hd95_bruteforce(pred, target, spacing):
    sp = _surface_points(pred) * np.asarray(spacing)
    st = _surface_points(target) * np.asarray(spacing)
    d = cdist(sp, st)
    return np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "shape,spacing", [((9, 8, 7), (2.5, 0.7, 1.3)), ((12, 10), (0.8, 3.0)), ((6, 7, 8), None)]
)
def test_hausdorff95_matches_bruteforce(seed, shape, spacing):
    rng = np.random.default_rng(seed)
    # Blobs: a smoothed random field thresholded, plus isolated voxels, so surfaces are
    # irregular and include interior holes.
    from scipy.ndimage import gaussian_filter

    pred = gaussian_filter(rng.standard_normal(shape), 1.0) > 0.1
    target = gaussian_filter(rng.standard_normal(shape), 1.0) > 0.0
    pred[tuple(rng.integers(0, s) for s in shape)] = True
    assert pred.any() and target.any()
    ref = _hd95_bruteforce(pred, target, spacing or (1.0,) * len(shape))
    got = hausdorff95(pred, target, spacing)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    # Symmetric.
    np.testing.assert_allclose(hausdorff95(target, pred, spacing), got, rtol=1e-12)


def test_hausdorff95_known_value_and_conventions():
    a = np.zeros((1, 1, 10), bool)
    b = np.zeros((1, 1, 10), bool)
    a[0, 0, 1] = True
    b[0, 0, 5] = True
    assert hausdorff95(a, b, (1.0, 1.0, 2.0)) == pytest.approx(8.0)
    assert hausdorff95(a, a, (1.0, 1.0, 2.0)) == 0.0
    empty = np.zeros_like(a)
    assert hausdorff95(empty, empty, (1, 1, 1)) == 0.0
    assert hausdorff95(a, empty, (1, 1, 1)) == float("inf")
    assert hausdorff95(empty, b, (1, 1, 1)) == float("inf")
    assert hausdorff95(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="spacing"):
        hausdorff95(a, b, (1.0, 1.0))
