"""Low-resolution views of slide regions, read from the pyramid, never from level 0 when avoidable."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
from skimage.transform import resize

from wsiseg.slide.multiscale import Multiscale


def _mean32(block: np.ndarray, axis=None) -> np.ndarray:
    # float32 halves the memory and time of float64 and is exact enough for colour means.
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
        arr = da.coarsen(_mean32, arr, {0: f, 1: f})
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
