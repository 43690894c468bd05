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
