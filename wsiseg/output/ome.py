"""Label masks in OME formats, derived from a finished ``<name>.mask.tif``.

Reverse sampling is the expensive part of segmenting a slide; it writes the
TIFF mask (:func:`wsiseg.output.mask.write_label_pyramid`) once, and these
writers turn that file into other containers by streaming it, so extra
formats cost one read of the mask each, never another segmentation:

* :func:`ome_tiff_from_mask` -> ``<name>.mask.ome.tif``: OME-TIFF (BigTIFF,
  OME-XML with the physical pixel size), level 0 in the main IFD and the
  reduced levels as its SubIFDs, the layout of OME-TIFF pyramids (Bio-Formats,
  QuPath, tifffile's ``series[0].levels``). The mask's compressed tiles are
  copied verbatim: same tiles, compression and values, nothing decoded.
* :func:`ome_zarr_from_mask` -> ``<name>.ome.zarr``: OME-Zarr (NGFF 0.4,
  zarr format 2), an *image* that viewers open at its root (napari-ome-zarr,
  vizarr, QuPath, ``wsiseg info``) with the mask as its *label image*::

      <name>.ome.zarr/
          .zattrs          multiscales (c, y, x), omero (RGB), wsiseg
          0, 1, ...        the slide's RGB, (3, y, x) uint8, chunks (3, 512, 512)
          labels/
              .zattrs      labels: ["segmentation"]
              segmentation/
                  .zattrs  multiscales (y, x), image-label (colours, class names)
                  0, 1, ...  the mask, (y, x) uint8, chunks 512 x 512

  Image and labels share their levels, the mask's (halved, rounding up):
  level ``k`` of both has one shape and the same ``scale`` and pixel-centre
  ``translation`` (:func:`wsiseg.slide.convert.ngff_multiscale`, as ``wsiseg
  convert`` writes them), and NGFF 0.4 asks for as many label levels as
  image levels. RGB arrays are stored as ``wsiseg convert`` stores them
  (:func:`wsiseg.slide.convert.rgb_level_array`, fill 255); a level of the
  slide's own size is copied, the others are exact area means of the
  coarsest level already at their resolution (the one just written or a
  slide pyramid level). Labels are copied from the mask (Blosc/zstd, fill 0
  so background chunks are not stored), decoded a band at a time (one chunk
  row, at most :data:`_PIECE_PIXELS` pixels), so memory does not grow with
  the slide.

  Cost and the reduced store: a lossless RGB copy of a whole slide at full
  resolution is several times the slide's own (JPEG) size and as slow to
  write as decoding it all, for a segmentation that is most often viewed
  zoomed out. So the store keeps level 0 up to :data:`MAX_MEGAPIXELS`
  (256 million pixels, e.g. 16k x 16k) and otherwise starts, RGB and labels
  alike, at the first mask level within it (``max_megapixels``; ``wsiseg
  segment --ome-zarr-megapixels``, 0 for no limit). Its scales and
  translations stay in the slide's level-0 frame, and the root's
  ``wsiseg.first_mask_level`` says which mask level is its level 0. The
  full-resolution labels are always in ``<name>.mask.tif``.

Both are written under a hidden temporary sibling and renamed when complete
(:func:`wsiseg.atomic.atomic_output`): a failure leaves no partial output.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import dask.array as da
import numcodecs
import numpy as np
import tifffile
import zarr

from wsiseg import __version__
from wsiseg.atomic import atomic_output
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.mpp import mpp_pair
from wsiseg.output.classes import ClassInfo
from wsiseg.output.mask import MaskWriteStats
from wsiseg.output.overlay import copy_mask_pyramid, mask_pages
from wsiseg.slide.convert import ngff_multiscale, ngff_multiscales_metadata, rgb_level_array, write_rgb_level
from wsiseg.slide.lowres import area_mean
from wsiseg.slide.multiscale import Multiscale
from wsiseg.slide.open import open_slide
from wsiseg.slide.tifffile_reader import tiff_resolution_mpp

__all__ = [
    "FORMATS",
    "FORMAT_SUFFIXES",
    "LABEL_NAME",
    "MAX_MEGAPIXELS",
    "first_kept_level",
    "image_label_metadata",
    "ome_tiff_from_mask",
    "ome_zarr_from_mask",
    "parse_formats",
]

#: Mask formats of ``wsiseg segment --format``, in the order they are written.
#: ``tiff`` (the mask and overlay TIFFs) is always written: the other outputs
#: (overlay, GeoJSON, QC, these formats) are made from it.
FORMATS = ("tiff", "ome-tiff", "ome-zarr")

#: Output kind -> suffix after the slide's name, for the formats beyond ``tiff``.
FORMAT_SUFFIXES = {"ome-tiff": ".mask.ome.tif", "ome-zarr": ".ome.zarr"}

#: Name of the label image in an OME-Zarr output (``labels/<LABEL_NAME>``).
LABEL_NAME = "segmentation"

#: Default largest finest level of an OME-Zarr output, in millions of pixels
#: (16k x 16k): a slide above it is stored from its first mask level within it.
MAX_MEGAPIXELS = 256.0

# Pixels decoded and written per piece of an OME-Zarr label level: 4 Mpx of uint8,
# whatever the slide's size.
_PIECE_PIXELS = 1 << 22

# Source pixels averaged at once for a reduced RGB level: 3 MiB of uint8, 12 MiB
# as float32.
_WINDOW_PIXELS = 1 << 20


def parse_formats(values: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise mask format names: repeated and/or comma-separated, any case.

    Parameters
    ----------
    values : str or iterable of str
        E.g. ``"tiff,ome-zarr"`` or ``["ome-tiff", "ome-zarr"]``.

    Returns
    -------
    tuple of str
        Known formats in :data:`FORMATS` order, each once, ``"tiff"`` always
        included, so equal requests give equal tuples (resume fingerprints).

    Raises
    ------
    ConfigError
        An unknown name; the message lists the allowed ones.

    Examples
    --------
    >>> parse_formats("ome-zarr, OME-TIFF")
    ('tiff', 'ome-tiff', 'ome-zarr')
    """
    items = [values] if isinstance(values, str) else list(values)
    names = [part.strip().lower() for item in items for part in str(item).split(",") if part.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown output format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    return tuple(f for f in FORMATS if f == "tiff" or f in names)


def _mpp(mpp, page: tifffile.TiffPage) -> tuple[float, float] | None:
    """The given MPP, checked, else the mask's own (its resolution tags, read as slides' are)."""
    return mpp_pair(mpp) if mpp is not None else tiff_resolution_mpp(page)


def ome_tiff_from_mask(
    mask_path: str | os.PathLike,
    path: str | os.PathLike,
    *,
    mpp: float | tuple[float, float] | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> MaskWriteStats:
    """Write a mask as a pyramidal OME-TIFF by copying its compressed tiles.

    Parameters
    ----------
    mask_path : path-like
        A mask written by :func:`~wsiseg.output.mask.write_label_pyramid`.
    path : path-like
        The OME-TIFF to write (``*.ome.tif``), under a temporary name first.
    mpp : float or (float, float), optional
        Micrometres per level-0 pixel for the OME-XML ``PhysicalSizeX/Y``;
        default the mask's X/YResolution (none when the mask has none).
    name : str, optional
        OME ``Image`` name; default the output's stem.
    overwrite : bool
        Replace an existing ``path``.

    Returns
    -------
    MaskWriteStats
        Of the copy (no tile is inspected, so no constant tiles are counted).

    Notes
    -----
    Level 0 is the one image of the main IFD chain; levels 1... are its
    SubIFDs with NewSubfileType=1 (reduced image) and their own
    X/YResolution. Memory: one compressed tile at a time.
    """
    if mpp is not None:
        mpp_pair(mpp)  # before any work
    if name is None:
        name = Path(path).name.removesuffix(".tif").removesuffix(".ome").removesuffix(".mask")

    def tags(i: int, page: tifffile.TiffPage, n_levels: int) -> dict:
        if i:
            return {"photometric": "minisblack", "subfiletype": 1, "metadata": None}
        metadata = {"axes": "YX", "Name": name}
        level0_mpp = _mpp(mpp, page)
        if level0_mpp is not None:
            metadata.update(
                PhysicalSizeX=level0_mpp[0], PhysicalSizeXUnit="µm", PhysicalSizeY=level0_mpp[1], PhysicalSizeYUnit="µm"
            )
        # tifffile writes the OME-XML here and reserves the SubIFDs that levels 1... fill
        return {"photometric": "minisblack", "subfiletype": 0, "subifds": n_levels - 1, "metadata": metadata}

    return copy_mask_pyramid(mask_path, path, tags, ome=True, overwrite=overwrite)


def ome_zarr_from_mask(
    mask_path: str | os.PathLike,
    path: str | os.PathLike,
    classes: Iterable[ClassInfo],
    *,
    slide: Multiscale | str | os.PathLike,
    mpp: float | tuple[float, float] | None = None,
    label_name: str = LABEL_NAME,
    chunk: int = 512,
    max_megapixels: float | None = MAX_MEGAPIXELS,
    overwrite: bool = False,
) -> MaskWriteStats:
    """Write a slide's RGB pyramid with its mask as the label image: an OME-Zarr (NGFF 0.4) viewers open.

    Parameters
    ----------
    mask_path, overwrite
        As for :func:`ome_tiff_from_mask`.
    path : path-like
        Output directory (``*.ome.zarr``), written atomically.
    classes : iterable of ClassInfo
        Class table: ``image-label`` colours (opaque RGBA) and ``properties``
        (``class`` names).
    slide : Multiscale or path-like
        The segmented slide (opened with :func:`~wsiseg.slide.open_slide`
        when a path); its level 0 must be the mask's size.
    mpp : float or (float, float), optional
        Micrometres per slide level-0 pixel; default the mask's
        X/YResolution. Without one the scales are unitless downsamples.
    label_name : str
        The label image's group name under ``labels/``.
    chunk : int
        Square chunk edge (>= 16) of the image and label arrays.
    max_megapixels : float, optional
        Largest finest level, in millions of pixels: a larger slide's store
        starts, image and labels alike, at the first mask level within it.
        None or 0 keeps level 0 whatever its size.

    Returns
    -------
    MaskWriteStats
        ``width``, ``height`` and ``levels`` of the store (its level 0 is a
        reduced level of the slide when ``max_megapixels`` dropped levels),
        ``tiles`` the label chunk positions covered (stored or left as fill),
        ``file_bytes`` the store's total size.

    Raises
    ------
    ConfigError
        A bad ``chunk``, ``mpp`` or ``max_megapixels``.
    WsisegError
        The slide's level 0 is not the mask's size.

    Notes
    -----
    The store's levels are the mask's levels (from the first one kept), so
    image level ``k`` and label level ``k`` have one shape and one scale and
    translation. Image levels of the slide's own size are copied; the others
    are exact area means (:func:`~wsiseg.slide.lowres.area_mean`) of the
    coarsest level already at that resolution: the one just written or a
    slide pyramid level. Label levels are the mask's, decoded a band at a
    time.
    """
    if not isinstance(chunk, int) or chunk < 16:
        raise ConfigError(f"chunk must be an integer >= 16, got {chunk!r}")
    if max_megapixels is not None and not max_megapixels >= 0:
        raise ConfigError(f"max megapixels must be >= 0 (0: no limit), got {max_megapixels!r}")
    classes = list(classes)
    if mpp is not None:
        mpp_pair(mpp)  # before any work
    ms = slide if isinstance(slide, Multiscale) else open_slide(slide)
    t0 = time.perf_counter()
    chunks = 0
    compressor = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
    with tifffile.TiffFile(mask_path) as tf:
        pages = mask_pages(tf)
        if pages[0].shape != (ms.height, ms.width):
            raise WsisegError(
                f"the slide is {ms.width}x{ms.height} but the mask is {pages[0].shape[1]}x{pages[0].shape[0]}",
                mask_path,
            )
        level0_mpp = _mpp(mpp, pages[0])
        first = first_kept_level([page.shape for page in pages], max_megapixels)
        pages = pages[first:]
        shapes = [page.shape for page in pages]
        downsamples = [(ms.width / w, ms.height / h) for h, w in shapes]
        name = Path(path).name.removesuffix(".zarr").removesuffix(".ome")
        with atomic_output(path, overwrite=overwrite) as tmp:
            root = zarr.open_group(str(tmp), mode="w-", zarr_format=2)
            _write_image(root, ms, shapes, chunk)
            labels = root.create_group("labels")
            image = labels.create_group(label_name)
            for i, page in enumerate(pages):
                dst = image.create_array(
                    str(i),
                    shape=page.shape,
                    chunks=(chunk, chunk),
                    dtype="uint8",
                    compressors=[compressor],
                    chunk_key_encoding={"name": "v2", "separator": "/"},
                    fill_value=0,
                )
                chunks += _copy_level(zarr.open_array(page.aszarr(), mode="r"), dst, band=_band(page, chunk))
            # metadata last: a reader never sees levels announced before they are written
            image.attrs.update(
                {
                    "multiscales": [
                        ngff_multiscale(
                            downsamples,
                            level0_mpp,
                            name=label_name,
                            method="copied from the wsiseg label mask; every reduced level is level 0 "
                            "subsampled: the level-0 pixel under each level pixel's centre",
                            channel_axis=False,
                            kind="nearest",
                        )
                    ],
                    "image-label": image_label_metadata(classes),
                }
            )
            labels.attrs["labels"] = [label_name]
            root.attrs.update(
                ngff_multiscales_metadata(
                    downsamples,
                    level0_mpp,
                    name=name,
                    method="the slide's levels of the same size copied, the others area means (each pixel the "
                    "exact mean of the slide area it covers) of the coarsest level at or above their resolution",
                )
            )
            root.attrs["wsiseg"] = {
                "version": __version__,
                "mask": Path(mask_path).name,
                "label_image": f"labels/{label_name}",
                # store level k is mask level first_mask_level + k (the slide's level 0 has downsample 1)
                "first_mask_level": first,
                "max_megapixels": max_megapixels or None,
                "source_vendor": ms.vendor,
            }
            file_bytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    return MaskWriteStats(
        path=Path(path),
        width=shapes[0][1],
        height=shapes[0][0],
        levels=len(shapes),
        tiles=chunks,
        constant_tiles=0,
        seconds=time.perf_counter() - t0,
        file_bytes=file_bytes,
    )


def first_kept_level(shapes: list[tuple[int, int]], max_megapixels: float | None) -> int:
    """Index of the finest level with at most ``max_megapixels`` million pixels.

    Parameters
    ----------
    shapes : list of (int, int)
        Level ``(height, width)``, finest first.
    max_megapixels : float, optional
        None or 0: no limit (level 0).

    Returns
    -------
    int
        The last level when none is small enough.

    Examples
    --------
    >>> first_kept_level([(3000, 2000), (1500, 1000), (750, 500)], 2.0)
    1
    """
    if not max_megapixels:
        return 0
    return next((i for i, (h, w) in enumerate(shapes) if h * w <= max_megapixels * 1e6), len(shapes) - 1)


def _write_image(root, ms: Multiscale, shapes: list[tuple[int, int]], chunk: int) -> None:
    """The RGB levels ``0, 1, ...`` of ``shapes``, each from the coarsest source that resolves it."""
    written: list[da.Array] = []
    for i, shape in enumerate(shapes):
        dst = rgb_level_array(root, str(i), shape, chunk)
        # the level just written first: on a tie it is read instead of the slide (zstd, not JPEG)
        src = _coarsest_source([*written[-1:], *(lv.array for lv in ms.levels)], shape)
        if src.shape[:2] == shape:
            write_rgb_level(dst, src, chunk)
        else:
            _write_area_mean(dst, src, chunk)
        written.append(da.from_zarr(dst).transpose(1, 2, 0))


def _coarsest_source(sources: list[da.Array], shape: tuple[int, int]) -> da.Array:
    """The source with the fewest pixels that is not over 1% smaller than ``shape`` on either side.

    The 1% lets a slide level that rounds its size down by a pixel stand in for
    a mask level that rounds up, instead of reading a level four times larger.
    """
    h, w = shape
    fit = [s for s in sources if s.shape[0] * 1.01 >= h and s.shape[1] * 1.01 >= w]
    return min(fit, key=lambda s: s.shape[0] * s.shape[1])


def _write_area_mean(dst, src: da.Array, chunk: int) -> None:
    """Fill a ``(3, h, w)`` zarr array with the area mean of a larger ``(H, W, 3)`` dask level.

    Pieces are whole chunks while the source of one chunk fits
    :data:`_WINDOW_PIXELS`, else fractions of a chunk (a chunk is then
    re-encoded once per piece: only on the small levels of steep ratios).
    """
    _, h, w = dst.shape
    big_h, big_w = src.shape[:2]
    # exact edges: k * H / h is an integer whenever the rational is
    row_edges = np.arange(h + 1) * big_h / h
    col_edges = np.arange(w + 1) * big_w / w
    chunk_source = chunk * chunk * (big_h / h) * (big_w / w)
    split = math.ceil(math.sqrt(chunk_source / _WINDOW_PIXELS))
    if split > 1:
        rows = cols = max(1, chunk // split)
    else:
        rows, cols = chunk, chunk * max(1, int(_WINDOW_PIXELS // chunk_source))
    for y0 in range(0, h, rows):
        y1 = min(y0 + rows, h)
        r0, r1 = math.floor(row_edges[y0]), min(big_h, math.ceil(row_edges[y1]))
        for x0 in range(0, w, cols):
            x1 = min(x0 + cols, w)
            c0, c1 = math.floor(col_edges[x0]), min(big_w, math.ceil(col_edges[x1]))
            window = np.asarray(src[r0:r1, c0:c1].compute())
            mean = area_mean(window, row_edges[y0 : y1 + 1] - r0, col_edges[x0 : x1 + 1] - c0)
            dst[:, y0:y1, x0:x1] = np.moveaxis(np.clip(np.floor(mean + 0.5), 0, 255).astype(np.uint8), -1, 0)


def image_label_metadata(classes: Iterable[ClassInfo]) -> dict:
    """NGFF 0.4 ``image-label`` attributes: a colour and a class name per label value.

    Parameters
    ----------
    classes : iterable of ClassInfo

    Returns
    -------
    dict
        ``{"version": "0.4", "colors": [{"label-value", "rgba"}...],
        "properties": [{"label-value", "class"}...], "source": {"image":
        "../../"}}``, in class-table order; the source is the image two
        groups up, where ``labels/<name>`` sits in an NGFF image.
    """
    classes = list(classes)
    return {
        "version": "0.4",
        "source": {"image": "../../"},
        "colors": [{"label-value": c.value, "rgba": [*c.color, 255]} for c in classes],
        "properties": [{"label-value": c.value, "class": c.name} for c in classes],
    }


def _band(page: tifffile.TiffPage, chunk: int) -> int:
    """Rows per band: whole chunks, at least one mask tile row (each tile decoded once)."""
    return chunk * math.ceil(page.tilelength / chunk)


def _copy_level(src, dst, *, band: int) -> int:
    """Copy a 2-D array into ``dst`` in chunk-aligned pieces; returns the chunk positions covered."""
    height, width = dst.shape
    chunk_h, chunk_w = dst.chunks
    step = chunk_w * max(1, _PIECE_PIXELS // (band * chunk_w))
    for y0 in range(0, height, band):
        for x0 in range(0, width, step):
            dst[y0 : y0 + band, x0 : x0 + step] = src[y0 : y0 + band, x0 : x0 + step]
    return math.ceil(height / chunk_h) * math.ceil(width / chunk_w)
