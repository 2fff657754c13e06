"""Bounds on every number wsiseg reads from a file, in one place.

Slides, manifests, annotations and model files come from outside: a header
may lie, a file may be damaged or built to exhaust memory. Each number they
carry is checked against these bounds *before* anything is allocated from
it, and a value outside them is refused with a one-line error naming the
file (exit code 2). The README's "Bad input" table lists them.

The bounds are far above anything a real slide, annotation or model needs,
and far below what would take a machine down.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from typing import Any

__all__ = [
    "GRID_SCALES",
    "MAX_ANNOTATION_BYTES",
    "MAX_GRID_ITERATIONS",
    "MAX_CHANNELS",
    "MAX_CLASSES",
    "MAX_COORDINATE",
    "MAX_JSON_DEPTH",
    "MAX_LAYER_WIDTH",
    "MAX_MODEL_SIDE",
    "MAX_SAMPLE_SPACING_UM",
    "MAX_SIGMA",
    "MAX_SLIDE_PIXELS",
    "MAX_SLIDE_SIDE",
    "MAX_SPEC_LIST",
    "MAX_SUPPORT",
    "MAX_TILE_PIXELS",
    "MPP_RANGE",
    "check_json_depth",
    "coordinates_problem",
    "loads_json",
    "mpp_problem",
    "read_capped",
]

# -- slides ------------------------------------------------------------------

#: Longest side of a slide level, in pixels. Real scanners write at most about
#: 200,000 x 100,000 at 0.25 um/px (a whole 75 mm slide is 300,000 px long);
#: a larger claim is a broken or hostile header.
MAX_SLIDE_SIDE = 500_000
#: Most pixels of a slide level: 1e11, e.g. 316,000 x 316,000 (a 75 x 50 mm
#: large-format slide at 0.25 um/px has 6e10).
MAX_SLIDE_PIXELS = 10**11
#: Most pixels of one stored tile of a slide level: 2**28, a 16,384 x 16,384
#: tile (1 GiB as RGBA). Scanners write tiles of 240 to 4,096 px; OpenSlide
#: allocates a whole tile to read one pixel of it and, when that allocation
#: fails, aborts the process (GLib) instead of raising.
MAX_TILE_PIXELS = 2**28
#: Accepted micrometres per pixel, inclusive: 10 nm (beyond any light
#: microscope) to 1 mm (a macro photograph of the glass).
MPP_RANGE = (0.01, 1000.0)

# -- annotations and JSON -------------------------------------------------------

#: Largest annotation file, in bytes after decompression (256 MiB: a QuPath
#: export of some 300,000 cell outlines); gzip is decompressed as a stream
#: and stopped there, so a gzip bomb never reaches memory.
MAX_ANNOTATION_BYTES = 256 * 2**20
#: Largest absolute annotation coordinate, in level-0 pixels (ten slide sides).
MAX_COORDINATE = 10 * MAX_SLIDE_SIDE
#: Deepest nesting of arrays and objects in JSON read from a file (GeoJSON
#: polygons need 4 levels, wsiseg's model metadata about 6).
MAX_JSON_DEPTH = 64

# -- model files -----------------------------------------------------------------

#: Largest side of a model's sampling grid (``out_size``) and density map (``map_size``).
MAX_MODEL_SIDE = 4096
#: Largest attraction-kernel sigma and edge radius, in density-map nodes.
MAX_SIGMA = 512.0
#: Largest attraction-kernel side (``2 * ceil(2 * MAX_SIGMA) + 1``: a 33 MB kernel).
MAX_SUPPORT = 2049
#: Most attraction steps from density to grid (each is one convolution of the density map).
MAX_GRID_ITERATIONS = 64
#: Bounds of ``--grid-scale`` (segment, evaluate): how many times as densely per axis as the model's scale.
GRID_SCALES = (0.1, 10.0)
#: Most image channels a model may take.
MAX_CHANNELS = 16
#: Most classes (label values are 0..255).
MAX_CLASSES = 256
#: Largest integer in a model's segmenter specification (decoder channels,
#: depths, atrous rates, ...): real decoders use up to 512.
MAX_LAYER_WIDTH = 4096
#: Longest list in a model's segmenter specification.
MAX_SPEC_LIST = 16
#: Largest sample spacing a model may record, in micrometres (10 cm).
MAX_SAMPLE_SPACING_UM = 1e5


def mpp_problem(value: Any) -> str | None:
    """What is wrong with a micrometres-per-pixel value, or None when it is in :data:`MPP_RANGE`.

    Parameters
    ----------
    value : object
        A number (or numeric text) read from a file or an option.

    Returns
    -------
    str or None
        A short reason (``"mpp must be ... got ..."``) for the caller's message.
    """
    lo, hi = MPP_RANGE
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not (math.isfinite(v) and lo <= v <= hi):
        return f"mpp must be a number of micrometres per pixel in [{lo:g}, {hi:g}], got {value!r}"
    return None


def check_json_depth(doc: Any, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise ValueError when ``doc`` nests lists/dicts deeper than ``limit`` (iteratively, no recursion)."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            raise ValueError(f"JSON nested deeper than {limit} levels")
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def loads_json(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses documents nested deeper than ``limit``.

    Raises
    ------
    ValueError
        Invalid JSON (:class:`json.JSONDecodeError`) or too deep nesting;
        Python's own recursion limit never escapes as RecursionError.
    """
    try:
        doc = json.loads(text)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {limit} levels") from None
    check_json_depth(doc, limit)
    return doc


def read_capped(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """A file's bytes, gunzipped as a stream when it starts with the gzip magic, at most ``limit`` of them.

    ``limit`` defaults to :data:`MAX_ANNOTATION_BYTES`.

    Raises
    ------
    ValueError
        The (decompressed) content is larger than ``limit``: decompression
        stops at ``limit + 1`` bytes, so a gzip bomb never fills memory.
    OSError, EOFError
        Unreadable file or damaged gzip stream.
    """
    limit = MAX_ANNOTATION_BYTES if limit is None else int(limit)
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
        fh.seek(0)
        if gzipped:
            with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                data = gz.read(limit + 1)
        else:
            data = fh.read(limit + 1)
    if len(data) > limit:
        what = "decompresses to more than" if gzipped else "is larger than"
        raise ValueError(f"file {what} {limit:,} bytes (the limit for annotation files)")
    return data


def coordinates_problem(geom) -> str | None:
    """What is wrong with a geometry's coordinates (NaN, infinite, beyond :data:`MAX_COORDINATE`), or None."""
    import numpy as np
    import shapely

    xy = shapely.get_coordinates(geom)
    if xy.size == 0:
        return None
    if not np.isfinite(xy).all():
        return "coordinates must be finite numbers (found NaN or infinity)"
    if np.abs(xy).max() > MAX_COORDINATE:
        return f"coordinates beyond +-{MAX_COORDINATE:,} level-0 pixels"
    return None
