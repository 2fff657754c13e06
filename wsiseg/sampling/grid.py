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

Borders: ``d`` is replicated into the pad and ``u_0`` continued *linearly*
(node centres ``(j + 0.5) / wd`` for ``j`` outside ``[0, wd)``), so a
constant ``d`` gives exactly the uniform grid: no pull toward the centre.
Because the Gaussian is an exponential tilt of its offset, each row's ``x``
(and each column's ``y``) is non-decreasing for any non-negative ``d``,
even with a truncated square kernel. The result is clamped to ``[0, 1]``.

The grid is then resized to the output size by bilinear interpolation of
its *displacement* from the uniform grid (border replicated), added to the
uniform grid at the output size: a uniform grid resizes exactly to the
uniform grid, and monotonicity is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsiseg.sampling.coords import uniform_grid

__all__ = ["DeformedGrid", "density_to_grid", "gaussian_kernel", "resize_grid"]


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


def _grid_from_kernel(d: torch.Tensor, kernel: torch.Tensor, out_size: tuple[int, int] | None) -> torch.Tensor:
    if d.dim() != 4 or d.shape[1] != 1:
        raise ValueError(f"density must have shape (B, 1, hd, wd), got {tuple(d.shape)}")
    if not d.is_floating_point() or d.dtype in (torch.float16, torch.bfloat16):
        # Half precision cannot place samples on a large slide (~1e-3 of its width).
        d = d.float()
    _b, _, hd, wd = d.shape
    kernel = kernel.to(dtype=d.dtype, device=d.device)
    r = kernel.shape[-1] // 2
    # Per-sample max-normalisation: exact scale invariance in practice and no
    # underflow for densities summing to 1 over large maps.
    scale = d.detach().amax(dim=(1, 2, 3), keepdim=True).clamp_min(torch.finfo(d.dtype).tiny)
    dp = F.pad(d / scale, (r, r, r, r), mode="replicate")
    # With the basis continued linearly, u0(x') - u0(x) is the kernel offset
    # over the map size wherever x' is, so eq. 3 is u0(x) plus a weighted
    # mean of offsets: convolve d with k*ox, k*oy and k. Same maths as
    # conv(d*u0) / conv(d), but with no large terms to cancel in float32.
    o = torch.arange(-r, r + 1, dtype=d.dtype, device=d.device)
    weights = torch.stack([kernel * o[None, :], kernel * o[:, None], kernel]).unsqueeze(1)
    with torch.autocast(device_type=d.device.type, enabled=False):
        out = F.conv2d(dp, weights)
    num, den = out[:, :2], out[:, 2:]
    # Nodes whose whole window has zero density stay where they are; the safe
    # denominator keeps gradients finite.
    ok = den > 0
    shift = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))
    size = torch.tensor([wd, hd], dtype=d.dtype, device=d.device)
    g = uniform_grid(hd, wd, dtype=d.dtype, device=d.device) + shift.permute(0, 2, 3, 1) / size
    g = g.clamp(0.0, 1.0)
    if out_size is not None:
        g = resize_grid(g, out_size)
    return g


def density_to_grid(
    d: torch.Tensor,
    sigma: float,
    support: int | None = None,
    out_size: tuple[int, int] | None = None,
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

    Returns
    -------
    torch.Tensor
        Normalised grid ``(B, h, w, 2)``, last axis ``(x, y)`` in ``[0, 1]``,
        dtype of ``d`` (float32 for half-precision or integer ``d``, also
        under autocast). Differentiable with respect to ``d``.
    """
    # Built in float64 on the CPU (tiny); cast to the working dtype and device later.
    return _grid_from_kernel(d, gaussian_kernel(sigma, support, dtype=torch.float64), out_size)


class DeformedGrid(torch.nn.Module):
    """Module turning a density map into a sampling grid (paper eq. 3).

    Parameters
    ----------
    sigma : float
        Gaussian standard deviation in density-map nodes.
    support : int, optional
        Kernel side, odd; default ``2 * round(sigma) + 1``.

    Notes
    -----
    The kernel is a buffer, not a parameter: it moves with ``.to()`` and is
    saved in the state dict but is never trained.
    """

    kernel: torch.Tensor  # buffer registered in __init__

    def __init__(self, sigma: float, support: int | None = None) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self.register_buffer("kernel", gaussian_kernel(sigma, support))

    @property
    def support(self) -> int:
        return int(self.kernel.shape[-1])

    def forward(self, d: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Grid ``(B, h, w, 2)`` from density ``d`` ``(B, 1, hd, wd)``; see :func:`density_to_grid`."""
        return _grid_from_kernel(d, self.kernel, out_size)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, support={self.support}"
