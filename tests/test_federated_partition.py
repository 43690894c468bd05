"""Splits of cases into sites: every case used once, sizes and shares as specified."""

from collections import Counter

import numpy as np
import pytest

from dpseg.federated.partition import (
    dirichlet_split,
    iid_split,
    quantity_skew_split,
    split_by_group,
    train_test_split,
)
from dpseg.federated.sitedata import partition_cases


def _assert_partition(parts, n):
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n)), "every case exactly once"
    assert all(len(p) >= 1 for p in parts), "no empty site"


@pytest.mark.parametrize("n,k", [(10, 3), (7, 7), (23, 4)])
def test_iid_split_even_and_complete(n, k):
    parts = iid_split(n, k, seed=3)
    _assert_partition(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert parts == iid_split(n, k, seed=3)  # deterministic
    assert parts != iid_split(n, k, seed=4) or n == k


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_quantity_skew_sizes(alpha):
    n, k = 40, 4
    parts = quantity_skew_split(n, k, alpha, seed=1)
    _assert_partition(parts, n)
    sizes = sorted(len(p) for p in parts)
    if alpha == 100.0:  # near-equal shares
        assert sizes[-1] - sizes[0] <= 4
    if alpha == 0.1:  # one dominant site
        assert sizes[-1] >= n // 2


def test_quantity_skew_follows_dirichlet_shares():
    # The sizes are the Dirichlet draw rounded (one case each first): recompute the draw.
    n, k, alpha, seed = 103, 5, 0.7, 9
    shares = np.random.default_rng([seed, 12]).dirichlet([alpha] * k)
    assert shares.sum() == pytest.approx(1.0)
    sizes = [len(p) for p in quantity_skew_split(n, k, alpha, seed)]
    assert sum(sizes) == n
    np.testing.assert_allclose(sizes, 1 + shares * (n - k), atol=1.0)


def test_dirichlet_split_shares_per_group():
    groups = ["a"] * 30 + ["b"] * 30 + ["c"] * 30
    k = 3
    for alpha in (0.05, 1000.0):
        parts = dirichlet_split(groups, k, alpha, seed=2)
        _assert_partition(parts, len(groups))
        counts = np.array([[Counter(groups[i] for i in p)[g] for g in "abc"] for p in parts])
        # Each group's cases are shared out completely: its shares over sites sum to 1.
        np.testing.assert_array_equal(counts.sum(0), [30, 30, 30])
        shares = counts / counts.sum(0, keepdims=True)
        np.testing.assert_allclose(shares.sum(0), 1.0)
        if alpha == 1000.0:  # near-uniform mix everywhere
            assert np.abs(shares - 1 / 3).max() < 0.15
        else:  # skewed: some site holds most of some group
            assert shares.max() > 0.8


def test_dirichlet_split_never_leaves_a_site_empty():
    parts = dirichlet_split(["x"] * 6, 5, alpha=0.01, seed=0)
    _assert_partition(parts, 6)


def test_split_by_group_and_holdout():
    groups = ["s1", "s0", "s1", "s2", "s0", "s1"]
    by = split_by_group(groups)
    assert list(by) == ["s1", "s0", "s2"]
    assert by["s1"] == [0, 2, 5]
    train, test = train_test_split(by["s1"], 0.25, seed=0)
    assert len(test) == 1 and sorted(train + test) == [0, 2, 5]
    train, test = train_test_split([4, 9], 0.9, seed=0)
    assert len(train) == 1 and len(test) == 1  # never all of them
    with pytest.raises(ValueError, match="cannot hold one out"):
        train_test_split([3], 0.25)


def test_partition_cases_by_site_checks_count():
    groups = ["a", "b", "a", "b"]
    assert partition_cases(groups, "site", None, 0.5, 0) == {"a": [0, 2], "b": [1, 3]}
    with pytest.raises(ValueError, match="records 2 site"):
        partition_cases(groups, "site", 3, 0.5, 0)
    parts = partition_cases(groups * 3, "iid", 3, 0.5, 0)
    assert list(parts) == ["site0", "site1", "site2"]
    with pytest.raises(ValueError):
        iid_split(2, 3)
