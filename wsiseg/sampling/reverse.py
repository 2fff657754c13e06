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

Method (no global scatter-and-fill): an initial guess from inverting the
separable 1-D marginals (mean node ``x`` per column, mean node ``y`` per
row; both monotone) -- for large outputs, instead, from interpolating the
inverse solved first on a raster twice the grid's size -- then Newton
iterations on the piecewise bilinear map,
re-selecting the cell that contains the current estimate at every step,
with step halving when the residual grows and, in collapsed cells (nodes
clamped together at a border), a half-cell step in the direction that
monotonicity implies. Only unconverged points keep iterating; queries are
processed in chunks, so memory is bounded whatever ``out_size`` is.

The solution is unique and found wherever the grid does not fold (cells
stay convex and consistently oriented), which holds for the Gaussian
attraction of :mod:`wsiseg.sampling.grid` at moderate density contrast.
Extreme contrast with a small kernel can fold a few cells; there the map
has no unique inverse and the returned index is the last Newton iterate
(best effort, not guaranteed to be the nearest node).

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

import torch
import torch.nn.functional as F

from wsiseg.sampling.coords import to_torch_grid

__all__ = ["grid_at_index", "inverse_map", "lookup_linear", "lookup_nearest", "reverse_sample"]


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
        Newton iterations at most.
    tol : float, optional
        Convergence tolerance on the residual, in uniform-cell units;
        default ``1e-4`` (float32) or ``1e-9`` (float64), raised to
        ``32 * eps * max(h, w)`` for large grids.
    chunk : int
        Query points per batch element processed at once (bounds memory).

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
    dtype, device = grid.dtype, grid.device
    ys = (torch.arange(top, top + rh, dtype=torch.float64) + 0.5) / hh
    xs = (torch.arange(left, left + rw, dtype=torch.float64) + 0.5) / ww
    qy, qx = torch.meshgrid(ys, xs, indexing="ij")
    qx = qx.reshape(1, -1).to(dtype=dtype, device=device).expand(b, -1)
    qy = qy.reshape(1, -1).to(dtype=dtype, device=device).expand(b, -1)
    # Coarse to fine: solve on a raster about twice the grid's size first;
    # interpolating that (smooth) inverse gives fine queries a first guess a
    # Newton step or two from the answer.
    ch, cw = min(hh, 2 * h), min(ww, 2 * w)
    coarse = None
    if rh * rw > 4 * ch * cw:
        cy, cx = torch.meshgrid(
            (torch.arange(ch, dtype=torch.float64) + 0.5) / ch,
            (torch.arange(cw, dtype=torch.float64) + 0.5) / cw,
            indexing="ij",
        )
        cx = cx.reshape(1, -1).to(dtype=dtype, device=device).expand(b, -1)
        cy = cy.reshape(1, -1).to(dtype=dtype, device=device).expand(b, -1)
        r0, c0 = _first_guess(g, cx, cy)
        r, c = _solve(g, cx, cy, r0, c0, max_iter, tol)
        coarse = torch.stack([r, c], dim=1).reshape(b, 2, ch, cw)
    out = torch.empty(b, rh * rw, 2, dtype=dtype, device=device)
    for s in range(0, rh * rw, chunk):
        e = min(s + chunk, rh * rw)
        px, py = qx[:, s:e], qy[:, s:e]
        if coarse is None:
            r0, c0 = _first_guess(g, px, py)
        else:
            pos = to_torch_grid(torch.stack([px, py], dim=-1)).unsqueeze(1)
            rc = F.grid_sample(coarse, pos, mode="bilinear", padding_mode="border", align_corners=False)
            r0, c0 = rc[:, 0, 0], rc[:, 1, 0]
        r, c = _solve(g, px, py, r0, c0, max_iter, tol)
        out[:, s:e, 0] = (r - 1.0).clamp(-0.5, h - 0.5)
        out[:, s:e, 1] = (c - 1.0).clamp(-0.5, w - 0.5)
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
