"""Colour overlay pyramids: the label mask as a palette TIFF.

Viewers show a 0/1/2 mask as nearly black. The overlay stores the very same
uint8 labels with PhotometricInterpretation=Palette and a ColorMap built from
the class colours, so viewers that honour TIFF palettes show class colours:
OpenSlide (through libtiff's RGBA interface) returns the palette colours from
``read_region`` (checked by the tests), and tifffile exposes the ColorMap.
Because the tiles are identical to the mask's, constant tiles cost nothing and
:func:`overlay_from_mask` can copy the mask's compressed tiles without
decoding them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import tifffile

from wsiseg.atomic import atomic_output
from wsiseg.errors import WsisegError
from wsiseg.output.classes import ClassInfo, class_colormap
from wsiseg.output.mask import SOFTWARE, MaskWriteStats, TileSource, write_pyramid

__all__ = ["copy_mask_pyramid", "mask_pages", "overlay_from_mask", "write_overlay_pyramid"]

_DESCRIPTION = "wsiseg class overlay: uint8 class values with a palette of the class colours"


def write_overlay_pyramid(
    path: str | os.PathLike,
    width: int,
    height: int,
    tile_source: TileSource,
    classes: Iterable[ClassInfo],
    *,
    tile: int = 512,
    mpp: float | tuple[float, float] | None = None,
    compression: str = "deflate",
    compression_level: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    workers: int = 0,
) -> MaskWriteStats:
    """Write a palette-colour overlay pyramid from a tile source.

    Same geometry, layout and arguments as
    :func:`wsiseg.output.mask.write_label_pyramid`; the file differs only in
    its photometric interpretation (palette) and ColorMap (the class colours;
    values without a class are black).

    Parameters
    ----------
    path, width, height, tile_source
        As for :func:`~wsiseg.output.mask.write_label_pyramid`.
    classes : iterable of ClassInfo
        Class table giving each label's colour.
    tile, mpp, compression, compression_level, overwrite, progress, workers
        As for :func:`~wsiseg.output.mask.write_label_pyramid`.

    Returns
    -------
    MaskWriteStats

    See Also
    --------
    overlay_from_mask : the same file from an existing mask, without
        re-evaluating the source.
    """
    return write_pyramid(
        path,
        width,
        height,
        tile_source,
        tile=tile,
        mpp=mpp,
        compression=compression,
        compression_level=compression_level,
        overwrite=overwrite,
        progress=progress,
        workers=workers,
        description=_DESCRIPTION,
        photometric="palette",
        colormap=class_colormap(classes),
    )


def _raw_tiles(fh, page: tifffile.TiffPage) -> Iterator[bytes]:
    for offset, count in zip(page.dataoffsets, page.databytecounts):
        if count == 0:
            yield b""  # sparse tile stays sparse
            continue
        fh.seek(offset)
        yield fh.read(count)


def overlay_from_mask(
    mask_path: str | os.PathLike,
    path: str | os.PathLike,
    classes: Iterable[ClassInfo],
    *,
    overwrite: bool = False,
) -> MaskWriteStats:
    """Write the palette overlay of a mask by copying its compressed tiles.

    No tile is decoded or re-encoded: the overlay's tiles are byte-identical
    to the mask's, only the tags differ. This is the cheap way to get both
    files when the tile source is expensive (the segmenter writes the mask,
    then this).

    Parameters
    ----------
    mask_path : path-like
        A mask written by :func:`~wsiseg.output.mask.write_label_pyramid`
        (any single-channel uint8 tiled pyramid in the main IFD chain).
    path : path-like
        Output overlay, written atomically.
    classes : iterable of ClassInfo
        Class table giving each label's colour.
    overwrite : bool
        Replace an existing ``path``.

    Returns
    -------
    MaskWriteStats
        ``constant_tiles`` is 0: tiles are copied, not inspected.
    """
    colormap = class_colormap(classes)

    def tags(i: int, page: tifffile.TiffPage, n_levels: int) -> dict:
        return {
            "photometric": "palette",
            "colormap": colormap,
            "subfiletype": page.subfiletype,
            "description": _DESCRIPTION if i == 0 else None,
            "metadata": None,
        }

    return copy_mask_pyramid(mask_path, path, tags, overwrite=overwrite)


def mask_pages(tf: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    """The levels of an open label mask: its main-chain pages, level 0 first.

    Raises
    ------
    WsisegError
        A page is not tiled, single-channel uint8.
    """
    pages = list(tf.pages)
    for page in pages:
        if page.dtype != "uint8" or page.samplesperpixel != 1 or not page.is_tiled:
            raise WsisegError("not a tiled single-channel uint8 label mask", tf.filehandle.path)
    return pages


def copy_mask_pyramid(
    mask_path: str | os.PathLike,
    path: str | os.PathLike,
    tags: Callable[[int, tifffile.TiffPage, int], dict],
    *,
    ome: bool = False,
    overwrite: bool = False,
) -> MaskWriteStats:
    """Copy a mask's levels into a new BigTIFF, compressed tiles verbatim, with new tags.

    Geometry, tiles, compression and X/YResolution are the mask's; everything
    else comes from ``tags``.

    Parameters
    ----------
    mask_path : path-like
        A mask as :func:`mask_pages` accepts.
    path : path-like
        Output file, written atomically.
    tags : callable
        ``tags(index, page, n_levels)`` -> extra keyword arguments of
        :meth:`tifffile.TiffWriter.write` for that level (photometric,
        subfiletype, subifds, description, metadata...).
    ome : bool
        Let tifffile write OME-XML (``TiffWriter(ome=True)``).
    overwrite : bool
        Replace an existing ``path``.

    Returns
    -------
    MaskWriteStats
    """
    t0 = time.perf_counter()
    tiles = 0
    with tifffile.TiffFile(mask_path) as tf:
        pages = mask_pages(tf)
        with atomic_output(path, overwrite=overwrite) as tmp:
            with tifffile.TiffWriter(tmp, bigtiff=True, ome=ome) as tw:
                for i, page in enumerate(pages):
                    extra = {}
                    if "XResolution" in page.tags and "YResolution" in page.tags:
                        # copy the rationals verbatim so mpp round-trips exactly
                        extra = {
                            "resolution": (page.tags["XResolution"].value, page.tags["YResolution"].value),
                            "resolutionunit": page.resolutionunit,
                        }
                    tw.write(
                        _raw_tiles(tf.filehandle, page),
                        shape=page.shape,
                        dtype=page.dtype,
                        tile=(page.tilelength, page.tilewidth),
                        compression=page.compression,
                        predictor=page.predictor if page.predictor != 1 else None,
                        software=SOFTWARE,
                        **extra,
                        **tags(i, page, len(pages)),
                    )
                    tiles += len(page.dataoffsets)
            file_bytes = tmp.stat().st_size
    return MaskWriteStats(
        path=Path(path),
        width=pages[0].imagewidth,
        height=pages[0].imagelength,
        levels=len(pages),
        tiles=tiles,
        constant_tiles=0,
        seconds=time.perf_counter() - t0,
        file_bytes=file_bytes,
    )
