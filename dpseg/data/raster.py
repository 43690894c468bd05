"""Rasterising ellipsoids, elliptic cylinders and domes into a label map, fast.

The phantom generator paints ~20 shapes per case; evaluating each on the full 64^3 grid costs
~3 ms, so shapes are evaluated only inside their world-space bounding box, on open (broadcast)
coordinate axes computed once per grid: ~10 ms for a whole 64^3 case.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Vec = Sequence[float] | np.ndarray
Ids = Sequence[int] | None

__all__ = ["AIR", "Painter", "grid", "rotation"]

AIR = 0  # the id a fresh map starts from


def grid(size: int, spacing: tuple[float, float, float]) -> list[np.ndarray]:
    """World coordinates (mm) of voxel centres along each axis; origin at the centre."""
    return [((np.arange(size) - (size - 1) / 2) * s).astype(np.float32) for s in spacing]


def rotation(rz: float, rx: float = 0.0) -> np.ndarray:
    cz, sz, cx, sx = np.cos(rz), np.sin(rz), np.cos(rx), np.sin(rx)
    return np.array([[cz, sz, 0], [-sz, cz, 0], [0, 0, 1]]) @ np.array(
        [[1, 0, 0], [0, cx, sx], [0, -sx, cx]]
    )


class Painter:
    """Paints ellipsoids and elliptic cylinders into an id map, inside bounding boxes only."""

    def __init__(self, size: int, spacing: tuple[float, float, float]) -> None:
        self.axes = grid(size, spacing)
        self.spacing = spacing
        self.ids = np.full((size, size, size), AIR, dtype=np.uint8)

    def _box(self, centre: Vec, half: Vec) -> tuple[slice, ...] | None:
        sl = []
        for ax, c, h, s in zip(self.axes, centre, half, self.spacing, strict=True):
            lo = int(np.searchsorted(ax, c - h - s))
            hi = int(np.searchsorted(ax, c + h + s))
            if hi <= lo:
                return None
            sl.append(slice(lo, hi))
        return tuple(sl)

    def ellipsoid(
        self,
        organ: int,
        centre: Vec,
        semi: Vec,
        rot: np.ndarray | None = None,
        where: Ids = None,
        inside: float = 1.0,
    ) -> None:
        """Paint `organ` where the ellipsoid (scaled by `inside`) covers ids in `where`."""
        rot = np.eye(3) if rot is None else rot
        semi = np.asarray(semi, float) * inside
        half = np.sqrt(((rot * semi[:, None]) ** 2).sum(axis=0))
        sl = self._box(centre, half)
        if sl is None:
            return
        d = [
            (ax[s] - np.float32(c)).reshape(shape)
            for ax, s, c, shape in zip(
                self.axes, sl, centre, [(-1, 1, 1), (1, -1, 1), (1, 1, -1)], strict=True
            )
        ]
        q = np.zeros(tuple(s.stop - s.start for s in sl), np.float32)
        for k in range(3):
            u = rot[k, 0] * d[0] + rot[k, 1] * d[1] + rot[k, 2] * d[2]
            q += (u / np.float32(semi[k])) ** 2
        self._paint(sl, q <= 1.0, organ, where)

    def cylinder(
        self,
        organ: int,
        centre_xy: Vec,
        semi_xy: Vec,
        z_mask: np.ndarray | None = None,
        where: Ids = None,
    ) -> None:
        """Elliptic cylinder along z (body, vertebrae, aorta); z_mask selects slices."""
        n = self.ids.shape[2]
        sl = self._box((*centre_xy, 0.0), (*semi_xy, 1e9))
        if sl is None:
            return
        x = (self.axes[0][sl[0]] - centre_xy[0])[:, None] / semi_xy[0]
        y = (self.axes[1][sl[1]] - centre_xy[1])[None, :] / semi_xy[1]
        disk = (x**2 + y**2 <= 1.0)[:, :, None]
        zm = np.ones((1, 1, n), bool) if z_mask is None else z_mask[None, None, :]
        self._paint((sl[0], sl[1], slice(0, n)), disk & zm, organ, where)

    def dome(
        self,
        organ: int,
        centre_xy: Vec,
        semi_xy: Vec,
        z_apex: float,
        depth: float,
        where: Ids = None,
    ) -> None:
        """Thorax above a diaphragm dome: inside the elliptic cross-section and above
        z = z_apex - depth * rho^2 (rho = elliptic radius), so the organ below (the liver)
        gets a convex-upward top as in a real coronal CT."""
        sl = self._box((*centre_xy, 0.0), (*semi_xy, 1e9))
        if sl is None:
            return
        x = (self.axes[0][sl[0]] - centre_xy[0])[:, None] / semi_xy[0]
        y = (self.axes[1][sl[1]] - centre_xy[1])[None, :] / semi_xy[1]
        rho2 = x**2 + y**2
        base = (z_apex - depth * rho2)[:, :, None]
        mask = (rho2 <= 1.0)[:, :, None] & (self.axes[2][None, None, :] >= base)
        self._paint((sl[0], sl[1], slice(0, self.ids.shape[2])), mask, organ, where)

    def _paint(self, sl: tuple[slice, ...], mask: np.ndarray, organ: int, where: Ids) -> None:
        block = self.ids[sl]  # a view: assignment paints the map
        if where is not None:
            mask &= np.isin(block, where)
        block[mask] = organ
