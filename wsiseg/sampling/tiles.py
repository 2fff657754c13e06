"""Tile-wise reverse sampling for whole slides: never a full-resolution array.

Each region (a level-0 box segmented on its own deformed grid) keeps its
low-resolution prediction and an inverse map (region position -> fractional
grid index, see :mod:`wsiseg.sampling.reverse`) solved once on a *coarse*
raster. A tile of any pyramid level is then produced by interpolating that
coarse map to the level-0 pixel centres its pixels stand for (bilinear,
continued linearly past the outermost coarse centres, so affine maps such as
the uniform grid's are reproduced exactly) and reading the prediction at the
nearest grid node.

A pixel of a reduced level stands for the level-0 pixel under its centre
(:func:`wsiseg.sampling.coords.level_source_index`): it is evaluated at that
level-0 pixel's centre, with the same arithmetic as level 0, so every
reduced level equals :func:`wsiseg.sampling.coords.reduce_nearest` of level
0 exactly and a viewer shows the same labels at every zoom. (Evaluating a
level at its own pixel centres, which for even downsamples lie on level-0
pixel edges, disagreed with level 0 on 0.1-0.2 % of the pixels of a real
run.) The cost is that of evaluating the level at its own scale.

Tiles are computed a row of tiles at a time. Each region's part of the row
is classified coarse to fine in super-blocks (32 x 32 pixels; all of one
label, the part is painted at once) and, inside mixed super-blocks, in small
blocks (8 x 8 pixels), each level all at once: each block's index range is bounded by the
index at its centre (block centres form a grid, so this is one separable
evaluation) plus the map's slope bound over the block times the block's half
extent (the map is piecewise bilinear, so its slope is bounded by the
differences of the coarse map, extended linearly by one node), and a
summed-area table of label changes tells in O(1) whether every node in that
range carries one label. (This also holds for linear read-back: a convex
combination of score vectors that share their argmax keeps it.) Such blocks
are painted; only the pixels of the other blocks are read one by one, in
whole blocks (:meth:`RegionPrediction.index_blocks`: the map's first pass
only at the block's rows and the coarse columns under it, not across the
region). Per-pixel work is thus spent only along label boundaries, and the
result is exactly that of reading every pixel. Small parts (a region on the
coarse levels of the pyramid) are read pixel by pixel outright: there the
fixed cost of the classification is the larger one. Tiles that come out
constant are handed to the writer as one label, which it emits as one
pre-compressed tile.

Coordinates follow :mod:`wsiseg.sampling.coords`: level-0 pixel ``j`` has
its centre at ``j + 0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from wsiseg.sampling.coords import level_source_index
from wsiseg.sampling.reverse import inverse_map

__all__ = ["RegionPrediction", "ReverseTiler", "coarse_inverse", "label_counts"]


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

    def __post_init__(self) -> None:
        # Stored as two contiguous planes (row index, column index) seen as an (Hc, Wc, 2) array:
        # the read-back gathers rows of one plane at a time, and no second copy is kept.
        inv = np.asarray(self.inverse, dtype=np.float64)
        self.inverse = np.moveaxis(np.ascontiguousarray(np.moveaxis(inv, -1, 0)), 0, -1)

    def _prepare(self) -> tuple:
        """Slope tables of the index map and summed-area tables of label changes (cached)."""
        if self._tables is None:
            _, _, bw, bh = self.box
            hc, wc = self.inverse.shape[:2]
            # on the two index planes (2, Hc, Wc), so that every operation runs along whole rows
            ext = _extend(_extend(np.moveaxis(self.inverse, -1, 0), 1), 2)
            # |d index / d level-0 pixel| per coarse cell of the extended map, maxima over
            # _POOL x _POOL cells: still bounds, at a 64th of the inverse map's memory
            slope_x = _max_pool(np.abs(np.diff(ext, axis=2)) * (wc / bw))
            slope_y = _max_pool(np.abs(np.diff(ext, axis=1)) * (hc / bh))
            lab = self.labels
            change_x = _sat(lab[:, 1:] != lab[:, :-1])
            change_y = _sat(lab[1:, :] != lab[:-1, :])
            self._tables = (slope_x, slope_y, change_x, change_y)
        return self._tables

    def column_slopes(self, xa: np.ndarray, xb: np.ndarray, ya: float, yb: float) -> np.ndarray:
        """Bounds on the index map's derivatives over a row of level-0 rectangles.

        Rectangle ``j`` is ``[xa[j], xb[j]] x [ya, yb]``; its bound is the
        maximum absolute derivative over every coarse cell it touches, with
        one cell of margin each side (extended-map centre ``k`` sits at
        coarse position ``k - 1``). One bound per block column rather than
        one for the whole row of blocks: tighter, so fewer blocks are left
        to be read pixel by pixel; their maximum bounds the whole row.

        Returns
        -------
        numpy.ndarray
            ``(2, 2, 1, len(xa))``: ``[[dr/dx, dr/dy], [dc/dx, dc/dy]]`` (index
            units per level-0 pixel) per column, shaped to broadcast over a
            block grid.
        """
        x, y, bw, bh = self.box
        hc, wc = self.inverse.shape[:2]
        slope_x, slope_y, _, _ = self._prepare()
        p = _POOL
        ja = np.maximum(0, np.floor((xa - x) / bw * wc + 0.5).astype(np.int64) - 1)
        jb = np.minimum(wc + 1, np.floor((xb - x) / bw * wc + 0.5).astype(np.int64) + 2)
        ia = max(0, int(np.floor((ya - y) / bh * hc + 0.5)) - 1)
        ib = min(hc + 1, int(np.floor((yb - y) / bh * hc + 0.5)) + 2)
        sx = _range_max(slope_x[ia // p : ib // p + 1].max(axis=0), ja // p, (jb - 1) // p)
        sy = _range_max(slope_y[ia // p : (ib - 1) // p + 1].max(axis=0), ja // p, jb // p)
        # (n, 2) each -> (2 index components, 2 directions, 1, n)
        return np.stack([sx.T, sy.T], axis=1)[:, :, None, :]

    def block_labels(
        self,
        xc: np.ndarray,
        yc: np.ndarray,
        hx: np.ndarray,
        hy: np.ndarray,
        slopes: np.ndarray,
        mode: str = "nearest",
        groups: tuple[np.ndarray, np.ndarray, int] | None = None,
    ) -> np.ndarray:
        """Label of each block whose pixels provably all read one label, else -1.

        Blocks form a grid: block ``(i, j)`` is centred on level-0
        ``(xc[j], yc[i])`` and its outermost pixel centres lie ``hx[j]`` and
        ``hy[i]`` away from it. With ``groups`` only some blocks of the grid
        are classified.

        Parameters
        ----------
        xc, hx : numpy.ndarray
            Block centres and half extents along x (one per block column).
        yc, hy : numpy.ndarray
            The same along y (one per block row).
        slopes : numpy.ndarray
            :meth:`column_slopes` (one bound per block column), or one
            ``(2, 2)`` bound for every block.
        mode : {"nearest", "linear"}
        groups : (numpy.ndarray, numpy.ndarray, int), optional
            ``(gi, gj, g)``: classify only the ``g x g`` groups of blocks
            whose first block is ``(gi[k] * g, gj[k] * g)``, as
            :meth:`index_blocks` lays them out.

        Returns
        -------
        numpy.ndarray
            ``(len(yc), len(xc))`` int16 labels, -1 where a block may be
            mixed; with ``groups``, ``(g, g, len(gi))``: block ``(u, v)`` of
            group ``k`` at ``[u, v, k]`` (as :meth:`index_blocks`).
        """
        if groups is None:
            r, c = self.index_at(xc, yc)
            hx, hy = hx[None, :], hy[:, None]
        else:
            r, c, rows, cols = self.index_blocks(xc, yc, *groups)
            hx, hy = hx[cols][None], hy[rows][:, None]
            if slopes.ndim == 4:  # per block column
                slopes = slopes[:, :, 0, cols][:, :, None]
        eps = 1e-9
        # |index(p) - index(centre)| <= |d/dx| |dx| + |d/dy| |dy| on the piecewise bilinear map
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

    def index_blocks(
        self, xs: np.ndarray, ys: np.ndarray, bi: np.ndarray, bj: np.ndarray, b: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`index_at` on whole ``b x b`` blocks of the grid ``ys`` x ``xs``.

        Block ``k`` holds the points at rows ``bi[k] * b + u`` and columns
        ``bj[k] * b + v`` (``u, v < b``) of the grid; rows and columns past its
        end are those of the last point instead (evaluated twice).

        The map's first (row) pass is evaluated only at each block's rows
        and the few coarse columns under it, not across the whole width;
        both passes are the operations of :meth:`index_at` in the same
        order, so the indices are bit for bit the same. Arrays run over
        blocks along their last axis, so each numpy operation has one long
        inner loop.

        Returns
        -------
        r, c : numpy.ndarray
            ``(b, b, len(bi))`` float64 fractional grid row and column:
            point ``(u, v)`` of block ``k`` at ``[u, v, k]``.
        rows, cols : numpy.ndarray
            ``(b, len(bi))`` int64: row ``u`` (in ``ys``) and column ``v`` (in
            ``xs``) of each block.
        """
        x, y, bw, bh = self.box
        hc, wc = self.inverse.shape[:2]
        j0, fx = _axis_weights((xs - x) / bw, wc)
        i0, fy = _axis_weights((ys - y) / bh, hc)
        n = bi.size
        off = np.arange(b)[:, None]
        rows = np.minimum(bi * b + off, ys.size - 1)
        cols = np.minimum(bj * b + off, xs.size - 1)
        # each point's left and right coarse column; j0 does not decrease with x, so a block's
        # columns are the k from its first point's left one on
        c0 = j0[cols]
        c1 = np.minimum(c0 + 1, wc - 1)
        first = c0[0]
        k = int((c1[-1] - first).max(initial=0)) + 1
        cc = np.minimum(first + np.arange(k)[:, None], wc - 1)[None]
        # first pass at (block row u, coarse column q, block m): flat indices of its two nodes
        top = (i0[rows] * wc)[:, None, :] + cc
        bottom = (np.minimum(i0 + 1, hc - 1)[rows] * wc)[:, None, :] + cc
        gy, fy = (1 - fy)[rows][:, None, :], fy[rows][:, None, :]
        # second pass at point (u, v) of block m: flat indices into the (b, k, n) first pass
        base = (np.arange(b) * (k * n))[:, None, None] + np.arange(n)
        left, right = base + ((c0 - first) * n)[None], base + ((c1 - first) * n)[None]
        gx, fx = (1 - fx)[cols][None], fx[cols][None]
        index = []
        for plane in self._planes():
            # a * g + b * f, in place: the same products and sums without temporaries
            flat = plane.ravel()
            rows_pass, other = flat.take(top), flat.take(bottom)
            rows_pass *= gy
            other *= fy
            rows_pass += other
            value, other = rows_pass.take(left), rows_pass.take(right)
            value *= gx
            other *= fx
            value += other
            index.append(value)
        return index[0], index[1], rows, cols

    def read_blocks(
        self, xs: np.ndarray, ys: np.ndarray, bi: np.ndarray, bj: np.ndarray, b: int, mode: str = "nearest"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`read` on whole ``b x b`` blocks of the pixel grid ``ys`` x ``xs`` (see :meth:`index_blocks`).

        Returns
        -------
        labels : numpy.ndarray
            ``(b, b, len(bi))`` uint8: pixel ``(u, v)`` of block ``k`` at
            ``[u, v, k]``.
        rows, cols : numpy.ndarray
            ``(b, len(bi))`` row and column (in ``ys`` and ``xs``) of each.
        """
        r, c, rows, cols = self.index_blocks(xs, ys, bi, bj, b)
        return self._lookup(r, c, mode), rows, cols

    def _rows(self, xs: np.ndarray, ys: np.ndarray):
        """First pass of the separable bilinear map: the coarse map at rows ``ys``.

        Returns the row and column index planes ``(len(ys), n)`` on the ``n``
        coarse columns that ``xs`` use, and per ``xs`` the left/right column
        in them and the weight.
        """
        x, y, bw, bh = self.box
        hc, wc = self.inverse.shape[:2]
        j0, fx = _axis_weights((xs - x) / bw, wc)
        i0, fy = _axis_weights((ys - y) / bh, hc)
        # restricted to the coarse columns in use; one contiguous plane per index component
        ca, cb = int(j0.min()), min(int(j0.max()) + 2, wc)
        i1 = np.minimum(i0 + 1, hc - 1)
        fy = fy[:, None]
        gy = 1 - fy
        rows = tuple(plane[i0, ca:cb] * gy + plane[i1, ca:cb] * fy for plane in self._planes())
        j0 = j0 - ca
        return rows, j0, np.minimum(j0 + 1, cb - ca - 1), fx

    def _planes(self) -> tuple[np.ndarray, np.ndarray]:
        """The inverse map's row and column index: two contiguous ``(Hc, Wc)`` views."""
        return self.inverse[..., 0], self.inverse[..., 1]

    def index_at(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional grid ``(row, col)`` at level-0 positions (outer product of ``ys`` x ``xs``)."""
        rows, j0, j1, fx = self._rows(xs, ys)
        gx = 1 - fx
        r, c = (plane[:, j0] * gx + plane[:, j1] * fx for plane in rows)
        return r, c

    def read(self, xs: np.ndarray, ys: np.ndarray, mode: str = "nearest") -> np.ndarray:
        """Labels at the outer product of level-0 positions ``ys`` x ``xs``."""
        r, c = self.index_at(xs, ys)
        return self._lookup(r, c, mode)

    def _lookup(self, r: np.ndarray, c: np.ndarray, mode: str) -> np.ndarray:
        h, w = self.labels.shape
        if mode == "nearest":
            # floor(x + 0.5): half up, the rule of wsiseg.sampling.reverse.lookup_nearest; in place,
            # and the flat node index formed in float64 (exact: far below 2**53), one cast
            i, j = r + 0.5, c + 0.5
            np.floor(i, out=i)
            np.clip(i, 0, h - 1, out=i)
            np.floor(j, out=j)
            np.clip(j, 0, w - 1, out=j)
            i *= w
            i += j
            return self.labels.ravel().take(i.astype(np.intp))
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


@dataclass
class _Strip:
    """One computed row of tiles: labels (and the same memory flat), and what computing it counted."""

    labels: np.ndarray
    flat: np.ndarray
    counts: np.ndarray | None
    refined: int = 0


class ReverseTiler:
    """``tile_source`` for :func:`wsiseg.output.mask.write_label_pyramid`.

    Tiles are produced a row of tiles (a *strip*) at a time: the first tile
    asked for in a strip computes the whole strip, each region in column
    chunks, and the strip's other tiles are slices of it. Work per call (the
    regions' slope tables, the index map's first pass, the block
    classification) is thus shared by every tile of a strip instead of
    being repeated per tile; memory is one strip (``tile`` rows by the
    level's width, in a buffer reused from strip to strip) plus one chunk's
    temporaries. Tiles asked for in another order are still correct (the
    strip is recomputed). Computing strips ahead on threads was measured
    slower (numpy's GIL-free stretches are too short at these sizes).

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
        Side of the finest blocks a region is classified in (coarser ones
        are multiples of it); only the pixels of mixed blocks are read one
        by one.
    chunk : int
        Columns of a region computed at once (bounds the temporaries: a few
        uint8 arrays of ``tile x chunk``, block arrays a ``block**2``-th of
        that; the pixels of mixed blocks are read :data:`_READ_BLOCKS` blocks
        at a time). Wider chunks mean fewer, larger numpy calls.
    dense : int
        A region's part of a strip (at most ``chunk`` wide) of at most this
        many pixels is read pixel by pixel, without blocks (the same
        labels): on the coarse levels, where a region is a few hundred
        pixels across, that is cheaper than the classification.

    Attributes
    ----------
    counts : numpy.ndarray
        ``(256,)`` int64 level-0 pixels written per label value (level-0
        strips, each counted once), for class areas without re-reading the mask.
    pixels_refined : int
        Pixels read one by one (all levels): the rest were painted per block.
    """

    def __init__(
        self,
        regions,
        width: int,
        height: int,
        *,
        background: int = 0,
        mode: str = "nearest",
        block: int = 8,
        chunk: int = 4096,
        dense: int = 65536,
    ):
        block, chunk = int(block), int(chunk)
        if block < 1:
            raise ValueError(f"block must be positive, got {block}")
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        if mode not in ("nearest", "linear"):
            raise ValueError(f"mode must be 'nearest' or 'linear', got {mode!r}")
        self.regions = list(regions)
        self.width, self.height = int(width), int(height)
        self.background = int(background)
        self.mode = mode
        self.block = block
        self.chunk = -(-chunk // block) * block  # whole blocks per chunk
        self.dense = int(dense)
        self.counts = np.zeros(256, np.int64)
        self.pixels_refined = 0
        boxes = np.array([r.box for r in self.regions], np.float64).reshape(-1, 4)
        self._x0, self._y0 = boxes[:, 0], boxes[:, 1]
        self._x1, self._y1 = boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]
        self._key: tuple | None = None  # (level index, y0, h, level width) of self._labels
        self._labels = np.empty((0, 0), np.uint8)
        # one buffer for every strip: a fresh one would cost a page fault per 4 KiB each time
        self._buffer = np.empty(0, np.uint8)
        self._counted: set[tuple[int, int]] = set()

    def __call__(self, level, x0: int, y0: int, w: int, h: int):
        key = (level.index, int(y0), int(h), int(level.width))
        if key != self._key:
            strip = self._strip(level, int(y0), int(h))
            self.pixels_refined += strip.refined
            if strip.counts is not None and (y0, h) not in self._counted:
                self.counts += strip.counts
                self._counted.add((y0, h))
            self._labels, self._key = strip.labels, key
        tile = self._labels[:, x0 : x0 + w]
        first = tile[0, 0]
        # a sparse look first: most tiles that are not constant show it there, at a 1000th of the cost
        if not (tile[::_PEEK, ::_PEEK] != first).any() and not (tile != first).any():
            return int(first)  # the writer emits one pre-compressed tile
        return tile

    def _centres(self, n0: int, n: int, start: int, count: int) -> np.ndarray:
        """Level-0 centres of the pixels ``start .. start + count`` of an ``n``-pixel level axis."""
        # the level-0 pixels the level stands for, not the level's own centres: levels are level 0 subsampled
        return level_source_index(n0, n)[start : start + count] + 0.5

    def _strip(self, level, y0: int, h: int) -> _Strip:
        """Labels of rows ``y0 .. y0 + h`` of ``level`` across its width, in the reused buffer."""
        width = int(level.width)
        if self._buffer.size < h * width:
            self._buffer = np.empty(h * width, np.uint8)
        flat = self._buffer[: h * width]
        labels = flat.reshape(h, width)
        labels.fill(self.background)
        strip = _Strip(labels, flat, np.zeros(256, np.int64) if level.index == 0 else None)
        xs, ys = self._centres(self.width, width, 0, width), self._centres(self.height, int(level.height), y0, h)
        covered = 0
        for k in np.flatnonzero((self._y0 <= ys[-1]) & (self._y1 > ys[0])):
            reg = self.regions[k]
            bx, by, bw, bh = reg.box
            # pixels whose centres fall inside the region's half-open box
            c0, c1 = (int(v) for v in np.searchsorted(xs, [bx, bx + bw]))
            r0, r1 = (int(v) for v in np.searchsorted(ys, [by, by + bh]))
            if c1 <= c0 or r1 <= r0:
                continue
            for a in range(c0, c1, self.chunk):
                b = min(a + self.chunk, c1)
                self._fill(strip, reg, xs[a:b], ys[r0:r1], r0, a)
            covered += (r1 - r0) * (c1 - c0)
        if strip.counts is not None:
            strip.counts[self.background] += h * width - covered
        return strip

    def _fill(self, strip: _Strip, reg, xs, ys, r0, c0) -> None:
        """Labels of ``reg`` at pixel centres ``ys`` x ``xs``, into the strip from ``(r0, c0)``."""
        h, w = ys.size, xs.size
        b = self.block
        target = strip.labels[r0 : r0 + h, c0 : c0 + w]
        counts = strip.counts
        if h * w <= self.dense:
            # small parts (regions on the coarse levels): reading every pixel costs less than the
            # fixed cost of classifying blocks (a few hundred numpy calls)
            labels = reg.read(xs, ys, self.mode)
            target[...] = labels
            strip.refined += labels.size
            if counts is not None:
                counts += label_counts(labels)
            return
        # Coarse to fine: blocks of b * _LEVELS[0] pixels (all of one label: the rectangle is painted
        # at once), then the blocks of each next size inside mixed blocks of the one before, then the
        # pixels of mixed blocks of the finest (b). A size is classified all at once (block centres
        # form a grid: the index map is one separable evaluation), each block column with its own
        # slope bound (tighter than the rectangle's). (No separate test of the whole rectangle as
        # one block: on the TMA layout it never held, and cost 8 % of this.)
        ja = np.arange(0, w, b)
        fine_slopes = reg.column_slopes(xs[ja], xs[np.minimum(ja + b, w) - 1], ys[0], ys[-1])
        values = None
        for k, f in enumerate(_LEVELS):
            size = b * f
            ja, ia = np.arange(0, w, size), np.arange(0, h, size)
            je, ie = np.minimum(ja + size, w) - 1, np.minimum(ia + size, h) - 1
            centres = ((xs[ja] + xs[je]) / 2, (ys[ia] + ys[ie]) / 2, (xs[je] - xs[ja]) / 2, (ys[ie] - ys[ia]) / 2)
            # a column of f finest columns is bounded by their largest bound (their rectangles cover it)
            slopes = (
                fine_slopes
                if f == 1
                else np.maximum.reduceat(fine_slopes, np.arange(0, fine_slopes.shape[-1], f), axis=-1)
            )
            if values is None:
                values = reg.block_labels(*centres, slopes, self.mode)
                whole = int(values.flat[0])
                if whole >= 0 and not (values != whole).any():  # one label throughout
                    if counts is not None:
                        counts[whole] += h * w
                    target[...] = whole
                    return
                continue
            step = _LEVELS[k - 1] // f
            parent_mixed = values < 0
            values = np.repeat(np.repeat(values, step, axis=0), step, axis=1)[: ia.size, : ja.size]
            if parent_mixed.any():
                # the step x step children of each mixed block (those past the edge are classified twice)
                si, sj = np.nonzero(parent_mixed)
                off = np.arange(step)[:, None]
                rows, cols = np.minimum(si * step + off, ia.size - 1), np.minimum(sj * step + off, ja.size - 1)
                values[rows[:, None, :], cols[None]] = reg.block_labels(
                    *centres, slopes, self.mode, groups=(si, sj, step)
                )
        assert values is not None  # _LEVELS is not empty: the loop set it or returned
        nby = values.shape[0]
        # paint every block (mixed ones are overwritten): blocks widened to pixel rows, then each
        # row copied down its block (contiguous copies, several times faster than a 4-D broadcast)
        rows = np.repeat(values.astype(np.uint8), b, axis=1)[:, :w]
        if h == nby * b:
            target.reshape(nby, b, w)[...] = rows[:, None, :]
        else:
            target[...] = np.repeat(rows, b, axis=0)[:h]
        mixed: np.ndarray = values < 0
        if counts is not None:
            counts += _block_counts(values, b, h - ia[-1], w - ja[-1])
        if mixed.any():  # the pixels of mixed blocks, one by one, a bounded number of blocks at a time
            bi, bj = np.nonzero(mixed)
            for a in range(0, bi.size, _READ_BLOCKS):
                self._read_blocks(strip, reg, xs, ys, r0, c0, bi[a : a + _READ_BLOCKS], bj[a : a + _READ_BLOCKS])

    def _read_blocks(self, strip: _Strip, reg: RegionPrediction, xs, ys, r0: int, c0: int, bi, bj) -> None:
        """Read the finest blocks ``(bi, bj)`` of ``reg``'s part of the strip (from ``(r0, c0)``) pixel by pixel."""
        b = self.block
        labels, rows, cols = reg.read_blocks(xs, ys, bi, bj, b, self.mode)
        # flat indices into the strip: several times faster than 2-D fancy indexing; the pixels of
        # blocks overhanging the edge were read as the last row or column again, so they write
        # that pixel's own label a second time
        width = strip.labels.shape[1]
        strip.flat[((rows + r0) * width + c0)[:, None, :] + cols[None]] = labels
        if (bi.max() + 1) * b > ys.size or (bj.max() + 1) * b > xs.size:
            off = np.arange(b)[:, None]
            labels = labels[(bi * b + off < ys.size)[:, None, :] & (bj * b + off < xs.size)[None]]
        strip.refined += labels.size
        if strip.counts is not None:
            strip.counts += label_counts(labels)


def label_counts(labels: np.ndarray | int, size: int = 1) -> np.ndarray:
    """Pixels per label value of a label tile: ``(256,)`` int64.

    Parameters
    ----------
    labels : numpy.ndarray or int
        uint8 labels, or one label standing for ``size`` pixels (a constant
        tile).
    size : int
        Pixels of a constant tile.

    Notes
    -----
    ``numpy.bincount`` first widens uint8 to 8-byte integers; with the few
    classes of a segmentation, one comparison per value up to the largest
    is several times faster (a 512 x 512 tile of three classes: 0.05 ms
    against 0.5 ms).
    """
    out = np.zeros(256, np.int64)
    if np.ndim(labels) == 0:
        out[int(labels)] = size
        return out
    a = np.asarray(labels)
    top = int(a.max()) if a.size else 0
    if top >= _FEW_LABELS:
        return np.bincount(a.ravel(), minlength=256).astype(np.int64)
    for v in range(1, top + 1):
        out[v] = np.count_nonzero(a == v)
    out[0] = a.size - out[1 : top + 1].sum()
    return out


#: Label tiles whose largest value is below this are counted value by value (:func:`label_counts`).
_FEW_LABELS = 8


def _block_counts(values: np.ndarray, b: int, last_h: int, last_w: int) -> np.ndarray:
    """Pixels per label value (``(256,)`` int64) of a grid of ``b x b`` blocks, mixed ones (-1) left out.

    The last block row and column are ``last_h`` and ``last_w`` pixels; integer
    counts without a weight per block (one ``bincount`` each for the grid,
    its last row and its last column).
    """
    v = values.astype(np.intp) + 1  # 0: mixed
    n = np.bincount(v.ravel(), minlength=257).astype(np.int64) * (b * b)
    n -= np.bincount(v[-1], minlength=257) * ((b - last_h) * b)
    n -= np.bincount(v[:, -1], minlength=257) * ((b - last_w) * b)
    n[v[-1, -1]] += (b - last_h) * (b - last_w)  # the corner was taken off twice
    return n[1:]


_POOL = 8  # coarse cells per side of one slope-table entry
_PEEK = 32  # pixels between those a tile's constancy test looks at first
#: Mixed blocks read pixel by pixel at once: bounds the temporaries (a few int64 and float64 arrays of
#: 2**18 pixels for blocks of 8) whatever the chunk.
_READ_BLOCKS = 4096
#: Block sizes classified coarse to fine, in multiples of the finest block (each divides the one before).
_LEVELS = (4, 1)


def _range_max(a: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Maxima of ``a`` over the row ranges ``lo[k] .. hi[k]`` (inclusive, clipped): ``(len(lo), ...)``.

    The ranges are a few rows long (a block spans one or two pooled slope
    cells), so one vectorised pass per row offset is enough.
    """
    n = a.shape[0]
    lo = np.clip(lo, 0, n - 1)
    hi = np.clip(hi, lo, n - 1)
    out = a[lo]
    for k in range(1, int((hi - lo).max(initial=0)) + 1):
        np.maximum(out, a[np.minimum(lo + k, hi)], out=out)
    return out


def _max_pool(a: np.ndarray) -> np.ndarray:
    """Maxima of ``(C, H, W)`` ``a`` over ``_POOL x _POOL`` blocks (edge blocks partial), as ``(H', W', C)``."""
    p = _POOL
    # rows first, as elementwise maxima of every p-th row (whole rows at a time: numpy's reductions
    # along a middle axis are several times slower), then along the rows
    rows = a[:, ::p].copy()
    for k in range(1, p):
        part = a[:, k::p]
        np.maximum(rows[:, : part.shape[1]], part, out=rows[:, : part.shape[1]])
    pooled = np.maximum.reduceat(rows, np.arange(0, a.shape[2], p), axis=2)
    return np.ascontiguousarray(np.moveaxis(pooled, 0, -1))


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
