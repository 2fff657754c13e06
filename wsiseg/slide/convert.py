"""Convert any slide to an OME-Zarr (NGFF 0.4) multiscale RGB image.

Layout written (zarr format 2, as NGFF 0.4 requires):

* one group with ``multiscales`` (and ``omero``) attributes;
* arrays ``0``, ``1``, ... of shape ``(3, H, W)`` uint8 with axes
  ``c`` (type ``channel``), ``y``, ``x`` (type ``space``). NGFF 0.4 requires
  the channel axis *before* the space axes, so RGB is stored planar;
* chunks ``(3, chunk, chunk)`` (one chunk holds a whole RGB tile), Blosc/zstd,
  nested ``/`` chunk keys, fill value 255 (all-white chunks are not stored).

Coordinate transformations. Per level, ``scale`` is the pixel size: MPP times
the level's downsample, in ``micrometer`` when the MPP is known, else the
bare downsample (unitless, as the spec asks). NGFF puts the continuous origin
at the *centre* of pixel 0 (NGFF "Coordinates and transformations": "The pixel
center is the origin of the continuous coordinate system"; 0.4 itself is
silent). In :mod:`wsiseg.sampling.coords` a level with downsample ``s`` covers
level 0 edge to edge, so its pixel ``j`` is centred at level-0 pixel index
``s * j + (s - 1) / 2``: levels other than 0 therefore get a ``translation``
of ``(s - 1) / 2`` level-0 pixels (in the scale's units). Level 0 has none.

Memory stays bounded: each level is written piece by piece (one chunk row
high, at most 16 Mpixel), each piece aligned to whole output chunks. The
output is written to a hidden sibling ``.NAME.tmp-<pid>`` and renamed when
complete; a failure removes it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import dask.array as da
import numpy as np

from wsiseg import __version__
from wsiseg.atomic import atomic_output
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.slide.multiscale import Multiscale
from wsiseg.slide.open import open_slide

__all__ = ["convert_to_ngff", "ngff_multiscale", "ngff_multiscales_metadata", "rgb_level_array", "write_rgb_level"]

# Pixels per written piece: bounds memory (16 Mpx = 48 MiB of RGB) while
# giving dask enough source tiles to decode in parallel.
_PIECE_PIXELS = 1 << 24


def convert_to_ngff(
    source: str | os.PathLike | Multiscale,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    chunk: int = 512,
    ngff_version: str = "0.4",
    mpp: float | tuple[float, float] | None = None,
    progress: bool | None = None,
) -> Path:
    """Stream a slide into an OME-Zarr NGFF 0.4 multiscale RGB image.

    Parameters
    ----------
    source : str, os.PathLike or Multiscale
        A slide path (opened with :func:`~wsiseg.slide.open_slide`) or an
        opened slide.
    out : str or os.PathLike
        Output directory (conventionally ``*.zarr``).
    overwrite : bool
        Replace ``out`` if it exists; otherwise an existing ``out`` is an
        error.
    chunk : int
        Square chunk size in pixels (>= 16).
    ngff_version : str
        Only ``"0.4"`` is written.
    mpp : float or (float, float), optional
        MPP override when ``source`` is a path.
    progress : bool, optional
        Show a progress bar; ``None`` shows it only on a terminal.

    Returns
    -------
    pathlib.Path
        ``out``.

    Notes
    -----
    The source's own pyramid levels are copied, not recomputed. A source with
    a single level gets extra levels (2x2 mean, read back from the level just
    written) until a level fits in one chunk. Associated images (label,
    macro) and vendor properties are never copied: they can identify
    patients.
    """
    if ngff_version != "0.4":
        raise ConfigError(f"only NGFF 0.4 output is supported, got --ngff {ngff_version}")
    if not isinstance(chunk, (int, np.integer)) or chunk < 16:
        raise ConfigError(f"--chunk must be an integer >= 16, got {chunk!r}")
    chunk = int(chunk)
    ms = source if isinstance(source, Multiscale) else open_slide(source, mpp=mpp)
    out = Path(out)
    _check_output(out, Path(ms.path), overwrite)
    try:
        with atomic_output(out, overwrite=overwrite) as tmp:
            _write_ngff(ms, tmp, chunk=chunk, name=out.stem, progress=progress)
    except OSError as exc:
        raise WsisegError(f"cannot write OME-Zarr: {exc.strerror or exc}", out) from exc
    return out


def _check_output(out: Path, src: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise WsisegError("output already exists (use --overwrite to replace it)", out)
    if out.exists() and not out.is_dir():
        raise WsisegError("output exists and is not a directory; refusing to replace it", out)
    if not out.parent.is_dir():
        raise WsisegError("the output's parent directory does not exist", out)
    src_abs, out_abs = src.resolve(), out.resolve()
    if out_abs == src_abs or src_abs in out_abs.parents or out_abs in src_abs.parents:
        raise WsisegError("output would overwrite or nest inside the source slide", out)


def _write_ngff(ms: Multiscale, path: Path, *, chunk: int, name: str, progress: bool | None) -> None:
    import zarr
    from tqdm.auto import tqdm

    group = zarr.open_group(str(path), mode="w-", zarr_format=2)
    shapes = [(lv.height, lv.width) for lv in ms.levels]
    computed = 0
    if len(shapes) == 1:
        h, w = shapes[0]
        while max(h, w) > chunk and min(h, w) >= 2:
            h, w = h // 2, w // 2
            shapes.append((h, w))
            computed += 1
    total = sum(math.ceil(h / chunk) * math.ceil(w / chunk) for h, w in shapes)
    with tqdm(
        total=total,
        unit="chunk",
        desc=f"convert {Path(ms.path).name}",
        disable=None if progress is None else not progress,
    ) as bar:
        previous = None
        for i, (h, w) in enumerate(shapes):
            zarr_arr = rgb_level_array(group, str(i), (h, w), chunk)
            if i < len(ms.levels):
                src = ms.levels[i].array
            else:
                # Downsample from the level just written (bounded, no re-read of level 0).
                src = _mean_downsample_2x(da.from_zarr(previous).transpose(1, 2, 0))
            write_rgb_level(zarr_arr, src, chunk, bar)
            previous = zarr_arr
    h0, w0 = shapes[0]
    downsamples = [(w0 / w, h0 / h) for h, w in shapes]
    group.attrs.update(
        ngff_multiscales_metadata(
            downsamples,
            ms.mpp,
            name=name,
            method="copied from the source pyramid"
            + (f"; {computed} level(s) added by 2x2 mean (dask.array.coarsen)" if computed else ""),
        )
    )
    group.attrs["wsiseg"] = {
        "version": __version__,
        "source_vendor": ms.vendor,
        "source_reader": ms.reader,
        "mpp_source": ms.mpp_source,
        "source_levels": len(ms.levels),
    }


def _mean_downsample_2x(arr: da.Array) -> da.Array:
    """``(H, W, 3)`` uint8 -> ``(H // 2, W // 2, 3)`` by 2x2 mean (odd edge row/column dropped)."""
    mean = da.coarsen(np.mean, arr.astype(np.float32), {0: 2, 1: 2}, trim_excess=True)
    return da.floor(mean + 0.5).astype(np.uint8)


def rgb_level_array(group, path: str, shape: tuple[int, int], chunk: int):
    """Create one level of an RGB pyramid in a zarr (format 2) group, as ``wsiseg convert`` stores it.

    Parameters
    ----------
    group : zarr.Group
        The image group.
    path : str
        The array's name (the level's dataset path).
    shape : (int, int)
        ``(height, width)`` in pixels.
    chunk : int
        Square chunk edge.

    Returns
    -------
    zarr.Array
        ``(3, height, width)`` uint8, chunks ``(3, chunk, chunk)``, Blosc/zstd,
        nested ``/`` keys, fill value 255 (all-white chunks are not stored).
    """
    import numcodecs

    h, w = shape
    return group.create_array(
        path,
        shape=(3, h, w),
        chunks=(3, chunk, chunk),
        dtype="uint8",
        compressors=[numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)],
        chunk_key_encoding={"name": "v2", "separator": "/"},
        fill_value=255,
    )


def write_rgb_level(zarr_arr, src: da.Array, chunk: int, bar=None) -> None:
    """Copy one ``(H, W, 3)`` dask level into a ``(3, H, W)`` zarr array piece by piece.

    Parameters
    ----------
    zarr_arr : zarr.Array
        From :func:`rgb_level_array`, of the same height and width as ``src``.
    src : dask.array.Array
        ``(H, W, 3)`` uint8.
    chunk : int
        The array's chunk edge: pieces are whole chunks.
    bar : tqdm, optional
        Advanced by the chunks written.

    Notes
    -----
    Pieces are one band of source tiles high (whole chunks) and at most 16
    Mpx, so memory is bounded and each source tile is decoded once.
    """
    _, h, w = zarr_arr.shape
    if src.shape[:2] != (h, w):
        raise WsisegError(f"internal size mismatch {src.shape[:2]} != {(h, w)}")
    # Bands as tall as a source tile row (rounded up to whole output chunks)
    # so that each source tile is decoded once, not once per output chunk row.
    band = chunk * max(1, min(-(-int(src.chunksize[0]) // chunk), _PIECE_PIXELS // (chunk * chunk)))
    per_piece = max(1, _PIECE_PIXELS // (band * chunk))
    step_x = chunk * per_piece
    for y0 in range(0, h, band):
        y1 = min(y0 + band, h)
        for x0 in range(0, w, step_x):
            x1 = min(x0 + step_x, w)
            _write_piece(zarr_arr, src, y0, y1, x0, x1)
            if bar is not None:
                bar.update(math.ceil((x1 - x0) / chunk))


def _write_piece(zarr_arr, src: da.Array, y0: int, y1: int, x0: int, x1: int) -> None:
    """Compute one chunk-aligned window of ``src`` and store it (separate for tests)."""
    block = np.asarray(src[y0:y1, x0:x1].compute())
    zarr_arr[:, y0:y1, x0:x1] = np.moveaxis(block, -1, 0)


def ngff_multiscale(
    downsamples: list[tuple[float, float]],
    mpp: tuple[float, float] | None,
    *,
    name: str = "image",
    method: str = "",
    channel_axis: bool = True,
    kind: str = "mean",
) -> dict:
    """One NGFF 0.4 ``multiscales`` entry: axes and per-level scale/translation.

    Parameters
    ----------
    downsamples : list of (float, float)
        Per dataset ``(x, y)`` level-0 pixels per dataset pixel, finest
        first. The first need not be ``(1, 1)``: a store that starts at a
        reduced level (:mod:`wsiseg.output.ome`) gets its scale and
        translation in the source's level-0 frame too.
    mpp : (float, float) or None
        Micrometres per source level-0 pixel; None writes unitless scales.
    name : str
        Image name.
    method : str
        How the levels were made (free text in ``metadata``).
    channel_axis : bool
        Axes ``(c, y, x)`` (an RGB image); False gives ``(y, x)`` (a label
        image, :mod:`wsiseg.output.ome`).
    kind : str
        The ``type`` of downscaling.

    Returns
    -------
    dict
        The entry; level ``k`` is dataset path ``"k"``.
    """
    px, py = mpp if mpp is not None else (1.0, 1.0)
    space = {"type": "space"}
    if mpp is not None:
        space["unit"] = "micrometer"
    # the channel axis is neither scaled nor shifted
    c_scale, c_shift = ([1.0], [0.0]) if channel_axis else ([], [])
    datasets = []
    for i, (sx, sy) in enumerate(downsamples):
        transforms = [{"type": "scale", "scale": [*c_scale, py * sy, px * sx]}]
        if i > 0 or (sx, sy) != (1.0, 1.0):  # a store may start at a reduced level (wsiseg.output.ome)
            # Pixel centres: level pixel j sits at level-0 index s*j + (s-1)/2.
            transforms.append({"type": "translation", "translation": [*c_shift, py * (sy - 1) / 2, px * (sx - 1) / 2]})
        datasets.append({"path": str(i), "coordinateTransformations": transforms})
    axes = [{"name": "y", **space}, {"name": "x", **space}]
    if channel_axis:
        axes.insert(0, {"name": "c", "type": "channel"})
    return {
        "version": "0.4",
        "name": name,
        "axes": axes,
        "datasets": datasets,
        "type": kind,
        "metadata": {"method": method, "writer": f"wsiseg {__version__}"},
    }


def ngff_multiscales_metadata(
    downsamples: list[tuple[float, float]],
    mpp: tuple[float, float] | None,
    *,
    name: str = "image",
    method: str = "",
) -> dict:
    """NGFF 0.4 ``multiscales`` + ``omero`` attributes for a ``(c, y, x)`` RGB pyramid.

    Parameters
    ----------
    downsamples, mpp, name, method
        As for :func:`ngff_multiscale`.

    Returns
    -------
    dict
        Group attributes (``multiscales``, ``omero``).
    """
    multiscale = ngff_multiscale(downsamples, mpp, name=name, method=method)
    channels = [
        {
            "label": label,
            "color": color,
            "active": True,
            "coefficient": 1,
            "family": "linear",
            "inverted": False,
            "window": {"start": 0, "end": 255, "min": 0, "max": 255},
        }
        for label, color in (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))
    ]
    omero = {
        "name": name,
        "version": "0.4",
        "channels": channels,
        "rdefs": {"model": "color", "defaultT": 0, "defaultZ": 0},
    }
    return {"multiscales": [multiscale], "omero": omero}
