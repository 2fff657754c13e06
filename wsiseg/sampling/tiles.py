"""Tile-wise reverse sampling for whole slides: never a full-resolution array.

Each region (a level-0 box segmented on its own deformed grid) keeps its
low-resolution prediction and an inverse map (region position -> fractional
grid index, see :mod:`wsiseg.sampling.reverse`) solved once on a *coarse*
raster. A tile of any pyramid level is then produced by interpolating that
coarse map to the tile's pixel centres (bilinear, continued linearly past the
outermost coarse centres, so affine maps such as the uniform grid's are
reproduced exactly) and reading the prediction at the nearest grid node.

Constant tiles cost nothing: the grid nodes that a tile's pixels read are
bounded exactly from the interpolated map at a few breakpoints; if they all
carry the same label the tile is that label, and the writer emits one pre-compressed
constant tile. (This also holds for linear read-back: a convex combination
of score vectors that share their argmax keeps it.) Mixed tiles are refined in blocks the same way, so per-pixel
work is spent only along label boundaries.

Coordinates follow :mod:`wsiseg.sampling.coords`: the pixel ``j`` of a level
with downsample ``s`` has its centre at level-0 ``(j + 0.5) * s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wsiseg.sampling.reverse import inverse_map

__all__ = ["RegionPrediction", "ReverseTiler", "coarse_inverse"]


def coarse_inverse(grid: torch.Tensor, region_size: tuple[int, int], factor: int = 4) -> np.ndarray:
    """Inverse map of a grid on a coarse raster over its region.

    Parameters
    ----------
    grid : torch.Tensor
        Normalised grid ``(h, w, 2)`` or ``(1, h, w, 2)``.
    region_size : (int, int)
        ``(H, W)`` of the region in level-0 pixels (caps the raster).
    factor : int
        Coarse raster nodes per grid node along each axis.

    Returns
    -------
    numpy.ndarray
        ``(Hc, Wc, 2)`` float64 fractional ``(row, col)`` grid indices at the
        pixel centres of an ``Hc x Wc`` raster covering the region.
    """
    g = grid if grid.dim() == 4 else grid.unsqueeze(0)
    h, w = int(g.shape[1]), int(g.shape[2])
    hc = max(1, min(int(region_size[0]), factor * h))
    wc = max(1, min(int(region_size[1]), factor * w))
    return inverse_map(g.detach().to("cpu", torch.float64), (hc, wc))[0].numpy()


def _axis_weights(u: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Left coarse index and weight for normalised positions ``u`` on ``n`` centres.

    Positions beyond the outermost centres extrapolate linearly (weights
    outside [0, 1]); that keeps affine maps exact up to the region's edges.
    """
    if n == 1:
        return np.zeros(u.shape, np.int64), np.zeros(u.shape, np.float64)
    t = u * n - 0.5
    i0 = np.clip(np.floor(t), 0, n - 2).astype(np.int64)
    return i0, t - i0


@dataclass
class RegionPrediction:
    """One segmented region, ready for tile-wise read-back.

    Attributes
    ----------
    box : (x, y, width, height)
        Level-0 integer box.
    labels : numpy.ndarray
        ``(h, w)`` uint8 label *values* at the grid nodes.
    inverse : numpy.ndarray
        :func:`coarse_inverse` of the grid over ``box``.
    scores : numpy.ndarray, optional
        ``(K, h, w)`` float32 class scores, for linear read-back.
    values : numpy.ndarray, optional
        ``(K,)`` label value of each score channel (linear read-back).
    """

    box: tuple[int, int, int, int]
    labels: np.ndarray
    inverse: np.ndarray
    scores: np.ndarray | None = None
    values: np.ndarray | None = None

    def index_at(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional grid ``(row, col)`` at level-0 positions (outer product of ``ys`` x ``xs``)."""
        x, y, bw, bh = self.box
        hc, wc = self.inverse.shape[:2]
        j0, fx = _axis_weights((xs - x) / bw, wc)
        i0, fy = _axis_weights((ys - y) / bh, hc)
        # Separable bilinear: rows first, restricted to the coarse columns in use.
        ca, cb = int(j0.min()), min(int(j0.max()) + 2, wc)
        inv = self.inverse[:, ca:cb]
        i1 = np.minimum(i0 + 1, hc - 1)
        fy = fy[:, None, None]
        rows = inv[i0] * (1 - fy) + inv[i1] * fy
        j0 = j0 - ca
        j1 = np.minimum(j0 + 1, cb - ca - 1)
        fx = fx[None, :, None]
        idx = rows[:, j0] * (1 - fx) + rows[:, j1] * fx
        return idx[..., 0], idx[..., 1]

    def node_range(self, xs: np.ndarray, ys: np.ndarray, mode: str = "nearest") -> tuple[int, int, int, int]:
        """Grid nodes (inclusive row/col bounds) that pixels at ``ys`` x ``xs`` read.

        The interpolated index map is bilinear within each coarse cell (and
        linear beyond the outer centres), so over the rectangle spanned by
        the first and last pixel centres its extremes lie on the products of
        the per-axis breakpoints: the span's ends and the coarse centres
        inside it. Evaluating just those gives exact bounds.
        """
        x, y, bw, bh = self.box
        hc, wc = self.inverse.shape[:2]
        h, w = self.labels.shape
        cxs = x + (np.arange(wc) + 0.5) * bw / wc
        cys = y + (np.arange(hc) + 0.5) * bh / hc
        px = np.concatenate([[xs[0], xs[-1]], cxs[(cxs > xs[0]) & (cxs < xs[-1])]])
        py = np.concatenate([[ys[0], ys[-1]], cys[(cys > ys[0]) & (cys < ys[-1])]])
        r, c = self.index_at(px, py)
        eps = 1e-9
        if mode == "nearest":
            lo = lambda v: int(np.floor(v.min() + 0.5 - eps))  # noqa: E731
            hi = lambda v: int(np.floor(v.max() + 0.5 + eps))  # noqa: E731
        else:  # bilinear reads the two nodes around each index
            lo = lambda v: int(np.floor(v.min() - eps))  # noqa: E731
            hi = lambda v: int(np.ceil(v.max() + eps))  # noqa: E731
        return max(0, lo(r)), min(h - 1, hi(r)), max(0, lo(c)), min(w - 1, hi(c))

    def constant_label(self, xs: np.ndarray, ys: np.ndarray, mode: str = "nearest") -> int | None:
        """The label if every node read by pixels at ``ys`` x ``xs`` carries it, else ``None``."""
        ra, rb, ca, cb = self.node_range(xs, ys, mode)
        block = self.labels[ra : rb + 1, ca : cb + 1]
        first = block.flat[0]
        return int(first) if (block == first).all() else None

    def read(self, xs: np.ndarray, ys: np.ndarray, mode: str = "nearest") -> np.ndarray:
        """Labels at the outer product of level-0 positions ``ys`` x ``xs``."""
        r, c = self.index_at(xs, ys)
        h, w = self.labels.shape
        if mode == "nearest":
            # floor(x + 0.5): half up, the rule of wsiseg.sampling.reverse.lookup_nearest.
            i = np.clip(np.floor(r + 0.5), 0, h - 1).astype(np.int64)
            j = np.clip(np.floor(c + 0.5), 0, w - 1).astype(np.int64)
            return self.labels[i, j]
        if mode == "linear":
            if self.scores is None or self.values is None:
                raise ValueError("linear read-back needs class scores")
            rr = np.clip(r, 0, h - 1)
            cc = np.clip(c, 0, w - 1)
            i0 = np.clip(np.floor(rr), 0, max(h - 2, 0)).astype(np.int64)
            j0 = np.clip(np.floor(cc), 0, max(w - 2, 0)).astype(np.int64)
            i1, j1 = np.minimum(i0 + 1, h - 1), np.minimum(j0 + 1, w - 1)
            a, b = (rr - i0)[None], (cc - j0)[None]
            s = self.scores
            v = (s[:, i0, j0] * (1 - b) + s[:, i0, j1] * b) * (1 - a) + (s[:, i1, j0] * (1 - b) + s[:, i1, j1] * b) * a
            return self.values[np.argmax(v, axis=0)].astype(np.uint8)
        raise ValueError(f"mode must be 'nearest' or 'linear', got {mode!r}")


class ReverseTiler:
    """``tile_source`` for :func:`wsiseg.output.mask.write_label_pyramid`.

    Parameters
    ----------
    regions : list of RegionPrediction
        Non-overlapping regions; pixels outside every region are ``background``.
    width, height : int
        Level-0 size of the slide.
    background : int
        Label outside the regions.
    mode : {"nearest", "linear"}
        Nearest grid node (the paper) or bilinear class scores.
    block : int
        Side of the sub-blocks a mixed tile is refined in.

    Attributes
    ----------
    counts : numpy.ndarray
        ``(256,)`` int64 level-0 pixels written per label value (level-0
        tiles only), for class areas without re-reading the mask.
    """

    def __init__(self, regions, width: int, height: int, *, background: int = 0, mode: str = "nearest", block: int = 64):
        self.regions = list(regions)
        self.width, self.height = int(width), int(height)
        self.background = int(background)
        self.mode = mode
        self.block = int(block)
        self.counts = np.zeros(256, np.int64)
        self.pixels_refined = 0

    def __call__(self, level, x0: int, y0: int, w: int, h: int):
        sx, sy = level.downsample
        out = self._tile(sx, sy, x0, y0, w, h)
        if level.index == 0:
            if isinstance(out, int):
                self.counts[out] += w * h
            else:
                self.counts += np.bincount(out.ravel(), minlength=256)
        return out

    def _centres(self, s: float, start: int, n: int) -> np.ndarray:
        return (np.arange(start, start + n, dtype=np.float64) + 0.5) * s

    def _tile(self, sx, sy, x0, y0, w, h):
        xs, ys = self._centres(sx, x0, w), self._centres(sy, y0, h)
        hits = []
        for reg in self.regions:
            bx, by, bw, bh = reg.box
            # Pixels whose centres fall inside the region's half-open box.
            cx = (xs >= bx) & (xs < bx + bw)
            cy = (ys >= by) & (ys < by + bh)
            if cx.any() and cy.any():
                hits.append((reg, cx, cy))
        if not hits:
            return self.background
        if len(hits) == 1 and hits[0][1].all() and hits[0][2].all():
            value = self._constant(hits[0][0], xs, ys)
            if value is not None:
                return value
        tile = np.full((h, w), self.background, np.uint8)
        for reg, cx, cy in hits:
            ci, ri = np.flatnonzero(cx), np.flatnonzero(cy)
            self._fill(tile, reg, xs, ys, ri[0], ri[-1] + 1, ci[0], ci[-1] + 1)
        return tile

    def _constant(self, reg, xs, ys):
        return reg.constant_label(xs, ys, self.mode)

    def _fill(self, tile, reg, xs, ys, r0, r1, c0, c1):
        b = self.block
        for i in range(r0, r1, b):
            for j in range(c0, c1, b):
                ie, je = min(i + b, r1), min(j + b, c1)
                bx, by = xs[j:je], ys[i:ie]
                value = self._constant(reg, bx, by)
                if value is not None:
                    tile[i:ie, j:je] = value
                else:
                    tile[i:ie, j:je] = reg.read(bx, by, self.mode)
                    self.pixels_refined += (ie - i) * (je - j)
