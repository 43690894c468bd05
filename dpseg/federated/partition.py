"""Who holds which patients: splits of a case list into federated sites.

Every function returns a list of index lists, one per site, that together use every case
exactly once (a patient lives at one hospital), in a deterministic order for a given seed.

- ``split_by_group``: the natural split, by the site recorded in dataset.json.
- ``iid_split``: shuffled cases dealt evenly (sizes differ by at most one).
- ``quantity_skew_split``: site sizes drawn from Dirichlet(alpha) shares: small alpha gives
  one big hospital and several small ones, the usual case in practice.
- ``dirichlet_split``: label-distribution skew in the style of Hsu et al. (2019): for every
  group (here the scanner a case came from, since a segmentation case has no single class),
  the group's cases are shared among sites in Dirichlet(alpha) proportions, so each site
  sees a different mix of scanners.

Sites that would be empty get one case moved from the largest site: a site without data
cannot train, and the simulator refuses such a split rather than silently dropping a site.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

__all__ = [
    "PARTITIONS",
    "dirichlet_split",
    "iid_split",
    "quantity_skew_split",
    "split_by_group",
    "train_test_split",
]

PARTITIONS = ("site", "iid", "quantity", "dirichlet")


def _check(n: int, sites: int) -> None:
    if sites < 1:
        raise ValueError(f"need at least one site, got {sites}")
    if n < sites:
        raise ValueError(f"{n} cases cannot fill {sites} sites (each needs at least one case)")


def _fill_empty(parts: list[list[int]]) -> list[list[int]]:
    for part in parts:
        if not part:
            donor = max(parts, key=len)
            part.append(donor.pop())
    return [sorted(p) for p in parts]


def split_by_group(groups: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """{group: case indices} in order of first appearance (the dataset.json "site")."""
    out: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        out.setdefault(g, []).append(i)
    return out


def iid_split(n: int, sites: int, seed: int = 0) -> list[list[int]]:
    _check(n, sites)
    order = np.random.default_rng([seed, 11]).permutation(n)
    return [sorted(int(i) for i in order[k::sites]) for k in range(sites)]


def quantity_skew_split(n: int, sites: int, alpha: float = 1.0, seed: int = 0) -> list[list[int]]:
    """Cases shuffled, then cut at Dirichlet(alpha) shares (each site keeps at least one)."""
    _check(n, sites)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng([seed, 12])
    shares = rng.dirichlet([alpha] * sites)
    # One case each first, the rest by the shares (largest remainders), so sizes sum to n.
    extra = shares * (n - sites)
    sizes = np.floor(extra).astype(int)
    short = n - sites - int(sizes.sum())
    sizes[np.argsort(-(extra - sizes), kind="stable")[:short]] += 1
    sizes += 1
    order = rng.permutation(n)
    cuts = np.cumsum(sizes)[:-1]
    return [sorted(int(i) for i in part) for part in np.split(order, cuts)]


def dirichlet_split(
    groups: Sequence[Hashable], sites: int, alpha: float = 0.5, seed: int = 0
) -> list[list[int]]:
    """Each group's cases dealt to sites in Dirichlet(alpha) proportions (Hsu et al.)."""
    n = len(groups)
    _check(n, sites)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng([seed, 13])
    parts: list[list[int]] = [[] for _ in range(sites)]
    for members in split_by_group(groups).values():
        members = rng.permutation(members)
        shares = rng.dirichlet([alpha] * sites)
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for k, chunk in enumerate(np.split(members, cuts)):
            parts[k].extend(int(i) for i in chunk)
    return _fill_empty(parts)


def train_test_split(
    indices: Sequence[int], test_fraction: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """A site's held-out cases: round(fraction * n), at least one, never all of them."""
    n = len(indices)
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if n < 2 and test_fraction > 0:
        raise ValueError(f"a site with {n} case(s) cannot hold one out and still train")
    n_test = 0 if test_fraction == 0 else min(n - 1, max(1, round(test_fraction * n)))
    order = np.random.default_rng([seed, 14, n]).permutation(n)
    test = sorted(int(indices[i]) for i in order[:n_test])
    train = sorted(int(indices[i]) for i in order[n_test:])
    return train, test
