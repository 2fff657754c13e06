"""The coordinate convention, stated once and used everywhere.

Continuous pixel coordinates
----------------------------
An image of ``W x H`` pixels covers the continuous rectangle
``[0, W) x [0, H)``. Pixel ``(row i, column j)`` is the half-open square
``[j, j + 1) x [i, i + 1)``; its *centre* is ``(j + 0.5, i + 0.5)``. This is
the convention of ``torch.nn.functional.grid_sample(..., align_corners=False)``
and of OpenSlide's ``read_region`` (level pixels map edge to edge).

NGFF/OME-Zarr instead puts the origin at the *centre* of the first level-0
pixel; :mod:`wsiseg.slide.convert` writes the matching translation for
reduced levels (``(s - 1) / 2`` level-0 pixels for downsample ``s``) so both
describe the same geometry.

Slide space is the continuous level-0 space. A pyramid level with downsample
``s`` maps level-``k`` continuous coordinate ``x_k`` to level 0 as
``x_0 = s * x_k`` (edges to edges, so pixel centres land at
``s * (j + 0.5)``).

Normalised grids
----------------
The sampling maths works on *normalised* grids: tensors of shape
``(..., h, w, 2)`` whose last axis is ``(x, y)`` with ``0`` the left/top edge
and ``1`` the right/bottom edge of the sampled region. A uniform ``h x w``
grid puts node ``(i, j)`` at ``((j + 0.5) / w, (i + 0.5) / h)``, the centres
of an ``h x w`` pixel raster over the region. Multiply by the region's size
in level-0 pixels (and add its origin) to get slide coordinates.

Nearest and bilinear reads
--------------------------
* Nearest (labels, never interpolated): a point ``x`` reads the pixel whose
  half-open square contains it, ``floor(x)``, clamped to the image. On a
  uniform grid at integer factor ``k`` this reads ``Y[k // 2 :: k]`` (the
  block centre, the lower-right one of the two central pixels for even
  ``k``).
* Bilinear (images): interpolate between the pixel centres around ``x``,
  with border replication (``grid_sample`` with ``align_corners=False`` and
  ``padding_mode="border"``).
* Reverse (full-resolution read-back): a full-resolution pixel centre
  ``x + 0.5`` has fractional grid index ``(x + 0.5) * w / W - 0.5``; nearest
  read-back rounds that index (it can never tie for integer factors), which
  on a uniform grid at integer factor ``k`` is exactly ``np.repeat`` by
  ``k``: forward then reverse sampling equals nearest down/up-sampling, with
  no half-pixel bias.

Pyramid levels of label masks
-----------------------------
A reduced level of ``n`` pixels along an axis of ``n0`` level-0 pixels
(downsample ``s = n0 / n``, not always a power of two: sizes are rounded up)
is level 0 read by the nearest rule at its pixel centres: pixel ``j`` takes
level-0 pixel ``floor((j + 0.5) * s)`` (:func:`level_source_index`, in exact
integer arithmetic), so every level is a subsampling of level 0
(:func:`reduce_nearest`) and every label a viewer shows at any zoom is the
label of a level-0 pixel that the level pixel covers. At ``s = 2`` that is
the lower-right pixel of each 2 x 2 block (``Y[1::2, 1::2]``); at an integer
``s = k``, ``Y[k // 2 :: k]``, the block centre of the nearest rule above.
The reverse sampler evaluates reduced levels at those level-0 pixel centres
(:class:`wsiseg.sampling.tiles.ReverseTiler`), never at the level's own
centres: those fall on level-0 pixel edges at even downsamples and can read
another label than level 0 has there, even one that no level-0 pixel under
the level pixel has. Nearest rather than the block mode: a level pixel
costs one evaluation, as a level-0 pixel does, where the mode needs every
level-0 pixel under it, so levels are still streamed tile by tile without
reading level 0 back.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "uniform_grid",
    "to_torch_grid",
    "to_pixels",
    "nearest_index",
    "normalised_nearest_index",
    "level_source_index",
    "reduce_nearest",
]


def uniform_grid(h: int, w: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Uniform normalised grid of ``h x w`` pixel centres.

    Parameters
    ----------
    h, w : int
        Grid size (rows, columns), both >= 1.

    Returns
    -------
    torch.Tensor
        Shape ``(h, w, 2)``, last axis ``(x, y)`` in ``(0, 1)``.
    """
    if h < 1 or w < 1:
        raise ValueError(f"grid size must be positive, got {h}x{w}")
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).to(dtype=dtype, device=device)


def to_torch_grid(grid: torch.Tensor) -> torch.Tensor:
    """Normalised ``[0, 1]`` grid -> ``grid_sample`` grid (``align_corners=False``)."""
    return grid * 2.0 - 1.0


def to_pixels(grid, width: float, height: float, origin=(0.0, 0.0)):
    """Normalised grid -> continuous pixel coordinates of a region.

    Parameters
    ----------
    grid : array-like, shape ``(..., 2)``
        Normalised ``(x, y)`` coordinates.
    width, height : float
        Region size in pixels.
    origin : tuple of float
        Region's top-left corner ``(x, y)`` in the target pixel space.
    """
    scale = np.array([width, height], dtype=np.float64)
    off = np.array(origin, dtype=np.float64)
    if isinstance(grid, torch.Tensor):
        return grid * torch.as_tensor(scale, dtype=grid.dtype, device=grid.device) + torch.as_tensor(
            off, dtype=grid.dtype, device=grid.device
        )
    return np.asarray(grid, dtype=np.float64) * scale + off


def nearest_index(coord, size: int):
    """Index of the pixel containing continuous coordinate ``coord`` (clamped).

    Works on numpy arrays and torch tensors.
    """
    if isinstance(coord, torch.Tensor):
        return torch.clamp(torch.floor(coord), 0, size - 1).long()
    return np.clip(np.floor(coord), 0, size - 1).astype(np.int64)


def normalised_nearest_index(x: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest-read pixel index of normalised coordinates on a ``size`` raster.

    This is the nearest rule above, ``floor(x * size)`` clamped to
    ``[0, size - 1]``, made robust to floating-point representation: a
    product that lies within a few ulps of an integer (a pixel edge) is
    snapped onto it first. Uniform grids at integer factor ``k`` put even-``k``
    samples exactly on pixel edges, where ``(j + 0.5) / w`` rounded to the
    grid's dtype and multiplied back can land an ulp short of the edge;
    snapping keeps the documented tie rule (the lower-right pixel) instead of
    depending on rounding.

    Parameters
    ----------
    x : torch.Tensor
        Normalised coordinates along one axis (any shape, floating point).
    size : int
        Raster size along that axis.

    Returns
    -------
    torch.Tensor
        ``int64`` indices, same shape as ``x``.
    """
    p = x * size
    # Representation error of x (half an ulp, relative) times size, plus the
    # rounding of the product itself: 2 eps * size bounds both.
    tol = 2.0 * torch.finfo(x.dtype).eps * max(size, 1)
    r = torch.round(p)
    p = torch.where((p - r).abs() <= tol, r, p)
    return torch.clamp(torch.floor(p), 0, size - 1).long()


def level_source_index(n0: int, n: int) -> np.ndarray:
    """Level-0 pixel read by each pixel of a reduced level, along one axis.

    Parameters
    ----------
    n0 : int
        Level-0 size along the axis (>= 1).
    n : int
        Reduced level's size along the axis (>= 1; ``n > n0`` up-samples,
        repeating level-0 pixels).

    Returns
    -------
    numpy.ndarray
        ``(n,)`` int64: ``floor((j + 0.5) * n0 / n)``, the level-0 pixel under
        pixel ``j``'s centre, computed as ``(2 j + 1) n0 // (2 n)`` (exact
        for any size, always in ``[0, n0 - 1]``). Identity for ``n == n0``.

    Examples
    --------
    >>> level_source_index(8, 4).tolist()
    [1, 3, 5, 7]
    >>> level_source_index(5, 3).tolist()
    [0, 2, 4]
    """
    n0, n = int(n0), int(n)
    if n0 < 1 or n < 1:
        raise ValueError(f"sizes must be positive, got {n0} and {n}")
    return (2 * np.arange(n, dtype=np.int64) + 1) * n0 // (2 * n)


def reduce_nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A reduced pyramid level of a label map: level 0 read at the level's pixel centres.

    The rule of every label pyramid wsiseg writes (see *Pyramid levels of
    label masks* above); the writers produce the same pixels tile by tile
    without holding level 0.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(H, W)`` level-0 labels.
    shape : (int, int)
        ``(h, w)`` of the level, both >= 1.

    Returns
    -------
    numpy.ndarray
        ``(h, w)``, same dtype: ``labels[level_source_index(H, h)][:, level_source_index(W, w)]``.
    """
    labels = np.asarray(labels)
    rows = level_source_index(labels.shape[0], shape[0])
    cols = level_source_index(labels.shape[1], shape[1])
    return labels[np.ix_(rows, cols)]
