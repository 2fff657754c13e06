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

Vector geometry is cleaned on load: points and lines are not areas and are
skipped (counted); invalid polygons (self-intersections, bow-ties) are
repaired with :func:`shapely.make_valid`, keeping the polygonal parts; empty
geometries are dropped. The counts are kept in an :class:`AnnotationReport`.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import LineString, MultiPoint, MultiPolygon, Point, Polygon
from shapely.geometry.base import BaseGeometry

from wsiseg.errors import WsisegError, one_line
from wsiseg.limits import coordinates_problem, read_capped
from wsiseg.output.classes import ClassInfo, default_palette
from wsiseg.output.geojson import read_qupath_geojson
from wsiseg.slide.tissue import Region

__all__ = [
    "IGNORE_INDEX",
    "Annotation",
    "AnnotationReport",
    "ClassMap",
    "LabelMaskAnnotation",
    "VectorAnnotation",
    "annotation_kind",
    "clean_shapes",
    "load_annotation",
    "load_class_map",
    "rasterise",
    "read_asap_xml",
    "read_value_names",
]

logger = logging.getLogger(__name__)

#: Label value of pixels that carry no supervision (the losses' ``ignore_index``).
IGNORE_INDEX = 255

VECTOR_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".json.gz", ".xml")
MASK_SUFFIXES = (".png", ".tif", ".tiff")

_UNMAPPED_HINT = "add them to the classes YAML or pass --ignore-unmapped"


# ---------------------------------------------------------------------------
# class map


def _norm(name: str) -> str:
    """Case- and whitespace-insensitive key for class names and aliases."""
    return " ".join(str(name).split()).casefold()


@dataclass(frozen=True)
class ClassMap:
    """Class names (and aliases) -> label values and colours.

    Attributes
    ----------
    classes : tuple of ClassInfo
        One class per model channel, sorted by value; values are
        ``0 .. n - 1`` so that channel ``i`` predicts value ``i``. Value 0 is
        background.
    aliases : Mapping[str, int]
        Normalised name (case-folded, whitespace collapsed) -> value, for
        every class name, every alias and every ignored name
        (-> :data:`IGNORE_INDEX`).
    source : str or None
        The YAML file it was read from, for messages.
    """

    classes: tuple[ClassInfo, ...]
    aliases: Mapping[str, int] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        classes = tuple(sorted(self.classes, key=lambda c: c.value))
        values = [c.value for c in classes]
        if values != list(range(len(classes))) or not classes:
            raise WsisegError(
                f"class values must be 0..n-1 without gaps (channel i predicts value i), got {values}", self.source
            )
        if len(classes) >= IGNORE_INDEX:
            raise WsisegError(f"at most {IGNORE_INDEX} classes (255 is the ignore value)", self.source)
        table = {_norm(c.name): c.value for c in classes}
        if len(table) != len(classes):
            raise WsisegError(f"class names must be unique, got {[c.name for c in classes]}", self.source)
        for key, value in dict(self.aliases).items():
            k = _norm(key)
            if table.get(k, value) != value:
                raise WsisegError(f"name {key!r} maps to both {table[k]} and {value}", self.source)
            if value != IGNORE_INDEX and not 0 <= value < len(classes):
                raise WsisegError(f"alias {key!r} maps to unknown value {value}", self.source)
            table[k] = int(value)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "aliases", table)

    @classmethod
    def from_names(cls, names: Sequence[str], *, ignore: Iterable[str] = ()) -> ClassMap:
        """Class map with values ``0 .. n - 1`` in the order of ``names`` (background first)."""
        colors = default_palette(len(names))
        classes = tuple(ClassInfo(i, n, c) for i, (n, c) in enumerate(zip(names, colors)))
        return cls(classes, {n: IGNORE_INDEX for n in ignore})

    @classmethod
    def from_classes(cls, classes: Iterable[ClassInfo], *, ignore: Iterable[str] = ()) -> ClassMap:
        """Class map from a class table (e.g. a model's classes)."""
        return cls(tuple(classes), {n: IGNORE_INDEX for n in ignore})

    @property
    def num_classes(self) -> int:
        """Number of classes (model output channels), background included."""
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        """Class names in channel order."""
        return [c.name for c in self.classes]

    def lookup(self, name: str) -> int | None:
        """Label value of a class name or alias; :data:`IGNORE_INDEX` for ignored names; None if unknown."""
        return self.aliases.get(_norm(name))

    def to_classes(self) -> list[ClassInfo]:
        """The class table in channel order (``classes[i].value == i``)."""
        return list(self.classes)


def load_class_map(path: str | os.PathLike) -> ClassMap:
    """Read a classes YAML file.

    Format: a list of classes, or a mapping with ``classes`` (that list) and
    ``ignore`` (names whose regions become :data:`IGNORE_INDEX`)::

        classes:
          - {value: 1, name: Tumor, color: [230, 25, 75], aliases: [tumour, "Tumor region"]}
          - {value: 2, name: Stroma}
        ignore: [Exclude, Artefact]

    A list item of the form ``{ignore: [...]}`` is accepted too. ``color``
    is optional (``[r, g, b]`` or ``"#rrggbb"``; default: a palette colour). Value 0 is background:
    added as ``background`` (black) unless the file defines value 0. Values
    must be ``0 .. n - 1`` without gaps. Names and aliases match
    case-insensitively, with runs of whitespace collapsed.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    ClassMap

    Raises
    ------
    WsisegError
        Unreadable file, bad YAML, bad entries; the message names the file.
    """
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise WsisegError(f"cannot read classes YAML: {one_line(exc)}", path) from exc
    ignore: list[str] = []
    if isinstance(doc, dict):
        unknown = set(doc) - {"classes", "ignore"}
        if unknown:
            raise WsisegError(f"unknown keys {sorted(unknown)} (expected 'classes', 'ignore')", path)
        entries, ignore = doc.get("classes") or [], list(doc.get("ignore") or [])
    elif isinstance(doc, list):
        entries = doc
    else:
        raise WsisegError("classes YAML must be a list of classes or a mapping with 'classes'", path)
    if not isinstance(entries, list):
        raise WsisegError("'classes' must be a list", path)
    specs = []
    for k, e in enumerate(entries):
        if isinstance(e, dict) and set(e) == {"ignore"}:
            ignore.extend(e["ignore"] or [])
            continue
        if not isinstance(e, dict) or "value" not in e or "name" not in e:
            raise WsisegError(f"class entry {k + 1} needs 'value' and 'name', got {e!r}", path)
        unknown = set(e) - {"value", "name", "color", "aliases"}
        if unknown:
            raise WsisegError(f"class entry {k + 1}: unknown keys {sorted(unknown)}", path)
        v = e["value"]
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < IGNORE_INDEX:
            raise WsisegError(
                f"class {e['name']!r}: value must be an integer in 0..254 (use 'ignore:' for ignored names), got {v!r}",
                path,
            )
        aliases = e.get("aliases") or []
        if isinstance(aliases, str):
            aliases = [aliases]
        color = e.get("color")
        if isinstance(color, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", color.strip()):
            color = tuple(int(color.strip()[i : i + 2], 16) for i in (1, 3, 5))
        specs.append((v, str(e["name"]), color, [str(a) for a in aliases]))
    if not any(v == 0 for v, *_ in specs):
        specs.append((0, "background", (0, 0, 0), []))
    specs.sort(key=lambda s: s[0])
    palette = default_palette(max(len(specs), 1))
    try:
        classes = tuple(
            ClassInfo(v, name, tuple(color) if color is not None else palette[i])
            for i, (v, name, color, _) in enumerate(specs)
        )
    except (WsisegError, TypeError) as exc:
        raise WsisegError(f"bad class entry: {one_line(exc)}", path) from exc
    aliases = {a: v for v, _, _, al in specs for a in al}
    for name in ignore:
        aliases[str(name)] = IGNORE_INDEX
    return ClassMap(classes, aliases, source=str(path))


# ---------------------------------------------------------------------------
# reading vector files


def read_asap_xml(path: str | os.PathLike) -> list[tuple[str, BaseGeometry]]:
    """Read ASAP XML annotations.

    ``Polygon``, ``Rectangle`` and ``Spline`` annotations become polygons
    (a spline through its control points, as drawn by its vertices);
    ``Dot`` becomes a point and ``PointSet`` a multipoint; any other type a
    line string. The class name is ``PartOfGroup`` unless it is ``None``
    (or missing), then ``Name``. Coordinates are taken in ``Order``;
    decimal commas (written by ASAP under some locales) are accepted.

    Files that declare a DOCTYPE or entities, in any encoding (UTF-16
    without a byte-order mark included), are refused before parsing (no
    entity expansion, no external resources), as are files larger than
    :data:`~wsiseg.limits.MAX_ANNOTATION_BYTES`.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    list of (str, shapely geometry)
        In file order, as stored (not repaired). Polygons with fewer than
        three vertices are returned empty.

    Raises
    ------
    WsisegError
        Unreadable or too large file, DOCTYPE/entity declarations, not ASAP XML.
    """
    try:
        data = read_capped(path)
    except ValueError as exc:
        raise WsisegError(f"refused: {exc}", path) from exc
    except (OSError, EOFError) as exc:
        raise WsisegError(f"cannot read ASAP XML: {getattr(exc, 'strerror', None) or exc}", path) from exc
    _refuse_dtd(data, path)
    try:
        parser = ET.XMLParser()
        parser.feed(data)
        root = parser.close()
    except ET.ParseError as exc:
        raise WsisegError(f"not valid XML: {exc}", path) from exc
    if root.tag != "ASAP_Annotations":
        raise WsisegError(f"not ASAP XML (root element <{root.tag}>, expected <ASAP_Annotations>)", path)
    out: list[tuple[str, BaseGeometry]] = []
    for ann in root.iter("Annotation"):
        group = (ann.get("PartOfGroup") or "").strip()
        name = group if group and group != "None" else (ann.get("Name") or "").strip() or "None"
        kind = (ann.get("Type") or "").strip().lower()
        try:
            pts = sorted(
                (
                    (float(c.get("Order", k)), float(c.get("X").replace(",", ".")), float(c.get("Y").replace(",", ".")))
                    for k, c in enumerate(ann.iter("Coordinate"))
                ),
                key=lambda t: t[0],
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise WsisegError(f"annotation {ann.get('Name')!r}: bad coordinate ({exc})", path) from exc
        xy = [(x, y) for _, x, y in pts]
        if kind in ("polygon", "rectangle", "spline"):
            geom: BaseGeometry = Polygon(xy) if len(xy) >= 3 else Polygon()
        elif kind == "dot":
            geom = Point(xy[0]) if xy else Point()
        elif kind == "pointset":
            geom = MultiPoint(xy)
        else:
            geom = LineString(xy) if len(xy) >= 2 else LineString()
        out.append((name, geom))
    return out


class _Declaration(Exception):
    """A DOCTYPE or ENTITY declaration met while pre-scanning XML."""


def _refuse_dtd(data: bytes, path) -> None:
    """Refuse XML that declares a DOCTYPE or entities, in whatever encoding expat detects.

    A byte search misses UTF-16 without a byte-order mark (and other
    encodings): expat itself decodes the document here, with handlers that
    stop at the first declaration, before anything is expanded.
    """
    from xml.parsers import expat

    def stop(*_args):
        raise _Declaration

    scanner = expat.ParserCreate()
    scanner.StartDoctypeDeclHandler = stop
    scanner.EntityDeclHandler = stop
    try:
        scanner.Parse(data, True)
    except _Declaration:
        raise WsisegError("refusing XML with DOCTYPE or ENTITY declarations", path) from None
    except expat.ExpatError as exc:
        raise WsisegError(f"not valid XML: {expat.ErrorString(exc.code)}: line {exc.lineno}, column {exc.offset}",
                          path) from None


# ---------------------------------------------------------------------------
# cleaning and class mapping


@dataclass
class AnnotationReport:
    """What loading one annotation file did.

    Attributes
    ----------
    path : str
    kind : str
        ``"qupath-geojson"``, ``"asap-xml"`` or ``"label-mask"``.
    read : int
        Geometries read (vector files).
    areas : int
        Polygonal shapes kept.
    non_area : dict of str to int
        Skipped geometries that are not areas, by geometry type
        (``Point``, ``LineString``, ...).
    repaired : int
        Invalid polygons repaired with :func:`shapely.make_valid`.
    dropped_empty : int
        Geometries dropped because they were (or became) empty.
    unmapped : dict of str to int
        Class names (or ``"value N"`` for masks) not in the class map, with
        counts (shapes, or pixels of masks). Only non-empty when unmapped
        classes were allowed; they become :data:`IGNORE_INDEX`.
    classes : dict of str to int
        Kept shapes per class name (vector files).
    """

    path: str
    kind: str
    read: int = 0
    areas: int = 0
    non_area: dict[str, int] = field(default_factory=dict)
    repaired: int = 0
    dropped_empty: int = 0
    unmapped: dict[str, int] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs."""
        parts = [f"{self.areas} areas"]
        if self.non_area:
            parts.append("skipped non-area " + ", ".join(f"{n} {k}" for k, n in sorted(self.non_area.items())))
        if self.repaired:
            parts.append(f"repaired {self.repaired} invalid")
        if self.dropped_empty:
            parts.append(f"dropped {self.dropped_empty} empty")
        if self.unmapped:
            parts.append("unmapped (ignored) " + ", ".join(sorted(self.unmapped)))
        return f"{self.path}: " + "; ".join(parts)


def _polygonal_part(geom: BaseGeometry) -> Polygon | MultiPolygon | None:
    """The non-empty polygons of a geometry (of a collection too), or None if it has none."""
    polys: list[Polygon] = []
    stack = [geom]
    while stack:
        g = stack.pop()
        if isinstance(g, Polygon):
            if not g.is_empty:
                polys.append(g)
        elif hasattr(g, "geoms"):
            stack.extend(reversed(list(g.geoms)))
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def _is_area_type(geom: BaseGeometry) -> bool:
    if isinstance(geom, (Polygon, MultiPolygon)):
        return True
    if geom.geom_type == "GeometryCollection":
        return any(_is_area_type(g) for g in geom.geoms)
    return False


def clean_shapes(
    named: Iterable[tuple[str, BaseGeometry]],
    class_map: ClassMap,
    *,
    ignore_unmapped: bool = False,
    path: str | os.PathLike | None = None,
    kind: str = "vector",
) -> tuple[list[tuple[int, Polygon | MultiPolygon]], AnnotationReport]:
    """Keep the valid polygonal areas of named geometries and map their classes.

    Parameters
    ----------
    named : iterable of (str, shapely geometry)
        As returned by :func:`read_qupath_geojson` or :func:`read_asap_xml`.
    class_map : ClassMap
    ignore_unmapped : bool
        Give shapes of unknown classes :data:`IGNORE_INDEX` (no supervision)
        instead of raising.
    path : path-like, optional
        The file, for messages and the report.
    kind : str
        Report's ``kind``.

    Returns
    -------
    shapes : list of (int, Polygon or MultiPolygon)
        Label value and valid geometry, in file order.
    report : AnnotationReport

    Raises
    ------
    WsisegError
        Unknown class names (listing all of them) unless ``ignore_unmapped``.
    """
    report = AnnotationReport(path=os.fspath(path) if path is not None else "<memory>", kind=kind)
    non_area: Counter[str] = Counter()
    unmapped: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    shapes: list[tuple[int, Polygon | MultiPolygon]] = []
    for name, geom in named:
        report.read += 1
        if geom is None or (geom.is_empty and not _is_area_type(geom)):
            report.dropped_empty += 1
            continue
        problem = coordinates_problem(geom)
        if problem:  # NaN or huge coordinates would fail deep inside GEOS
            raise WsisegError(f"annotation {report.read} ({name!r}): {problem}", path)
        if not _is_area_type(geom):
            non_area[geom.geom_type] += 1
            continue
        if geom.is_empty:
            report.dropped_empty += 1
            continue
        repaired = not geom.is_valid
        part = _polygonal_part(shapely.make_valid(geom) if repaired else geom)
        if part is not None and not part.is_valid:
            # e.g. overlapping polygons gathered from a collection
            part, repaired = _polygonal_part(shapely.make_valid(part)), True
        if part is None or part.is_empty or part.area == 0:
            report.dropped_empty += 1
            continue
        report.repaired += repaired
        geom = part
        value = class_map.lookup(name)
        if value is None:
            unmapped[name] += 1
            value = IGNORE_INDEX
        kept[name] += 1
        shapes.append((value, geom))
    if unmapped and not ignore_unmapped:
        raise WsisegError(f"unmapped classes: {', '.join(sorted(unmapped))} ({_UNMAPPED_HINT})", path)
    report.areas = len(shapes)
    report.non_area = dict(non_area)
    report.unmapped = dict(unmapped)
    report.classes = dict(kept)
    if report.non_area or report.repaired or report.dropped_empty or report.unmapped:
        logger.warning("%s", report.summary())
    return shapes, report


# ---------------------------------------------------------------------------
# rasterisation


def _ring_edges(geom: Polygon | MultiPolygon) -> np.ndarray:
    """All ring edges (exteriors and holes) as ``(E, 4)`` ``x0, y0, x1, y1``."""
    rings = shapely.get_rings(shapely.get_parts(geom))  # get_rings needs Polygons, not MultiPolygons
    xy, idx = shapely.get_coordinates(rings, return_index=True)
    same = idx[:-1] == idx[1:]  # consecutive vertices of one (closed) ring
    return np.concatenate([xy[:-1][same], xy[1:][same]], axis=1)


def _fill(edges: np.ndarray, h: int, w: int) -> np.ndarray:
    """Even-odd scanline fill of ring edges given in output pixel coordinates.

    Pixel ``(i, j)`` is inside when a ray from its centre ``(j + 0.5, i + 0.5)``
    to the left crosses the rings an odd number of times. Edges crossing a
    row are counted half-open in ``y`` (``min <= y < max``) and a crossing
    at ``x`` toggles every pixel whose centre is ``>= x``, so polygon edges
    that pass exactly through pixel centres include the left/top edge and
    exclude the right/bottom one, like the half-open pixels themselves.
    """
    x0, y0, x1, y1 = edges.T
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    # Rows whose centre lies in [ylo, yhi): i + 0.5 >= ylo and i + 0.5 < yhi.
    r0 = np.clip(np.ceil(ylo - 0.5), 0, h).astype(np.int64)
    r1 = np.clip(np.ceil(yhi - 0.5), 0, h).astype(np.int64)
    counts = np.maximum(r1 - r0, 0)
    total = int(counts.sum())
    out = np.zeros((h, w), dtype=bool)
    if total == 0:
        return out
    e = np.repeat(np.arange(len(edges)), counts)
    starts = np.cumsum(counts) - counts
    rows = r0[e] + (np.arange(total) - starts[e])
    yc = rows + 0.5
    # counts > 0 implies y0 != y1 for that edge
    xc = x0[e] + (yc - y0[e]) * (x1[e] - x0[e]) / (y1[e] - y0[e])
    cols = np.clip(np.ceil(xc - 0.5), 0, w).astype(np.int64)
    toggles = np.bincount(rows * (w + 1) + cols, minlength=h * (w + 1)).reshape(h, w + 1)[:, :w]
    np.cumsum(toggles & 1, axis=1, out=toggles)
    return (toggles & 1).astype(bool)


def rasterise(
    shapes: Sequence[tuple[int, BaseGeometry]],
    box: Region,
    out_shape: tuple[int, int],
    *,
    fill: int = 0,
    order: str = "area",
) -> np.ndarray:
    """Rasterise labelled polygons over a level-0 box at a given resolution.

    Output pixel ``(i, j)`` stands for the level-0 point at its centre,
    ``(box.x + (j + 0.5) * box.width / w, box.y + (i + 0.5) * box.height / h)``
    (:mod:`wsiseg.sampling.coords`), and gets the value of a polygon that
    contains that point (holes excluded). Centres exactly on an edge count
    as inside on the left/top edges and outside on the right/bottom ones, so
    an axis-aligned rectangle with integer corners rasterised at 1 px per
    pixel covers exactly its area.

    Parameters
    ----------
    shapes : sequence of (int, Polygon or MultiPolygon)
        Label value and valid polygonal geometry in level-0 pixels.
    box : Region
        Level-0 box the raster covers.
    out_shape : (int, int)
        Raster ``(h, w)``; the caller picks the resolution (never the full
        level-0 size of a gigapixel slide).
    fill : int
        Value of pixels outside every polygon (0, background).
    order : {"area", "given"}
        Drawing order; later shapes overwrite earlier ones. ``"area"``
        (default) draws larger shapes first (stable for equal areas), so a
        small region nested inside a large one keeps its class; ``"given"``
        draws in the order of ``shapes`` (file order).

    Returns
    -------
    numpy.ndarray
        ``(h, w)`` uint8.

    Notes
    -----
    An exact even-odd scanline fill over each shape's bounding box: cost is
    the number of edge/row crossings plus the pixels in the box, independent
    of the number of vertices per row (unlike point-in-polygon per pixel).
    """
    h, w = (int(s) for s in out_shape)
    if h < 1 or w < 1:
        raise ValueError(f"out_shape must be positive, got {out_shape}")
    if order not in ("area", "given"):
        raise ValueError(f"order must be 'area' or 'given', got {order!r}")
    values = [int(v) for v, _ in shapes]
    if not all(0 <= v <= 255 for v in [*values, fill]):
        raise ValueError(f"label values must be in 0..255, got {sorted(set(values))} and fill {fill}")
    out = np.full((h, w), fill, dtype=np.uint8)
    if not shapes:
        return out
    geoms = np.array([g for _, g in shapes], dtype=object)
    sx, sy = w / box.width, h / box.height
    bounds = shapely.bounds(geoms)
    # Bounding boxes in output pixel coordinates -> pixel-centre index ranges.
    c0 = np.clip(np.ceil((bounds[:, 0] - box.x) * sx - 0.5), 0, w).astype(np.int64)
    c1 = np.clip(np.ceil((bounds[:, 2] - box.x) * sx - 0.5) + 1, 0, w).astype(np.int64)
    r0 = np.clip(np.ceil((bounds[:, 1] - box.y) * sy - 0.5), 0, h).astype(np.int64)
    r1 = np.clip(np.ceil((bounds[:, 3] - box.y) * sy - 0.5) + 1, 0, h).astype(np.int64)
    idx = np.arange(len(shapes))
    if order == "area":
        idx = np.argsort(-shapely.area(geoms), kind="stable")
    for k in idx:
        if c1[k] <= c0[k] or r1[k] <= r0[k]:
            continue
        edges = _ring_edges(geoms[k])
        # Into the sub-window's pixel coordinates.
        edges[:, [0, 2]] = (edges[:, [0, 2]] - box.x) * sx - c0[k]
        edges[:, [1, 3]] = (edges[:, [1, 3]] - box.y) * sy - r0[k]
        mask = _fill(edges, int(r1[k] - r0[k]), int(c1[k] - c0[k]))
        out[r0[k] : r1[k], c0[k] : c1[k]][mask] = values[k]
    return out


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
            raise WsisegError(f"unmapped classes: {', '.join(names)} ({_UNMAPPED_HINT})", self.path)
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

