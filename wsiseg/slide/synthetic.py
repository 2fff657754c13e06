"""Realistic large test slides: a real image region mirror-tiled to any size.

The slide is a pyramidal, tiled, JPEG-compressed BigTIFF laid out like the
files scanners write (Aperio-style JPEG tiles: PhotometricInterpretation RGB,
YCbCr 4:2:0 inside each JPEG stream; reduced levels in the main IFD chain with
NewSubfileType=1, the layout OpenSlide reads as ``generic-tiff``).

Content
-------
Level 0 is the source region reflected at its edges and repeated (``numpy``
``"symmetric"`` padding extended forever), so there are no seams. The source
is centre-cropped so that its period is divisible by the coarsest downsample;
then level ``k`` is *exactly* the ``2**k`` box average of level 0 (up to JPEG
and rounding) although it is built from a box-downsampled copy of the source
period, never by re-reading level 0. Memory is bounded by the source period
and one batch of tiles, whatever the slide size.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import imagecodecs
import numpy as np
import tifffile

from wsiseg.errors import SlideError, WsisegError

__all__ = ["write_synthetic_slide", "pyramid_shapes", "load_source_region"]

_BATCH = 64  # tiles encoded per batch: bounds memory while keeping threads busy


def pyramid_shapes(width: int, height: int, tile: int, levels: int | None = None) -> list[tuple[int, int]]:
    """Level sizes ``(width, height)`` of a power-of-two pyramid.

    Level ``k`` has ``ceil(W / 2**k) x ceil(H / 2**k)`` pixels (its last pixel
    may overhang level 0). With ``levels=None``, levels are added until one
    fits in a single tile.
    """
    if width < 1 or height < 1:
        raise WsisegError(f"slide size must be positive, got {width}x{height}")
    if levels is None:
        levels = 1
        while max(math.ceil(width / 2 ** (levels - 1)), math.ceil(height / 2 ** (levels - 1))) > tile:
            levels += 1
    if levels < 1:
        raise WsisegError(f"levels must be >= 1, got {levels}")
    return [(math.ceil(width / 2**k), math.ceil(height / 2**k)) for k in range(levels)]


def load_source_region(source: str | os.PathLike, max_size: int = 4096) -> np.ndarray:
    """Read a real RGB region to tile from: a slide's level 0 or an image file.

    Parameters
    ----------
    source : path
        A TIFF-family slide (SVS, generic/pyramidal TIFF; read with tifffile,
        only the needed region is decoded) or any image Pillow reads.
    max_size : int
        The centre region of at most ``max_size x max_size`` pixels is kept.

    Returns
    -------
    numpy.ndarray
        ``(h, w, 3)`` uint8 RGB (alpha dropped, grey replicated).
    """
    path = Path(source)
    if not path.is_file():
        raise SlideError("source image not found", path)
    try:
        with tifffile.TiffFile(path) as tif:
            import zarr  # local: only the TIFF path needs it

            series = tif.series[0]
            if not series.axes.startswith("YX"):
                raise SlideError(f"source series must be a YX(S) image, got axes {series.axes!r}", path)
            z = zarr.open(series.aszarr(level=0), mode="r")
            assert isinstance(z, zarr.Array)  # one level of one series: an array, never a group
            h, w = z.shape[:2]
            y0, x0 = max(0, (h - max_size) // 2), max(0, (w - max_size) // 2)
            arr = np.asarray(z[y0 : y0 + max_size, x0 : x0 + max_size])
    except tifffile.TiffFileError:
        from PIL import Image

        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB"))
        except OSError as exc:
            raise SlideError(f"cannot read source image: {exc}", path) from exc
        h, w = arr.shape[:2]
        y0, x0 = max(0, (h - max_size) // 2), max(0, (w - max_size) // 2)
        arr = arr[y0 : y0 + max_size, x0 : x0 + max_size]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise SlideError(f"source must be 8-bit RGB(A), got shape {arr.shape} {arr.dtype}", path)
    return np.ascontiguousarray(arr[..., :3])


def _period_axis(n: int, align: int) -> tuple[int, int]:
    """Cropped source length and period length along one axis.

    The period ``2 * n_src`` (or a multiple of it) must be divisible by
    ``align`` so that box-downsampling the period by any level factor equals
    downsampling the tiled level 0.
    """
    if n >= align:
        n_src = (n // align) * align
        return n_src, 2 * n_src
    n_src = 2 ** int(math.floor(math.log2(n)))  # power of two: the period divides or is divided by align
    return n_src, max(2 * n_src, align)


def _period_images(src: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """The repeating unit of every level, level 0 first (uint8)."""
    align = 2 ** (n_levels - 1)
    (hs, th), (ws, tw) = _period_axis(src.shape[0], align), _period_axis(src.shape[1], align)
    y0, x0 = (src.shape[0] - hs) // 2, (src.shape[1] - ws) // 2
    crop = src[y0 : y0 + hs, x0 : x0 + ws]
    # "symmetric" padding = reflection with the edge pixel repeated: no seams
    period = np.pad(crop, ((0, th - hs), (0, tw - ws), (0, 0)), mode="symmetric")
    out = [period]
    acc = period.astype(np.float32)
    for _ in range(1, n_levels):
        # 2x2 box mean of the previous (float) level = 2**k box mean of level 0
        acc = (acc[0::2, 0::2] + acc[1::2, 0::2] + acc[0::2, 1::2] + acc[1::2, 1::2]) * 0.25
        out.append(np.rint(acc).astype(np.uint8))
    return out


def _encode(tile: np.ndarray, quality: int) -> bytes:
    # YCbCr 4:2:0 inside the JPEG stream, as Aperio and most scanners write it
    # imagecodecs' stub says bytes | bytearray; without out= it returns bytes
    return imagecodecs.jpeg8_encode(  # type: ignore[return-value]
        tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling="420"
    )


def _compose_encode(tex: np.ndarray, alpha: np.ndarray, glass: np.ndarray, quality: int) -> bytes:
    """Blend a texture tile with glass by a coverage tile (``(h, w)`` in [0, 1]) and encode it."""
    a = alpha[..., None]
    return _encode(np.rint(tex * a + glass * (1 - a)).astype(np.uint8), quality)


def _tiles(
    period: np.ndarray,
    shape: tuple[int, int],
    tile: int,
    quality: int,
    pool: ThreadPoolExecutor,
    coverage: Callable[[int, int, int, int], float | np.ndarray] | None = None,
    glass: np.ndarray | None = None,
) -> Iterator[bytes]:
    """Encoded tiles of one level in TIFF order (row-major), in bounded batches.

    With ``coverage`` (``f(y0, x0, h, w)`` of the level: 0.0 all glass, 1.0
    all tissue, else a per-pixel array), tiles are the texture blended with
    the ``glass`` colour; all-glass tiles are encoded once and reused.
    """
    # wrap-padding by one tile lets every tile be a plain slice, edge tiles included
    ext = np.pad(period, ((0, tile), (0, tile), (0, 0)), mode="wrap")
    ph, pw = period.shape[:2]
    width, height = shape
    coords = [(ty * tile, tx * tile) for ty in range(math.ceil(height / tile)) for tx in range(math.ceil(width / tile))]
    glass_tile = None if glass is None else np.broadcast_to(glass.astype(np.float32), (tile, tile, 3))
    glass_bytes = None if glass_tile is None else _encode(np.ascontiguousarray(glass_tile, dtype=np.uint8), quality)
    for b in range(0, len(coords), _BATCH):
        texture = [ext[y % ph : y % ph + tile, x % pw : x % pw + tile] for y, x in coords[b : b + _BATCH]]
        if coverage is None or glass_tile is None:
            yield from pool.map(_encode, [np.ascontiguousarray(t) for t in texture], [quality] * len(texture))
            continue
        alphas = [coverage(y, x, tile, tile) for y, x in coords[b : b + _BATCH]]
        jobs = [
            None
            if isinstance(a, float) and a == 0.0
            else pool.submit(_encode, np.ascontiguousarray(t), quality)
            if isinstance(a, float)
            else pool.submit(_compose_encode, t, a, glass_tile, quality)
            for t, a in zip(texture, alphas)
        ]
        for job in jobs:
            yield glass_bytes if job is None else job.result()  # type: ignore[misc]


def write_synthetic_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    source: str | os.PathLike | np.ndarray,
    tile: int = 256,
    quality: int = 90,
    mpp: float = 0.5,
    levels: int | None = None,
    *,
    max_source: int = 4096,
    workers: int | None = None,
    coverage=None,
    glass: tuple[int, int, int] = (240, 239, 241),
    description: str | None = None,
) -> Path:
    """Write a pyramidal JPEG-tiled BigTIFF of any size from a real image region.

    Parameters
    ----------
    path : path
        Output file (``.tiff``); overwritten.
    width, height : int
        Level-0 size in pixels.
    source : path or numpy.ndarray
        Real slide or RGB image whose centre region is mirror-tiled (see
        :func:`load_source_region`), or that region itself (``(h, w, 3)``
        uint8).
    tile : int
        Tile edge in pixels, a multiple of 16 (JPEG 4:2:0 blocks).
    quality : int
        JPEG quality (1-100).
    mpp : float
        Micrometres per level-0 pixel, written as XResolution/YResolution in
        pixels per centimetre (scaled per level).
    levels : int, optional
        Number of pyramid levels (downsample 2 each); by default until a level
        fits in one tile.
    max_source : int
        Largest source region edge read.
    workers : int, optional
        JPEG encoding threads (default: CPU count).
    coverage : wsiseg.bench.layouts.Coverage, optional
        Where the tissue is: the mirror-tiled texture is blended with the
        ``glass`` colour by ``coverage.level(k)`` on every level (a layout
        slide, :func:`wsiseg.bench.layouts.write_layout_slide`); default
        tissue everywhere.
    glass : (int, int, int)
        RGB of the glass, with ``coverage``.
    description : str, optional
        ImageDescription of level 0 (default ``wsiseg synthetic slide WxH``).

    Returns
    -------
    pathlib.Path
        ``path``.

    Notes
    -----
    Writing streams tile by tile, so memory stays bounded by the source
    period and one batch of tiles even for 100k x 100k slides.
    """
    if tile < 16 or tile % 16:
        raise WsisegError(f"tile must be a positive multiple of 16, got {tile}")
    if not 1 <= quality <= 100:
        raise WsisegError(f"JPEG quality must be in 1..100, got {quality}")
    if mpp <= 0:
        raise WsisegError(f"mpp must be positive, got {mpp}")
    shapes = pyramid_shapes(int(width), int(height), tile, levels)
    region = source if isinstance(source, np.ndarray) else load_source_region(source, max_source)
    periods = _period_images(region, len(shapes))
    glass_rgb = None if coverage is None else np.asarray(glass, dtype=np.uint8)
    path = Path(path)
    ppcm = 1e4 / mpp  # pixels per centimetre at level 0
    with (
        ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool,
        tifffile.TiffWriter(path, bigtiff=True) as tif,
    ):
        for k, ((w, h), period) in enumerate(zip(shapes, periods)):
            tif.write(
                _tiles(period, (w, h), tile, quality, pool, None if coverage is None else coverage.level(k), glass_rgb),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                # tifffile tags the page PhotometricInterpretation=YCbCr with
                # YCbCrSubSampling (2, 2) to match the streams (see _encode)
                subsampling=(2, 2),
                resolution=(ppcm * w / width, ppcm * h / height),
                resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0,
                description=(description or f"wsiseg synthetic slide {width}x{height}") if k == 0 else None,
                software="wsiseg",
                metadata=None,
            )
    return path
