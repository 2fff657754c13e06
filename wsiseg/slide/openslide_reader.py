"""The ``openslide`` reader: DICOM, MIRAX, NDPI, Ventana, Philips, Leica, and TIFFs tifffile cannot read as RGB.

Each dask chunk calls ``OpenSlide.read_region`` lazily; the RGBA it returns
is composited on white.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import dask.array as da
import numpy as np

from wsiseg.errors import SlideError, one_line
from wsiseg.slide.common import (
    build_multiscale,
    check_dimensions,
    check_tiles,
    composite_on_white,
    file_token,
    fmt_key,
    openslide_detect,
    openslide_mpp,
    resolve_mpp,
)
from wsiseg.slide.multiscale import Multiscale

__all__ = ["open_openslide"]


_OPENSLIDE_MIN_CHUNK = 256
_OPENSLIDE_DEFAULT_TILE = 512


# ---------------------------------------------------------------------------
# OpenSlide-backed levels


class _OpenSlideLevelSource:
    """Array-like view of one OpenSlide level, for ``da.from_array``.

    ``__getitem__`` calls ``read_region`` for exactly the requested window
    and composites the premultiplied-then-unpremultiplied RGBA on white.
    Pickles as ``(path, level)`` and reopens lazily.
    """

    def __init__(self, path: str, level: int, shape, downsample: float, osr=None):
        self.path = path
        self.level = level
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.downsample = float(downsample)
        self._osr = osr
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_osr"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _slide(self):
        if self._osr is None:
            with self._lock:
                if self._osr is None:
                    import openslide

                    self._osr = openslide.OpenSlide(self.path)
        return self._osr

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        (y0, y1, _), (x0, x1, _) = (k.indices(n) for k, n in zip(key[:2], self.shape[:2]))
        h, w = max(y1 - y0, 0), max(x1 - x0, 0)
        if h == 0 or w == 0:
            return np.empty((h, w, 3), dtype=np.uint8)[:, :, key[2]]
        # OpenSlide takes level-0 coordinates; with non-integer downsamples it
        # resamples by the rounding error (an OpenSlide limitation).
        loc = (int(round(x0 * self.downsample)), int(round(y0 * self.downsample)))
        try:
            rgba = np.asarray(self._slide().read_region(loc, self.level, (w, h)))
        except Exception as exc:
            raise SlideError(
                f"OpenSlide cannot read level {self.level} region {fmt_key(key)}: {type(exc).__name__}: {exc}",
                self.path,
            ) from exc
        rgb = composite_on_white(rgba[..., :3], rgba[..., 3])
        return rgb[:, :, key[2]]


def _openslide_tile(props: dict, level: int) -> tuple[int, int]:
    """(width, height) of a level's tiles as OpenSlide reports them; 0 where it does not."""
    out = []
    for name in ("width", "height"):
        try:
            out.append(max(int(props.get(f"openslide.level[{level}].tile-{name}", 0)), 0))
        except ValueError:
            out.append(0)
    return out[0], out[1]


def _openslide_chunk(props: dict, level: int) -> tuple[int, int]:
    """(rows, cols) of one dask chunk: OpenSlide's tile, grown to >= 256 px."""
    out = []
    for t in reversed(_openslide_tile(props, level)):
        if t <= 0:
            t = _OPENSLIDE_DEFAULT_TILE
        # Tiny tiles (DICOM can use 10 px) would make millions of dask tasks:
        # group whole tiles into chunks of at least 256 px.
        out.append(t * max(1, -(-_OPENSLIDE_MIN_CHUNK // t)))
    return out[0], out[1]


def open_openslide(file: Path, override, *, display_path: Path) -> Multiscale:
    """Open a slide with OpenSlide (the ``openslide`` reader).

    Parameters
    ----------
    file : Path
        The file OpenSlide opens (for a DICOM folder, one of its files).
    override : (float, float) or None
        ``--mpp``.
    display_path : Path
        The path the user gave, named in the result and the warnings.
    """
    try:
        import openslide
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise SlideError(f"OpenSlide is not available ({exc})", display_path) from exc
    fmt = openslide_detect(file)
    if fmt is None:
        raise SlideError(
            "unsupported or unrecognised format (not a TIFF, not an OME-Zarr directory, and OpenSlide does not "
            "recognise it)",
            file,
        )
    try:
        osr = openslide.OpenSlide(str(file))
    except Exception as exc:
        raise SlideError(_openslide_refusal(fmt, file, exc), file) from exc
    try:
        dims = [(int(w), int(h)) for w, h in osr.level_dimensions]
        check_dimensions(dims, file)
        props = dict(osr.properties)
        check_tiles([_openslide_tile(props, lv) for lv in range(len(dims))], file)
        token = file_token(file)
        arrays = []
        for lv, (w, h) in enumerate(dims):
            src = _OpenSlideLevelSource(str(file), lv, (h, w, 3), osr.level_downsamples[lv], osr=osr)
            arrays.append(
                da.from_array(
                    src,
                    chunks=_openslide_chunk(props, lv) + (3,),
                    name=f"wsiseg-openslide-{token}-{lv}",
                    asarray=False,
                    fancy=False,
                    lock=False,
                    meta=np.empty((0, 0, 3), dtype=np.uint8),
                )
            )
        associated = tuple(sorted(osr.associated_images))
        # Decode one pixel of the coarsest level now, so that unreadable
        # tiles fail here rather than in the middle of a run.
        osr.read_region((0, 0), len(dims) - 1, (1, 1))
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(f"cannot read slide with OpenSlide ({type(exc).__name__}: {one_line(exc)})", file) from exc
    resolved = resolve_mpp(display_path, override, [("openslide", lambda: openslide_mpp(props))])
    if file != display_path:
        props["wsiseg.file"] = str(file)
    vendor = props.get("openslide.vendor") or fmt
    return build_multiscale(display_path, arrays, resolved, vendor, "openslide", associated, props)


def _openslide_refusal(fmt: str, file: Path, exc: Exception) -> str:
    # OpenSlide prefixes "Reading <path>: "; the path is already named once.
    msg = one_line(exc).replace(f"Reading {file}: ", "")
    m = re.search(r"BitsAllocated value (\d+)", msg)
    if m:
        return (
            f"refused: {m.group(1)}-bit {fmt.upper() if fmt == 'dicom' else fmt} image (BitsAllocated {m.group(1)}); "
            f"only 8-bit brightfield RGB slides are supported (OpenSlide: {msg})"
        )
    return f"OpenSlide cannot open this {fmt} slide: {msg}"
