"""keep_largest_component against a breadth-first flood fill written here."""

import itertools
from collections import deque

import numpy as np
import pytest

from dpseg.train.postprocess import keep_largest_component


def _components(mask: np.ndarray) -> list[list[tuple[int, ...]]]:
    """Connected components of a boolean mask (full connectivity), in C order of their
    first voxel: a plain flood fill, the oracle."""
    seen = np.zeros(mask.shape, dtype=bool)
    steps = [d for d in itertools.product((-1, 0, 1), repeat=mask.ndim) if any(d)]
    found = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        comp, queue = [], deque([start])
        while queue:
            v = queue.popleft()
            comp.append(v)
            for d in steps:
                w = tuple(a + b for a, b in zip(v, d, strict=True))
                if all(0 <= i < s for i, s in zip(w, mask.shape, strict=True)):
                    if mask[w] and not seen[w]:
                        seen[w] = True
                        queue.append(w)
        found.append(comp)
    return found


def _oracle(labels: np.ndarray, num_classes: int) -> np.ndarray:
    out = labels.copy()
    for c in range(1, num_classes):
        comps = _components(labels == c)
        if len(comps) <= 1:
            continue
        keep = max(range(len(comps)), key=lambda i: (len(comps[i]), -i))  # first of the largest
        for i, comp in enumerate(comps):
            if i != keep:
                for v in comp:
                    out[v] = 0
    return out


@pytest.mark.parametrize(
    "shape, num_classes, density, seed, dtype",
    [
        ((9, 8, 7), 2, 0.25, 0, np.uint8),  # uint8: what `dpseg predict` passes
        ((9, 8, 7), 3, 0.3, 1, np.int64),
        ((16, 13), 2, 0.35, 2, np.int64),
        ((16, 13), 4, 0.5, 3, np.uint8),
    ],
)
def test_matches_a_flood_fill(shape, num_classes, density, seed, dtype):
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(shape) < density, rng.integers(1, num_classes, shape), 0)
    labels = labels.astype(dtype)
    kept = keep_largest_component(labels, num_classes)
    assert kept.dtype == dtype
    np.testing.assert_array_equal(kept, _oracle(labels, num_classes))
    for c in range(1, num_classes):  # one piece per class is left, where there were any
        assert len(_components(kept == c)) == min(len(_components(labels == c)), 1)


def test_a_tie_keeps_the_first_piece_in_c_order():
    labels = np.zeros((6, 6), dtype=np.uint8)
    labels[4:6, 0:2] = 1  # 4 voxels, found second (its first voxel is in row 4)
    labels[0:2, 4:6] = 1  # 4 voxels, found first (row 0)
    kept = keep_largest_component(labels, 2)
    expected = np.zeros_like(labels)
    expected[0:2, 4:6] = 1
    np.testing.assert_array_equal(kept, expected)


def test_islands_go_the_organ_stays():
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[4:12, 4:12, 4:12] = 1  # the organ
    labels[16, 16, 16] = 1  # an island
    labels[15:18, 1:3, 1:3] = 1  # a bigger island, still smaller than the organ
    labels[12, 12, 12] = 1  # touches the organ at a corner: 26-connected, so it stays
    kept = keep_largest_component(labels, 2)
    expected = np.zeros_like(labels)
    expected[4:12, 4:12, 4:12] = 1
    expected[12, 12, 12] = 1
    np.testing.assert_array_equal(kept, expected)
    # Only the named classes are touched; an empty class is left empty.
    two = labels.copy()
    two[0, 0, 0] = 2
    two[19, 19, 0] = 2
    only1 = keep_largest_component(two, 3, classes=(1,))
    assert (only1 == 2).sum() == 2 and (only1 == 1).sum() == expected.sum()
    np.testing.assert_array_equal(keep_largest_component(np.zeros((4, 4)), 2), np.zeros((4, 4)))
