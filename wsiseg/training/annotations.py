"""Training annotations: class maps, vector annotations, label masks -> label rasters.

Three kinds of annotation file are read, all in level-0 pixel coordinates of
their slide (:mod:`wsiseg.sampling.coords`: pixel ``(i, j)`` covers
``[j, j + 1) x [i, i + 1)``):

* **QuPath GeoJSON** (``.geojson``, ``.json``, ``.geojson.gz``), read with
  :func:`wsiseg.output.geojson.read_qupath_geojson`;
* **ASAP XML** (``.xml``), read with :func:`read_asap_xml`;
* **label masks** (``.png``, ``.tif``, ``.tiff``): a uint8 raster at level 0
  or at a stated downsample, optionally with a value -> class-name table
  (e.g. the BCSS ``GTcodes.csv``).

Every kind becomes an :class:`Annotation` whose
:meth:`~Annotation.labels` returns the uint8 class raster of any level-0
box at any resolution, so that labels are produced on exactly the raster of
the image they go with. Class names are mapped to label values by a
:class:`ClassMap`; value :data:`IGNORE_INDEX` (255) marks pixels the loss
must not see.

Vector geometry is cleaned on load (:mod:`wsiseg.training.vectors`); the counts
of what was skipped or repaired are kept in an :class:`AnnotationReport`.
"""

from __future__ import annotations

import csv
import io
import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from wsiseg.errors import WsisegError, one_line
from wsiseg.output.geojson import read_qupath_geojson
from wsiseg.slide.tissue import Region
from wsiseg.training.classmap import IGNORE_INDEX, UNMAPPED_HINT, ClassMap
from wsiseg.training.vectors import AnnotationReport, clean_shapes, rasterise, read_asap_xml

__all__ = [
    "MASK_SUFFIXES",
    "VECTOR_SUFFIXES",
    "Annotation",
    "LabelMaskAnnotation",
    "VectorAnnotation",
    "annotation_kind",
    "load_annotation",
    "read_value_names",
]

VECTOR_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz", ".xml")
MASK_SUFFIXES = (".png", ".tif", ".tiff")


# ---------------------------------------------------------------------------
# annotations


class Annotation(ABC):
    """An annotation file that can produce label rasters of any level-0 box.

    Attributes
    ----------
    path : str
    report : AnnotationReport
    """

    path: str
    report: AnnotationReport

    @abstractmethod
    def labels(self, box: Region, out_shape: tuple[int, int]) -> np.ndarray:
        """uint8 ``(h, w)`` labels of ``box`` sampled at the pixel centres of an ``out_shape`` raster.

        Values are class values of the :class:`ClassMap`, or
        :data:`IGNORE_INDEX`.
        """

    def check_slide_size(self, slide_size: tuple[int, int], slide_path: str | os.PathLike) -> None:
        """Raise :class:`WsisegError` if the annotation cannot belong to a slide of this size."""


class VectorAnnotation(Annotation):
    """Polygons with class values (QuPath GeoJSON, ASAP XML).

    Parameters
    ----------
    path : str
    shapes : list of (int, Polygon or MultiPolygon)
        Valid geometry in level-0 pixels with its label value.
    report : AnnotationReport
    fill : int
        Value of pixels outside every polygon (0, background; pass
        :data:`IGNORE_INDEX` for sparse annotations where unannotated
        tissue is unknown).
    """

    def __init__(self, path: str, shapes: list[tuple[int, BaseGeometry]], report: AnnotationReport, *, fill: int = 0):
        self.path = path
        self.shapes = list(shapes)
        self.report = report
        self.fill = int(fill)

    def labels(self, box: Region, out_shape: tuple[int, int]) -> np.ndarray:
        return rasterise(self.shapes, box, out_shape, fill=self.fill)

    @property
    def bounds(self) -> tuple[float, float, float, float] | None:
        """Level-0 ``(xmin, ymin, xmax, ymax)`` of all shapes, or None."""
        if not self.shapes:
            return None
        b = shapely.bounds(np.array([g for _, g in self.shapes], dtype=object))
        return float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())

    def check_slide_size(self, slide_size: tuple[int, int], slide_path: str | os.PathLike) -> None:
        b = self.bounds
        W, H = slide_size
        if b is not None and (b[0] >= W or b[1] >= H or b[2] <= 0 or b[3] <= 0):
            raise WsisegError(
                f"all annotations lie outside the slide {os.fspath(slide_path)} ({W}x{H} px): "
                f"bounds {tuple(round(v) for v in b)}; coordinates must be level-0 pixels of that slide",
                self.path,
            )

    def __repr__(self) -> str:
        return f"VectorAnnotation({self.path!r}, {len(self.shapes)} shapes)"


def read_value_names(path: str | os.PathLike) -> dict[int, str]:
    """Value -> class name table of a label mask from a CSV file.

    The CSV needs a header with a name column (``group``, ``name``,
    ``label`` or ``class``) and a value column (``GT_code``, ``value``,
    ``code``), as in the BCSS ``GTcodes.csv``.
    """
    path = Path(path)
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline="")))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise WsisegError(f"cannot read value table: {one_line(exc)}", path) from exc
    if not rows:
        raise WsisegError("value table is empty", path)
    cols = {c.strip().lower(): c for c in rows[0] if c}
    name_col = next((cols[c] for c in ("group", "name", "label", "class") if c in cols), None)
    value_col = next((cols[c] for c in ("gt_code", "value", "code") if c in cols), None)
    if name_col is None or value_col is None:
        raise WsisegError(f"value table needs a name column and a value column, got {list(rows[0])}", path)
    out: dict[int, str] = {}
    for line, row in enumerate(rows, start=2):
        try:
            v = int(str(row[value_col]).strip())
        except ValueError as exc:
            raise WsisegError(f"line {line}: value {row[value_col]!r} is not an integer", path) from exc
        if not 0 <= v <= 255:
            raise WsisegError(f"line {line}: value {v} is not in 0..255", path)
        out[v] = str(row[name_col]).strip()
    return out


class LabelMaskAnnotation(Annotation):
    """A uint8 label raster (PNG or TIFF) at level 0 or a stated downsample.

    Mask pixel ``(i, j)`` covers level-0 ``[j * d, (j + 1) * d) x [i * d, (i + 1) * d)``
    for downsample ``d``. Labels are read by nearest neighbour at output
    pixel centres (never interpolated). TIFF masks are read lazily, window
    by window, through tifffile's zarr store; PNG masks are decoded once on
    first use.

    Mask values go through a lookup table: with ``value_names`` each value's
    name is looked up in the class map; without, a value is taken as the
    class value itself when the class map has it. :data:`IGNORE_INDEX`
    stays ignored. Other values are unmapped: an error when read, or
    :data:`IGNORE_INDEX` with ``ignore_unmapped``.

    Parameters
    ----------
    path : path-like
    class_map : ClassMap
    downsample : float, optional
        Level-0 pixels per mask pixel (default 1).
    value_names : mapping of int to str, or path-like, optional
        Value -> class name, or a CSV for :func:`read_value_names`.
    ignore_unmapped : bool
    """

    def __init__(
        self,
        path: str | os.PathLike,
        class_map: ClassMap,
        downsample: float | None = None,
        *,
        value_names: Mapping[int, str] | str | os.PathLike | None = None,
        ignore_unmapped: bool = False,
    ):
        self.path = os.fspath(path)
        self.downsample = float(downsample) if downsample is not None else 1.0
        if not (math.isfinite(self.downsample) and self.downsample > 0):
            raise WsisegError(f"mask downsample must be positive, got {downsample!r}", path)
        self.ignore_unmapped = bool(ignore_unmapped)
        self.report = AnnotationReport(path=self.path, kind="label-mask")
        if value_names is not None and not isinstance(value_names, Mapping):
            value_names = read_value_names(value_names)
        self.lut, self.unmapped, self.names = _value_lut(class_map, value_names)
        self._array = None
        self._lock = threading.Lock()
        self.height, self.width = self._read_shape()
        self._checked = False

    def check_values(self) -> None:
        """Scan the whole mask once for unmapped values (in row bands, memory bounded).

        Raises :class:`WsisegError` listing them unless ``ignore_unmapped``;
        otherwise records their pixel counts in :attr:`report`.
        """
        band = max(1, (1 << 24) // max(1, self.width))
        for r in range(0, self.height, band):
            self._check_mapped(self._as_uint8(self.raw(slice(r, min(self.height, r + band)), slice(0, self.width))))
        self._checked = True

    # -- reading

    def _read_shape(self) -> tuple[int, int]:
        p = self.path
        try:
            if _is_tiff(p):
                import tifffile

                with tifffile.TiffFile(p) as tif:
                    shape = tif.series[0].levels[0].shape
            else:
                from PIL import Image

                with Image.open(p) as im:
                    shape = (im.height, im.width) + ((len(im.getbands()),) if len(im.getbands()) > 1 else ())
        except FileNotFoundError as exc:
            raise WsisegError("no such file", p) from exc
        except Exception as exc:  # any decoder error: one line naming the file
            raise WsisegError(f"cannot read label mask: {one_line(exc)}", p) from exc
        if len(shape) != 2:
            raise WsisegError(f"label mask must be single-channel, got shape {tuple(shape)}", p)
        return int(shape[0]), int(shape[1])

    def _data(self):
        """Array-like ``(H, W)`` supporting slicing; opened once, lazily."""
        if self._array is None:
            with self._lock:
                if self._array is None:
                    self._array = self._open()
        return self._array

    def _open(self):
        p = self.path
        try:
            if _is_tiff(p):
                import tifffile
                import zarr

                store = tifffile.TiffFile(p).series[0].aszarr(level=0)
                arr = zarr.open_array(store, mode="r")
            else:
                from PIL import Image

                with Image.open(p) as im:
                    arr = np.asarray(im)
        except Exception as exc:
            raise WsisegError(f"cannot read label mask: {one_line(exc)}", p) from exc
        if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
            raise WsisegError(f"label mask must hold integers, got {arr.dtype}", p)
        return arr

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_array"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def raw(self, rows: slice, cols: slice) -> np.ndarray:
        """Stored mask values of a window (no mapping)."""
        try:
            return np.asarray(self._data()[rows, cols])
        except WsisegError:
            raise
        except Exception as exc:
            raise WsisegError(f"cannot decode label mask window: {one_line(exc)}", self.path) from exc

    def labels(self, box: Region, out_shape: tuple[int, int]) -> np.ndarray:
        h, w = (int(s) for s in out_shape)
        if h < 1 or w < 1:
            raise ValueError(f"out_shape must be positive, got {out_shape}")
        d = self.downsample
        # Level-0 pixel centres of the output raster -> mask pixel (floor rule).
        xs = box.x + (np.arange(w) + 0.5) * (box.width / w)
        ys = box.y + (np.arange(h) + 0.5) * (box.height / h)
        ci, ri = np.floor(xs / d).astype(np.int64), np.floor(ys / d).astype(np.int64)
        # Within one mask pixel past the edge: rounding of the mask size, replicate.
        cvalid = (ci >= 0) & (ci <= self.width)
        rvalid = (ri >= 0) & (ri <= self.height)
        ci, ri = np.clip(ci, 0, self.width - 1), np.clip(ri, 0, self.height - 1)
        out = np.full((h, w), IGNORE_INDEX, dtype=np.uint8)
        if not cvalid.any() or not rvalid.any():
            return out
        c_lo, c_hi = int(ci[cvalid].min()), int(ci[cvalid].max()) + 1
        r_lo, r_hi = int(ri[rvalid].min()), int(ri[rvalid].max()) + 1
        window = self.raw(slice(r_lo, r_hi), slice(c_lo, c_hi))
        raw = self._as_uint8(window[np.ix_(ri[rvalid] - r_lo, ci[cvalid] - c_lo)])
        if not self._checked:
            self._check_mapped(raw)
        out[np.ix_(rvalid, cvalid)] = self.lut[raw]
        return out

    def _as_uint8(self, raw: np.ndarray) -> np.ndarray:
        if raw.dtype == np.uint8:
            return raw
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            bad = sorted({int(v) for v in np.unique(raw) if not 0 <= v <= 255})[:5]
            raise WsisegError(f"label mask values outside 0..255: {bad}", self.path)
        return raw.astype(np.uint8)

    def _check_mapped(self, raw: np.ndarray) -> None:
        counts = np.bincount(raw.ravel(), minlength=256)
        bad = np.flatnonzero((counts > 0) & self.unmapped)
        if bad.size == 0:
            return
        names = [self.names.get(int(v), f"value {int(v)}") for v in bad]
        if not self.ignore_unmapped:
            raise WsisegError(f"unmapped classes: {', '.join(names)} ({UNMAPPED_HINT})", self.path)
        for v, n in zip(bad, names):
            self.report.unmapped[n] = self.report.unmapped.get(n, 0) + int(counts[v])

    def check_slide_size(self, slide_size: tuple[int, int], slide_path: str | os.PathLike) -> None:
        """Mask size times downsample must match the slide within one downsample."""
        W, H = slide_size
        d = self.downsample
        if abs(self.width * d - W) > d + 1e-6 or abs(self.height * d - H) > d + 1e-6:
            raise WsisegError(
                f"label mask is {self.width}x{self.height} px at downsample {d:g} "
                f"(covers {self.width * d:g}x{self.height * d:g}) but slide {os.fspath(slide_path)} "
                f"is {W}x{H} px",
                self.path,
            )

    def __repr__(self) -> str:
        return f"LabelMaskAnnotation({self.path!r}, {self.width}x{self.height}, downsample={self.downsample:g})"


def _value_lut(
    class_map: ClassMap, value_names: Mapping[int, str] | None
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Mask value -> class value (uint8, unmapped -> ignore), the unmapped flags, and value names."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    unmapped = np.ones(256, dtype=bool)
    names: dict[int, str] = {}
    if value_names is None:
        lut[: class_map.num_classes] = np.arange(class_map.num_classes)
        unmapped[: class_map.num_classes] = False
    else:
        for v, name in value_names.items():
            names[int(v)] = name
            mapped = class_map.lookup(name)
            if mapped is not None:
                lut[int(v)], unmapped[int(v)] = mapped, False
    unmapped[IGNORE_INDEX] = False
    return lut, unmapped, names


def _is_tiff(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    except OSError:
        return False


def annotation_kind(path: str | os.PathLike) -> str:
    """``"geojson"``, ``"asap"`` or ``"mask"`` by extension, else by content; raises if neither."""
    name = os.fspath(path).lower()
    if name.endswith((".geojson", ".json", ".geojson.gz", ".json.gz")):
        return "geojson"
    if name.endswith(".xml"):
        return "asap"
    if name.endswith(MASK_SUFFIXES):
        return "mask"
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise WsisegError(f"cannot read annotation: {exc.strerror or exc}", path) from exc
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:2] == b"\x1f\x8b" or stripped[:1] in (b"{", b"["):
        return "geojson"
    if stripped[:1] == b"<":
        return "asap"
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "mask"
    raise WsisegError("unknown annotation format (expected GeoJSON, ASAP XML, PNG or TIFF label mask)", path)


def load_annotation(
    path: str | os.PathLike,
    class_map: ClassMap,
    *,
    downsample: float | None = None,
    ignore_unmapped: bool = False,
    value_names: Mapping[int, str] | str | os.PathLike | None = None,
    fill: int = 0,
    check_values: bool = True,
) -> Annotation:
    """Load any supported annotation file.

    Dispatch by extension (``.geojson``, ``.json``, ``.geojson.gz`` ->
    QuPath GeoJSON; ``.xml`` -> ASAP XML; ``.png``, ``.tif``, ``.tiff`` ->
    label mask), else by content.

    Parameters
    ----------
    path : path-like
    class_map : ClassMap
    downsample : float, optional
        Label masks only: level-0 pixels per mask pixel (default 1).
    ignore_unmapped : bool
        Unknown classes become :data:`IGNORE_INDEX` instead of an error.
    value_names : mapping or path-like, optional
        Label masks only: value -> class name (or a CSV such as BCSS
        ``GTcodes.csv``).
    fill : int
        Vector files only: value of pixels outside every polygon.
    check_values : bool
        Label masks only: scan the whole mask now for unmapped values
        (:meth:`LabelMaskAnnotation.check_values`), so that errors come
        before training rather than at the first bad region.

    Returns
    -------
    Annotation

    Raises
    ------
    WsisegError
        Missing or unreadable file, unknown format, unmapped classes.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise WsisegError("annotation file not found", p)
    kind = annotation_kind(p)
    if kind == "mask":
        mask = LabelMaskAnnotation(p, class_map, downsample, value_names=value_names, ignore_unmapped=ignore_unmapped)
        if check_values:
            mask.check_values()
        return mask
    if downsample not in (None, 1, 1.0):
        raise WsisegError("downsample applies to label masks only; vector annotations are in level-0 pixels", p)
    if kind == "geojson":
        named, label = read_qupath_geojson(p), "qupath-geojson"
    else:
        named, label = read_asap_xml(p), "asap-xml"
    shapes, report = clean_shapes(named, class_map, ignore_unmapped=ignore_unmapped, path=p, kind=label)
    return VectorAnnotation(p, shapes, report, fill=fill)
