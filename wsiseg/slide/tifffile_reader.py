"""The ``tifffile`` reader: TIFF, BigTIFF, Aperio SVS, generic tiled pyramids, OME-TIFF.

Each level is tifffile's zarr store over the TIFF pages, opened with zarr and
wrapped as a dask array with one chunk per TIFF tile, so only touched tiles
are ever decoded. A valid TIFF this reader cannot decode as RGB raises
:class:`NotReadable` (:func:`~wsiseg.slide.open.open_slide` then tries
OpenSlide); data that is not 8-bit brightfield, and every broken file, raise
:class:`~wsiseg.errors.SlideError`.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from wsiseg.errors import SlideError, one_line
from wsiseg.slide.common import (
    UNIT_TO_UM,
    as_rgb,
    build_multiscale,
    check_dimensions,
    check_tiles,
    file_token,
    fmt_key,
    openslide_mpp,
    openslide_properties,
    resolve_mpp,
    valid_mpp,
)
from wsiseg.slide.multiscale import Multiscale
from wsiseg.slide.tiff_checks import capture_tifffile_log, check_tiff_extent, raise_if_corrupt, tiff_int

__all__ = ["NotReadable", "open_tiff", "tiff_resolution_mpp"]


_ASSOCIATED_NAMES = {"label", "macro", "thumbnail", "overview", "barcode", "map"}
# Missing (sparse) TIFF tiles read as white, like OpenSlide's transparent background.
_FILL = 255


class NotReadable(Exception):
    """The TIFF is valid but not RGB-readable by the tifffile path (try OpenSlide)."""


# ---------------------------------------------------------------------------
# TIFF family through tifffile's zarr store


class _TiffLevelSource:
    """Array-like view of one pyramid level of a TIFF series, for ``da.from_array``.

    Reads go through tifffile's zarr store opened with zarr, which decodes
    only the tiles a slice touches. The object pickles as ``(path, series,
    level)`` and reopens the file on first use, so levels can be shipped to
    dask.distributed workers (tifffile's store holds an open file handle and
    cannot be pickled itself).
    """

    def __init__(self, path: str, series: int, level: int, shape, dtype, zarray=None):
        self.path = path
        self.series = series
        self.level = level
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self._zarray = zarray
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_zarray"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _array(self):
        if self._zarray is None:
            with self._lock:
                if self._zarray is None:
                    import tifffile
                    import zarr

                    tif = tifffile.TiffFile(self.path)
                    store = tif.series[self.series].aszarr(level=self.level, fillvalue=_FILL)
                    self._zarray = zarr.open_array(store, mode="r")
        return self._zarray

    def __getitem__(self, key):
        try:
            return np.asarray(self._array()[key])
        except Exception as exc:
            raise SlideError(
                f"cannot decode level {self.level} region {fmt_key(key)}: {type(exc).__name__}: {exc}", self.path
            ) from exc


@dataclass(frozen=True)
class _TiffLayout:
    """How a TIFF series maps to RGB: which axes, whether gray, which alpha."""

    transpose: tuple[int, ...] | None
    gray: bool
    alpha: str | None


def _tiff_layout(series, page, ome_xml: str | None) -> _TiffLayout:
    """Validate a series' axes/photometric and say how to turn it into RGB.

    Raises SlideError (via the caller) for non-brightfield data, and
    NotReadable for valid TIFFs this path cannot decode as RGB.
    """
    from tifffile import PHOTOMETRIC

    axes = series.axes
    shape = series.shape
    dtype = np.dtype(series.dtype)
    if dtype != np.uint8:
        bits = dtype.itemsize * 8
        raise _Refused(
            f"{bits}-bit {dtype.name} samples; only 8-bit brightfield RGB slides are supported"
            if dtype.kind in "uif"
            else f"unsupported sample type {dtype}"
        )
    if ome_xml and re.search(
        r'(IlluminationType="Epifluorescence"|ContrastMethod="Fluorescence"|AcquisitionMode="[^"]*Fluorescence)',
        ome_xml,
    ):
        raise _Refused("OME metadata describes a fluorescence image; only brightfield slides are supported")
    has_samples = "S" in axes and shape[axes.index("S")] > 1
    # With interleaved samples, a C axis > 1 is a stack of RGB planes.
    extra = {a: n for a, n in zip(axes, shape) if (a not in "YXSC" or (a == "C" and has_samples)) and n > 1}
    if extra:
        desc = ", ".join(f"{a}={n}" for a, n in extra.items())
        raise _Refused(
            f"image has more than one plane ({desc}, axes {axes}); only single-plane 2-D slides are supported"
        )
    photometric = page.photometric
    nchan = 1
    chan_axis = None
    for ax in ("S", "C"):
        if ax in axes and shape[axes.index(ax)] > 1:
            if chan_axis is not None:
                raise _Refused(f"image has both sample and channel axes (axes {axes}, shape {shape})")
            chan_axis = ax
            nchan = shape[axes.index(ax)]
    if photometric in (PHOTOMETRIC.RGB, PHOTOMETRIC.YCBCR):
        gray = False
        ncolour = 3
    elif photometric == PHOTOMETRIC.MINISBLACK:
        gray = True
        ncolour = 1
    else:
        # an unknown value stays a plain int (a damaged tag): named by its number
        name = getattr(photometric, "name", photometric)
        raise NotReadable(f"photometric {name} is not handled by the tifffile reader")
    if chan_axis == "C" and gray:
        raise _Refused(
            f"{nchan} separate grayscale channels (axes {axes}) look like fluorescence; "
            "only brightfield RGB or single-channel grayscale slides are supported"
        )
    nextra = nchan - ncolour
    if nextra < 0:
        raise NotReadable(f"{photometric.name} image with only {nchan} samples")
    if nextra > 1:
        raise _Refused(
            f"{nchan} channels ({ncolour} colour + {nextra} extra); more than one extra channel is not brightfield"
        )
    alpha = None
    if nextra == 1:
        kinds = tuple(int(e) for e in (page.extrasamples or ()))
        kind = kinds[0] if kinds else 0
        alpha = {1: "associated", 2: "unassociated"}.get(kind, "ignore")
    # Put Y, X (and the channel axis) in that order; singleton axes are squeezed by the caller.
    keep = [a for a in axes if a in "YX" or a == chan_axis]
    order = [keep.index(a) for a in ("Y", "X") + ((chan_axis,) if chan_axis else ())]
    transpose = None if order == list(range(len(order))) else tuple(order)
    return _TiffLayout(transpose=transpose, gray=gray, alpha=alpha)


class _Refused(Exception):
    """Data the project refuses (not 8-bit brightfield): becomes SlideError, no fallback."""


def _pick_pyramid_series(tif) -> tuple[int, list[str]]:
    """Index of the main pyramid series and the names of the associated ones."""
    series = list(tif.series)
    if not series:
        raise NotReadable("no image series")

    def area(s):
        try:
            return int(s.shape[s.axes.index("Y")]) * int(s.shape[s.axes.index("X")])
        except ValueError:
            return 0

    named = [(i, (s.name or "").strip().lower()) for i, s in enumerate(series)]
    candidates = [i for i, name in named if name not in _ASSOCIATED_NAMES]
    if not candidates:
        raise NotReadable("only associated images (label/macro/thumbnail), no main image")
    if tif.is_svs:
        main = 0  # Aperio: the first series is the baseline pyramid
    else:
        main = max(candidates, key=lambda i: (area(series[i]), -i))
    associated = sorted({name or f"series{i}" for i, name in named if i != main})
    return main, associated


def open_tiff(p: Path, override, os_vendor: str | None) -> Multiscale:
    """Open a TIFF with tifffile (the ``tifffile`` reader).

    Parameters
    ----------
    p : Path
        The TIFF file.
    override : (float, float) or None
        ``--mpp``.
    os_vendor : str or None
        OpenSlide's format name for the file, when it recognises it.

    Raises
    ------
    NotReadable
        A valid TIFF this reader cannot decode as RGB (OpenSlide may).
    SlideError
        A broken or refused file.
    """
    import tifffile
    import zarr

    spath = str(p)
    records: list[logging.LogRecord] = []
    try:
        with capture_tifffile_log() as records:
            tif = tifffile.TiffFile(spath)
            try:
                main, associated = _pick_pyramid_series(tif)
                series = tif.series[main]
                levels = list(series.levels)
                keyframes = [lv.keyframe for lv in levels]
            except BaseException:
                tif.close()
                raise
    except Exception as exc:
        raise_if_corrupt(records, p)  # the logged cause says more than the exception
        if isinstance(exc, (SlideError, NotReadable)):
            raise
        raise SlideError(f"cannot read TIFF ({type(exc).__name__}: {one_line(exc)})", p) from exc
    try:
        raise_if_corrupt(records, p)
    except SlideError:
        tif.close()
        raise

    try:
        dims = [
            (
                tiff_int(kf.imagewidth, f"level {i} ImageWidth", p),
                tiff_int(kf.imagelength, f"level {i} ImageLength", p),
            )
            for i, kf in enumerate(keyframes)
        ]
        check_dimensions(dims, p)
        check_tiles(
            [
                (
                    tiff_int(kf.tilewidth, f"level {i} TileWidth", p),
                    tiff_int(kf.tilelength, f"level {i} TileLength", p),
                )
                for i, kf in enumerate(keyframes)
            ],
            p,
        )
        ome_xml = tif.ome_metadata if tif.is_ome else None
        try:
            layout = _tiff_layout(series, keyframes[0], ome_xml)
        except _Refused as exc:
            raise SlideError(f"refused: {exc}", p) from None
        check_tiff_extent(p, tif, levels)
        if tiff_int(keyframes[0].compression, "Compression", p) == 33003:
            # Aperio YCbCr JPEG 2000: the codestream does not flag the colour
            # transform; OpenSlide applies it, tifffile would return YCbCr.
            raise NotReadable("Aperio YCbCr JPEG 2000 tiles need OpenSlide's colour conversion")

        token = file_token(p)
        arrays = []
        for i, lv in enumerate(levels):
            zarr_level = zarr.open_array(series.aszarr(level=i, fillvalue=_FILL), mode="r")
            if i == len(levels) - 1:
                _probe_decode(zarr_level)
            src = _TiffLevelSource(spath, main, i, zarr_level.shape, zarr_level.dtype, zarray=zarr_level)
            arr = da.from_array(
                src,
                chunks=zarr_level.chunks,
                name=f"wsiseg-tiff-{token}-{main}-{i}",
                asarray=False,
                fancy=False,
                lock=False,
                meta=np.empty((0,) * len(zarr_level.shape), dtype=zarr_level.dtype),
            )
            arrays.append(_squeeze_to_layout(arr, lv.axes, layout))
    except BaseException as exc:
        tif.close()
        if isinstance(exc, (SlideError, NotReadable)) or not isinstance(exc, Exception):
            raise
        raise SlideError(f"cannot read TIFF ({type(exc).__name__}: {one_line(exc)})", p) from exc

    props: dict = {}
    os_props = openslide_properties(p) if os_vendor else None
    if os_props:
        props.update(os_props)
    props["wsiseg.series"] = main
    props["wsiseg.series-name"] = series.name or ""

    resolved = resolve_mpp(p, override, _tiff_mpp_candidates(os_props, keyframes[0], ome_xml, main))
    if os_props and os_props.get("openslide.vendor"):
        vendor = os_props["openslide.vendor"]
    elif tif.is_svs:
        vendor = "aperio"
    elif tif.is_ome:
        vendor = "ome-tiff"
    else:
        vendor = "generic-tiff"
    if tif.is_ome and vendor == "generic-tiff":
        vendor = "ome-tiff"  # OpenSlide reads OME-TIFF as generic; the OME name says more
    return build_multiscale(p, arrays, resolved, vendor, "tifffile", tuple(associated), props)


def _squeeze_to_layout(arr: da.Array, axes: str, layout: _TiffLayout) -> da.Array:
    """Drop singleton axes other than Y/X/S/C, order as (Y, X[, S]), convert to RGB."""
    index = [slice(None) if a in "YX" or (a in "SC" and n > 1) else 0 for a, n in zip(axes, arr.shape)]
    arr = arr[tuple(index)]
    if layout.transpose is not None:
        arr = arr.transpose(layout.transpose)
    return as_rgb(arr, gray=layout.gray, alpha=layout.alpha)


def _probe_decode(zarr_level) -> None:
    """Decode the first chunk of a level; raise NotReadable when that fails.

    Catches codecs that imagecodecs lacks (then OpenSlide may still read the
    file) for the price of one tile of the coarsest level.
    """
    try:
        zarr_level[tuple(slice(0, min(c, n)) for c, n in zip(zarr_level.chunks, zarr_level.shape))]
    except Exception as exc:
        raise NotReadable(f"tiles cannot be decoded ({type(exc).__name__}: {one_line(exc)})") from None


def _tiff_mpp_candidates(os_props, page, ome_xml, series_index):
    """Sources of a TIFF's MPP for :func:`~wsiseg.slide.common.resolve_mpp`: OpenSlide, resolution tags, OME-XML."""
    if os_props:
        yield "openslide", lambda: openslide_mpp(os_props)
    yield "tiff-resolution", lambda: tiff_resolution_mpp(page)
    if ome_xml:
        yield "ome", lambda: _ome_mpp(ome_xml, series_index)


def tiff_resolution_mpp(page) -> tuple[float, float] | None:
    """MPP from XResolution/YResolution/ResolutionUnit (cm or inch; unit NONE ignored)."""
    tags = page.tags
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF default: inch
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)
    if um_per_unit is None:
        return None
    values = []
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        if tag is None:
            return None
        v = tag.value
        try:
            px_per_unit = v[0] / v[1] if isinstance(v, tuple) else float(v)
        except (ZeroDivisionError, TypeError, IndexError):
            return None
        if not px_per_unit or not math.isfinite(px_per_unit) or px_per_unit <= 0:
            return None
        values.append(um_per_unit / px_per_unit)
    return valid_mpp(*values)


def _ome_mpp(ome_xml: str, series_index: int) -> tuple[float, float] | None:
    """PhysicalSizeX/Y of the OME Image matching the series (default unit µm)."""
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    pixels = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"]
    if not pixels:
        return None
    px = pixels[series_index] if series_index < len(pixels) else pixels[0]
    out = []
    for ax in ("X", "Y"):
        value = px.get(f"PhysicalSize{ax}")
        unit = px.get(f"PhysicalSize{ax}Unit", "µm")
        factor = UNIT_TO_UM.get(unit.strip().lower() if unit else "µm")
        if value is None or factor is None:
            return None
        try:
            out.append(float(value) * factor)
        except ValueError:
            return None
    return valid_mpp(*out)
