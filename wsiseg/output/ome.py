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
  zarr format 2) with the mask as the multiscale *label image*
  ``labels/segmentation``: ``(y, x)`` uint8 arrays ``0, 1, ...`` chunked
  512 x 512 (Blosc/zstd, nested ``/`` keys, fill value 0 so background chunks
  are not stored), ``multiscales`` with the scales and pixel-centre
  translations of ``wsiseg convert`` (:func:`wsiseg.slide.convert.ngff_multiscale`),
  and ``image-label`` colours and class names from the class table. The
  ``labels`` group lists it (NGFF 0.4 puts the ``"labels"`` key there). The
  slide's own RGB pyramid is not copied (``wsiseg convert`` does that); the
  root group only says what made the store. Tiles are decoded a band at a
  time (one chunk row, at most :data:`_PIECE_PIXELS` pixels), so memory does
  not grow with the slide.

Both are written under a hidden temporary sibling and renamed when complete
(:func:`wsiseg.atomic.atomic_output`): a failure leaves no partial output.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numcodecs
import tifffile
import zarr

from wsiseg import __version__
from wsiseg.atomic import atomic_output
from wsiseg.errors import ConfigError
from wsiseg.output.classes import ClassInfo
from wsiseg.output.mask import MaskWriteStats, _check_mpp
from wsiseg.output.overlay import copy_mask_pyramid, mask_pages
from wsiseg.slide.convert import ngff_multiscale
from wsiseg.slide.open import tiff_resolution_mpp

__all__ = [
    "FORMATS",
    "FORMAT_SUFFIXES",
    "LABEL_NAME",
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

# Pixels decoded and written per piece of an OME-Zarr level: 4 Mpx of uint8,
# whatever the slide's size.
_PIECE_PIXELS = 1 << 22


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
    return _check_mpp(mpp) if mpp is not None else tiff_resolution_mpp(page)


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
        _check_mpp(mpp)  # before any work
    if name is None:
        name = Path(path).name.removesuffix(".tif").removesuffix(".ome").removesuffix(".mask")

    def tags(i: int, page: tifffile.TiffPage, n_levels: int) -> dict:
        if i:
            return {"photometric": "minisblack", "subfiletype": 1, "metadata": None}
        metadata = {"axes": "YX", "Name": name}
        level0_mpp = _mpp(mpp, page)
        if level0_mpp is not None:
            metadata.update(PhysicalSizeX=level0_mpp[0], PhysicalSizeXUnit="µm",
                            PhysicalSizeY=level0_mpp[1], PhysicalSizeYUnit="µm")
        # tifffile writes the OME-XML here and reserves the SubIFDs that levels 1... fill
        return {"photometric": "minisblack", "subfiletype": 0, "subifds": n_levels - 1, "metadata": metadata}

    return copy_mask_pyramid(mask_path, path, tags, ome=True, overwrite=overwrite)


def ome_zarr_from_mask(
    mask_path: str | os.PathLike,
    path: str | os.PathLike,
    classes: Iterable[ClassInfo],
    *,
    mpp: float | tuple[float, float] | None = None,
    label_name: str = LABEL_NAME,
    chunk: int = 512,
    overwrite: bool = False,
) -> MaskWriteStats:
    """Write a mask as the multiscale label image of an OME-Zarr (NGFF 0.4).

    Parameters
    ----------
    mask_path, overwrite
        As for :func:`ome_tiff_from_mask`.
    path : path-like
        Output directory (``*.ome.zarr``), written atomically.
    classes : iterable of ClassInfo
        Class table: ``image-label`` colours (opaque RGBA) and ``properties``
        (``class`` names).
    mpp : float or (float, float), optional
        Micrometres per level-0 pixel; default the mask's X/YResolution.
        Without one the scales are unitless downsamples.
    label_name : str
        The label image's group name under ``labels/``.
    chunk : int
        Square chunk edge (>= 16).

    Returns
    -------
    MaskWriteStats
        ``tiles`` counts chunk positions covered (stored or left as fill),
        ``file_bytes`` the store's total size.

    Notes
    -----
    Each level is copied in chunk-aligned bands read through tifffile's zarr
    view of the mask page, which decodes only the tiles a band touches.
    """
    if not isinstance(chunk, int) or chunk < 16:
        raise ConfigError(f"chunk must be an integer >= 16, got {chunk!r}")
    classes = list(classes)
    if mpp is not None:
        _check_mpp(mpp)  # before any work
    t0 = time.perf_counter()
    chunks = 0
    compressor = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
    with tifffile.TiffFile(mask_path) as tf:
        pages = mask_pages(tf)
        shapes = [page.shape for page in pages]
        level0_mpp = _mpp(mpp, pages[0])
        with atomic_output(path, overwrite=overwrite) as tmp:
            root = zarr.open_group(str(tmp), mode="w-", zarr_format=2)
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
            h0, w0 = shapes[0]
            image.attrs.update(
                {
                    "multiscales": [
                        ngff_multiscale(
                            [(w0 / w, h0 / h) for h, w in shapes],
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
            root.attrs["wsiseg"] = {"version": __version__, "mask": Path(mask_path).name, "label_image": f"labels/{label_name}"}
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


def image_label_metadata(classes: Iterable[ClassInfo]) -> dict:
    """NGFF 0.4 ``image-label`` attributes: a colour and a class name per label value.

    Parameters
    ----------
    classes : iterable of ClassInfo

    Returns
    -------
    dict
        ``{"version": "0.4", "colors": [{"label-value", "rgba"}...],
        "properties": [{"label-value", "class"}...]}``, in class-table order.
    """
    classes = list(classes)
    return {
        "version": "0.4",
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
