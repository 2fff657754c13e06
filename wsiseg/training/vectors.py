"""Vector annotations: ASAP XML reading, cleaning, class mapping and rasterisation of polygons.

Vector geometry is cleaned on load: points and lines are not areas and are
skipped (counted); invalid polygons (self-intersections, bow-ties) are
repaired with :func:`shapely.make_valid`, keeping the polygonal parts; empty
geometries are dropped. The counts are kept in an :class:`AnnotationReport`.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry import LineString, MultiPoint, MultiPolygon, Point, Polygon
from shapely.geometry.base import BaseGeometry

from wsiseg.errors import WsisegError
from wsiseg.limits import coordinates_problem, read_capped
from wsiseg.slide.tissue import Region
from wsiseg.training.classmap import IGNORE_INDEX, UNMAPPED_HINT, ClassMap

__all__ = [
    "AnnotationReport",
    "clean_shapes",
    "rasterise",
    "read_asap_xml",
]

logger = logging.getLogger(__name__)


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
        raise WsisegError(
            f"not valid XML: {expat.ErrorString(exc.code)}: line {exc.lineno}, column {exc.offset}", path
        ) from None


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
        raise WsisegError(f"unmapped classes: {', '.join(sorted(unmapped))} ({UNMAPPED_HINT})", path)
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
