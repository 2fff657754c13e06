"""Refusing truncated, corrupt and looping TIFFs, before and while tifffile reads them.

tifffile logs (rather than raises) on broken IFD chains and follows a
circular chain for ever; damaged tags come back as bytes, text or lists.
These checks turn each case into a one-line :class:`~wsiseg.errors.SlideError`.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from pathlib import Path

import numpy as np

from wsiseg.errors import SlideError, one_line

__all__ = ["capture_tifffile_log", "check_ifd_chain", "check_tiff_extent", "raise_if_corrupt", "tiff_int"]


# tifffile logs (rather than raises) when an IFD chain or a tag value points
# past the end of the file: those messages mean a truncated or corrupt file.
_TIFF_CORRUPT_PATTERNS = ("invalid page offset", "invalid offset to first page", "invalid value offset", "corrupt")

# The name the slide reader has always logged under: filters on it keep working.
logger = logging.getLogger("wsiseg.slide.open")


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
