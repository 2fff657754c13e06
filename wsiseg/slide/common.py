"""What the slide readers share: size checks, RGB conversion, MPP handling, OpenSlide probes.

Used by :mod:`~wsiseg.slide.tifffile_reader`, :mod:`~wsiseg.slide.openslide_reader`
and :mod:`~wsiseg.slide.zarr_reader`, between which
:func:`~wsiseg.slide.open.open_slide` picks. Every reader checks the sizes a
file claims with :func:`check_dimensions` (and :func:`check_tiles`), turns its
levels into ``(H, W, 3)`` uint8 with :func:`as_rgb` or
:func:`composite_on_white`, and returns :func:`build_multiscale`'s result.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dask.array as da
import numpy as np
from dask.base import tokenize

from wsiseg.errors import ConfigError, SlideError
from wsiseg.limits import MAX_SLIDE_PIXELS, MAX_SLIDE_SIDE, MAX_TILE_PIXELS
from wsiseg.mpp import MAX_PLAUSIBLE_MPP, IgnoredMpp, is_plausible_mpp, mpp_pair
from wsiseg.slide.multiscale import IGNORED_IMPLAUSIBLE, Level, Multiscale

__all__ = [
    "MAX_PIXELS",
    "UNIT_TO_UM",
    "as_rgb",
    "build_multiscale",
    "check_dimensions",
    "check_tiles",
    "composite_on_white",
    "file_token",
    "fmt_key",
    "openslide_detect",
    "openslide_mpp",
    "openslide_properties",
    "pil_rgb_on_white",
    "resolve_mpp",
    "valid_mpp",
]


#: Refuse levels claiming more pixels than this (see :mod:`wsiseg.limits`;
#: levels are also refused above ``MAX_SLIDE_SIDE`` pixels a side).
MAX_PIXELS = MAX_SLIDE_PIXELS

UNIT_TO_UM = {
    "angstrom": 1e-4,
    "nanometer": 1e-3,
    "micrometer": 1.0,
    "micron": 1.0,
    "µm": 1.0,
    "um": 1.0,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
    "inch": 25400.0,
}

# The name the slide reader has always logged under: filters on it keep working.
logger = logging.getLogger("wsiseg.slide.open")


# ---------------------------------------------------------------------------
# helpers shared by the backends


def valid_mpp(mx, my) -> tuple[float, float] | None:
    """``(mx, my)`` as floats when both are positive and finite, else None."""
    try:
        return mpp_pair((mx, my), bounded=False)  # out-of-range values are ignored later, not refused
    except ConfigError:
        return None


def resolve_mpp(path: Path, override, candidates) -> tuple[tuple[float, float] | None, str, IgnoredMpp | None]:
    """The level-0 MPP, where it came from, and an implausible file value that was ignored.

    Parameters
    ----------
    path : Path
        The slide, named in the warning.
    override : (float, float) or None
        ``--mpp``; wins over the file and is not range-checked.
    candidates : iterable of (str, callable)
        ``(source, read)`` in order of preference; ``read()`` gives a valid
        pair or None. The first plausible value wins.

    Returns
    -------
    mpp, source, ignored
        ``source`` is ``"override"``, the winning candidate's name,
        :data:`~wsiseg.slide.multiscale.IGNORED_IMPLAUSIBLE` (only
        implausible values found; ``ignored`` holds the first) or
        ``"missing"``.
    """
    if override is not None:
        return override, "override", None
    ignored = None
    for source, read in candidates:
        mpp = read()
        if mpp is None:
            continue
        if is_plausible_mpp(mpp):
            return mpp, source, None
        ignored = ignored or IgnoredMpp(mpp, source)
    if ignored is None:
        return None, "missing", None
    # one line per opened slide; the value stays visible in `wsiseg info` and report.json
    hint = " (a default 72/96 dpi tag?)" if max(ignored.mpp) > MAX_PLAUSIBLE_MPP else ""
    logger.warning(
        "%s: ignored implausible level-0 resolution %s%s; MPP unknown, pass --mpp", path, ignored.describe(), hint
    )
    return None, IGNORED_IMPLAUSIBLE, ignored


def check_dimensions(dims: list[tuple[int, int]], path: Path) -> None:
    """Refuse absurd or inconsistent pyramids before anything is allocated.

    Parameters
    ----------
    dims : list of (width, height)
        Level sizes, level 0 first, as the file claims them.
    """
    if not dims:
        raise SlideError("no image levels found", path)
    for i, (w, h) in enumerate(dims):
        if w < 1 or h < 1:
            raise SlideError(f"level {i} has an empty size {w}x{h}", path)
        if max(w, h) > MAX_SLIDE_SIDE:
            raise SlideError(
                f"level {i} claims an absurd size {w}x{h} (a side over {MAX_SLIDE_SIDE:,} pixels); "
                "the header is corrupt",
                path,
            )
        if w * h > MAX_PIXELS:
            raise SlideError(
                f"level {i} claims an absurd size {w}x{h} (> {MAX_PIXELS:.0e} pixels); the header is corrupt", path
            )
    for i in range(1, len(dims)):
        (pw, ph), (w, h) = dims[i - 1], dims[i]
        if w > pw or h > ph:
            raise SlideError(
                f"inconsistent pyramid: level {i} ({w}x{h}) is larger than level {i - 1} ({pw}x{ph})", path
            )


def pil_rgb_on_white(im) -> np.ndarray:
    """A loaded PIL image as ``(H, W, 3)`` uint8 RGB; transparency composited over white.

    Plain images (PNG, JPEG) get the same background as slides with an alpha
    channel (:func:`composite_on_white`): white, the colour of glass.

    Parameters
    ----------
    im : PIL.Image.Image
    """
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def check_tiles(tiles: list[tuple[int, int]], path: Path) -> None:
    """Refuse levels whose stored tiles are absurdly large, before any tile is read.

    Parameters
    ----------
    tiles : list of (width, height)
        Tile size of each level, level 0 first; ``(0, 0)`` where the reader
        does not say.

    Raises
    ------
    SlideError
        A tile of more than :data:`~wsiseg.limits.MAX_TILE_PIXELS` pixels:
        reading one pixel would allocate the whole tile, and OpenSlide
        aborts the process when that fails.
    """
    for i, (w, h) in enumerate(tiles):
        if w * h > MAX_TILE_PIXELS:
            raise SlideError(
                f"level {i} claims tiles of {w}x{h} pixels (more than {MAX_TILE_PIXELS:,}); the header is corrupt",
                path,
            )


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """Composite 8-bit colour over a white background.

    Parameters
    ----------
    rgb : ndarray, uint8, ``(..., C)``
    alpha : ndarray, uint8, ``(...)``
    premultiplied : bool
        True for associated (premultiplied) alpha.
    """
    a = alpha[..., None].astype(np.uint16)
    if premultiplied:
        out = rgb.astype(np.uint16) + (255 - a)
    else:
        # Rounded rgb * a / 255 + 255 * (1 - a / 255), in integers.
        out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return np.minimum(out, 255).astype(np.uint8)


def _block_to_rgb(block: np.ndarray, *, gray: bool, alpha: str | None) -> np.ndarray:
    """One chunk ``(h, w[, S])`` -> ``(h, w, 3)`` uint8 RGB (pure, for map_blocks).

    ``alpha`` is None (no alpha), ``"unassociated"``, ``"associated"`` or
    ``"ignore"`` (an unspecified extra sample, dropped as libtiff does).
    """
    if block.ndim == 2:
        block = block[..., None]
    ncolour = 1 if gray else 3
    colour = block[..., :ncolour]
    if alpha in ("unassociated", "associated"):
        colour = composite_on_white(colour, block[..., ncolour], premultiplied=alpha == "associated")
    if gray:
        colour = np.repeat(colour, 3, axis=-1)
    return np.ascontiguousarray(colour, dtype=np.uint8)


def as_rgb(arr: da.Array, *, gray: bool, alpha: str | None) -> da.Array:
    """Lazily turn a ``(H, W[, S])`` uint8 dask array into ``(H, W, 3)`` RGB."""
    if arr.ndim == 3 and len(arr.chunks[2]) > 1:
        arr = arr.rechunk({2: -1})  # planar TIFF / NGFF: one chunk per tile holds all channels
    if arr.ndim == 3 and not gray and alpha is None and arr.shape[2] == 3:
        return arr
    chunks = (arr.chunks[0], arr.chunks[1], (3,))
    meta = np.empty((0, 0, 3), dtype=np.uint8)
    # dask's stub types Array.map_blocks as a decorator; the call is dask's documented form
    if arr.ndim == 2:
        return arr.map_blocks(  # type: ignore[call-arg]
            _block_to_rgb,  # type: ignore[arg-type]
            gray=gray,
            alpha=alpha,
            dtype=np.uint8,
            chunks=chunks,
            new_axis=2,
            meta=meta,
        )
    return arr.map_blocks(  # type: ignore[call-arg]
        _block_to_rgb,  # type: ignore[arg-type]
        gray=gray,
        alpha=alpha,
        dtype=np.uint8,
        chunks=chunks,
        meta=meta,
    )


def file_token(path: Path) -> str:
    """A dask token for a slide file: its resolved path, size and modification time.

    Parameters
    ----------
    path : Path
        The slide file.
    """
    st = path.stat()
    return tokenize(str(path.resolve()), st.st_size, st.st_mtime_ns)


def fmt_key(key) -> str:
    """A read window for error messages: the first two axes of an index, as ``[y0:y1, x0:x1]``.

    Parameters
    ----------
    key : slice, int or tuple of them
        The index passed to ``__getitem__``.
    """
    if not isinstance(key, tuple):
        key = (key,)
    parts = []
    for k in key[:2]:
        if isinstance(k, slice):
            parts.append(f"{k.start or 0}:{'' if k.stop is None else k.stop}")
        else:
            parts.append(str(k))
    return "[" + ", ".join(parts) + "]"


# ---------------------------------------------------------------------------
# OpenSlide probes (the TIFF reader asks OpenSlide too)


def openslide_detect(p: Path) -> str | None:
    """OpenSlide's name for the file's format, or None (not recognised, or OpenSlide missing or failing).

    Parameters
    ----------
    p : Path
        The slide file.
    """
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(p))
    except Exception:  # detection is only a hint; never fail on it
        return None


def openslide_properties(p: Path) -> dict | None:
    """OpenSlide's properties of the file, or None when OpenSlide cannot open it.

    Parameters
    ----------
    p : Path
        The slide file.
    """
    try:
        import openslide

        with openslide.OpenSlide(str(p)) as osr:
            return dict(osr.properties)
    except Exception:
        return None


def openslide_mpp(props: dict) -> tuple[float, float] | None:
    """``openslide.mpp-x/y`` of OpenSlide's properties as a valid pair, or None.

    Parameters
    ----------
    props : dict
        OpenSlide's properties.
    """
    return valid_mpp(props.get("openslide.mpp-x"), props.get("openslide.mpp-y"))


# ---------------------------------------------------------------------------


def build_multiscale(path, arrays, resolved, vendor, reader, associated, props) -> Multiscale:
    """The Multiscale of level arrays; ``resolved`` is :func:`resolve_mpp`'s ``(mpp, source, ignored)``."""
    mpp, source, ignored = resolved
    h0, w0 = arrays[0].shape[:2]
    levels = tuple(Level(a, (w0 / a.shape[1], h0 / a.shape[0])) for a in arrays)
    return Multiscale(
        path=str(path),
        levels=levels,
        mpp=mpp,
        mpp_source=source,
        mpp_ignored=ignored,
        vendor=vendor,
        reader=reader,
        associated=tuple(associated),
        properties=props,
    )
