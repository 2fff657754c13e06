"""Reverse sampling: low-resolution predictions at grid nodes -> full-resolution labels.

Inverse map
-----------
The ``h x w`` grid nodes ``G[i, j]`` (normalised ``(x, y)``) define a
continuous map from fractional grid index ``(r, c)`` to the image: bilinear
interpolation between the four nodes around ``(r, c)``. To cover the whole
region, a ring of virtual nodes mirrors the outer nodes across the region's
edges (index ``-1`` sits at ``-x[:, 0]``, index ``w`` at ``2 - x[:, -1]``,
likewise for rows), so index ``-0.5`` lies exactly on the edge. For each
output pixel centre ``p`` (see :mod:`wsiseg.sampling.coords`)
:func:`inverse_map` solves ``G(r, c) = p``, giving ``(r, c)`` in
``[-0.5, h - 0.5] x [-0.5, w - 0.5]``. On a uniform grid this is exactly the
convention's read-back index ``(x + 0.5) * w / W - 0.5``.

Method: scan conversion, at the cost of the output. Each cell of the
(augmented) grid is a quadrilateral in the image; the output pixel centres
in its bounding box are tested against it, and the bilinear map is
inverted in closed form there (a quadratic; see :func:`_scan_inverse`). A
centre inside the cell (within the tolerance) takes that solution. The work
is a few array operations per output pixel, whatever the grid's
deformation; candidates are processed in chunks, so memory is bounded
whatever ``out_size`` is. (Newton iterations from interpolated first
guesses, the method before, cost several times as much: see the notes on
issue 12 in ``docs/benchmarks.md``.)

The solution is unique wherever the grid does not fold (cells stay convex
and consistently oriented), which holds for the Gaussian attraction of
:mod:`wsiseg.sampling.grid` at moderate density contrast. Extreme contrast
with a small kernel can fold a few cells; a pixel centre such a cell may
cover (its bounding box) can have several preimages, and gets Newton's
method as before: an initial guess from inverting the separable 1-D
marginals (mean node ``x`` per column, mean node ``y`` per row; both
monotone) -- for large outputs, instead, from interpolating the inverse
solved on a raster twice the grid's size -- then Newton iterations on the
piecewise bilinear map, re-selecting the cell that contains the current
estimate at every step, with step halving when the residual grows and, in
collapsed cells (nodes clamped together at a border), a half-cell step in
the direction that monotonicity implies. There the returned index is the
last Newton iterate (best effort, not guaranteed to be the nearest node).
Every other centre has exactly one preimage, the closed form's.

Read-back
---------
:func:`lookup_nearest` rounds the fractional index (half up; on integer
factors there are no ties) and gathers the low-resolution label: on a
uniform grid at integer factor ``k`` forward-then-reverse sampling equals
``np.repeat`` by ``k``. :func:`lookup_linear` interpolates probabilities
bilinearly in index space (border replicated).

Whole-slide use: call :func:`inverse_map` on a coarse raster (``out_size``
small) or on a sub-rectangle (``region``) of the full raster, and
interpolate the index map to a tile's pixels before the lookup.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from wsiseg.sampling.coords import to_torch_grid

__all__ = ["folded_cells", "grid_at_index", "inverse_map", "lookup_linear", "lookup_nearest", "reverse_sample"]


def _augment(grid: torch.Tensor) -> torch.Tensor:
    """Add a ring of virtual nodes mirroring the outer nodes across the region's edges.

    Virtual column ``-1`` sits at ``(-x[:, 0], y[:, 0])``, column ``w`` at
    ``(2 - x[:, -1], y[:, -1])``, likewise for rows (corners mirror both).
    The midpoints between a virtual and an outer node lie exactly on the
    region's edge, so the augmented grid covers ``[0, 1]^2``, every query is
    inside some cell (no extrapolation, which can fold), and a uniform grid
    stays uniform (index ``-0.5`` is the edge ``0``). Shape ``(B, h+2, w+2, 2)``.
    """
    x, y = grid[..., 0], grid[..., 1]
    x = torch.cat([-x[:, :, :1], x, 2.0 - x[:, :, -1:]], dim=2)
    y = torch.cat([y[:, :, :1], y, y[:, :, -1:]], dim=2)
    x = torch.cat([x[:, :1], x, x[:, -1:]], dim=1)
    y = torch.cat([-y[:, :1], y, 2.0 - y[:, -1:]], dim=1)
    return torch.stack([x, y], dim=-1)


def _cell_table(grid: torch.Tensor) -> torch.Tensor:
    """Per-cell bilinear coefficients ``(B * (h-1) * (w-1), 8)``.

    Cell ``(i, j)`` maps local ``(a, b)`` to ``p00 + b e + a v + a b f`` with
    ``e = p01 - p00``, ``v = p10 - p00``, ``f = p11 - p10 - p01 + p00``; one
    row gather per evaluation instead of four node gathers.
    """
    p00, p01 = grid[:, :-1, :-1], grid[:, :-1, 1:]
    p10, p11 = grid[:, 1:, :-1], grid[:, 1:, 1:]
    e = p01 - p00
    tab = torch.cat([p00, e, p10 - p00, p11 - p10 - e], dim=-1)
    return tab.reshape(-1, 8).contiguous()


def _cell_eval(tab: torch.Tensor, h: int, w: int, bofs: torch.Tensor, r: torch.Tensor, c: torch.Tensor):
    """Bilinear map and its partial derivatives at fractional indices ``(r, c)``.

    ``tab`` is :func:`_cell_table` of an ``h x w`` node grid, ``bofs`` each
    point's batch offset ``b * (h-1) * (w-1)``; ``r``, ``c`` are ``(M,)``.
    The cell is the one containing ``(r, c)``, clamped to the outer cells
    (linear beyond).
    """
    i0 = torch.clamp(torch.floor(r), 0, h - 2)
    j0 = torch.clamp(torch.floor(c), 0, w - 2)
    a = (r - i0).unsqueeze(-1)
    b = (c - j0).unsqueeze(-1)
    k = tab.index_select(0, bofs + i0.long() * (w - 1) + j0.long())
    p00, e, v, f = k[:, 0:2], k[:, 2:4], k[:, 4:6], k[:, 6:8]
    d_r = v + b * f
    d_c = e + a * f
    return p00 + b * e + a * d_r, d_r, d_c


def grid_at_index(grid: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Evaluate the continuous grid map at fractional indices.

    Parameters
    ----------
    grid : torch.Tensor
        Normalised grid ``(B, h, w, 2)``.
    index : torch.Tensor
        Fractional ``(row, col)`` indices ``(B, ..., 2)``.

    Returns
    -------
    torch.Tensor
        Normalised ``(x, y)`` positions ``(B, ..., 2)``: bilinear between
        nodes, including the virtual ring that mirrors the outer nodes across
        the region's edges (index ``-1`` and ``h`` / ``w``), linear beyond.
        The forward counterpart of :func:`inverse_map`.
    """
    if grid.dim() == 3:
        grid = grid.unsqueeze(0)
    g = _augment(grid)
    b, h, w, _ = g.shape
    shape = index.shape
    idx = index.reshape(b, -1, 2).to(grid.dtype) + 1.0
    n = idx.shape[1]
    bofs = (torch.arange(b, device=g.device) * ((h - 1) * (w - 1))).repeat_interleave(n)
    val, _, _ = _cell_eval(_cell_table(g), h, w, bofs, idx[..., 0].reshape(-1), idx[..., 1].reshape(-1))
    return val.reshape(shape)


def _invert_1d(seq: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Fractional index where non-decreasing ``seq`` (B, n) reaches ``q`` (B, N); linear beyond the ends."""
    n = seq.shape[1]
    j = torch.clamp(torch.searchsorted(seq.contiguous(), q.contiguous()) - 1, 0, n - 2)
    lo = torch.gather(seq, 1, j)
    hi = torch.gather(seq, 1, j + 1)
    span = hi - lo
    ok = span > 0
    t = torch.where(ok, (q - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(q))
    return j + t


def _newton_step(res, d_r, d_c, scale, eps):
    """Newton step ``(dr, dc)`` solving ``J [dr, dc]^T = -res`` (Cramer's rule)."""
    jr, jc = d_r * scale, d_c * scale  # Jacobian columns, (M, 2)
    det = jr[:, 0] * jc[:, 1] - jc[:, 0] * jr[:, 1]
    ok = det.abs() > eps * (jr.abs().amax(-1) * jc.abs().amax(-1) + eps)
    sdet = torch.where(ok, det, torch.ones_like(det))
    # A collapsed cell (nodes clamped together at a border) has no Newton
    # step: move half a cell the way monotonicity says (y grows with r, x with c).
    dr = torch.where(ok, (res[:, 1] * jc[:, 0] - res[:, 0] * jc[:, 1]) / sdet, -0.5 * torch.sign(res[:, 1]))
    dc = torch.where(ok, (res[:, 0] * jr[:, 1] - res[:, 1] * jr[:, 0]) / sdet, -0.5 * torch.sign(res[:, 0]))
    # Trust region: one linearisation is not trusted across many cells.
    return dr.clamp(-2.0, 2.0), dc.clamp(-2.0, 2.0)


def _solve(grid, px, py, r, c, max_iter: int, tol: float):
    """Solve ``G(r, c) = (px, py)`` on the augmented grid from a first guess.

    ``px``, ``py``, ``r``, ``c`` are ``(B, N)``; returns refined ``(r, c)``.
    """
    b, h, w, _ = grid.shape
    n = px.shape[1]
    dev = grid.device
    tab = _cell_table(grid)
    bofs = (torch.arange(b, device=dev) * ((h - 1) * (w - 1))).repeat_interleave(n)
    target = torch.stack([px.reshape(-1), py.reshape(-1)], dim=-1)
    r = r.reshape(-1).clamp(0.0, h - 1.0)
    c = c.reshape(-1).clamp(0.0, w - 1.0)
    # Residuals in uniform-cell units so one tolerance fits every size.
    scale = torch.tensor([w - 2, h - 2], dtype=grid.dtype, device=dev)
    eps = torch.finfo(grid.dtype).eps

    def evaluate(bo, rr, cc, tt):
        val, dr_, dc_ = _cell_eval(tab, h, w, bo, rr, cc)
        res_ = (val - tt) * scale
        return res_, res_.abs().amax(dim=-1), dr_, dc_

    res, err, d_r, d_c = evaluate(bofs, r, c, target)
    # Only unconverged points iterate (``act`` indexes them).
    act = torch.nonzero(err > tol).squeeze(1)
    res, err, d_r, d_c = res[act], err[act], d_r[act], d_c[act]
    for _ in range(max_iter):
        if act.numel() == 0:
            break
        ar, ac, ab, at = r[act], c[act], bofs[act], target[act]
        dr, dc = _newton_step(res, d_r, d_c, scale, eps)
        nr = (ar + dr).clamp(0.0, h - 1.0)
        nc = (ac + dc).clamp(0.0, w - 1.0)
        nres, nerr, nd_r, nd_c = evaluate(ab, nr, nc, at)
        # Halve the steps that made things worse (re-evaluating only those);
        # after three halvings take the step anyway, so a point stuck in the
        # wrong cell gets a new linearisation next time.
        for _half in range(3):
            worse = torch.nonzero(nerr > err).squeeze(1)
            if worse.numel() == 0:
                break
            dr[worse] *= 0.5
            dc[worse] *= 0.5
            nr[worse] = (ar[worse] + dr[worse]).clamp(0.0, h - 1.0)
            nc[worse] = (ac[worse] + dc[worse]).clamp(0.0, w - 1.0)
            wres, werr, wd_r, wd_c = evaluate(ab[worse], nr[worse], nc[worse], at[worse])
            nres[worse], nerr[worse], nd_r[worse], nd_c[worse] = wres, werr, wd_r, wd_c
        r[act] = nr
        c[act] = nc
        keep = nerr > tol
        act, res, err, d_r, d_c = act[keep], nres[keep], nerr[keep], nd_r[keep], nd_c[keep]
    return r.reshape(b, n), c.reshape(b, n)


def _first_guess(grid, px, py):
    """Initial ``(r, c)`` from the separable marginals (augmented-grid indices).

    Mean node ``x`` per column and mean node ``y`` per row are monotone;
    ``cummax`` guards against rounding-level violations.
    """
    mx = grid[..., 0].mean(dim=1).cummax(dim=1).values
    my = grid[..., 1].mean(dim=2).cummax(dim=1).values
    return _invert_1d(my, py), _invert_1d(mx, px)


def _folded(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(B, h-1, w-1)`` bool: cells of the node grid ``(x, y)`` ``(B, h, w)`` turning the wrong way at a corner.

    Collinear corners (nodes clamped together at a border) are not folds:
    such cells stay convex.
    """
    x00, x01, x10, x11 = x[:, :-1, :-1], x[:, :-1, 1:], x[:, 1:, :-1], x[:, 1:, 1:]
    y00, y01, y10, y11 = y[:, :-1, :-1], y[:, :-1, 1:], y[:, 1:, :-1], y[:, 1:, 1:]
    # corners in turn: p00 -> p01 -> p11 -> p10
    ring = ((x00, y00), (x01, y01), (x11, y11), (x10, y10))
    folded = np.zeros(x00.shape, bool)
    for k in range(4):
        (ax, ay), (bx, by), (cx, cy) = ring[k], ring[(k + 1) % 4], ring[(k + 2) % 4]
        folded |= (bx - ax) * (cy - by) - (by - ay) * (cx - bx) < 0
    return folded


def folded_cells(grid: torch.Tensor | np.ndarray) -> int:
    """Cells of a grid that fold: turn the wrong way at a corner, so the grid crosses itself there.

    Parameters
    ----------
    grid : torch.Tensor or numpy.ndarray
        ``(B, h, w, 2)`` ``(x, y)`` nodes: normalised, or in any pixel
        frame with ``x`` to the right and ``y`` down (a positive scale and a
        shift change no fold).

    Returns
    -------
    int
        Folded cells over the batch (0 for a grid whose cells all stay
        consistently oriented). Exactly collinear corners, such as nodes
        clamped together at a border, are not folds; a cell collapsed to
        almost no area can still count, by its rounding.

    >>> from wsiseg.sampling.coords import uniform_grid
    >>> g = uniform_grid(3, 3)[None]
    >>> folded_cells(g), folded_cells(g.flip(2))
    (0, 4)
    """
    if grid.ndim != 4 or grid.shape[-1] != 2:
        raise ValueError(f"grid must be (B, h, w, 2), got {tuple(grid.shape)}")
    g = grid.detach().to("cpu", torch.float64).numpy() if isinstance(grid, torch.Tensor) else np.asarray(grid, float)
    return int(_folded(g[..., 0], g[..., 1]).sum())


#: Candidates scanned at once at most: a chunk's arrays stay small (measured on a 2048 x 2048 map of a
#: 512 x 512 grid: 0.6-0.9 s and 163 MB more peak memory, against 2.7 s and 565 MB with chunks of 2**20;
#: the 80 maps of docs/benchmarks.md, issue 12: 0.6-0.7 s CPU against 1.5 s).
_SCAN_CHUNK = 1 << 15

#: Owner of the pixels a folded cell may cover: above every candidate number, so it always wins.
_FOLD = np.iinfo(np.int64).max


def _scan_inverse(nodes: np.ndarray, out_size, region, tol: float, chunk: int):
    """Closed-form inverse of every cell at the output pixel centres inside it (scan conversion).

    ``nodes`` is the augmented grid ``(B, h, w, 2)`` (float64). Each cell is
    a quadrilateral; the pixel centres in its bounding box are candidates.
    Eliminating ``a`` from ``p00 + b e + a (v + b f) = p`` leaves
    ``qa b^2 + qb b + qc = 0``; of its two roots the one inside a
    consistently oriented (convex) cell is where the Jacobian
    ``cross(e + a f, v + b f) = -(2 qa b + qb)`` is positive, i.e.
    ``(-qb - sqrt(disc)) / (2 qa)``, taken in the cancellation-free form so
    near-parallelogram cells (``qa ~ 0``) keep it. A candidate is claimed
    when its ``(a, b)`` lies in the unit square and maps back onto the
    centre, both within ``tol`` cell units. The work is a few operations per
    output pixel, not per pixel and Newton iteration.

    Folded cells overlap others, so a centre they may cover can have several
    preimages: every centre in a folded cell's bounding box is left
    unclaimed. Any other centre has exactly one (the map has degree one and
    its other cells keep their orientation), which is the claimed one.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``(B, height * width, 2)`` float64 augmented-grid indices, and
        ``(B, height * width)`` bool: claimed by a cell.
    """
    hh, ww = out_size
    top, left, rh, rw = region
    b, h, w, _ = nodes.shape
    # Node positions in window pixels: the window's pixel (i, j) has its centre at (j, i).
    x = nodes[..., 0] * ww - (left + 0.5)
    y = nodes[..., 1] * hh - (top + 0.5)
    x00, x01, x10, x11 = x[:, :-1, :-1], x[:, :-1, 1:], x[:, 1:, :-1], x[:, 1:, 1:]
    y00, y01, y10, y11 = y[:, :-1, :-1], y[:, :-1, 1:], y[:, 1:, :-1], y[:, 1:, 1:]
    # A cell lies in the convex hull of its corners (a bilinear patch does), so in their bounding box.
    slack = 1e-6
    x0 = np.maximum(np.ceil(np.minimum(np.minimum(x00, x01), np.minimum(x10, x11)) - slack), 0)
    x1 = np.minimum(np.floor(np.maximum(np.maximum(x00, x01), np.maximum(x10, x11)) + slack), rw - 1)
    y0 = np.maximum(np.ceil(np.minimum(np.minimum(y00, y01), np.minimum(y10, y11)) - slack), 0)
    y1 = np.minimum(np.floor(np.maximum(np.maximum(y00, y01), np.maximum(y10, y11)) + slack), rh - 1)
    nx = np.maximum(x1 - x0 + 1, 0)
    count = (nx * np.maximum(y1 - y0 + 1, 0)).astype(np.int64).ravel()
    ends = np.cumsum(count)
    starts = ends - count
    plane = rh * rw
    ii, jj = np.meshgrid(np.arange(h - 1.0), np.arange(w - 1.0), indexing="ij")
    # Per cell, one row per quantity (repeated per candidate below): first candidate, columns,
    # first candidate's position relative to p00, e = p01 - p00, v = p10 - p00,
    # f = p11 - p10 - p01 + p00, the quadratic's qa and cross(e, v), first candidate's flat
    # pixel index, the cell's (row, col) in the augmented grid, and whether it folds.
    ex, ey, vx, vy = x01 - x00, y01 - y00, x10 - x00, y10 - y00
    fx, fy = x11 - x10 - ex, y11 - y10 - ey
    base = np.arange(b)[:, None, None] * plane + y0 * rw + x0
    tab = np.stack(
        np.broadcast_arrays(
            starts.reshape(x00.shape),
            nx,
            x0 - x00,
            y0 - y00,
            ex,
            ey,
            vx,
            vy,
            fx,
            fy,
            fx * ey - fy * ex,
            ex * vy - ey * vx,
            base,
            ii,
            jj,
            _folded(x, y),
        )
    ).reshape(16, -1)
    # residuals in uniform-cell units, as in _solve
    sx, sy = (w - 2) / ww, (h - 2) / hh
    out = np.zeros((b * plane, 2))  # unclaimed pixels stay 0 until Newton: no garbage (or warnings) from np.empty
    owner = np.full(b * plane, -1, np.int64)  # claiming candidate of each pixel, or _FOLD
    total = int(ends[-1])
    for s in range(0, total, chunk):
        e = min(s + chunk, total)
        c0, c1 = int(np.searchsorted(ends, s, side="right")), int(np.searchsorted(ends, e - 1, side="right")) + 1
        part = np.minimum(ends[c0:c1], e) - np.maximum(starts[c0:c1], s)
        start, ncol, ox, oy, ex, ey, vx, vy, fx, fy, qa, cev, base, ci, cj, fold = np.repeat(
            tab[:, c0:c1], part, axis=1
        )
        loc = np.arange(s, e, dtype=np.float64) - start
        row = np.floor(loc / ncol)  # exact: small integers in float64
        col = loc - row * ncol
        qx, qy = ox + col, oy + row
        qb = qx * fy - qy * fx - cev
        qc = qx * vy - qy * vx
        qq = -0.5 * (qb + np.copysign(np.sqrt(np.maximum(qb * qb - 4.0 * qa * qc, 0.0)), qb))
        with np.errstate(divide="ignore", invalid="ignore"):
            rb = np.where(qb >= 0, qq / qa, qc / qq)  # inf or nan in degenerate cells: not claimed
            dx, dy = vx + rb * fx, vy + rb * fy
            tx, ty = qx - rb * ex, qy - rb * ey
            ra = (tx * dx + ty * dy) / (dx * dx + dy * dy)
            err = np.maximum(np.abs(tx - ra * dx) * sx, np.abs(ty - ra * dy) * sy)
            ok = (ra >= -tol) & (ra <= 1.0 + tol) & (rb >= -tol) & (rb <= 1.0 + tol) & (err <= tol)
        fold = fold != 0
        sel = np.flatnonzero(ok | fold)
        pid = (base[sel] + row[sel] * rw + col[sel]).astype(np.int64)
        # A centre on a shared edge is claimed by each cell there (the same index up to
        # rounding): the last candidate wins, whatever order numpy assigns in.
        np.maximum.at(owner, pid, np.where(fold[sel], _FOLD, s + sel))
        keep = owner[pid] == s + sel
        sel, pid = sel[keep], pid[keep]
        out[pid, 0] = ci[sel] + ra[sel]
        out[pid, 1] = cj[sel] + rb[sel]
    return out.reshape(b, plane, 2), ((owner >= 0) & (owner != _FOLD)).reshape(b, plane)


def _newton_inverse(g, out_size, region, points, max_iter, tol, chunk):
    """Newton's method for the output pixels ``points`` (flat indices into ``region``) of one grid.

    ``g`` is the augmented ``(1, h, w, 2)`` grid. The first guess comes from
    the separable marginals or, for a large ``region``, from interpolating
    the inverse solved first on a raster twice the grid's size (at the
    raster nodes the points interpolate from, each solved as if all were).
    Returns ``(len(points), 2)`` augmented-grid indices, dtype of ``g``.
    """
    hh, ww = out_size
    top, left, rh, rw = region
    _, h, w, _ = g.shape
    dtype, device = g.dtype, g.device
    points = points.to(device)
    qy = ((top + torch.div(points, rw, rounding_mode="floor")).double() + 0.5) / hh
    qx = ((left + points % rw).double() + 0.5) / ww
    # Coarse to fine: the inverse is smooth, so interpolating it from a raster about
    # twice the grid's size gives each point a first guess a step or two from the answer.
    ch, cw = min(hh, 2 * (h - 2)), min(ww, 2 * (w - 2))
    coarse = None
    if rh * rw > 4 * ch * cw:
        # the raster nodes around each point (one more each side than bilinear reads, for rounding)
        iy = torch.floor(qy * ch - 0.5).long()
        ix = torch.floor(qx * cw - 0.5).long()
        need = torch.zeros(ch, cw, dtype=torch.bool, device=device)
        for dy in (-1, 0, 1, 2):
            for dx in (-1, 0, 1, 2):
                need[(iy + dy).clamp(0, ch - 1), (ix + dx).clamp(0, cw - 1)] = True
        nodes = torch.nonzero(need.reshape(-1)).squeeze(1)
        cy = ((torch.div(nodes, cw, rounding_mode="floor")).double() + 0.5) / ch
        cx = ((nodes % cw).double() + 0.5) / cw
        cx, cy = cx.to(dtype)[None], cy.to(dtype)[None]
        r, c = _solve(g, cx, cy, *_first_guess(g, cx, cy), max_iter, tol)
        coarse = torch.zeros(2, ch * cw, dtype=dtype, device=device)
        coarse[0, nodes], coarse[1, nodes] = r[0], c[0]
        coarse = coarse.reshape(1, 2, ch, cw)
    qx, qy = qx.to(dtype)[None], qy.to(dtype)[None]
    out = torch.empty(points.numel(), 2, dtype=dtype, device=device)
    for s in range(0, points.numel(), chunk):
        px, py = qx[:, s : s + chunk], qy[:, s : s + chunk]
        if coarse is None:
            r0, c0 = _first_guess(g, px, py)
        else:
            pos = to_torch_grid(torch.stack([px, py], dim=-1)).unsqueeze(1)
            rc = F.grid_sample(coarse, pos, mode="bilinear", padding_mode="border", align_corners=False)
            r0, c0 = rc[:, 0, 0], rc[:, 1, 0]
        r, c = _solve(g, px, py, r0, c0, max_iter, tol)
        out[s : s + chunk, 0] = r[0]
        out[s : s + chunk, 1] = c[0]
    return out


def inverse_map(
    grid: torch.Tensor,
    out_size: tuple[int, int],
    region: tuple[int, int, int, int] | None = None,
    *,
    max_iter: int = 30,
    tol: float | None = None,
    chunk: int = 1 << 20,
) -> torch.Tensor:
    """Fractional grid index of every output pixel centre.

    Parameters
    ----------
    grid : torch.Tensor
        Normalised grid ``(B, h, w, 2)`` (or ``(h, w, 2)``).
    out_size : tuple of int
        ``(H, W)`` of the output raster covering the grid's region.
    region : tuple of int, optional
        ``(top, left, height, width)`` sub-rectangle of that raster to
        evaluate (pixel units); default the whole raster.
    max_iter : int
        Newton iterations at most (pixels no cell claims).
    tol : float, optional
        Tolerance on the residual, in uniform-cell units, and on a claimed
        pixel's position in its cell; default ``1e-4`` (float32) or
        ``1e-9`` (float64), raised to ``32 * eps * max(h, w)`` for large grids.
    chunk : int
        Candidate pixels (at most 32768) or Newton query points processed
        at once (bounds memory).

    Returns
    -------
    torch.Tensor
        ``(B, height, width, 2)``: fractional ``(row, col)`` grid indices in
        ``[-0.5, h - 0.5] x [-0.5, w - 0.5]``, dtype of ``grid``.
    """
    if grid.dim() == 3:
        grid = grid.unsqueeze(0)
    if grid.dim() != 4 or grid.shape[-1] != 2:
        raise ValueError(f"grid must have shape (B, h, w, 2), got {tuple(grid.shape)}")
    if not grid.is_floating_point():
        raise TypeError("grid must be floating point")
    hh, ww = int(out_size[0]), int(out_size[1])
    if hh < 1 or ww < 1:
        raise ValueError(f"out_size must be positive, got {out_size}")
    top, left, rh, rw = (0, 0, hh, ww) if region is None else (int(v) for v in region)
    if rh < 1 or rw < 1:
        raise ValueError(f"region must be non-empty, got {region}")
    b, h, w, _ = grid.shape
    if tol is None:
        # Float resolution of the nodes, in cell units, bounds what is reachable.
        eps = torch.finfo(grid.dtype).eps
        tol = max(1e-4 if grid.dtype != torch.float64 else 1e-9, 32 * eps * max(h, w))
    g = _augment(grid.detach())
    window = (top, left, rh, rw)
    idx, claimed = _scan_inverse(g.double().cpu().numpy(), (hh, ww), window, tol, min(chunk, _SCAN_CHUNK))
    # augmented -> grid indices, in numpy: a handful of small torch operations costs more here
    idx -= 1.0
    np.clip(idx[..., 0], -0.5, h - 0.5, out=idx[..., 0])
    np.clip(idx[..., 1], -0.5, w - 0.5, out=idx[..., 1])
    out = torch.from_numpy(idx).to(device=grid.device, dtype=grid.dtype)
    # Newton where no cell claimed a pixel: near folded cells, and centres that rounding left between cells.
    for k in np.flatnonzero(~claimed.all(axis=1)):
        missing = torch.from_numpy(np.flatnonzero(~claimed[k])).to(grid.device)
        rc = _newton_inverse(g[k : k + 1], (hh, ww), window, missing, max_iter, tol, chunk)
        out[k, missing, 0] = (rc[:, 0] - 1.0).clamp(-0.5, h - 0.5)
        out[k, missing, 1] = (rc[:, 1] - 1.0).clamp(-0.5, w - 0.5)
    return out.reshape(b, rh, rw, 2)


def _batched_index(index_map: torch.Tensor, b: int) -> torch.Tensor:
    if index_map.dim() == 3:
        index_map = index_map.unsqueeze(0)
    if index_map.shape[0] == 1 and b != 1:
        index_map = index_map.expand(b, -1, -1, -1)
    if index_map.shape[0] != b:
        raise ValueError(f"index_map batch {index_map.shape[0]} does not match prediction batch {b}")
    return index_map


def lookup_nearest(pred: torch.Tensor, index_map: torch.Tensor) -> torch.Tensor:
    """Read labels at the nearest grid node of each fractional index.

    Parameters
    ----------
    pred : torch.Tensor
        Labels at grid nodes ``(B, h, w)``.
    index_map : torch.Tensor
        Fractional ``(row, col)`` indices ``(B, H, W, 2)``.

    Returns
    -------
    torch.Tensor
        ``(B, H, W)`` labels (gathered: values occur in ``pred``).
    """
    if pred.dim() != 3:
        raise ValueError(f"pred must have shape (B, h, w), got {tuple(pred.shape)}")
    b, h, w = pred.shape
    idx = _batched_index(index_map, b).to(pred.device)
    # floor(x + 0.5): half up, deterministic (torch.round is half-to-even).
    i = torch.clamp(torch.floor(idx[..., 0] + 0.5), 0, h - 1).long()
    j = torch.clamp(torch.floor(idx[..., 1] + 0.5), 0, w - 1).long()
    flat = (i * w + j).reshape(b, -1)
    return pred.reshape(b, -1).gather(1, flat).reshape(b, *idx.shape[1:3])


def lookup_linear(probs: torch.Tensor, index_map: torch.Tensor) -> torch.Tensor:
    """Bilinear read of per-class scores at fractional grid indices.

    Parameters
    ----------
    probs : torch.Tensor
        Floating point ``(B, K, h, w)`` (probabilities or logits).
    index_map : torch.Tensor
        Fractional ``(row, col)`` indices ``(B, H, W, 2)``.

    Returns
    -------
    torch.Tensor
        ``(B, K, H, W)``, interpolated in index space, border replicated.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must have shape (B, K, h, w), got {tuple(probs.shape)}")
    b, _, h, w = probs.shape
    idx = _batched_index(index_map, b).to(device=probs.device, dtype=probs.dtype)
    # Fractional index -> normalised position of a uniform raster of nodes.
    g = torch.stack([(idx[..., 1] + 0.5) / w, (idx[..., 0] + 0.5) / h], dim=-1)
    return F.grid_sample(probs, to_torch_grid(g), mode="bilinear", padding_mode="border", align_corners=False)


def reverse_sample(
    pred: torch.Tensor,
    grid: torch.Tensor,
    out_size: tuple[int, int],
    mode: str = "nearest",
    region: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Full-resolution labels from predictions at the grid nodes (in memory).

    Parameters
    ----------
    pred : torch.Tensor
        ``(B, h, w)`` labels for ``mode="nearest"`` (``(B, K, h, w)`` scores
        are argmaxed first), or ``(B, K, h, w)`` scores for ``mode="linear"``.
    grid : torch.Tensor
        The normalised grid ``(B, h, w, 2)`` the prediction was sampled at.
    out_size : tuple of int
        ``(H, W)`` of the full-resolution raster.
    mode : {"nearest", "linear"}
        Nearest grid node (the paper), or bilinear scores then argmax.
    region : tuple of int, optional
        ``(top, left, height, width)`` sub-rectangle to produce.

    Returns
    -------
    torch.Tensor
        ``(B, H, W)`` int64 labels (``pred``'s dtype for nearest).
    """
    idx = inverse_map(grid, out_size, region)
    if mode == "nearest":
        if pred.dim() == 4:
            pred = pred.argmax(dim=1)
        return lookup_nearest(pred, idx)
    if mode == "linear":
        if pred.dim() != 4:
            raise ValueError("mode='linear' needs scores of shape (B, K, h, w)")
        return lookup_linear(pred, idx).argmax(dim=1)
    raise ValueError(f"mode must be 'nearest' or 'linear', got {mode!r}")
