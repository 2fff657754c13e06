"""Forward sampling of in-memory images and label maps at a normalised grid.

Images are read bilinearly (differentiable with respect to the grid), labels
by nearest only: class ids are gathered, never interpolated. Both follow
:mod:`wsiseg.sampling.coords`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsiseg.sampling.coords import normalised_nearest_index, to_torch_grid, uniform_grid

__all__ = ["downsample_labels", "sample_image", "sample_labels"]


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
    map; at an integer factor ``k`` this is ``labels[:, k // 2 :: k, k // 2 :: k]``.

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
    h, w = int(size[0]), int(size[1])
    # float64 keeps pixel centres far from edges at any factor (float32 can
    # blur them together for large, non-integer factors); MPS lacks float64.
    dtype = torch.float32 if labels.device.type == "mps" else torch.float64
    return sample_labels(labels, uniform_grid(h, w, dtype=dtype, device=labels.device).unsqueeze(0))
