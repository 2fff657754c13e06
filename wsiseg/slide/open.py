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

The readers are :mod:`~wsiseg.slide.tifffile_reader`, :mod:`~wsiseg.slide.openslide_reader` and
:mod:`~wsiseg.slide.zarr_reader`, with :mod:`~wsiseg.slide.tiff_checks` and what they share in
:mod:`~wsiseg.slide.common`; this module picks one.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from wsiseg.errors import SlideError, one_line
from wsiseg.mpp import mpp_pair
from wsiseg.slide.common import MAX_PIXELS, openslide_detect, pil_rgb_on_white
from wsiseg.slide.multiscale import Multiscale
from wsiseg.slide.openslide_reader import open_openslide
from wsiseg.slide.tiff_checks import check_ifd_chain
from wsiseg.slide.tifffile_reader import NotReadable, open_tiff, tiff_resolution_mpp
from wsiseg.slide.zarr_reader import open_ngff

__all__ = ["open_slide", "pil_rgb_on_white", "tiff_resolution_mpp", "MAX_PIXELS"]


_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# TIFF-based vendor formats whose pyramids OpenSlide assembles and tifffile
# does not (NDPI: huge JPEG strips; Ventana: overlapping tiles; Philips:
# sparse tiles; Leica: several images per file; Trestle: overlaps).
_OPENSLIDE_FIRST = {"hamamatsu", "ventana", "philips", "leica", "trestle"}

logger = logging.getLogger(__name__)


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


def _check_mpp_override(mpp) -> tuple[float, float] | None:
    # taken as given, even outside the plausible range: the user knows the scan
    return mpp_pair(mpp, what="--mpp")


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
# TIFF family: tifffile first, OpenSlide for the vendor formats it assembles better


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
