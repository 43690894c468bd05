"""Statistical and structural properties of the noise every backend shares.

Fixed seeds, so each check is deterministic; the bounds are 5 standard errors (a correct
generator fails one of them with probability ~1e-6, a biased one by far more).
"""

import math

import pytest
import torch
from scipy import stats

from dpseg.ops import available_backends, gaussian_noise

N = 1 << 20  # 1,048,576 draws
BACKEND = available_backends()[0]  # the fastest here: cpp when built


def _noise(numel=N, seed=2024, step=0, offset=0, draws=1) -> torch.Tensor:
    return gaussian_noise(numel, seed, step, offset, draws, torch.float64, backend=BACKEND)


@pytest.mark.parametrize("draws", [1, 4])
@pytest.mark.parametrize("seed,step", [(2024, 0), (2**64 - 5, 2**33 + 1)])
def test_noise_is_standard_normal(draws, seed, step):
    z = _noise(seed=seed, step=step, draws=draws)
    assert z.isfinite().all()
    assert abs(z.mean().item()) < 5 / math.sqrt(N)
    # Var of the sample variance of N(0,1) is 2/N, so sd of the sample sd is sqrt(1/(2N)).
    assert abs(z.std().item() - 1) < 5 * math.sqrt(1 / (2 * N))
    # Fourth moment (3 for a normal) catches a wrong Box-Muller radius that keeps variance.
    assert abs((z**4).mean().item() - 3) < 5 * math.sqrt(96 / N)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3


def test_tails_match_the_normal():
    z = _noise(seed=77)
    for k in (2.0, 3.0, 4.0):
        p = 2 * stats.norm.sf(k)
        frac = (z.abs() > k).double().mean().item()
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / N)


def test_the_two_box_muller_outputs_are_independent_normals():
    """Elements 2q and 2q + 1 are one Philox block's cosine and sine outputs. They are iid
    N(0, 1) exactly when the pair's angle is uniform, its squared radius is chi-square with 2
    degrees of freedom, and the two are independent: test all three, and that the outputs are
    uncorrelated within a block, in their squares (a shared radius would show there) and
    across neighbouring blocks."""
    z = _noise(seed=31, step=4)
    c, s = z[0::2], z[1::2]
    pairs = c.numel()  # 524,288
    bound = 5 / math.sqrt(pairs)
    for a, b in [(c, s), (c**2, s**2), (s[:-1], c[1:]), (c[:-1], c[1:])]:
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < bound
    angle = torch.atan2(s, c)
    r2 = c**2 + s**2
    assert stats.kstest(angle.numpy(), stats.uniform(-math.pi, 2 * math.pi).cdf).pvalue > 1e-3
    assert stats.kstest(r2.numpy(), stats.chi2(2).cdf).pvalue > 1e-3
    # Independence of angle and radius: an 8 x 8 contingency table of octant by radius octile
    # (equal-probability bins of chi2(2)), 8,192 pairs expected per cell.
    octant = ((angle + math.pi) / (math.pi / 4)).long().clamp(max=7)
    edges = torch.tensor(stats.chi2(2).ppf([k / 8 for k in range(1, 8)]), dtype=torch.float64)
    ring = torch.bucketize(r2, edges)
    table = torch.zeros(8, 8, dtype=torch.float64).index_put_(
        (octant, ring), torch.ones(pairs, dtype=torch.float64), accumulate=True
    )
    assert stats.chi2_contingency(table.numpy()).pvalue > 1e-3


@pytest.mark.parametrize(
    "other",
    [
        dict(step=1),  # the next DP step
        dict(seed=2024 + (1 << 32)),  # differs only in the key's high word
        dict(seed=2025),
        dict(offset=1),  # neighbouring elements
    ],
)
def test_streams_are_uncorrelated(other):
    a = _noise()
    b = _noise(**other)
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(N)


def test_noise_is_a_function_of_the_element_index():
    whole = _noise(numel=5000, step=3)
    part = _noise(numel=1234, step=3, offset=777)
    assert torch.equal(part, whole[777 : 777 + 1234])


@pytest.mark.parametrize("draws", [2, 3, 4])
def test_secure_mode_sums_consecutive_draws(draws):
    """z(e, draws) = (N(e*draws) + ... + N(e*draws + draws - 1)) / sqrt(draws), exactly."""
    n, offset = 1001, 13
    single = _noise(numel=n * draws, offset=offset * draws).view(n, draws)
    s = single[:, 0]
    for k in range(1, draws):
        s = s + single[:, k]
    want = s / torch.tensor(math.sqrt(draws), dtype=torch.float64)
    assert torch.equal(_noise(numel=n, offset=offset, draws=draws), want)
    if draws == 4:  # the Opacus secure-mode construction: the sum over 2
        assert torch.equal(want, s * 0.5)


def test_float32_is_the_float64_noise_rounded_once():
    z64 = _noise(numel=10_007, seed=5)
    z32 = gaussian_noise(10_007, 5, 0, dtype=torch.float32, backend=BACKEND)
    assert torch.equal(z32, z64.float())
