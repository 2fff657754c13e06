"""Low-resolution views of slide regions, read from the pyramid, never from level 0 when avoidable."""

from __future__ import annotations

import math
from typing import cast

import dask.array as da
import numpy as np
from skimage.transform import resize

from wsiseg.slide.multiscale import Multiscale

__all__ = ["area_mean", "mean32", "read_lowres", "thumbnail"]


def mean32(block: np.ndarray, axis=None) -> np.ndarray:
    """``block.mean(axis)`` in float32 (a ``dask.array.coarsen`` reduction).

    float32 halves the memory and time of float64 and is exact enough for
    colour means.
    """
    return block.mean(axis=axis, dtype=np.float32)


def read_lowres(ms: Multiscale, box: tuple[int, int, int, int], out_shape: tuple[int, int]) -> np.ndarray:
    """Area-resampled view of a level-0 box at ``out_shape``.

    The box is read from the coarsest pyramid level that still has at least
    ``out_shape`` pixels across it, averaged over integer blocks chunk by
    chunk (dask, so memory stays bounded), then resized to exactly
    ``out_shape`` with anti-aliasing.

    Parameters
    ----------
    ms : Multiscale
        The slide.
    box : (x, y, width, height)
        Level-0 pixel box (integers, inside the slide).
    out_shape : (h, w)
        Output size, both >= 1.

    Returns
    -------
    numpy.ndarray
        ``(h, w, 3)`` float32 in ``[0, 1]``.

    Notes
    -----
    The box is widened to whole pixels of the chosen level, so its edges may
    move by up to one level pixel: below one output pixel by construction.
    """
    x, y, bw, bh = (int(v) for v in box)
    th, tw = (int(v) for v in out_shape)
    if bw < 1 or bh < 1 or th < 1 or tw < 1:
        raise ValueError(f"empty box {box} or output shape {out_shape}")
    level = ms.levels[ms.level_for_downsample(min(bw / tw, bh / th))]
    sx, sy = level.downsample
    x0, y0 = int(math.floor(x / sx)), int(math.floor(y / sy))
    x1 = min(level.width, max(x0 + 1, int(math.ceil((x + bw) / sx))))
    y1 = min(level.height, max(y0 + 1, int(math.ceil((y + bh) / sy))))
    arr = level.array[y0:y1, x0:x1]
    h, w = arr.shape[:2]
    f = max(1, min(h // th, w // tw))
    if f > 1:
        # Edge-replicate up to a multiple of f so no border pixels are lost.
        arr = da.pad(arr, ((0, -h % f), (0, -w % f), (0, 0)), mode="edge")
        arr = da.coarsen(mean32, arr, {0: f, 1: f})
    rgb = np.asarray(arr.compute(), dtype=np.float32) / np.float32(255.0)
    if rgb.shape[:2] != (th, tw):
        rgb = resize(rgb, (th, tw), order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)
    return np.clip(rgb, 0.0, 1.0)


def thumbnail(ms: Multiscale, max_size: int = 1024) -> tuple[np.ndarray, tuple[float, float]]:
    """Whole-slide thumbnail with long side ``max_size`` (uint8) and its scale.

    Returns
    -------
    (numpy.ndarray, (float, float))
        ``(h, w, 3)`` uint8 and thumbnail pixels per level-0 pixel ``(x, y)``.
    """
    scale = min(1.0, max_size / max(ms.width, ms.height))
    th, tw = max(1, round(ms.height * scale)), max(1, round(ms.width * scale))
    rgb = read_lowres(ms, (0, 0, ms.width, ms.height), (th, tw))
    return (rgb * 255.0 + 0.5).astype(np.uint8), (tw / ms.width, th / ms.height)


def area_mean(a: np.ndarray, row_edges: np.ndarray, col_edges: np.ndarray) -> np.ndarray:
    """Exact box average of an image over a grid of fractional pixel intervals.

    Output pixel ``(i, j)`` is the mean of ``a`` over the rectangle
    ``[row_edges[i], row_edges[i + 1]) x [col_edges[j], col_edges[j + 1])``
    in ``a``'s pixel coordinates (pixel ``k`` covers ``[k, k + 1)``), each
    input pixel weighted by the area it shares with it: the area-preserving
    downsample at any ratio, integer or not.

    Parameters
    ----------
    a : numpy.ndarray
        ``(H, W)`` or ``(H, W, C)`` image.
    row_edges, col_edges : numpy.ndarray
        Increasing interval edges, ``h + 1`` and ``w + 1`` of them; clipped
        to ``[0, H]`` and ``[0, W]``.

    Returns
    -------
    numpy.ndarray
        ``(h, w)`` or ``(h, w, C)``, float32 (float64 for a float64 ``a``).

    Examples
    --------
    >>> area_mean(np.array([[0.0, 2.0, 4.0]]), np.array([0.0, 1.0]), np.array([0.0, 1.5, 3.0]))
    array([[0.66666667, 3.33333333]])
    """
    a = np.asarray(a)
    dtype = np.result_type(a.dtype, np.float32)
    rows = _interval_mean(a, np.asarray(row_edges, np.float64), 0, dtype)
    return _interval_mean(rows, np.asarray(col_edges, np.float64), 1, dtype)


def _interval_mean(a: np.ndarray, edges: np.ndarray, axis: int, dtype) -> np.ndarray:
    """Means of ``a`` along ``axis`` over ``[edges[k], edges[k + 1])``, as ``dtype``.

    A sum of shifted copies ("taps"): tap ``t`` of output ``k`` is input
    ``floor(edges[k]) + t``, weighted by the length it shares with the
    interval. Only output-sized arrays are made (the input is never converted).
    """
    n = a.shape[axis]
    edges = np.clip(edges, 0.0, n)
    lo, hi = edges[:-1], edges[1:]
    first = np.floor(lo).astype(np.intp)
    shape = [1] * a.ndim
    shape[axis] = len(lo)
    out = None
    for tap in range(int(np.ceil((hi - lo).max())) + 1):
        index = first + tap
        weight = np.clip(np.minimum(index + 1, hi) - np.maximum(index, lo), 0.0, None) / (hi - lo)
        term = np.take(a, np.minimum(index, n - 1), axis=axis).astype(dtype)
        term *= weight.astype(dtype).reshape(shape)
        out = term if out is None else np.add(out, term, out=out)
    return cast(np.ndarray, out)  # increasing edges: at least one tap
