"""Density map -> sampling grid (the paper's equation 3).

A sampling density ``d`` of ``hd x wd`` nodes (from the deformation net) is
turned into a smooth, monotone sampling grid by Gaussian attraction: every
node moves to the average of its neighbours' coordinates weighted by their
density times a Gaussian of their offset,

.. math::

    u(x) = \\frac{\\sum_{x'} d(x')\\,k(x - x')\\,u_0(x')}{\\sum_{x'} d(x')\\,k(x - x')},

where ``u_0`` is the uniform grid (node centres, see
:mod:`wsiseg.sampling.coords`). Numerator and denominator are
convolutions; since ``u_0(x') - u_0(x)`` is just the kernel offset, they are
computed as ``u_0(x)`` plus ``conv(d, k * offset) / conv(d, k)``, which is
the same quantity without cancellation error.

Borders: ``u_0`` is continued *linearly* (node centres ``(j + 0.5) / wd``
for ``j`` outside ``[0, wd)``), which is ``u_0`` mirrored about the map's
edges, and ``d`` is mirrored the same way into the pad (node ``-1 - k``
takes node ``k``'s density; :func:`_pad_mirror`). A constant ``d`` gives
exactly the uniform grid: no pull toward the centre. And no node leaves
``[0, 1]``: each offset beyond an edge is outweighed by its mirror image,
which carries the same density nearer the node. (Replicating the border
node's density into the pad instead, as before 2026-12-07, pulled nodes
past an edge wherever the density was high there; clamped back, neighbouring
columns collapsed onto the edge and some cells folded: docs/benchmarks.md,
grid capacity.) Because the Gaussian is an exponential tilt of its offset,
each row's ``x`` (and each column's ``y``) is non-decreasing for any
non-negative ``d``, even with a truncated square kernel. The result is
clamped to ``[0, 1]`` against rounding. ``border="replicate"`` keeps the
old rule: models record theirs (``grid_border``), and files from before it
read as ``"replicate"``, so they sample as they were trained.

The grid is then resized to the output size by bilinear interpolation of
its *displacement* from the uniform grid (border replicated), added to the
uniform grid at the output size: a uniform grid resizes exactly to the
uniform grid, and monotonicity is kept.

Iterations (equidistribution)
-----------------------------
One attraction moves a node only about a kernel width, so the grid's
sample density follows ``d`` only loosely: a narrow boundary band keeps too
few samples and the interior too many (on the labelled regions the oracle
edge density gains at most 1.8 points of mIoU(Y', Y) over uniform with one
attraction, far less than ``d``'s contrast allows). With ``iterations = n > 1`` the attraction is
repeated as a moving-mesh fixed point: at step ``k`` each map node ``i``
carries the *mass* ``m_i = d(g_k(i)) * A_k(i)``, the density at the node's
current position times the area of its cell (both relative), the
attraction of ``m`` gives a small move ``a_k`` in index space, and the grid
becomes ``g_{k+1} = g_k(a_k)`` (``g_k`` interpolated at ``a_k``, continued
linearly past the border nodes). Where the samples already follow ``d``
the mass is constant and nothing moves, so the iteration converges toward
a grid whose cell areas are inversely proportional to ``d``. After each
step every row's ``x`` and every column's ``y`` are made non-decreasing
again (a running maximum), so the monotonicity above holds for any ``n``,
and a step is kept only where it lowers the spread (coefficient of
variation) of the mass: a kernel as wide as the map pulls every node
toward one centroid and would otherwise collapse the grid over a few steps.
``n = 1`` is the single attraction above, bit for bit. Every step is
differentiable.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from wsiseg.sampling.coords import uniform_grid

__all__ = [
    "BORDERS",
    "PRIOR_ITERATIONS",
    "DeformedGrid",
    "check_border",
    "check_iterations",
    "density_to_grid",
    "gaussian_kernel",
    "prior_grid",
    "resize_grid",
]


def gaussian_kernel(
    sigma: float,
    support: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Square 2-D Gaussian kernel, normalised to sum 1.

    Parameters
    ----------
    sigma : float
        Standard deviation in grid nodes (> 0).
    support : int, optional
        Side of the square support, odd and >= 1. Defaults to
        ``2 * round(sigma) + 1``.
    dtype, device
        Of the returned tensor.

    Returns
    -------
    torch.Tensor
        Shape ``(support, support)``.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if support is None:
        support = 2 * round(sigma) + 1
    if support < 1 or support % 2 != 1:
        raise ValueError(f"support must be a positive odd integer, got {support}")
    r = support // 2
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2.0 * sigma**2))
    k = g[:, None] * g[None, :]
    return (k / k.sum()).to(dtype=dtype, device=device)


def resize_grid(grid: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Resize a normalised grid field to ``out_size`` nodes.

    Interpolates the displacement ``grid - uniform`` bilinearly in the
    pixel-centre convention (``align_corners=False``, border replicated) and
    adds the uniform grid of the new size, so uniform stays exactly uniform.
    The result is clamped to ``[0, 1]``.

    Parameters
    ----------
    grid : torch.Tensor
        Shape ``(B, h, w, 2)``.
    out_size : tuple of int
        ``(H, W)``, both >= 1.

    Returns
    -------
    torch.Tensor
        Shape ``(B, H, W, 2)``.
    """
    _b, h, w, _ = grid.shape
    oh, ow = int(out_size[0]), int(out_size[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"out_size must be positive, got {out_size}")
    if (oh, ow) == (h, w):
        return grid.clamp(0.0, 1.0)
    u_in = uniform_grid(h, w, dtype=grid.dtype, device=grid.device)
    u_out = uniform_grid(oh, ow, dtype=grid.dtype, device=grid.device)
    disp = (grid - u_in).permute(0, 3, 1, 2)
    disp = F.interpolate(disp, size=(oh, ow), mode="bilinear", align_corners=False)
    return (u_out + disp.permute(0, 2, 3, 1)).clamp(0.0, 1.0)


#: How the density continues past the map's edges in the attraction: mirrored (the default), or the edge node's
#: density replicated (models trained before 2026-12-07; module notes).
BORDERS = ("mirror", "replicate")


def check_border(border, name: str = "border") -> None:
    """Raise ``ValueError`` (naming ``name``) unless ``border`` is one of :data:`BORDERS`."""
    if border not in BORDERS:
        raise ValueError(f"{name} must be one of {', '.join(BORDERS)}, got {border!r}")


def _pad_mirror(x: torch.Tensor, r: int) -> torch.Tensor:
    """``x (B, C, h, w)`` padded by ``r`` on every side with its mirror image about the edges (edge nodes
    repeated: index ``-1 - k`` takes ``k``), reflected again as often as a pad wider than the map needs."""

    def index(n: int) -> torch.Tensor:
        j = torch.arange(-r, n + r, device=x.device) % (2 * n)
        return torch.where(j < n, j, 2 * n - 1 - j)

    h, w = x.shape[-2:]
    return x.index_select(-1, index(w)).index_select(-2, index(h))


def _attract(d: torch.Tensor, kernel: torch.Tensor, border: str = "mirror") -> torch.Tensor:
    """One Gaussian attraction of ``d`` ``(B, 1, hd, wd)`` at the map's own size (eq. 3, unclamped).

    ``border``: how ``d`` continues past the map's edges (:data:`BORDERS`).

    ``kernel`` is the 2-D Gaussian (an outer product of one 1-D Gaussian with
    itself), applied as two 1-D passes: the same sums as the 2-D convolution
    in ``2 * support`` instead of ``support**2`` multiplications per node.
    """
    _b, _, hd, wd = d.shape
    g = kernel.sum(dim=0)  # the 1-D factor (the kernel sums to 1)
    k = g.numel()
    r = k // 2
    # Per-sample max-normalisation: exact scale invariance in practice and no
    # underflow for densities summing to 1 over large maps.
    scale = d.detach().amax(dim=(1, 2, 3), keepdim=True).clamp_min(torch.finfo(d.dtype).tiny)
    # mirrored: replicated, a dense edge pulls nodes past it (module notes)
    dp = _pad_mirror(d / scale, r) if border == "mirror" else F.pad(d / scale, (r, r, r, r), mode="replicate")
    # With the basis continued linearly, u0(x') - u0(x) is the kernel offset
    # over the map size wherever x' is, so eq. 3 is u0(x) plus a weighted
    # mean of offsets: convolve d with k*ox, k*oy and k. Same maths as
    # conv(d*u0) / conv(d), but with no large terms to cancel in float32.
    # k*ox = (g*o)(x) g(y), k*oy = g(x) (g*o)(y), k = g(x) g(y): along x first, then y.
    o = torch.arange(-r, r + 1, dtype=d.dtype, device=d.device)
    along_x = F.conv2d(dp, torch.stack([g, g * o]).view(2, 1, 1, k))  # the caller has turned autocast off
    along_y = torch.stack([g, g * o, g]).view(3, 1, k, 1)
    out = F.conv2d(along_x[:, [1, 0, 0]], along_y, groups=3)  # channels: num x, num y, den
    num, den = out[:, :2], out[:, 2:]
    # Nodes whose whole window has zero density stay where they are; the safe
    # denominator keeps gradients finite.
    ok = den > 0
    shift = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))
    size = torch.tensor([wd, hd], dtype=d.dtype, device=d.device)
    return uniform_grid(hd, wd, dtype=d.dtype, device=d.device) + shift.permute(0, 2, 3, 1) / size


def _cell_areas(g: torch.Tensor) -> torch.Tensor:
    """``(B, h, w)`` area of each node's cell relative to the uniform grid's (1 there).

    The Jacobian determinant of the node positions over the node index,
    by central differences (one-sided at the borders; an axis of one node
    counts as uniform). Folded or collapsed cells get zero.
    """
    _b, h, w, _ = g.shape
    x, y = g[..., 0] * w, g[..., 1] * h

    def diff(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        if n == 1:
            return torch.zeros_like(t)
        inner = (t.narrow(dim, 2, n - 2) - t.narrow(dim, 0, n - 2)) / 2
        first = t.narrow(dim, 1, 1) - t.narrow(dim, 0, 1)
        last = t.narrow(dim, n - 1, 1) - t.narrow(dim, n - 2, 1)
        return torch.cat([first, inner, last], dim=dim)

    x_c, y_r = diff(x, 2), diff(y, 1)
    if w == 1:
        x_c = torch.ones_like(x_c)
    if h == 1:
        y_r = torch.ones_like(y_r)
    return (x_c * y_r - diff(x, 1) * diff(y, 2)).clamp_min(0.0)


def _compose(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``g`` at the normalised index positions ``a`` (both ``(B, h, w, 2)``): ``a`` plus ``g``'s displacement there.

    The displacement from the uniform grid is interpolated bilinearly with
    the border nodes' displacement continued outward, so the uniform grid is
    the identity and ``g``'s linear continuation is kept, as in :func:`resize_grid`.
    """
    _b, h, w, _ = g.shape
    disp = (g - uniform_grid(h, w, dtype=g.dtype, device=g.device)).permute(0, 3, 1, 2)
    at = F.grid_sample(disp, a * 2 - 1, mode="bilinear", padding_mode="border", align_corners=False)
    return a + at.permute(0, 2, 3, 1)


def _mass(d: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each map node's sample mass under grid ``g`` and its spread.

    Returns ``(m, cv)``: ``m (B, 1, h, w)`` is the density at the node's
    position (bilinear, pixel-centre convention: exact at the uniform nodes)
    times its cell area; ``cv (B,)`` is the coefficient of variation of
    ``m``, 0 when the samples follow ``d`` exactly.
    """
    m = _at(d, g) * _cell_areas(g).unsqueeze(1)
    mean = m.mean(dim=(1, 2, 3))
    cv = m.std(dim=(1, 2, 3)) / mean.clamp_min(torch.finfo(m.dtype).tiny) if m[0].numel() > 1 else mean * 0
    return m, torch.where(mean > 0, cv, torch.full_like(cv, math.inf))


def _iterate(d: torch.Tensor, kernel: torch.Tensor, iterations: int, border: str = "mirror") -> torch.Tensor:
    """The map-size grid after ``iterations`` equidistribution steps (see the module notes)."""
    g = _attract(d, kernel, border).clamp(0.0, 1.0)
    if iterations == 1:
        return g
    m, cv = _mass(d, g)
    for _ in range(iterations - 1):
        step = _compose(g, _attract(m, kernel, border).clamp(0.0, 1.0)).clamp(0.0, 1.0)
        # Composition can shear a strongly compressed cell past its neighbour (random high-contrast
        # densities, not the labelled regions' edge densities): restore each row's x and each
        # column's y order, which one attraction guarantees (module notes).
        step = torch.stack([step[..., 0].cummax(dim=2).values, step[..., 1].cummax(dim=1).values], dim=-1)
        m_step, cv_step = _mass(d, step)
        # A kernel as wide as the map overshoots (every node pulled toward one centroid) and can
        # collapse the grid: keep a step only where it brings the samples closer to the density.
        better = cv_step < cv
        if not bool(better.any()):
            break
        keep = better.view(-1, 1, 1, 1)
        g, m, cv = torch.where(keep, step, g), torch.where(keep, m_step, m), torch.where(better, cv_step, cv)
    return g


def check_iterations(iterations, name: str = "iterations", most: int | None = None) -> None:
    """Raise ``ValueError`` (naming ``name``) unless ``iterations`` is an integer >= 1 (not a bool), and at most
    ``most`` when given."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{name} must be a positive integer, got {iterations!r}")
    if most is not None and iterations > most:
        raise ValueError(f"{name} must be at most {most}, got {iterations!r}")


def _working(d: torch.Tensor) -> torch.Tensor:
    """``d`` in a dtype that can place samples: half precision cannot on a large slide (~1e-3 of its width)."""
    return d.float() if not d.is_floating_point() or d.dtype in (torch.float16, torch.bfloat16) else d


def _at(d: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``d (B, 1, hd, wd)`` read at the normalised positions ``g (B, h, w, 2)`` (bilinear, pixel centres, border)."""
    return F.grid_sample(d, g * 2 - 1, mode="bilinear", padding_mode="border", align_corners=False)


def _grid_from_kernel(
    d: torch.Tensor,
    kernel: torch.Tensor,
    out_size: tuple[int, int] | None,
    iterations: int = 1,
    border: str = "mirror",
) -> torch.Tensor:
    if d.dim() != 4 or d.shape[1] != 1:
        raise ValueError(f"density must have shape (B, 1, hd, wd), got {tuple(d.shape)}")
    check_iterations(iterations)
    check_border(border)
    d = _working(d)
    kernel = kernel.to(dtype=d.dtype, device=d.device)
    with torch.autocast(device_type=d.device.type, enabled=False):
        g = _iterate(d, kernel, iterations, border)
    if out_size is not None:
        g = resize_grid(g, out_size)
    return g


def density_to_grid(
    d: torch.Tensor,
    sigma: float,
    support: int | None = None,
    out_size: tuple[int, int] | None = None,
    iterations: int = 1,
    border: str = "mirror",
) -> torch.Tensor:
    """Sampling grid from a density map (functional form of :class:`DeformedGrid`).

    Parameters
    ----------
    d : torch.Tensor
        Non-negative density, shape ``(B, 1, hd, wd)``; need not sum to 1
        (the grid is invariant to scaling ``d``).
    sigma : float
        Gaussian standard deviation in density-map nodes.
    support : int, optional
        Kernel side, odd; default ``2 * round(sigma) + 1``.
    out_size : tuple of int, optional
        ``(h, w)`` of the returned grid; default ``(hd, wd)``.
    iterations : int
        Attraction steps (>= 1); more than one repeats it toward
        equidistribution (module notes). 1: the paper's single attraction.
    border : {"mirror", "replicate"}
        How ``d`` continues past the map's edges (module notes): mirrored
        keeps every node inside without collapsing any onto an edge;
        ``"replicate"`` is the rule of models trained before 2026-12-07.

    Returns
    -------
    torch.Tensor
        Normalised grid ``(B, h, w, 2)``, last axis ``(x, y)`` in ``[0, 1]``,
        dtype of ``d`` (float32 for half-precision or integer ``d``, also
        under autocast). Differentiable with respect to ``d``.
    """
    # Built in float64 on the CPU (tiny); cast to the working dtype and device later.
    kernel = gaussian_kernel(sigma, support, dtype=torch.float64)
    return _grid_from_kernel(d, kernel, out_size, iterations, border)


#: Attraction steps of the warp toward a prior (:func:`prior_grid`): enough to move samples across a slide's glass,
#: which one attraction (about two kernel widths) cannot.
PRIOR_ITERATIONS = 16


def prior_grid(
    d: torch.Tensor,
    prior: torch.Tensor,
    sigma: float,
    support: int | None = None,
    out_size: tuple[int, int] | None = None,
    iterations: int = 1,
    prior_iterations: int = PRIOR_ITERATIONS,
    border: str = "mirror",
) -> torch.Tensor:
    """A grid that follows ``d`` as :func:`density_to_grid` does, on top of a warp toward ``prior``.

    First the map's nodes are moved toward equidistribution of ``prior``
    (``prior_iterations`` attraction steps: a base warp ``B``); then ``d``
    is read where the warped nodes sit and turned into a grid ``L`` as
    usual (``iterations`` steps, the model's own); the result is ``B`` read
    at ``L``. A constant prior leaves ``B`` the identity, so the grid is
    :func:`density_to_grid` of ``d``: where the prior is flat (no glass) the
    sampler behaves exactly as trained, and only where it varies are the
    samples moved, however far.

    Parameters
    ----------
    d, prior : torch.Tensor
        ``(B, 1, hd, wd)`` non-negative densities on the same map.
    sigma, support, out_size, iterations, border
        As :func:`density_to_grid` (``border`` for both the warp and ``d``'s grid).
    prior_iterations : int
        Attraction steps of the base warp.

    Returns
    -------
    torch.Tensor
        Normalised grid ``(B, h, w, 2)`` in ``[0, 1]``.
    """
    if prior.shape != d.shape:
        raise ValueError(f"prior must have the density's shape {tuple(d.shape)}, got {tuple(prior.shape)}")
    kernel = gaussian_kernel(sigma, support, dtype=torch.float64)
    d = _working(d)
    with torch.autocast(device_type=d.device.type, enabled=False):  # reading and composing grids, as building them
        base = _grid_from_kernel(prior, kernel, None, prior_iterations, border).to(d.dtype)
        inner = _grid_from_kernel(_at(d, base), kernel, out_size, iterations, border)
        return _compose(base, inner).clamp(0.0, 1.0)


class DeformedGrid(torch.nn.Module):
    """Module turning a density map into a sampling grid (paper eq. 3).

    Parameters
    ----------
    sigma : float
        Gaussian standard deviation in density-map nodes.
    support : int, optional
        Kernel side, odd; default ``2 * round(sigma) + 1``.
    iterations : int
        Attraction steps; see :func:`density_to_grid`.
    border : {"mirror", "replicate"}
        See :func:`density_to_grid`.

    Notes
    -----
    The kernel is a buffer, not a parameter: it moves with ``.to()`` and is
    saved in the state dict but is never trained.
    """

    kernel: torch.Tensor  # buffer registered in __init__

    def __init__(self, sigma: float, support: int | None = None, iterations: int = 1, border: str = "mirror") -> None:
        super().__init__()
        check_iterations(iterations)
        check_border(border)
        self.sigma = float(sigma)
        self.iterations = iterations
        self.border = border
        self.register_buffer("kernel", gaussian_kernel(sigma, support))

    @property
    def support(self) -> int:
        return int(self.kernel.shape[-1])

    def forward(self, d: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Grid ``(B, h, w, 2)`` from density ``d`` ``(B, 1, hd, wd)``; see :func:`density_to_grid`."""
        return _grid_from_kernel(d, self.kernel, out_size, self.iterations, self.border)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, support={self.support}, iterations={self.iterations}, border={self.border}"
