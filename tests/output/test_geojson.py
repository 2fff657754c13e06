"""QuPath GeoJSON: exact vectorisation, classes that tile the raster, round trips on real labels, reading QuPath
exports."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from unittest import mock

import dask.array as da
import numpy as np
import pytest
import shapely
from _polygons import overlap_areas, rasterise
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from scipy import ndimage as ndi
from shapely.geometry import MultiPolygon, Polygon
from skimage.draw import polygon2mask

from wsiseg.errors import WsisegError
from wsiseg.output import geojson as gj
from wsiseg.output import tracing
from wsiseg.output.classes import ClassInfo
from wsiseg.output.geojson import label_polygons, read_qupath_geojson, write_qupath_geojson
from wsiseg.output.tracing import trace_regions
from wsiseg.slide.multiscale import Level

# BCSS class values present in the label map (names from sample_GTcodes.csv).
BCSS = {
    1: "mostly_tumor",
    2: "mostly_stroma",
    3: "mostly_lymphocytic_infiltrate",
    7: "exclude",
    13: "normal_acinus_or_duct",
    18: "blood_vessel",
}
CLASSES = [ClassInfo(v, n, (v * 13 % 256, 100, 200)) for v, n in BCSS.items()]
K = 5  # nearest downsampling of the 4542x4594 map, to ~1000 px


@pytest.fixture(scope="module")
def bcss(shared_data):
    path = next((shared_data / "annotations").glob("*mag-BASE.png"))
    full = np.asarray(Image.open(path))
    assert full.shape == (4594, 4542)
    return full[K // 2 :: K, K // 2 :: K].copy()  # nearest: block centres


@pytest.fixture(scope="module")
def bcss_written(bcss, tmp_path_factory):
    out = {}
    for tol in (0.0, 1.0):
        path = tmp_path_factory.mktemp("gj") / f"bcss-{tol}.geojson"
        n = write_qupath_geojson(path, (bcss, (K, K)), CLASSES, mpp=0.25, simplify_tolerance=tol)
        out[tol] = (path, n, read_qupath_geojson(path))
    return out


LUT = {c.name: c.value for c in CLASSES}


def test_bcss_exact_round_trip(bcss, bcss_written):
    path, n, items = bcss_written[0.0]
    assert n == len(items) > 20
    assert all(g.is_valid and isinstance(g, (Polygon, MultiPolygon)) for _, g in items)
    back = rasterise(items, bcss.shape, (K, K), LUT)
    assert (back == bcss).mean() == 1.0
    # Pixel-edge polygons: each class's area is its pixel count (in level-0 px^2).
    for c in CLASSES:
        area = sum(g.area for name, g in items if name == c.name)
        assert area == (bcss == c.value).sum() * K * K


def test_bcss_simplified_round_trip(bcss, bcss_written):
    _, n, items = bcss_written[1.0]
    assert n == bcss_written[0.0][1]
    assert all(g.is_valid for _, g in items)
    # Simplified boundaries keep every pixel centre on its side: the raster comes back exactly.
    back = rasterise(items, bcss.shape, (K, K), LUT)
    assert np.array_equal(back, bcss)

    # Simplification is the point: far fewer vertices than the exact outlines.
    def vertices(kept):
        return sum(shapely.get_num_coordinates(g) for _, g in kept)

    assert vertices(items) < vertices(bcss_written[0.0][2]) / 2


def test_bcss_classes_tile_without_overlaps(bcss, bcss_written):
    # Before shared-boundary simplification: 45 overlapping pairs, 466 level-0 px^2 in all.
    _, _, items = bcss_written[1.0]
    areas = overlap_areas(items)
    assert len(areas) > 50  # neighbours do meet, along their shared boundaries
    assert areas.max() == 0
    # No gaps either: the polygons cover exactly the non-background pixels' area.
    union = shapely.union_all([g for _, g in items])
    assert union.area == pytest.approx(sum(g.area for _, g in items), abs=1e-6)
    assert union.area == pytest.approx((bcss != 0).sum() * K * K, rel=1e-4)  # measured 6e-6


def test_coordinates_are_level0(bcss, bcss_written):
    _, _, items = bcss_written[0.0]
    h, w = bcss.shape
    union = shapely.union_all([g for _, g in items])
    x0, y0, x1, y1 = union.bounds
    assert x0 >= 0 and y0 >= 0 and x1 <= w * K and y1 <= h * K
    # Pixel edges at integers times the downsample.
    coords = shapely.get_coordinates([g for _, g in items])
    assert np.all(coords % K == 0)


def test_feature_properties(bcss_written):
    path, _, _ = bcss_written[1.0]
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection"
    f = doc["features"][0]
    assert f["type"] == "Feature"
    props = f["properties"]
    assert props["objectType"] == "annotation"
    cls = {c.name: c for c in CLASSES}[props["classification"]["name"]]
    assert props["classification"]["color"] == list(cls.color)
    geom = shapely.geometry.shape(f["geometry"])
    m = props["measurements"]
    assert m["Area px^2"] == pytest.approx(geom.area)
    assert m["Area µm^2"] == pytest.approx(geom.area * 0.25 * 0.25)
    # Background is never written.
    assert {x["properties"]["classification"]["name"] for x in doc["features"]} <= set(BCSS.values())


def test_holes_are_preserved(tmp_path):
    lab = np.zeros((40, 50), np.uint8)
    lab[5:35, 5:45] = 1
    lab[10:20, 10:20] = 0  # background hole
    lab[22:30, 25:40] = 2  # hole filled by another class
    lab[24:27, 30:33] = 0  # hole in the hole
    path = tmp_path / "holes.geojson"
    classes = [ClassInfo(0, "background", (0, 0, 0)), ClassInfo(1, "a", (255, 0, 0)), ClassInfo(2, "b", (0, 0, 255))]
    assert write_qupath_geojson(path, (lab, 4), classes, simplify_tolerance=0) == 2
    items = dict(read_qupath_geojson(path))
    a, b = items["a"], items["b"]
    assert isinstance(a, Polygon) and len(a.interiors) == 2 and a.is_valid
    assert isinstance(b, Polygon) and len(b.interiors) == 1 and b.is_valid
    assert a.area == (lab == 1).sum() * 16 and b.area == (lab == 2).sum() * 16
    # Independent rasteriser: skimage polygon2mask on pixel-centre index coordinates.
    for poly, value in ((a, 1), (b, 2)):

        def mask(ring):
            xy = np.asarray(ring.coords) / 4 - 0.5
            return polygon2mask(lab.shape, xy[:, ::-1])

        m = mask(poly.exterior)
        for hole in poly.interiors:
            m &= ~mask(hole)
        assert np.array_equal(m, lab == value)


def test_tolerance_keeps_holes_and_min_area_fills_them(tmp_path):
    lab = np.zeros((60, 60), np.uint8)
    lab[5:55, 5:55] = 1
    lab[20:23, 20:23] = 0  # 9-pixel hole
    lab[58:60, 0:2] = 1  # 4-pixel speck
    classes = [ClassInfo(1, "a", (1, 2, 3))]
    p = tmp_path / "a.geojson"
    assert write_qupath_geojson(p, (lab, 1), classes, simplify_tolerance=2) == 2
    assert len(read_qupath_geojson(p)[0][1].interiors) == 1
    p2 = tmp_path / "b.geojson"
    assert write_qupath_geojson(p2, (lab, 1), classes, min_area=10) == 1
    ((_, g),) = read_qupath_geojson(p2)
    assert len(g.interiors) == 0 and g.area == 50 * 50


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 14), st.integers(1, 14)), elements=st.integers(0, 3)))
def test_exact_tracing_property(lab):
    # Random rasters are full of diagonal pinches and touching holes.
    for v in (1, 2, 3):
        geoms = list(label_polygons(lab, v))
        assert all(g.is_valid for g in geoms)
        assert sum(g.area for g in geoms) == (lab == v).sum()
    items = [(str(v), g) for v in (1, 2, 3) for g in label_polygons(lab, v)]
    back = rasterise(items, lab.shape, (1, 1), {"1": 1, "2": 2, "3": 3})
    assert np.array_equal(back, lab)


def components(lab: np.ndarray) -> int:
    """Number of 4-connected regions of all values."""
    return sum(ndi.label(lab == v)[1] for v in np.unique(lab))


# Random maps (pixel noise: pinches everywhere) and blocky ones (long straight and staircase
# boundaries that simplification does shorten).
LABEL_MAPS = st.one_of(
    arrays(np.uint8, st.tuples(st.integers(1, 14), st.integers(1, 14)), elements=st.integers(1, 3)),
    st.builds(
        lambda small, k: np.kron(small, np.ones((k, k), np.uint8)),
        arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6)), elements=st.integers(1, 3)),
        st.integers(2, 6),
    ),
)


@settings(max_examples=80, deadline=None)
@given(LABEL_MAPS, st.sampled_from([0.0, 0.3, 1.0, 4.0]))
def test_classes_tile_the_raster_property(lab, tol):
    # Every value is a class, so the written polygons must tile the raster: no overlap, no gap.
    classes = [ClassInfo(v, f"c{v}", (v, v, v)) for v in (1, 2, 3)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.geojson"
        n = write_qupath_geojson(path, (lab, 1), classes, simplify_tolerance=tol)
        items = read_qupath_geojson(path)
    h, w = lab.shape
    assert n == len(items) == components(lab)
    assert all(g.is_valid for _, g in items)
    union = shapely.union_all([g for _, g in items])
    assert union.bounds == (0, 0, w, h)
    assert union.area == pytest.approx(h * w, abs=1e-9)
    assert sum(g.area for _, g in items) == pytest.approx(h * w, abs=1e-9)  # so no overlaps
    # Every pixel centre stays in its own region, simplified or not.
    back = rasterise(items, lab.shape, (1, 1), {c.name: c.value for c in classes})
    assert np.array_equal(back, lab)


@settings(max_examples=80, deadline=None)
@given(
    arrays(np.uint8, st.tuples(st.integers(1, 16), st.integers(1, 16)), elements=st.integers(0, 3)),
    st.sampled_from([0.0, 0.5, 2.0]),
)
def test_traced_polygons_need_no_repair_property(lab, tol):
    # Valid as traced and simplified: the make_valid fallback is never used.
    with mock.patch.object(tracing, "_repaired", side_effect=AssertionError("invalid polygon")):
        items = list(trace_regions(lab, [1, 2, 3], simplify_tolerance=tol))
    assert all(isinstance(g, Polygon) and g.is_valid for _, g in items)
    assert len(items) == components(lab) - ndi.label(lab == 0)[1]
    geoms = [g for _, g in items]
    if geoms:
        assert shapely.union_all(geoms).area == pytest.approx(sum(g.area for g in geoms), abs=1e-9)
    back = rasterise([(str(v), g) for v, g in items], lab.shape, (1, 1), {"1": 1, "2": 2, "3": 3})
    assert np.array_equal(back, lab)


def test_regions_touching_at_a_corner():
    # A C-shaped region closing on itself at a corner, around a pixel of another class: an exterior
    # and a hole that touch at that corner (OGC-valid), not one ring through the corner twice.
    c_shape = np.zeros((5, 5), np.uint8)
    c_shape[1:4, 1:4] = 1
    c_shape[2, 2] = c_shape[3, 3] = 2
    # A hole made of two pixels that touch at a corner: two holes touching there.
    eight = np.ones((4, 5), np.uint8)
    eight[1, 1] = eight[2, 2] = 2
    for lab, holes in ((c_shape, 1), (eight, 2)):
        for tol in (0.0, 1.0):
            with mock.patch.object(tracing, "_repaired", side_effect=AssertionError("invalid polygon")):
                items = list(trace_regions(lab, [1, 2], simplify_tolerance=tol))
            assert [v for v, _ in items] == [1, 2, 2]
            one = items[0][1]
            assert one.is_valid and len(one.interiors) == holes
            if tol == 0:
                assert one.area == (lab == 1).sum()
            rings = [one.exterior, *one.interiors] if holes == 1 else list(one.interiors)
            assert shapely.intersection(*rings).geom_type == "Point"


def test_any_integer_labels():
    # Negative and large values: the raster's outside must not be taken for one of them.
    lab = np.array([[-5, -5, 2**40], [np.iinfo(np.int64).max, -5, 2**40]], np.int64)
    assert [g.area for g in label_polygons(lab, -5)] == [3.0]
    assert [g.area for g in label_polygons(lab, 2**40)] == [2.0]
    assert [g.area for g in label_polygons(lab, np.iinfo(np.int64).max)] == [1.0]
    with pytest.raises(WsisegError, match="reserved"):
        list(label_polygons(np.array([[np.iinfo(np.int64).min]]), 0))


def test_narrow_and_wide_label_types_trace_alike():
    # Class masks are traced with 32-bit lookups, other label types with 64-bit ones: the same polygons
    # for label values in the same order (the order decides which way each shared arc is simplified).
    lab = np.random.default_rng(0).integers(0, 4, (24, 31))
    lab[ndi.binary_dilation(lab == 3)] = 2  # some larger regions among the single pixels
    want = None
    for dtype, values in (
        (np.int16, (np.iinfo(np.int16).min, 0, 1, 2)),
        (np.uint16, (0, 1, 2, 65535)),
        (np.int32, (-7, 0, 1, 2)),
        (np.int64, (-(2**40), 0, 1, 2**40)),
    ):
        typed = np.asarray(values, dtype)[lab]
        got = [(values.index(v), g.wkb) for v, g in trace_regions(typed, values, simplify_tolerance=1.0)]
        assert want is None or got == want, dtype
        want = got
    assert len(want) > 10


def test_anisotropic_downsample_and_lazy_level(tmp_path):
    lab = np.zeros((30, 40), np.uint8)
    lab[3:17, 7:31] = 1
    level = Level(da.from_array(lab, chunks=16), (4.02, 8.09))
    p = tmp_path / "a.geojson"
    write_qupath_geojson(p, level, [ClassInfo(1, "a", (1, 2, 3))], simplify_tolerance=0)
    ((_, g),) = read_qupath_geojson(p)
    assert g.bounds == pytest.approx((7 * 4.02, 3 * 8.09, 31 * 4.02, 17 * 8.09))


def test_gzip(bcss, tmp_path):
    small = bcss[::4, ::4]
    plain, packed = tmp_path / "a.geojson", tmp_path / "a.geojson.gz"
    n = write_qupath_geojson(plain, (small, 20), CLASSES)
    assert write_qupath_geojson(packed, (small, 20), CLASSES) == n
    raw = packed.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert gzip.decompress(raw) == plain.read_bytes()
    a, b = read_qupath_geojson(plain), read_qupath_geojson(packed)
    assert [(k, g.wkb) for k, g in a] == [(k, g.wkb) for k, g in b]
    # Reproducible bytes (no timestamp in the gzip header).
    again = tmp_path / "b.geojson.gz"
    write_qupath_geojson(again, (small, 20), CLASSES)
    assert again.read_bytes() == raw


def test_atomic_on_failure(tmp_path, monkeypatch):
    lab = np.zeros((20, 20), np.uint8)
    lab[2:5, 2:5] = 1
    lab[10:15, 10:15] = 1
    calls = []

    def boom(geom):
        calls.append(geom)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(geom)

    real = gj._geometry_json
    monkeypatch.setattr(gj, "_geometry_json", boom)
    out = tmp_path / "a.geojson.gz"
    with pytest.raises(RuntimeError):
        write_qupath_geojson(out, (lab, 1), [ClassInfo(1, "a", (1, 2, 3))])
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(gj, "_geometry_json", real)
    write_qupath_geojson(out, (lab, 1), [ClassInfo(1, "a", (1, 2, 3))])
    with pytest.raises(WsisegError, match="exists"):
        write_qupath_geojson(out, (lab, 1), [ClassInfo(1, "a", (1, 2, 3))])
    assert write_qupath_geojson(out, (lab, 1), [ClassInfo(1, "a", (1, 2, 3))], overwrite=True) == 2


def test_bad_inputs(tmp_path):
    cls = [ClassInfo(1, "a", (1, 2, 3))]
    with pytest.raises(WsisegError):
        write_qupath_geojson(tmp_path / "a.geojson", np.zeros((4, 4), np.uint8), cls)
    with pytest.raises(WsisegError):
        write_qupath_geojson(tmp_path / "a.geojson", (np.zeros((4, 4), np.float32), 1), cls)
    with pytest.raises(WsisegError):
        write_qupath_geojson(tmp_path / "a.geojson", (np.zeros((4, 4), np.uint8), 0), cls)
    assert not (tmp_path / "a.geojson").exists()


# What each QuPath export holds (inspected by hand): geometry types and classes.
QUPATH = {
    "qupath-brush.json": (["Polygon"], ["Unclassified"]),
    "qupath-ellipse.json": (["Polygon"], ["Unclassified"]),
    "qupath-line.json": (["LineString"], ["Unclassified"]),
    "qupath-multipoint.json": (["MultiPoint"], ["Unclassified"]),
    "qupath-point.json": (["Point"], ["Unclassified"]),
    "qupath-polygon-cell-classified.json": (["Polygon"] * 4, ["Cell", "Cell", "Nucleus", "Nucleus"]),
    "qupath-polygon.json": (["Polygon"], ["Unclassified"]),
    "qupath-polyline.json": (["LineString"], ["Unclassified"]),
    "qupath-rectangle.json": (["Polygon"], ["Unclassified"]),
    "qupath-wand.json": (["Polygon"], ["Unclassified"]),
    "qupath05.geojson": (["Polygon"] * 3, ["Unclassified"] * 3),
}


def test_read_qupath_exports(shared_data):
    folder = shared_data / "annotations" / "qupath"
    assert sorted(p.name for p in folder.iterdir()) == sorted(QUPATH)
    for name, (types, classes) in QUPATH.items():
        items = read_qupath_geojson(folder / name)
        assert [g.geom_type for _, g in items] == types, name
        assert [c for c, _ in items] == classes, name
    ((_, rect),) = read_qupath_geojson(folder / "qupath-rectangle.json")
    assert rect.bounds == (26268, 15298, 26478, 15474) and rect.area == 210 * 176
    ((_, pt),) = read_qupath_geojson(folder / "qupath-point.json")
    assert (pt.x, pt.y) == (26833.53, 15424.94)


def test_read_other_shapes(tmp_path):
    geom = {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 3], [0, 0]]]}
    cases = {
        "bare.json": geom,
        "fc.json": {
            "type": "FeatureCollection",
            "features": [
                {"type": "Feature", "geometry": geom, "properties": {"classification": "Tumor"}},
                {"type": "Feature", "geometry": None, "properties": {}},
            ],
        },
    }
    for name, doc in cases.items():
        (tmp_path / name).write_text(json.dumps(doc))
    assert [(c, g.area) for c, g in read_qupath_geojson(tmp_path / "bare.json")] == [("Unclassified", 6.0)]
    assert [(c, g.area) for c, g in read_qupath_geojson(tmp_path / "fc.json")] == [("Tumor", 6.0)]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(WsisegError, match="bad.json"):
        read_qupath_geojson(tmp_path / "bad.json")
    with pytest.raises(WsisegError):
        read_qupath_geojson(tmp_path / "missing.json")
