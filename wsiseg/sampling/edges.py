"""Edge-loss target and fixed densities (uniform, edge-based baseline).

Edge target (paper eq. 4 and its footnote 4)
--------------------------------------------
The target density for the edge loss is an edge map of the low-resolution
label ``Y_lr``: Gaussian blur (sigma 1), then the 3x3 filter
``[[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]]`` with border values replicated,
then the magnitude.

Multi-class labels: the filter is applied to the *one-hot map of each class*
and the magnitudes are summed over classes and halved. Filtering the label
ids directly would make an edge's strength depend on arbitrary id
differences (``|7 - 1|`` vs ``|2 - 1|``); per-class one-hot maps make every
boundary count the same whatever the ids, and halving makes a two-class
label give exactly the edge map of its binary ``{0, 1}`` mask. Taking the
magnitude counts both sides of a boundary.

The blur is a sum of shifted copies and the filter a sum of the eight
differences ``centre - neighbour`` (the same filter, rearranged), both in
the same order at every pixel: wherever the label is locally constant, and
on a single-class label everywhere, the target is exactly 0 (never NaN,
never a rounding residue).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["blur", "edge_density", "edge_target", "uniform_density"]


def _gauss1d(sigma: float, dtype, device) -> torch.Tensor:
    r = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with replicated borders.

    Parameters
    ----------
    x : torch.Tensor
        Floating point, shape ``(N, C, H, W)``.
    sigma : float
        Standard deviation in pixels (> 0); support ``2 * ceil(3 sigma) + 1``.

    Returns
    -------
    torch.Tensor
        Same shape as ``x``. A constant input is returned bit-for-bit constant
        (the taps are summed in the same order at every pixel).
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    g = _gauss1d(sigma, x.dtype, x.device)
    r = (g.numel() - 1) // 2
    h, w = x.shape[-2:]
    xp = F.pad(x, (r, r, 0, 0), mode="replicate")
    y = sum(g[t] * xp[..., :, t : t + w] for t in range(2 * r + 1))
    yp = F.pad(y, (0, 0, r, r), mode="replicate")
    return sum(g[t] * yp[..., t : t + h, :] for t in range(2 * r + 1))


def _laplace8(x: torch.Tensor) -> torch.Tensor:
    """The filter ``[[-1,-1,-1],[-1,8,-1],[-1,-1,-1]]`` with replicated borders."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    out = torch.zeros_like(x)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy == 1 and dx == 1:
                continue
            out = out + (x - xp[..., dy : dy + h, dx : dx + w])
    return out


def edge_target(labels_lr: torch.Tensor, sigma: float = 1.0, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Edge-loss target density from low-resolution labels.

    Parameters
    ----------
    labels_lr : torch.Tensor
        Integer labels ``(B, hd, wd)`` at the density-map size (any ids,
        including an ignore value, which counts as one more class).
    sigma : float
        Gaussian blur before the edge filter (the paper uses 1).
    dtype : torch.dtype
        Floating type of the result.

    Returns
    -------
    torch.Tensor
        Non-negative, unnormalised map ``(B, 1, hd, wd)``: ``0.5 * sum over
        classes |filter(blur(onehot_c))|``. All zeros where a sample has a
        single class.
    """
    if labels_lr.dim() != 3:
        raise ValueError(f"labels_lr must have shape (B, hd, wd), got {tuple(labels_lr.shape)}")
    b, hd, wd = labels_lr.shape
    # Compact ids so arbitrary values (255, -1) need no huge one-hot.
    _, inv = torch.unique(labels_lr, return_inverse=True)
    k = int(inv.max().item()) + 1 if inv.numel() else 1
    if k == 1:
        return torch.zeros(b, 1, hd, wd, dtype=dtype, device=labels_lr.device)
    onehot = F.one_hot(inv, k).permute(0, 3, 1, 2).to(dtype)
    resp = _laplace8(blur(onehot, sigma)).abs()
    return 0.5 * resp.sum(dim=1, keepdim=True)


def _boundary(labels: torch.Tensor) -> torch.Tensor:
    """True where any of the 8 neighbours (borders replicated) has another label."""
    h, w = labels.shape[-2:]
    # Replicate-pad by clamped indexing: works for any integer dtype exactly.
    rows = torch.arange(-1, h + 1, device=labels.device).clamp(0, h - 1)
    cols = torch.arange(-1, w + 1, device=labels.device).clamp(0, w - 1)
    lp = labels[:, rows][:, :, cols]
    out = torch.zeros_like(labels, dtype=torch.bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= lp[:, dy : dy + h, dx : dx + w] != labels
    return out


def edge_density(
    labels_lr: torch.Tensor,
    radius: float,
    floor: float = 0.05,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Edge-based sampling density (baseline of paper A.5, after Marin et al.).

    Label boundaries (pixels with a differently labelled 8-neighbour, both
    sides) are blurred with a Gaussian of standard deviation ``radius``,
    scaled to peak 1, and ``floor`` is added so the density stays positive
    and a single-class label gives the uniform density.

    Parameters
    ----------
    labels_lr : torch.Tensor
        Integer labels ``(B, hd, wd)`` at the density-map size.
    radius : float
        Blur standard deviation in density-map nodes (> 0).
    floor : float
        Constant added after peak normalisation (> 0).
    dtype : torch.dtype
        Floating type of the result.

    Returns
    -------
    torch.Tensor
        Density ``(B, 1, hd, wd)``, positive, each sample summing to 1.
    """
    if labels_lr.dim() != 3:
        raise ValueError(f"labels_lr must have shape (B, hd, wd), got {tuple(labels_lr.shape)}")
    if not floor > 0:
        raise ValueError(f"floor must be positive, got {floor}")
    e = _boundary(labels_lr).unsqueeze(1).to(dtype)
    e = blur(e, radius)
    peak = e.amax(dim=(1, 2, 3), keepdim=True)
    e = torch.where(peak > 0, e / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(e))
    d = e + floor
    return d / d.sum(dim=(1, 2, 3), keepdim=True)


def uniform_density(b: int, hd: int, wd: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Constant density ``(b, 1, hd, wd)`` summing to 1 per sample (gives the uniform grid)."""
    return torch.full((b, 1, hd, wd), 1.0 / (hd * wd), dtype=dtype, device=device)
