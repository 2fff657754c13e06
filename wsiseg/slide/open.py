"""Open any slide as a :class:`~wsiseg.slide.multiscale.Multiscale` of lazy RGB levels.

Three backends, tried in this order:

``tifffile``
    TIFF, BigTIFF, Aperio SVS, generic tiled pyramids, OME-TIFF. Each level
    is tifffile's zarr store over the TIFF pages, opened with zarr and wrapped
    as a dask array with one chunk per TIFF tile, so only touched tiles are
    ever decoded.
``openslide``
    Formats tifffile cannot read as RGB, or which OpenSlide assembles better
    (DICOM, MIRAX, NDPI, Ventana, Philips, Leica): each dask chunk calls
    ``OpenSlide.read_region`` lazily.
``zarr``
    OME-Zarr (NGFF 0.4 and 0.5 ``multiscales``) directories.

Every level is ``(H, W, 3)`` uint8: alpha is composited on white and
grayscale is expanded to RGB, lazily and chunk by chunk. Data that is not
8-bit brightfield (16-bit, more than three colour channels, fluorescence) is
refused with :class:`~wsiseg.errors.SlideError`, as is every broken file;
no raw library exception escapes :func:`open_slide`. Paths that are not
regular files (FIFOs, devices, sockets) are refused before anything is read
(opening a FIFO would block), and a TIFF whose chain of image directories
loops back on itself is refused before tifffile or OpenSlide walks it
(tifffile would follow most such loops for ever).

Like OpenSlide, the TIFF ``Orientation`` tag is ignored: pixels are returned
in stored order so that coordinates agree with OpenSlide-based tools.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import os
import re
import stat
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from wsiseg.errors import SlideError, one_line
from wsiseg.mpp import mpp_pair
from wsiseg.slide.common import (
    MAX_PIXELS,
    UNIT_TO_UM,
    as_rgb,
    build_multiscale,
    check_dimensions,
    check_tiles,
    file_token,
    fmt_key,
    openslide_detect,
    openslide_mpp,
    openslide_properties,
    pil_rgb_on_white,
    resolve_mpp,
    valid_mpp,
)
from wsiseg.slide.multiscale import Multiscale
from wsiseg.slide.openslide_reader import open_openslide
from wsiseg.slide.zarr_reader import open_ngff

__all__ = ["open_slide", "pil_rgb_on_white", "tiff_resolution_mpp", "MAX_PIXELS"]

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ASSOCIATED_NAMES = {"label", "macro", "thumbnail", "overview", "barcode", "map"}
# TIFF-based vendor formats whose pyramids OpenSlide assembles and tifffile
# does not (NDPI: huge JPEG strips; Ventana: overlapping tiles; Philips:
# sparse tiles; Leica: several images per file; Trestle: overlaps).
_OPENSLIDE_FIRST = {"hamamatsu", "ventana", "philips", "leica", "trestle"}
# Missing (sparse) TIFF tiles read as white, like OpenSlide's transparent background.
_FILL = 255
# tifffile logs (rather than raises) when an IFD chain or a tag value points
# past the end of the file: those messages mean a truncated or corrupt file.
_TIFF_CORRUPT_PATTERNS = ("invalid page offset", "invalid offset to first page", "invalid value offset", "corrupt")
logger = logging.getLogger(__name__)


class NotReadable(Exception):
    """The TIFF is valid but not RGB-readable by the tifffile path (try OpenSlide)."""


# ---------------------------------------------------------------------------
# public entry point


def open_slide(path: str | os.PathLike, mpp: float | tuple[float, float] | None = None) -> Multiscale:
    """Open a whole-slide image as a pyramid of lazy ``(H, W, 3)`` uint8 levels.

    Parameters
    ----------
    path : str or os.PathLike
        A slide file (TIFF/SVS/OME-TIFF/BigTIFF, or anything OpenSlide reads:
        DICOM, MIRAX, NDPI, ...), a DICOM series folder (OpenSlide reads the
        folder's other instances itself), or an OME-Zarr directory.
    mpp : float or (float, float), optional
        Micrometres per level-0 pixel ``(x, y)``; overrides the file's value
        and is taken as given.

    Returns
    -------
    Multiscale
        Levels as dask arrays, one chunk per stored tile; nothing is decoded
        until a slice is computed. The file's MPP is taken from OpenSlide's
        properties, then the TIFF resolution tags, then OME-XML (or the NGFF
        scales); a value outside the plausible range of
        :mod:`wsiseg.mpp` (e.g. a 72 dpi default, 352.8 µm/px) is
        ignored with a one-line warning: ``mpp`` is then None,
        ``mpp_source`` ``"ignored-implausible"`` and ``mpp_ignored`` says
        what was read.

    Raises
    ------
    SlideError
        The path is missing, not a slide, not a regular file (FIFO, device,
        socket), empty, truncated, corrupt (e.g. a TIFF whose IFD chain
        loops), claims an absurd size, is in an unsupported format, or is
        not 8-bit brightfield.
        The message is one line and names the file.
    ConfigError
        ``mpp`` is not a positive finite number.
    """
    override = _check_mpp_override(mpp)
    p = Path(path)
    try:
        return _open_any(p, override)
    except (SlideError, KeyboardInterrupt):
        raise
    except Exception as exc:  # last resort: a bad file must never leak a library traceback
        raise SlideError(f"cannot open slide ({type(exc).__name__}: {one_line(exc)})", p) from exc


def _open_any(p: Path, override) -> Multiscale:
    try:
        st = p.stat()
    except FileNotFoundError:
        raise SlideError("no such file or directory", p) from None
    except OSError as exc:
        raise SlideError(f"cannot read file: {exc.strerror or exc}", p) from exc
    if stat.S_ISDIR(st.st_mode):
        return _open_directory(p, override)
    check_regular_file(p, st)
    try:
        size = st.st_size
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise SlideError(f"cannot read file: {exc.strerror or exc}", p) from exc
    if size == 0:
        raise SlideError("empty file (0 bytes), not a slide", p)
    if head[:4] in _TIFF_MAGICS:
        return _open_tiff_family(p, override)
    return open_openslide(p, override, display_path=p)


_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def check_regular_file(path: str | os.PathLike, st: os.stat_result | None = None) -> None:
    """Refuse anything but a regular file (after symlinks), before it is opened.

    Opening a FIFO blocks until a writer comes and reading a terminal blocks
    for input, so one such path would stall a whole batch.

    Parameters
    ----------
    path : path-like
        The slide file.
    st : os.stat_result, optional
        ``os.stat(path)``, when the caller has it already.

    Raises
    ------
    SlideError
        The path is a FIFO, device, socket or directory (or missing); the
        message is one line and names the file and its kind.
    """
    if st is None:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise SlideError(f"cannot read file: {exc.strerror or exc}", path) from exc
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a file")
        raise SlideError(f"not a regular file ({kind}); a slide is a file, a DICOM folder or an OME-Zarr store", path)


# ---------------------------------------------------------------------------
# helpers shared by the backends


def _check_mpp_override(mpp) -> tuple[float, float] | None:
    # taken as given, even outside the plausible range: the user knows the scan
    return mpp_pair(mpp, what="--mpp")


@contextlib.contextmanager
def capture_tifffile_log():
    """Collect tifffile's log records (it logs, not raises, on broken IFD chains).

    Records are kept from the console while a slide is opened; harmless
    ones (e.g. an out-of-range Orientation value) are re-logged at DEBUG.
    """
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    tlog = logging.getLogger("tifffile")
    handler = _Keep(logging.WARNING)
    old_propagate = tlog.propagate
    tlog.addHandler(handler)
    tlog.propagate = False
    try:
        yield records
    finally:
        tlog.removeHandler(handler)
        tlog.propagate = old_propagate
        for r in records:
            logger.debug("tifffile: %s", r.getMessage())


# ---------------------------------------------------------------------------
# directories: OME-Zarr or a DICOM series folder


def _open_directory(p: Path, override) -> Multiscale:
    if any((p / name).exists() for name in (".zattrs", ".zgroup", "zarr.json")):
        return open_ngff(p, override)
    dicom = _find_dicom_file(p)
    if dicom is not None:
        return open_openslide(dicom, override, display_path=p)
    raise SlideError("is a directory but not a slide (no OME-Zarr metadata and no DICOM files inside)", p)


def _find_dicom_file(folder: Path) -> Path | None:
    """First DICOM file of a folder: ``*.dcm`` first, else files with the DICM magic."""
    try:
        files = sorted(f for f in folder.iterdir() if f.is_file())
    except OSError:
        return None
    for f in files:
        if f.suffix.lower() == ".dcm" and f.stat().st_size > 0:
            return f
    for f in files[:1000]:  # DICOM files often have no extension
        if has_dicom_magic(f):
            return f
    return None


def has_dicom_magic(path: Path) -> bool:
    """True when a regular file carries the DICOM preamble magic ``DICM`` at byte 128 (FIFOs are never opened)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


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


def check_ifd_chain(p: Path) -> None:
    """Refuse a TIFF whose chain of IFDs (image file directories) loops back on itself.

    tifffile compares offsets only once, at the 100th IFD, and otherwise
    follows a circular chain forever, its list of offsets growing; OpenSlide
    refuses such a file without saying why. The chain is walked here with
    the IFD layout tifffile detected (classic, BigTIFF, NDPI), reading only
    each IFD's tag count and next offset. Offsets past the end of the file
    are left to the readers, which report the file as truncated.
    """
    import struct

    import tifffile

    try:
        tif = tifffile.TiffFile(str(p))
    except Exception:  # noqa: BLE001 - not a readable TIFF: the readers say why
        return
    with tif:
        fmt, fh = tif.tiff, tif.filehandle
        size = fh.size
        try:
            offset = tif.pages.first.offset
        except IndexError:
            return
        index_of: dict[int, int] = {}
        while offset:
            if offset in index_of:
                raise SlideError(
                    f"corrupt TIFF: its chain of image directories loops back (IFD {len(index_of) - 1} points to "
                    f"IFD {index_of[offset]} at byte {offset})",
                    p,
                )
            index_of[offset] = len(index_of)
            if offset + fmt.tagnosize > size:
                return
            fh.seek(offset)
            (count,) = struct.unpack(fmt.tagnoformat, fh.read(fmt.tagnosize))
            at = offset + fmt.tagnosize + count * fmt.tagsize
            if at + fmt.offsetsize > size:
                return
            fh.seek(at)
            (offset,) = struct.unpack(fmt.offsetformat, fh.read(fmt.offsetsize))


def _open_tiff_family(p: Path, override) -> Multiscale:
    check_ifd_chain(p)  # first: tifffile would hang on a circular chain
    os_vendor = openslide_detect(p)
    if os_vendor in _OPENSLIDE_FIRST:
        return open_openslide(p, override, display_path=p)
    try:
        return open_tiff(p, override, os_vendor)
    except NotReadable as exc:
        if os_vendor is not None:
            logger.debug("%s: tifffile path refused (%s); using OpenSlide", p, exc)
            return open_openslide(p, override, display_path=p)
        raise SlideError(f"TIFF is not readable as an RGB slide: {exc}", p) from None


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


def raise_if_corrupt(records, p: Path) -> None:
    """Raise when tifffile logged that the file is truncated or corrupt.

    Parameters
    ----------
    records : list of logging.LogRecord
        What :func:`capture_tifffile_log` collected.
    p : Path
        The TIFF, named in the error.
    """
    for r in records:
        msg = r.getMessage()
        if any(pat in msg for pat in _TIFF_CORRUPT_PATTERNS):
            raise SlideError(f"truncated or corrupt TIFF ({one_line(msg)})", p)


def tiff_int(value, what: str, p: Path) -> int:
    """A TIFF tag value that must be a whole number, as an int.

    Raises
    ------
    SlideError
        Damage to the tag's type made it bytes, text, a fraction or a list:
        ``corrupt TIFF: <what> <value> is not an integer``.
    """
    try:
        return operator.index(value)
    except TypeError:
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise SlideError(f"corrupt TIFF: {what} {shown} is not an integer", p) from None


def check_tiff_extent(p: Path, tif, levels) -> None:
    """Refuse files whose tile/strip data lies past the end of the file (truncated).

    Also those whose offsets and byte counts differ in number.
    """
    size = tif.filehandle.size
    for i, lv in enumerate(levels):
        for page in lv.pages:
            if page is None:
                continue
            try:  # as floats: damaged tags may claim offsets past 2**63, and their sums past 2**64
                offsets = np.asarray(page.dataoffsets, dtype=np.float64)
                counts = np.asarray(page.databytecounts, dtype=np.float64)
            except (TypeError, ValueError):
                raise SlideError(f"corrupt TIFF: level {i} tile offsets or byte counts are not numbers", p) from None
            if offsets.size != counts.size:
                raise SlideError(
                    f"corrupt TIFF: level {i} has {offsets.size} tile offsets but {counts.size} byte counts", p
                )
            if offsets.size == 0:
                continue
            used = counts > 0  # sparse (missing) tiles have offset 0 and count 0
            if not used.any():
                continue
            end = int((offsets[used] + counts[used]).max())
            if end > size:
                raise SlideError(
                    f"truncated file: level {i} image data ends at byte {end} but the file has {size} bytes", p
                )


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
    """Sources of a TIFF's MPP for :func:`resolve_mpp`: OpenSlide, resolution tags, OME-XML."""
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
