"""Label raster to polygons that tile the plane, with shared boundaries simplified once.

Every 4-connected region of a label raster is a face of a planar graph whose
edges are the pixel edges between different labels (outside the raster counts
as one more label). Vertices where three or more labels meet, or where two
regions of one label touch at a corner, are *nodes*; a chain of edges between
two nodes is an *arc*, shared by the two regions on its sides (a closed
boundary without nodes, such as an island's, is one closed arc). Every
region's rings are assembled from its arcs, so neighbouring regions share
exactly the same boundary: no gaps, no overlaps.

Simplification works on the arcs, each once: an arc's staircase is first
replaced by the line through its pixel edges' midpoints (corners cut, as a
marching-squares contour runs), then Douglas-Peucker with fixed end points
keeps a chord only if it is within the tolerance *and* leaves every pixel
next to the arc on its own side. Every pixel centre therefore stays in its
region: the simplified polygons rasterise back (by pixel centres) to the
raster exactly, and no arc can cross another or jump over a region, since
that would move a pixel centre. A region keeps its pixel centres inside, so
it cannot collapse either.

The tracing is vectorised over *half-edges* (a boundary edge with one region
on its left): the next half-edge of a region's ring follows from the four
pixels around the vertex it ends at, keeping the region on the left and
turning around a corner pixel rather than crossing a diagonal touch, which
is what 4-connectivity means. Coordinates follow :mod:`wsiseg.sampling.coords`:
raster pixel ``(i, j)`` is the square ``[j, j + 1) x [i, i + 1)``.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import shapely
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, depth_first_order
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from wsiseg.errors import WsisegError

__all__ = ["trace_regions"]

# Directions E, S, W, N in raster coordinates (y grows downwards); the left of
# direction d is d + 3 (mod 4), its right d + 1.
# int8, so that int32 coordinates plus a step stay int32.
_DX = np.array([1, 0, -1, 0], np.int8)
_DY = np.array([0, 1, 0, -1], np.int8)


def _repaired(geom: BaseGeometry) -> Polygon | MultiPolygon | None:
    """The polygonal part of a geometry, made valid first if it is not.

    Parameters
    ----------
    geom : shapely geometry

    Returns
    -------
    shapely Polygon or MultiPolygon, or None
        ``None`` when nothing polygonal is left (``make_valid`` can turn a
        collapsed polygon into lines or points).
    """
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if geom.is_empty:
        return None
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    polys = [p for g in parts for p in (g.geoms if isinstance(g, MultiPolygon) else [g])]
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def _ranges(starts: np.ndarray, lengths: np.ndarray, steps: np.ndarray | int = 1) -> np.ndarray:
    """Concatenated ``starts[k] + steps[k] * arange(lengths[k])``."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    within = np.arange(total, dtype=np.int64) - first
    steps = np.broadcast_to(steps, lengths.shape)
    return np.repeat(np.asarray(starts, np.int64), lengths) + np.repeat(steps, lengths) * within


def _index_type(n: int) -> type[np.signedinteger]:
    """The narrowest of int32 and int64 that indexes ``n`` elements."""
    return np.int32 if n < np.iinfo(np.int32).max else np.int64


def _successor_graph(succ: np.ndarray, has: np.ndarray | None = None, extra: np.ndarray | None = None) -> csr_matrix:
    """Sparse graph with the edges ``i -> succ[i]`` (where ``has[i]``), plus a root ``n -> extra``.

    Built in CSR form directly, with 32-bit indices where they fit: the
    rows are already in order, so scipy's conversion from coordinates (a
    sort and several copies of millions of half-edges) is not needed.
    """
    n = len(succ)
    size = n + (extra is not None)
    itype = _index_type(size + 1)
    if has is None:
        indices, counts = succ, np.ones(n, itype)
    else:
        indices, counts = succ[has], has.astype(itype)
    if extra is not None:
        indices, counts = np.r_[indices, extra], np.r_[counts, len(extra)]
    indptr = np.zeros(size + 1, itype)
    np.cumsum(counts, out=indptr[1:])
    indices = indices.astype(itype, copy=False)
    return csr_matrix((np.ones(len(indices), bool), indices, indptr), shape=(size, size))


def _cycles(succ: np.ndarray) -> np.ndarray:
    """Cycle number of each element of a permutation."""
    return connected_components(_successor_graph(succ), directed=True, connection="weak")[1]


class _Raster:
    """Pixel lookups around lattice vertices, with one value for 'outside'.

    Looked-up labels are int32 when every label value and 'outside' fit
    (class masks), else int64: the lookups are per half-edge, millions on a
    boundary-heavy raster, so their width is most of the tracer's memory.
    """

    def __init__(self, labels: np.ndarray):
        self.h, self.w = labels.shape
        self.flat = labels.ravel()
        if labels.dtype == np.uint64 and labels.size and int(labels.max()) > np.iinfo(np.int64).max:
            raise WsisegError("uint64 label values above 2**63 - 1 are not supported")
        narrow = labels.dtype.kind in "bui" and labels.dtype.itemsize <= 2
        self.dtype = np.dtype(np.int32 if narrow else np.int64)
        self.outside = np.iinfo(self.dtype).min
        if labels.dtype == np.int64 and labels.size and int(labels.min()) == self.outside:
            raise WsisegError(f"label value {self.outside} is reserved")

    def ahead(self, x: np.ndarray, y: np.ndarray, d: np.ndarray, side: int) -> np.ndarray:
        """Label of the pixel ahead of vertex ``(x, y)`` in direction ``d``, on its left (+1) or right (-1)."""
        lft = (d + 3) % 4
        col = x + (_DX[d] + side * _DX[lft] - 1) // 2
        row = y + (_DY[d] + side * _DY[lft] - 1) // 2
        inside = (row >= 0) & (row < self.h) & (col >= 0) & (col < self.w)
        out = np.full(x.shape, self.outside, self.dtype)
        out[inside] = self.flat[row[inside].astype(np.int64) * self.w + col[inside]]
        return out


def _half_edges(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start vertices ``(x, y)`` (int32) and directions (int8) of the half-edges with a pixel on their left."""
    h, w = labels.shape
    # flat indices, then divmod: 2-d nonzero is several times slower on a large raster
    ys, xs = np.divmod(np.flatnonzero(labels[:-1] != labels[1:]), w)
    ys += 1  # horizontal boundary edges between rows ys - 1 and ys, from x to x + 1
    yv, xv = np.divmod(np.flatnonzero(labels[:, :-1] != labels[:, 1:]), max(w - 1, 1))
    xv += 1  # vertical boundary edges between columns xv - 1 and xv, from y to y + 1
    cols, rows = np.arange(w), np.arange(h)
    hx, vy = np.concatenate([xs, cols]), np.concatenate([yv, rows])
    parts = [
        (hx, np.concatenate([ys, np.full(w, h)]), 0),  # east, pixel above on the left (and the bottom border)
        (hx + 1, np.concatenate([ys, np.zeros(w, np.int64)]), 2),  # west, pixel below on the left (top border)
        (np.concatenate([xv, np.zeros(h, np.int64)]), vy, 1),  # south, pixel to the right on the left (left border)
        (np.concatenate([xv, np.full(h, w)]), vy + 1, 3),  # north, pixel to the left on the left (right border)
    ]
    x = np.concatenate([p[0] for p in parts]).astype(np.int32)
    y = np.concatenate([p[1] for p in parts]).astype(np.int32)
    d = np.concatenate([np.full(len(p[0]), p[2], np.int8) for p in parts])
    return x, y, d


class _Graph:
    """Rings, arcs and faces of a label raster's boundary graph.

    Sizes below: ``m`` half-arcs (an arc seen from one side), ``r`` rings,
    ``a`` arcs, ``k`` edges of arcs.

    Attributes
    ----------
    ha_arc, ha_rev : (m,) the arc each half-arc runs along, and whether
        backwards (half-arcs numbered ring by ring, each ring in order)
    ring_start : (r + 1,) first half-arc of each ring, and ``m``
    ring_value, ring_area2, ring_minv : (r,) face label, twice the signed area
        (negative for a face's exterior, positive for its holes), smallest
        vertex id (row-major), which for an exterior is its region's first pixel
    arc_border : (a,) whether an arc runs along the raster's edge
    arc_xy, arc_edge, arc_start : corners of the arcs (and end points), the
        arc edge each lies on (the edge it starts, or the arc's last), and
        ``arc_start`` (a + 1,) where each arc's corners start
    edge_left, edge_right : (k, 2) centres of the pixels left and right of
        each arc edge, arc by arc, each arc in order
    """

    def __init__(self, labels: np.ndarray):
        px = _Raster(labels)
        x, y, d = _half_edges(labels)
        w1 = np.int64(px.w + 1)  # an int64 scalar: vertex ids and keys of int32 coordinates are int64
        key = (y * w1 + x) * 4 + d
        order = np.argsort(key)
        x, y, d, key = x[order], y[order], d[order], key[order]
        del order  # each per-half-edge array below is dropped once used: a boundary-heavy raster has millions
        n = len(x)

        face = px.ahead(x, y, d, +1)
        right = px.ahead(x, y, d, -1)
        ex, ey = x + _DX[d], y + _DY[d]
        left_ahead = px.ahead(ex, ey, d, +1)
        right_ahead = px.ahead(ex, ey, d, -1)
        # Keep the face on the left: turn left if the pixel ahead-left is not
        # the face, else go straight if ahead-right is not, else turn right.
        nd = np.where(left_ahead != face, (d + 3) % 4, np.where(right_ahead != face, d, (d + 1) % 4))
        succ = np.searchsorted(key, (ey * w1 + ex) * 4 + nd).astype(_index_type(n))
        degree = (
            (face != left_ahead).astype(np.int8)
            + (left_ahead != right_ahead)
            + (right_ahead != right)
            + (right != face)
        )
        node_start = np.zeros(n, bool)
        node_start[succ] = degree >= 3
        del nd, degree

        # Rings: the cycles of succ. Where a region touches itself at a corner
        # (its pixels diagonal there), its ring passes that vertex twice; a ring
        # must not touch itself, so swap the two exits there, which splits it
        # into two rings touching at the vertex (an exterior and a hole, or
        # two holes). Passes on two different rings are left as they are.
        ring = _cycles(succ)
        pinch = np.flatnonzero((right_ahead == face) & (left_ahead != face) & (right != face))
        other = np.searchsorted(
            key, ((ey[pinch] + _DY[d[pinch]]) * w1 + ex[pinch] + _DX[d[pinch]]) * 4 + (d[pinch] + 2) % 4
        )
        pair = (pinch < other) & (ring[pinch] == ring[other])
        del key, left_ahead, right_ahead
        if pair.any():
            a, b = pinch[pair], other[pair]
            succ[a], succ[b] = succ[b], succ[a]
            ring = _cycles(succ)
        del pinch, other, pair
        vid = y * w1 + x
        by_ring = np.lexsort((np.where(node_start, vid, vid + (px.h + 1) * w1), ring))
        first = np.flatnonzero(np.r_[True, ring[by_ring][1:] != ring[by_ring][:-1]])
        del ring
        ring_head = np.zeros(n, bool)
        ring_head[by_ring[first]] = True

        # Each ring in order: depth-first from a root linked to every ring head,
        # with the link into each head cut.
        graph = _successor_graph(succ, ~ring_head[succ], by_ring[first])
        seq = depth_first_order(graph, n, directed=True, return_predecessors=False)[1:]
        if len(seq) != n:  # pragma: no cover - a broken successor map
            raise AssertionError("boundary tracing lost half-edges")
        del graph, by_ring, succ

        starts_ring = np.flatnonzero(ring_head[seq])
        starts_arc = ring_head[seq] | node_start[seq]
        ha_of_pos = np.cumsum(starts_arc) - 1
        ha_first = np.flatnonzero(starts_arc)
        ha_last = np.r_[ha_first[1:], n] - 1
        self.ring_start = np.searchsorted(ha_first, np.r_[starts_ring, n])
        self._ring_of = np.empty(n, np.int64)
        self._ring_of[seq] = np.cumsum(ring_head[seq]) - 1
        del ring_head, node_start

        cross = x * ey.astype(np.int64) - ex * y.astype(np.int64)  # shoelace terms
        self.ring_area2 = np.add.reduceat(cross[seq], starts_ring)
        del cross
        self.ring_minv = np.minimum.reduceat(vid[seq], starts_ring)
        self.ring_value = face[seq[starts_ring]]
        # Leftmost vertical edge of each ring (for finding a hole's region).
        vertical = (d & 1) == 1
        self._ring_left = np.minimum.reduceat(
            np.where(vertical, x * np.int64(px.h + 1) + np.minimum(y, ey), np.iinfo(np.int64).max)[seq], starts_ring
        )
        self._h1, self._w1 = px.h + 1, w1
        south = np.flatnonzero(d == 1)  # sorted by (y, x), as key is
        self._south, self._south_vid = south, vid[south]

        # Arcs: a half-arc with the larger label on its left is the arc's own
        # direction; the other side runs it backwards, from the arc's last edge.
        hf, hl = seq[ha_first], seq[ha_last]
        canonical = face[hf] > right[hf]
        del face
        edge_id = np.minimum(vid, ey * w1 + ex) * 2 + (d & 1)
        del vid
        own = np.flatnonzero(canonical)
        last_edges = edge_id[hl[own]]
        by_last = np.argsort(last_edges)
        twin = by_last[np.searchsorted(last_edges, edge_id[hf[~canonical]], sorter=by_last)]
        self.ha_arc = np.empty(len(ha_first), np.int64)
        self.ha_arc[own] = np.arange(len(own))
        self.ha_arc[~canonical] = twin
        del edge_id, last_edges, by_last, twin
        self.ha_rev = ~canonical
        self.arc_border = right[hf[own]] == px.outside  # along the raster's edge
        del right

        # The arcs' edges in order, with the pixel centres on their two sides.
        pos = np.flatnonzero(canonical[ha_of_pos])
        he = seq[pos]
        lft = (d[he] + 3) % 4
        mid_x, mid_y = x[he] + _DX[d[he]] / 2, y[he] + _DY[d[he]] / 2
        self.edge_left = np.stack([mid_x + _DX[lft] / 2, mid_y + _DY[lft] / 2], 1)
        self.edge_right = np.stack([mid_x - _DX[lft] / 2, mid_y - _DY[lft] / 2], 1)
        n_edges = np.bincount(self.ha_arc[ha_of_pos[pos]], minlength=len(own))

        # Arc corners: the start of each of its edges where the direction turns
        # (and of the first), then the end of its last edge.
        turn = np.flatnonzero(starts_arc[pos] | (d[he] != d[seq[pos - 1]]))
        counts = np.bincount(self.ha_arc[ha_of_pos[pos[turn]]], minlength=len(own))
        at = np.cumsum(counts)
        self.arc_xy = np.stack(
            [np.insert(x[he[turn]], at, ex[hl[own]]), np.insert(y[he[turn]], at, ey[hl[own]])], 1
        ).astype(np.float64)
        self.arc_edge = np.insert(turn, at, np.cumsum(n_edges) - 1)
        self.arc_start = np.r_[0, np.cumsum(counts + 1)]

    def hole_parents(self, holes: np.ndarray) -> np.ndarray:
        """The exterior ring of the region each hole ring belongs to.

        Left of a hole's leftmost edge is a pixel of its region; the run of
        that region's pixels leftwards along the row ends at an edge of the
        same region's exterior or of another of its holes, one further left.
        Following such links ends at the exterior.
        """
        left = self._ring_left[holes]
        col, row = left // self._h1 - 1, left % self._h1
        at = np.searchsorted(self._south_vid, row * self._w1 + col, side="right") - 1
        link = np.arange(len(self.ring_area2))
        link[holes] = self._ring_of[self._south[at]]
        parent = link[holes]
        while True:
            up = self.ring_area2[parent] > 0
            if not up.any():
                return parent
            parent[up] = link[parent[up]]

    def simplified_arcs(self, tolerance: float, arcs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates of the listed arcs, corners cut and simplified.

        Returns ``(xy, start)`` like ``arc_xy`` and ``arc_start``, with no
        points for the arcs not listed.
        """
        npts = np.diff(self.arc_start)[arcs]
        idx = _ranges(self.arc_start[arcs], npts)
        # A corner starts one edge and ends the one before (end points: just theirs).
        inner = np.ones(len(idx), bool)
        inner[np.cumsum(npts) - npts] = inner[np.cumsum(npts) - 1] = False
        edges = np.stack([self.arc_edge[idx], self.arc_edge[idx] - inner], 1)
        # The raster's own corners stay: the polygons cover it edge to edge.
        xy, edges, npts = _cut_corners(self.arc_xy[idx], edges, npts, ~self.arc_border[arcs])
        keep = _simplify(xy, edges, npts, self.edge_left, self.edge_right, tolerance)
        out_len = np.zeros(len(self.arc_start) - 1, np.int64)
        out_len[arcs] = np.bincount(np.repeat(np.arange(len(arcs)), npts)[keep], minlength=len(arcs))
        # Arcs are listed in increasing order, so their points follow in that order too.
        return xy[keep], np.r_[0, np.cumsum(out_len)]

    def rings(self, ring_ids: np.ndarray, arc_xy: np.ndarray, arc_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates of the listed rings (not closed) and each point's position in ``ring_ids``."""
        first, count = self.ring_start[ring_ids], np.diff(self.ring_start)[ring_ids]
        ha = _ranges(first, count)
        arc, rev = self.ha_arc[ha], self.ha_rev[ha]
        a0, alen = arc_start[arc], np.diff(arc_start)[arc]
        # Every arc but its last point; backwards: from its last point down to its second.
        idx = _ranges(np.where(rev, a0 + alen - 1, a0), alen - 1, np.where(rev, -1, 1))
        per_ring = np.bincount(
            np.repeat(np.arange(len(ring_ids)), count), weights=alen - 1, minlength=len(ring_ids)
        ).astype(np.int64)
        return arc_xy[idx], np.repeat(np.arange(len(ring_ids)), per_ring)


def _cut_corners(
    xy: np.ndarray, edges: np.ndarray, npts: np.ndarray, cut: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-edge polylines with midpoints added around their inner corners.

    Simplifying through the midpoints of the edges at a corner instead of
    the corner cuts it the way a marching-squares contour does, between the
    pixel centres on its two sides, and so follows staircases (diagonal
    boundaries). A corner between two runs of two or more edges stays as a
    candidate too, so that a square stays square. End points (the nodes)
    stay.

    Parameters
    ----------
    xy : numpy.ndarray
        ``(N, 2)`` corners of consecutive polylines of axis-parallel unit edges.
    edges : numpy.ndarray
        ``(N, 2)`` first edge a chord from each point spans and last edge a
        chord to it spans.
    npts : numpy.ndarray
        Points per polyline.
    cut : numpy.ndarray
        Per polyline, whether to add midpoints (else it is kept as it is).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray, numpy.ndarray)
        Points, their ``edges``, and points per polyline, without consecutive
        duplicates (a one-edge run gives its midpoint twice).
    """
    line = np.repeat(np.arange(len(npts)), npts)
    local = np.arange(len(xy)) - np.repeat(np.cumsum(npts) - npts, npts)
    inner = np.flatnonzero((local > 0) & (local < npts[line] - 1) & cut[line])
    back, ahead = xy[inner - 1] - xy[inner], xy[inner + 1] - xy[inner]
    square = (np.abs(back).sum(1) >= 2) & (np.abs(ahead).sum(1) >= 2)
    counts = np.ones(len(xy), np.int64)
    counts[inner] = 2 + square
    at = np.cumsum(counts) - counts
    out = np.empty((int(counts.sum()), 2))
    out_edges = np.empty((len(out), 2), np.int64)
    out[at], out_edges[at] = xy, edges
    out[at[inner[square]] + 1], out_edges[at[inner[square]] + 1] = xy[inner[square]], edges[inner[square]]
    out[at[inner]] = xy[inner] + 0.5 * np.sign(back)
    out_edges[at[inner]] = edges[inner, 1:]
    out[at[inner] + 1 + square] = xy[inner] + 0.5 * np.sign(ahead)
    out_edges[at[inner] + 1 + square] = edges[inner, :1]
    out_line = np.repeat(line, counts)
    keep = np.r_[True, np.any(out[1:] != out[:-1], axis=1) | (out_line[1:] != out_line[:-1])]
    return out[keep], out_edges[keep], np.bincount(out_line[keep], minlength=len(npts))


def _chords(
    xy: np.ndarray,
    edges: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    tolerance: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Whether each chord ``a -> b`` (point indices, ``b > a + 1``) may replace the points between.

    It may if they are all within ``tolerance`` of it and the centres of the
    pixels left and right of the edges it spans (``edges[a, 0]`` to
    ``edges[b, 1]``) are strictly left and right of it. Also returns the
    point between that is farthest from it.
    """
    u = xy[b] - xy[a]
    n_in = b - a - 1
    idx = _ranges(a + 1, n_in)
    sec = np.repeat(np.arange(len(a)), n_in)
    rel = xy[idx] - xy[a][sec]
    dist = np.abs(u[sec, 0] * rel[:, 1] - u[sec, 1] * rel[:, 0])  # times the chord's length
    far_d = np.maximum.reduceat(dist, np.cumsum(n_in) - n_in)
    hit = np.flatnonzero(dist == far_d[sec])
    far = idx[hit[np.r_[True, sec[hit][1:] != sec[hit][:-1]]]]
    ok = far_d <= tolerance * np.hypot(u[:, 0], u[:, 1])
    # Side of the pixel centres (y down: left of u has a negative cross product), only for the chords
    # close enough: most long chords of the first depths are not, and their edges need no check.
    c = np.flatnonzero(ok)
    if len(c):
        ac, uc = a[c], u[c]
        n_e = edges[b[c], 1] - edges[ac, 0] + 1
        eidx = _ranges(edges[ac, 0], n_e)
        esec = np.repeat(np.arange(len(c)), n_e)
        lrel, rrel = left[eidx] - xy[ac][esec], right[eidx] - xy[ac][esec]
        margin = np.minimum(
            uc[esec, 1] * lrel[:, 0] - uc[esec, 0] * lrel[:, 1], uc[esec, 0] * rrel[:, 1] - uc[esec, 1] * rrel[:, 0]
        )
        ok[c] = np.minimum.reduceat(margin, np.cumsum(n_e) - n_e) > 0
    return ok, far


def _simplify(
    xy: np.ndarray, edges: np.ndarray, npts: np.ndarray, left: np.ndarray, right: np.ndarray, tolerance: float
) -> np.ndarray:
    """Douglas-Peucker on many polylines at once, keeping every pixel on its side.

    A chord replaces the points between its ends if :func:`_chords` allows
    it, else it is split at the farthest point; all polylines' chords of one
    depth are tested together (whether a chord is allowed depends on the
    pixels only, not on other chords). A closed polyline starts as its two
    halves.

    Returns
    -------
    numpy.ndarray
        Bool mask of the points kept.
    """
    start = np.r_[0, np.cumsum(npts)[:-1]]
    end = start + npts - 1
    closed = np.all(xy[start] == xy[end], axis=1)
    half = start[closed] + npts[closed] // 2
    keep = np.zeros(len(xy), bool)
    keep[start], keep[end], keep[half] = True, True, True
    a = np.concatenate([start[~closed], start[closed], half])
    b = np.concatenate([end[~closed], half, end[closed]])
    while True:
        inner = b - a > 1
        a, b = a[inner], b[inner]
        if not len(a):
            return keep
        ok, far = _chords(xy, edges, left, right, a, b, tolerance)
        keep[far[~ok]] = True
        a, b = np.concatenate([a[~ok], far[~ok]]), np.concatenate([far[~ok], b[~ok]])


def trace_regions(
    labels: np.ndarray,
    values: Iterable[int],
    *,
    simplify_tolerance: float = 0.0,
    min_area: int = 1,
) -> Iterator[tuple[int, Polygon | MultiPolygon]]:
    """Polygons of the 4-connected regions of a label raster, tiling it.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(h, w)`` integer raster.
    values : iterable of int
        Label values to return regions of, in this order.
    simplify_tolerance : float
        Douglas-Peucker tolerance in raster pixels, applied once to every
        boundary between two regions, which both then share. A chord is only
        taken if it also keeps every pixel centre in its region, so the
        polygons still rasterise to the raster and tile it, and a boundary
        never moves more than about half a pixel from the pixel edges
        (tolerances above ~0.7 change nothing more). 0 keeps the exact pixel
        outlines.
    min_area : int
        Regions, and holes, of fewer pixels are dropped (holes are filled).

    Yields
    ------
    (int, shapely Polygon or MultiPolygon)
        The value and the region: a Polygon with its holes in raster pixel
        coordinates (pixel ``(i, j)`` is ``[j, j + 1) x [i, i + 1)``), for
        each value in turn, regions in raster order of their first pixels.
        Unsimplified, its area is the pixel count. A MultiPolygon only if a
        region came out invalid and repairing it split it (not expected).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise WsisegError(f"labels must be a 2-D integer raster, got {labels.dtype} {labels.shape}")
    if simplify_tolerance < 0:
        raise WsisegError(f"simplify_tolerance must be >= 0, got {simplify_tolerance}")
    values = [int(v) for v in values]
    if labels.size == 0 or not values:
        return
    g = _Graph(labels)
    wanted = np.isin(g.ring_value, values)
    exteriors = np.flatnonzero(wanted & (g.ring_area2 < 0))
    holes = np.flatnonzero(wanted & (g.ring_area2 > 0))
    parent = g.hole_parents(holes)
    # Pixel count of each region: its exterior less all its holes.
    pixels = -g.ring_area2.copy()
    np.add.at(pixels, parent, -g.ring_area2[holes])
    keep_ext = exteriors[pixels[exteriors] >= 2 * min_area]
    big = (g.ring_area2[holes] >= 2 * max(1, min_area)) & np.isin(parent, keep_ext)
    keep_holes, hole_parent = holes[big], parent[big]

    rank = np.full(len(g.ring_value), len(values))
    for k, v in enumerate(values):
        rank[g.ring_value == v] = np.minimum(rank[g.ring_value == v], k)
    ext_order = keep_ext[np.lexsort((g.ring_minv[keep_ext], rank[keep_ext]))]
    if not len(ext_order):
        return
    poly_of = np.full(len(g.ring_value), -1, np.int64)
    poly_of[ext_order] = np.arange(len(ext_order))
    # Shells first, then each polygon's holes: ring order as shapely.polygons wants it.
    ring_poly = np.r_[np.arange(len(ext_order)), poly_of[hole_parent]]
    ring_order = np.lexsort((np.r_[np.zeros(len(ext_order)), np.ones(len(keep_holes))], ring_poly))
    ring_ids, ring_poly = np.r_[ext_order, keep_holes][ring_order], ring_poly[ring_order]

    arc_xy, arc_start = g.arc_xy, g.arc_start
    if simplify_tolerance > 0:
        arcs = np.unique(g.ha_arc[_ranges(g.ring_start[ring_ids], np.diff(g.ring_start)[ring_ids])])
        arc_xy, arc_start = g.simplified_arcs(simplify_tolerance, arcs)
    xy, idx = g.rings(ring_ids, arc_xy, arc_start)
    polys = shapely.polygons(shapely.linearrings(xy, indices=idx), indices=ring_poly)
    valid = shapely.is_valid(polys)
    for k, e in enumerate(ext_order):
        geom = polys[k] if valid[k] else _repaired(polys[k])
        if geom is not None:
            yield int(g.ring_value[e]), geom
