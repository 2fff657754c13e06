"""Forward sampling of in-memory images and label maps at a normalised grid.

Images are read bilinearly (differentiable with respect to the grid), labels
by nearest only: class ids are gathered, never interpolated. Both follow
:mod:`wsiseg.sampling.coords`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from wsiseg.sampling.coords import level_source_index, normalised_nearest_index, to_torch_grid

__all__ = ["downsample_labels", "grid_spacing", "sample_image", "sample_image_lod", "sample_labels"]


def _batched_grid(grid: torch.Tensor, b: int) -> torch.Tensor:
    if grid.dim() == 3:
        grid = grid.unsqueeze(0)
    if grid.dim() != 4 or grid.shape[-1] != 2:
        raise ValueError(f"grid must have shape (B, h, w, 2), got {tuple(grid.shape)}")
    if grid.shape[0] == 1 and b != 1:
        grid = grid.expand(b, -1, -1, -1)
    if grid.shape[0] != b:
        raise ValueError(f"grid batch {grid.shape[0]} does not match input batch {b}")
    return grid


def sample_image(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``image`` at ``grid`` (border replicated).

    Parameters
    ----------
    image : torch.Tensor
        Floating point, shape ``(B, C, H, W)``.
    grid : torch.Tensor
        Normalised grid ``(B, h, w, 2)`` (or ``(h, w, 2)`` / batch 1,
        broadcast over ``B``).

    Returns
    -------
    torch.Tensor
        Shape ``(B, C, h, w)``; differentiable with respect to ``image`` and
        ``grid``.
    """
    if image.dim() != 4:
        raise ValueError(f"image must have shape (B, C, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError("image must be floating point; convert before sampling")
    g = _batched_grid(grid, image.shape[0]).to(dtype=image.dtype, device=image.device)
    return F.grid_sample(image, to_torch_grid(g), mode="bilinear", padding_mode="border", align_corners=False)


def grid_spacing(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Local sample spacing of a normalised grid, in pixels of a ``height x width`` image.

    The longer of the two Jacobian columns, ``max(|dp/di|, |dp/dj|)``, by
    central differences (one-sided at the border, 0 along an axis of length
    1): the rule of :func:`wsiseg.slide.gather.sample_spacing`.

    Parameters
    ----------
    grid : torch.Tensor
        ``(B, h, w, 2)`` normalised grid.
    height, width : int
        Image size the grid is scaled to.

    Returns
    -------
    torch.Tensor
        ``(B, h, w)``, detached.
    """
    p = grid.detach().double() * torch.tensor([width, height], dtype=torch.float64, device=grid.device)
    zeros = torch.zeros(p.shape[:3], dtype=p.dtype, device=p.device)
    di = torch.gradient(p, dim=1)[0].norm(dim=-1) if p.shape[1] > 1 else zeros
    dj = torch.gradient(p, dim=2)[0].norm(dim=-1) if p.shape[2] > 1 else zeros
    return torch.maximum(di, dj)


def sample_image_lod(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Level-of-detail samples of ``image`` at ``grid``: the in-memory twin of the slide gather.

    Each point is read bilinearly from the level of a power-of-two
    area-averaged pyramid of ``image`` whose pixel is the largest not
    larger than the local sample spacing (:func:`grid_spacing`; level 0
    where samples are denser than pixels), exactly as
    :func:`wsiseg.slide.gather.gather` reads a slide pyramid. Training on
    these samples matches what ``wsiseg segment`` feeds the segmenter, and
    sparse samples carry the local mean colour instead of an aliased single
    pixel. Differentiable with respect to ``image`` and ``grid`` (the level
    choice is not).

    Parameters
    ----------
    image : torch.Tensor
        Floating point ``(B, C, H, W)``.
    grid : torch.Tensor
        Normalised grid ``(B, h, w, 2)`` (or batch 1, broadcast).

    Returns
    -------
    torch.Tensor
        ``(B, C, h, w)``.
    """
    if image.dim() != 4:
        raise ValueError(f"image must have shape (B, C, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError("image must be floating point; convert before sampling")
    b, c, H, W = image.shape
    g = _batched_grid(grid, b).to(dtype=image.dtype, device=image.device)
    spacing = grid_spacing(g, H, W)
    # Level k has downsample 2**k; the coarsest not coarser than the spacing (tiny slack against rounding).
    top = max(0, int(math.floor(math.log2(max(1.0, min(H, W))))))
    level = torch.floor(torch.log2(spacing.clamp_min(1.0) * (1 + 1e-9))).long().clamp(0, top)
    out = F.grid_sample(image, to_torch_grid(g), mode="bilinear", padding_mode="border", align_corners=False)
    for k in range(1, int(level.max()) + 1):
        sel = level == k
        if not bool(sel.any()):
            continue
        # Area averaging maps edges to edges, so the normalised grid addresses every level alike.
        lv = F.adaptive_avg_pool2d(image, (max(1, round(H / 2**k)), max(1, round(W / 2**k))))
        at = F.grid_sample(lv, to_torch_grid(g), mode="bilinear", padding_mode="border", align_corners=False)
        out = torch.where(sel.unsqueeze(1), at, out)
    return out


def sample_labels(labels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Nearest samples of a label map at ``grid`` (gathered, never interpolated).

    Parameters
    ----------
    labels : torch.Tensor
        Integer labels, shape ``(B, H, W)``.
    grid : torch.Tensor
        Normalised grid ``(B, h, w, 2)`` (or broadcastable batch 1).

    Returns
    -------
    torch.Tensor
        Shape ``(B, h, w)``, same dtype as ``labels``; every value occurs in
        ``labels``. Pixel ``floor(x * W), floor(y * H)`` (clamped) is read,
        see :func:`wsiseg.sampling.coords.normalised_nearest_index`.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must have shape (B, H, W), got {tuple(labels.shape)}")
    b, hh, ww = labels.shape
    g = _batched_grid(grid, b).to(device=labels.device)
    if not g.is_floating_point():
        raise TypeError("grid must be floating point")
    ix = normalised_nearest_index(g[..., 0], ww)
    iy = normalised_nearest_index(g[..., 1], hh)
    flat = (iy * ww + ix).reshape(b, -1)
    return labels.reshape(b, -1).gather(1, flat).reshape(b, *g.shape[1:3])


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Uniform nearest down-sampling of labels (``Y_lr`` for the edge loss).

    Reads the label under each pixel centre of an ``h x w`` raster over the
    map (:func:`wsiseg.sampling.coords.level_source_index`, the rule of the
    mask pyramids); at an integer factor ``k`` this is
    ``labels[:, k // 2 :: k, k // 2 :: k]``.

    Parameters
    ----------
    labels : torch.Tensor
        Integer labels ``(B, H, W)``.
    size : tuple of int
        ``(h, w)``.

    Returns
    -------
    torch.Tensor
        Shape ``(B, h, w)``.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must have shape (B, H, W), got {tuple(labels.shape)}")
    _, hh, ww = labels.shape
    # integer indices: exact at any size and factor, on every device
    rows = torch.as_tensor(level_source_index(hh, size[0]), device=labels.device)
    cols = torch.as_tensor(level_source_index(ww, size[1]), device=labels.device)
    return labels[:, rows[:, None], cols[None, :]]
