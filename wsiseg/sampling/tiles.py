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
of score vectors that share their argmax keeps it.) Other tiles are
classified in small blocks (8 x 8 pixels), all at once: each block's index
range is bounded by the index at its centre (block centres form a grid, so
this is one separable evaluation) plus the map's slope bound times the
block's half extent (the map is piecewise bilinear, so its slope is bounded
by the differences of the coarse map, extended linearly by one node), and a
summed-area table of label changes tells in O(1) whether every node in that
range carries one label. Such blocks are painted; only the pixels of the
other blocks are read one by one. Per-pixel work is thus spent only along
label boundaries, and the result is exactly that of reading every pixel.

Coordinates follow :mod:`wsiseg.sampling.coords`: the pixel ``j`` of a level
with downsample ``s`` has its centre at level-0 ``(j + 0.5) * s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    _tables: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def _prepare(self) -> tuple:
        """Slope tables of the index map and summed-area tables of label changes (cached)."""
        if self._tables is None:
            _, _, bw, bh = self.box
            hc, wc = self.inverse.shape[:2]
            ext = _extend(_extend(self.inverse, 0), 1)
            # |d index / d level-0 pixel| per coarse cell of the extended map, maxima over
            # _POOL x _POOL cells: still bounds, at a 64th of the inverse map's memory
            slope_x = _max_pool(np.abs(np.diff(ext, axis=1)) * (wc / bw))
            slope_y = _max_pool(np.abs(np.diff(ext, axis=0)) * (hc / bh))
            lab = self.labels
            change_x = _sat(lab[:, 1:] != lab[:, :-1])
            change_y = _sat(lab[1:, :] != lab[:-1, :])
            self._tables = (slope_x, slope_y, change_x, change_y)
        return self._tables

    def slope_bounds(self, xa: float, xb: float, ya: float, yb: float) -> np.ndarray:
        """Bounds on the index map's partial derivatives over a level-0 rectangle.

        Returns
        -------
        numpy.ndarray
            ``[[dr/dx, dr/dy], [dc/dx, dc/dy]]`` maxima of the absolute
            derivatives (index units per level-0 pixel) over every coarse
            cell that the rectangle ``[xa, xb] x [ya, yb]`` touches.
        """
        x, y, bw, bh = self.box
        hc, wc = self.inverse.shape[:2]
        slope_x, slope_y, _, _ = self._prepare()
        # extended-map centre k sits at coarse position k - 1; one cell of margin each side
        ja = max(0, int(np.floor((xa - x) / bw * wc + 0.5)) - 1)
        jb = min(wc + 1, int(np.floor((xb - x) / bw * wc + 0.5)) + 2)
        ia = max(0, int(np.floor((ya - y) / bh * hc + 0.5)) - 1)
        ib = min(hc + 1, int(np.floor((yb - y) / bh * hc + 0.5)) + 2)
        # cells: x slopes rows ia..ib, columns ja..jb-1; y slopes rows ia..ib-1, columns ja..jb (pooled)
        p = _POOL
        sx = slope_x[ia // p : ib // p + 1, ja // p : (jb - 1) // p + 1].reshape(-1, 2).max(axis=0)
        sy = slope_y[ia // p : (ib - 1) // p + 1, ja // p : jb // p + 1].reshape(-1, 2).max(axis=0)
        return np.stack([sx, sy], axis=1)

    def block_labels(
        self,
        xc: np.ndarray,
        yc: np.ndarray,
        hx: np.ndarray,
        hy: np.ndarray,
        slopes: np.ndarray,
        mode: str = "nearest",
    ) -> np.ndarray:
        """Label of each block whose pixels provably all read one label, else -1.

        Blocks form a grid: block ``(i, j)`` is centred on level-0
        ``(xc[j], yc[i])`` and its outermost pixel centres lie ``hx[j]`` and
        ``hy[i]`` away from it.

        Parameters
        ----------
        xc, hx : numpy.ndarray
            Block centres and half extents along x (one per block column).
        yc, hy : numpy.ndarray
            The same along y (one per block row).
        slopes : numpy.ndarray
            :meth:`slope_bounds` over a rectangle holding every block.
        mode : {"nearest", "linear"}

        Returns
        -------
        numpy.ndarray
            ``(len(yc), len(xc))`` int16 labels, -1 where a block may be mixed.
        """
        r, c = self.index_at(xc, yc)
        eps = 1e-9
        # |index(p) - index(centre)| <= |d/dx| |dx| + |d/dy| |dy| on the piecewise bilinear map
        hx, hy = hx[None, :], hy[:, None]
        sr = slopes[0, 0] * hx + slopes[0, 1] * hy + eps
        sc = slopes[1, 0] * hx + slopes[1, 1] * hy + eps
        h, w = self.labels.shape
        if mode == "nearest":
            ra, rb = np.floor(r - sr + 0.5), np.floor(r + sr + 0.5)
            ca, cb = np.floor(c - sc + 0.5), np.floor(c + sc + 0.5)
        else:  # bilinear reads the two nodes around each index
            ra, rb = np.floor(r - sr), np.ceil(r + sr)
            ca, cb = np.floor(c - sc), np.ceil(c + sc)
        ra = np.clip(ra, 0, h - 1).astype(np.int64)
        rb = np.clip(rb, 0, h - 1).astype(np.int64)
        ca = np.clip(ca, 0, w - 1).astype(np.int64)
        cb = np.clip(cb, 0, w - 1).astype(np.int64)
        _, _, change_x, change_y = self._prepare()
        # no label change between horizontal neighbours in rows ra..rb, cols ca..cb, nor vertical ones
        # (flat takes on the summed-area tables: cheaper than 2-D fancy indexing)
        sx, sy = change_x.ravel(), change_y.ravel()
        ta, tb = ra * w, (rb + 1) * w  # change_x has w columns
        nx = sx.take(tb + cb) - sx.take(ta + cb) - sx.take(tb + ca) + sx.take(ta + ca)
        ta, tb = ra * (w + 1), rb * (w + 1)  # change_y has w + 1 columns
        ny = sy.take(tb + cb + 1) - sy.take(ta + cb + 1) - sy.take(tb + ca) + sy.take(ta + ca)
        out = self.labels.ravel().take(ra * w + ca).astype(np.int16)
        out[(nx != 0) | (ny != 0)] = -1
        return out

    def read_pixels(self, xs: np.ndarray, ys: np.ndarray, pj: np.ndarray, pi: np.ndarray, mode: str = "nearest"):
        """Labels at the pixel centres ``(xs[pj], ys[pi])``: :meth:`read` at scattered pixels.

        The first (row) pass of :meth:`index_at` is done once for all ``ys``;
        per pixel only the second one remains, with the same operations in
        the same order, so the labels are bit for bit those of :meth:`read`.
        """
        rows, j0, j1, fx = self._rows(xs, ys)
        n = rows.shape[1]
        gx = 1 - fx
        ka = pi * n + j0[pj]
        kb = pi * n + j1[pj]
        wa, wb = gx[pj], fx[pj]
        r, c = (np.ascontiguousarray(rows[..., k]).ravel() for k in range(2))
        return self._lookup(r.take(ka) * wa + r.take(kb) * wb, c.take(ka) * wa + c.take(kb) * wb, mode)

    def _rows(self, xs: np.ndarray, ys: np.ndarray):
        """First pass of the separable bilinear map: the coarse map at rows ``ys``.

        Returns ``rows`` ``(len(ys), n, 2)`` on the ``n`` coarse columns that
        ``xs`` use, and per ``xs`` the left/right column in ``rows`` and weight.
        """
        x, y, bw, bh = self.box
        hc, wc = self.inverse.shape[:2]
        j0, fx = _axis_weights((xs - x) / bw, wc)
        i0, fy = _axis_weights((ys - y) / bh, hc)
        # restricted to the coarse columns in use
        ca, cb = int(j0.min()), min(int(j0.max()) + 2, wc)
        inv = self.inverse[:, ca:cb]
        i1 = np.minimum(i0 + 1, hc - 1)
        fy = fy[:, None, None]
        rows = inv[i0] * (1 - fy) + inv[i1] * fy
        j0 = j0 - ca
        return rows, j0, np.minimum(j0 + 1, cb - ca - 1), fx

    def index_at(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional grid ``(row, col)`` at level-0 positions (outer product of ``ys`` x ``xs``)."""
        rows, j0, j1, fx = self._rows(xs, ys)
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
        return self._lookup(r, c, mode)

    def _lookup(self, r: np.ndarray, c: np.ndarray, mode: str) -> np.ndarray:
        h, w = self.labels.shape
        if mode == "nearest":
            # floor(x + 0.5): half up, the rule of wsiseg.sampling.reverse.lookup_nearest.
            i = np.clip(np.floor(r + 0.5), 0, h - 1).astype(np.int64)
            j = np.clip(np.floor(c + 0.5), 0, w - 1).astype(np.int64)
            return self.labels.ravel().take(i * w + j)
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
        Side of the blocks a tile that is not constant is classified in;
        only the pixels of mixed blocks are read one by one.

    Attributes
    ----------
    counts : numpy.ndarray
        ``(256,)`` int64 level-0 pixels written per label value (level-0
        tiles only), for class areas without re-reading the mask.
    pixels_refined : int
        Pixels read one by one (all levels): the rest were painted per block.
    """

    def __init__(self, regions, width: int, height: int, *, background: int = 0, mode: str = "nearest", block: int = 8):
        block = int(block)
        if block < 1:
            raise ValueError(f"block must be positive, got {block}")
        if mode not in ("nearest", "linear"):
            raise ValueError(f"mode must be 'nearest' or 'linear', got {mode!r}")
        self.regions = list(regions)
        self.width, self.height = int(width), int(height)
        self.background = int(background)
        self.mode = mode
        self.block = block
        self.counts = np.zeros(256, np.int64)
        self.pixels_refined = 0
        boxes = np.array([r.box for r in self.regions], np.float64).reshape(-1, 4)
        self._x0, self._y0 = boxes[:, 0], boxes[:, 1]
        self._x1, self._y1 = boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]

    def __call__(self, level, x0: int, y0: int, w: int, h: int):
        sx, sy = level.downsample
        return self._tile(sx, sy, x0, y0, w, h, count=level.index == 0)

    def _centres(self, s: float, start: int, n: int) -> np.ndarray:
        return (np.arange(start, start + n, dtype=np.float64) + 0.5) * s

    def _tile(self, sx, sy, x0, y0, w, h, count=False):
        xs, ys = self._centres(sx, x0, w), self._centres(sy, y0, h)
        # one vectorised test instead of a Python loop over every region per tile
        near = np.flatnonzero((self._x0 <= xs[-1]) & (self._x1 > xs[0]) & (self._y0 <= ys[-1]) & (self._y1 > ys[0]))
        hits = []
        for k in near:
            reg = self.regions[k]
            bx, by, bw, bh = reg.box
            # pixels whose centres fall inside the region's half-open box
            c0, c1 = np.searchsorted(xs, [bx, bx + bw])
            r0, r1 = np.searchsorted(ys, [by, by + bh])
            if c1 > c0 and r1 > r0:
                hits.append((reg, int(r0), int(r1), int(c0), int(c1)))
        if not hits:
            if count:
                self.counts[self.background] += w * h
            return self.background
        if len(hits) == 1 and hits[0][1:] == (0, h, 0, w):
            value = hits[0][0].constant_label(xs, ys, self.mode)
            if value is not None:
                if count:
                    self.counts[value] += w * h
                return value
        if len(hits) == 1 and hits[0][1:] == (0, h, 0, w):  # one region covers the tile: no background
            return self._fill(None, hits[0][0], xs, ys, 0, 0, count)
        tile = np.full((h, w), self.background, np.uint8)
        covered = 0
        for reg, r0, r1, c0, c1 in hits:
            self._fill(tile, reg, xs[c0:c1], ys[r0:r1], r0, c0, count)
            covered += (r1 - r0) * (c1 - c0)
        if count:
            self.counts[self.background] += w * h - covered
        return tile

    def _fill(self, tile, reg, xs, ys, r0, c0, count):
        """Labels of ``reg`` at pixel centres ``ys`` x ``xs``, into ``tile`` from ``(r0, c0)``.

        Returns ``tile``, or with ``tile=None`` the labels as a new array.
        """
        h, w = ys.size, xs.size
        b = self.block
        slopes = reg.slope_bounds(xs[0], xs[-1], ys[0], ys[-1])
        # the whole rectangle as one block first: often constant where a region meets the background
        whole = reg.block_labels(
            np.array([(xs[0] + xs[-1]) / 2]), np.array([(ys[0] + ys[-1]) / 2]),
            np.array([(xs[-1] - xs[0]) / 2]), np.array([(ys[-1] - ys[0]) / 2]), slopes, self.mode,
        )[0, 0]
        if whole >= 0:
            if count:
                self.counts[whole] += h * w
            if tile is None:
                return np.full((h, w), whole, np.uint8)
            tile[r0 : r0 + h, c0 : c0 + w] = whole
            return tile
        ja, ia = np.arange(0, w, b), np.arange(0, h, b)
        je, ie = np.minimum(ja + b, w) - 1, np.minimum(ia + b, h) - 1
        # every block at once: the block centres form a grid, so the index map is one separable evaluation
        values = reg.block_labels(
            (xs[ja] + xs[je]) / 2, (ys[ia] + ys[ie]) / 2, (xs[je] - xs[ja]) / 2, (ys[ie] - ys[ia]) / 2, slopes,
            self.mode,
        )
        nby, nbx = values.shape
        full = np.empty((nby, b, nbx, b), np.uint8)
        full[...] = values.astype(np.uint8)[:, None, :, None]  # paint every block (mixed ones are overwritten)
        out = full.reshape(nby * b, nbx * b)
        if out.shape != (h, w):
            out = np.ascontiguousarray(out[:h, :w])
        mixed = values < 0
        if count:
            area = np.outer(ie - ia + 1, je - ja + 1)
            done = ~mixed
            self.counts += np.bincount(values[done], weights=area[done], minlength=256).astype(np.int64)
        if mixed.any():  # the pixels of mixed blocks, one by one
            bi, bj = np.nonzero(mixed)
            pi, pj = _children(bi * b, bj * b, b, 1, h, w)
            labels = reg.read_pixels(xs, ys, pj, pi, self.mode)
            out.reshape(-1)[pi * w + pj] = labels
            self.pixels_refined += pi.size
            if count:
                self.counts += np.bincount(labels, minlength=256)
        if tile is None:
            return out
        tile[r0 : r0 + h, c0 : c0 + w] = out
        return tile


def _children(bi: np.ndarray, bj: np.ndarray, size: int, child: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of the ``child``-sized blocks of blocks at ``(bi, bj)``, inside ``h x w``."""
    off = np.arange(0, size, child)
    k = off.size
    ci = np.repeat(np.add.outer(bi, off), k, axis=1).ravel()
    cj = np.tile(np.add.outer(bj, off), (1, k)).ravel()
    if bi.size and (bi.max() + size > h or bj.max() + size > w):  # blocks at the edge overhang
        keep = (ci < h) & (cj < w)
        ci, cj = ci[keep], cj[keep]
    return ci, cj


_POOL = 8  # coarse cells per side of one slope-table entry


def _max_pool(a: np.ndarray) -> np.ndarray:
    """Maxima of ``(H, W, C)`` non-negative ``a`` over ``_POOL x _POOL`` blocks (edge blocks partial)."""
    h, w, c = a.shape
    p = _POOL
    padded = np.zeros((-(-h // p) * p, -(-w // p) * p, c), a.dtype)
    padded[:h, :w] = a
    return padded.reshape(padded.shape[0] // p, p, padded.shape[1] // p, p, c).max(axis=(1, 3))


def _extend(a: np.ndarray, axis: int) -> np.ndarray:
    """One more node at each end of ``axis``, continuing the map linearly (constant for one node)."""
    first, last = np.take(a, [0], axis), np.take(a, [-1], axis)
    if a.shape[axis] > 1:
        first = 2 * first - np.take(a, [1], axis)
        last = 2 * last - np.take(a, [-2], axis)
    return np.concatenate([first, a, last], axis=axis)


def _sat(mask: np.ndarray) -> np.ndarray:
    """Summed-area table with a leading zero row and column: ``S[i, j] = mask[:i, :j].sum()``."""
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1, out=out[1:, 1:])
    return out
