"""Annotations: class maps, QuPath/ASAP parsing, repair, exact rasterisation, label masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import tifffile
from PIL import Image
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry import box as sbox

from wsiseg.training.annotations import LabelMaskAnnotation, VectorAnnotation, load_annotation, read_value_names
from wsiseg.training.classmap import IGNORE_INDEX, ClassMap, load_class_map
from wsiseg.training.vectors import clean_shapes, rasterise, read_asap_xml
from wsiseg.errors import WsisegError
from wsiseg.output.geojson import read_qupath_geojson
from wsiseg.slide.tissue import Region

# What each real export holds: (areas kept, non-area geometry types skipped, class names of the areas).
QUPATH = {
    "qupath-brush.json": (1, {}, {"Unclassified"}),
    "qupath-ellipse.json": (1, {}, {"Unclassified"}),
    "qupath-line.json": (0, {"LineString": 1}, set()),
    "qupath-multipoint.json": (0, {"MultiPoint": 1}, set()),
    "qupath-point.json": (0, {"Point": 1}, set()),
    "qupath-polygon-cell-classified.json": (4, {}, {"Cell", "Nucleus"}),
    "qupath-polygon.json": (1, {}, {"Unclassified"}),
    "qupath-polyline.json": (0, {"LineString": 1}, set()),
    "qupath-rectangle.json": (1, {}, {"Unclassified"}),
    "qupath-wand.json": (1, {}, {"Unclassified"}),
    "qupath05.geojson": (3, {}, {"Unclassified"}),
}
ASAP = {
    "asap-dot.xml": (0, {"Point": 1}),
    "asap-pointset.xml": (0, {"MultiPoint": 1}),
    "asap-polygon.xml": (1, {}),
}
ALL = ClassMap.from_names(["background", "region", "Cell", "Nucleus"])
ALL = ClassMap(ALL.classes, {"Unclassified": 1, "Annotation 0": 1})


def _write_geojson(path: Path, features: list[dict]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _feature(geometry: dict, name: str | None = "Tumor") -> dict:
    props = {"classification": {"name": name, "color": [255, 0, 0]}} if name else {}
    return {"type": "Feature", "geometry": geometry, "properties": props}


# ---------------------------------------------------------------------------
# class map


def test_class_map_yaml(tmp_path):
    p = tmp_path / "classes.yaml"
    p.write_text(
        "classes:\n"
        "  - {value: 1, name: Tumor, color: [255, 0, 0], aliases: [tumour, 'Tumor region']}\n"
        "  - {value: 2, name: Stroma}\n"
        "ignore: [Exclude]\n"
    )
    cm = load_class_map(p)
    assert [c.value for c in cm.to_classes()] == [0, 1, 2]
    assert cm.names == ["background", "Tumor", "Stroma"] and cm.num_classes == 3
    assert cm.to_classes()[0].color == (0, 0, 0) and cm.to_classes()[1].color == (255, 0, 0)
    assert cm.lookup("TUMOUR") == 1 and cm.lookup("tumor  REGION") == 1 and cm.lookup("stroma") == 2
    assert cm.lookup("exclude") == IGNORE_INDEX and cm.lookup("Background") == 0
    assert cm.lookup("necrosis") is None


def test_class_map_yaml_list_form_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- {value: 0, name: Normal}\n- {value: 1, name: Tumor, color: '#ff8000'}\n- ignore: [Other]\n")
    cm = load_class_map(p)
    assert cm.names == ["Normal", "Tumor"] and cm.lookup("other") == IGNORE_INDEX
    assert cm.to_classes()[1].color == (255, 128, 0)
    p.write_text("- {value: 2, name: Tumor}\n")
    with pytest.raises(WsisegError, match="0..n-1") as e:
        load_class_map(p)
    assert str(p) in str(e.value)
    p.write_text("- {value: 255, name: Tumor}\n")
    with pytest.raises(WsisegError, match="ignore"):
        load_class_map(p)
    p.write_text("- {value: 1, name: Tumor, aliases: [x]}\n- {value: 2, name: Stroma, aliases: [X]}\n")
    with pytest.raises(WsisegError, match="maps to both"):
        load_class_map(p)
    p.write_text("- [unclosed\n")
    with pytest.raises(WsisegError, match="YAML"):
        load_class_map(p)


# ---------------------------------------------------------------------------
# real vector files


@pytest.mark.parametrize("name", sorted(QUPATH))
def test_qupath_exports_parse(shared_data, name):
    path = shared_data / "annotations" / "qupath" / name
    areas, non_area, classes = QUPATH[name]
    ann = load_annotation(path, ALL)
    assert isinstance(ann, VectorAnnotation)
    assert ann.report.areas == len(ann.shapes) == areas
    assert ann.report.non_area == non_area
    assert set(ann.report.classes) == classes
    assert ann.report.repaired == ann.report.dropped_empty == 0
    assert all(g.is_valid and g.area > 0 for _, g in ann.shapes)


def test_qupath_classified_cells_map_through_class_map(shared_data):
    ann = load_annotation(shared_data / "annotations" / "qupath" / "qupath-polygon-cell-classified.json", ALL)
    assert sorted(v for v, _ in ann.shapes) == [2, 2, 3, 3]


@pytest.mark.parametrize("name", sorted(ASAP))
def test_asap_files_parse(shared_data, name):
    path = shared_data / "annotations" / "asap" / name
    raw = read_asap_xml(path)
    assert len(raw) == 1 and raw[0][0] == "Annotation 0"  # PartOfGroup="None" -> Name
    areas, non_area = ASAP[name]
    ann = load_annotation(path, ALL)
    assert ann.report.areas == areas and ann.report.non_area == non_area


def test_asap_polygon_geometry(shared_data):
    ((_, geom),) = read_asap_xml(shared_data / "annotations" / "asap" / "asap-polygon.xml")
    assert geom.geom_type == "Polygon" and len(geom.exterior.coords) == 7
    assert geom.exterior.coords[0] == pytest.approx((22851.3281, 16551.1797))


def test_unknown_classes_reported_with_file(shared_data):
    path = shared_data / "annotations" / "qupath" / "qupath-polygon-cell-classified.json"
    cm = ClassMap.from_names(["background", "Tumor"])
    with pytest.raises(WsisegError) as e:
        load_annotation(path, cm)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "unmapped classes: Cell, Nucleus" in msg and "--ignore-unmapped" in msg
    ann = load_annotation(path, cm, ignore_unmapped=True)
    assert ann.report.unmapped == {"Cell": 2, "Nucleus": 2}
    assert {v for v, _ in ann.shapes} == {IGNORE_INDEX}
    # points and lines are no areas: their (unmapped) class is never an error
    load_annotation(shared_data / "annotations" / "qupath" / "qupath-point.json", cm)


def test_asap_group_name_and_decimal_comma(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        '<Annotation Name="A" Type="Rectangle" PartOfGroup="Tumor"><Coordinates>'
        '<Coordinate Order="2" X="10" Y="10"/><Coordinate Order="0" X="0" Y="0"/>'
        '<Coordinate Order="3" X="0" Y="10"/><Coordinate Order="1" X="10,0" Y="0"/>'
        "</Coordinates></Annotation>"
        '<Annotation Name="B" Type="Polygon" PartOfGroup="Tumor"><Coordinates>'
        '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="1" Y="1"/></Coordinates></Annotation>'
        "</Annotations></ASAP_Annotations>"
    )
    ann = load_annotation(p, ClassMap.from_names(["background", "Tumor"]))
    assert ann.report.areas == 1 and ann.report.dropped_empty == 1
    assert ann.shapes[0][0] == 1 and ann.shapes[0][1].area == 100


def test_asap_doctype_refused(tmp_path):
    p = tmp_path / "evil.xml"
    p.write_text(
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
        "<ASAP_Annotations><Annotations/></ASAP_Annotations>"
    )
    with pytest.raises(WsisegError, match="DOCTYPE") as e:
        read_asap_xml(p)
    assert str(p) in str(e.value)
    p.write_text("<NotAsap/>")
    with pytest.raises(WsisegError, match="not ASAP XML"):
        read_asap_xml(p)


def test_invalid_geometry_repaired_and_empty_dropped(tmp_path):
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    empty = {"type": "Polygon", "coordinates": [[]]}
    degenerate = {"type": "Polygon", "coordinates": [[[5, 5], [5, 5], [5, 5], [5, 5]]]}
    line = {"type": "LineString", "coordinates": [[0, 0], [3, 3]]}
    good = {"type": "Polygon", "coordinates": [[[20, 20], [30, 20], [30, 30], [20, 30], [20, 20]]]}
    p = _write_geojson(tmp_path / "a.geojson", [_feature(g) for g in (bowtie, empty, degenerate, line, good)])
    ann = load_annotation(p, ClassMap.from_names(["background", "Tumor"]))
    r = ann.report
    assert (r.read, r.areas, r.repaired, r.dropped_empty, r.non_area) == (5, 2, 1, 2, {"LineString": 1})
    fixed = ann.shapes[0][1]
    assert isinstance(fixed, MultiPolygon) and fixed.is_valid and fixed.area == pytest.approx(50)
    # the two triangles of the bow-tie rasterise as two triangles (their diagonals pass
    # through pixel centres: those are the only points where the half-open rule decides)
    lab = ann.labels(Region(0, 0, 10, 10), (10, 10))
    X, Y = np.meshgrid(np.arange(10) + 0.5, np.arange(10) + 0.5)
    diff = (lab == 1) != shapely.contains_xy(fixed, X, Y)
    assert ((X[diff] == Y[diff]) | (X[diff] + Y[diff] == 10)).all()
    assert (lab == 1).sum() == 50 and lab[5, 1] == 1 and lab[5, 8] == 1 and lab[1, 5] == 0


def test_gzipped_geojson(tmp_path):
    import gzip

    doc = {
        "type": "FeatureCollection",
        "features": [_feature(json.loads(json.dumps(sbox(0, 0, 4, 4).__geo_interface__)))],
    }
    p = tmp_path / "a.geojson.gz"
    p.write_bytes(gzip.compress(json.dumps(doc).encode()))
    ann = load_annotation(p, ClassMap.from_names(["background", "Tumor"]))
    assert ann.labels(Region(0, 0, 8, 8), (8, 8)).sum() == 16


def test_unknown_format(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello")
    with pytest.raises(WsisegError, match="unknown annotation format"):
        load_annotation(p, ALL)
    with pytest.raises(WsisegError, match="not found"):
        load_annotation(tmp_path / "missing.geojson", ALL)


# ---------------------------------------------------------------------------
# rasterisation


def test_rasterise_rectangle_exact():
    rect = Polygon([(2, 3), (7, 3), (7, 8), (2, 8)])
    lab = rasterise([(1, rect)], Region(0, 0, 10, 10), (10, 10))
    assert lab.dtype == np.uint8 and lab.sum() == 25
    assert np.array_equal(np.argwhere(lab == 1), [(i, j) for i in range(3, 8) for j in range(2, 7)])
    # an offset box: same pixels, shifted
    lab2 = rasterise([(1, rect)], Region(1, 2, 10, 10), (10, 10))
    assert np.array_equal(lab2[1:6, 1:6], np.ones((5, 5))) and lab2.sum() == 25
    # half resolution: centres at 1, 3, 5, 7, 9; x in [2, 7) -> 3, 5 (columns 1, 2);
    # y in [3, 8) -> 3, 5, 7 (rows 1..3; the top edge through a centre is inside)
    half = rasterise([(1, rect)], Region(0, 0, 10, 10), (5, 5))
    assert np.array_equal(np.argwhere(half == 1), [(i, j) for i in (1, 2, 3) for j in (1, 2)])


def test_rasterise_polygon_with_hole_exact():
    ring = Polygon([(0, 0), (8, 0), (8, 8), (0, 8)], [[(2, 2), (6, 2), (6, 6), (2, 6)]])
    lab = rasterise([(3, ring)], Region(0, 0, 8, 8), (8, 8))
    assert (lab == 3).sum() == 48 and (lab[2:6, 2:6] == 0).all()
    lab = rasterise([(3, ring)], Region(0, 0, 8, 8), (4, 4))  # centres 1, 3, 5, 7
    expected = np.full((4, 4), 3)
    expected[1:3, 1:3] = 0
    assert np.array_equal(lab, expected)


def test_rasterise_pixel_centre_on_edge_half_open():
    # Edges through pixel centres: left/top edges inside, right/bottom outside.
    rect = Polygon([(0.5, 0.5), (3.5, 0.5), (3.5, 2.5), (0.5, 2.5)])
    lab = rasterise([(1, rect)], Region(0, 0, 5, 5), (5, 5))
    assert np.array_equal(np.argwhere(lab == 1), [(i, j) for i in (0, 1) for j in (0, 1, 2)])


def test_rasterise_order_nested():
    big, small = (1, sbox(0, 0, 10, 10)), (2, sbox(3, 3, 5, 5))
    for shapes in ([big, small], [small, big]):
        lab = rasterise(shapes, Region(0, 0, 10, 10), (10, 10))
        assert (lab == 2).sum() == 4 and (lab == 1).sum() == 96
    lab = rasterise([small, big], Region(0, 0, 10, 10), (10, 10), order="given")
    assert (lab == 1).sum() == 100
    assert (rasterise([], Region(0, 0, 3, 3), (3, 3), fill=IGNORE_INDEX) == IGNORE_INDEX).all()


def _star(rng, cx, cy, r, n):
    a = np.sort(rng.uniform(0, 2 * np.pi, n))
    rr = r * rng.uniform(0.3, 1.0, n)
    return shapely.make_valid(Polygon(np.c_[cx + rr * np.cos(a), cy + rr * np.sin(a)]))


def test_rasterise_matches_point_in_polygon():
    rng = np.random.default_rng(1)
    for _ in range(60):
        geom = _star(rng, 50, 50, 45, 25).difference(_star(rng, 50, 50, 12, 9))
        geom = MultiPolygon([geom, sbox(110, 110, 117.3, 121.9)]) if isinstance(geom, Polygon) else geom
        box = Region(
            int(rng.integers(-10, 20)),
            int(rng.integers(-10, 20)),
            int(rng.integers(20, 130)),
            int(rng.integers(20, 130)),
        )
        h, w = int(rng.integers(3, 70)), int(rng.integers(3, 70))
        lab = rasterise([(1, geom)], box, (h, w))
        X, Y = np.meshgrid(box.x + (np.arange(w) + 0.5) * box.width / w, box.y + (np.arange(h) + 0.5) * box.height / h)
        diff = (lab == 1) != shapely.contains_xy(geom, X, Y)
        if diff.any():  # only points on the boundary may differ (the half-open rule)
            assert shapely.distance(geom.boundary, shapely.points(X[diff], Y[diff])).max() < 1e-9


@pytest.mark.parametrize(
    "name",
    ["qupath-rectangle.json", "qupath-ellipse.json", "qupath-polygon.json", "qupath-brush.json", "qupath-wand.json"],
)
def test_rasterise_real_exports_area(shared_data, name):
    ((_, geom),) = read_qupath_geojson(shared_data / "annotations" / "qupath" / name)
    x0, y0, x1, y1 = (int(v) for v in geom.bounds)
    box = Region(x0 - 7, y0 - 5, x1 - x0 + 20, y1 - y0 + 11)
    full = rasterise([(1, geom)], box, (box.height, box.width))
    assert abs(int(full.sum()) - geom.area) <= 0.02 * geom.area
    if name == "qupath-rectangle.json":
        assert full.sum() == geom.area == 210 * 176
    # scale invariance: half resolution holds about a quarter of the pixels
    half = rasterise([(1, geom)], box, (box.height // 2, box.width // 2))
    assert abs(4 * int(half.sum()) - int(full.sum())) <= 0.03 * full.sum()


# ---------------------------------------------------------------------------
# label masks


_BASE = ClassMap.from_names(["background", "Tumor", "Stroma", "Lymphocytes"])
BCSS_CLASSES = ClassMap(
    _BASE.classes,
    {
        "mostly_tumor": 1,
        "mostly_stroma": 2,
        "mostly_lymphocytic_infiltrate": 3,
        "exclude": IGNORE_INDEX,
        "normal_acinus_or_duct": IGNORE_INDEX,
        "blood_vessel": IGNORE_INDEX,
    },
)


def _bcss(shared_data: Path) -> tuple[Path, Path]:
    ann = shared_data / "annotations"
    return next(ann.glob("TCGA-*.png")), ann / "sample_GTcodes.csv"


def test_gtcodes_csv(shared_data):
    names = read_value_names(_bcss(shared_data)[1])
    assert names[1] == "mostly_tumor" and names[18] == "blood_vessel" and names[254] == "roi" and 0 not in names


def test_bcss_label_map_mapped_through_codes(shared_data):
    mask_path, codes = _bcss(shared_data)
    with pytest.raises(WsisegError, match=r"unmapped classes: value 0 \(") as e:
        load_annotation(mask_path, BCSS_CLASSES, value_names=codes)
    assert str(mask_path) in str(e.value)
    ann = load_annotation(mask_path, BCSS_CLASSES, value_names=codes, ignore_unmapped=True)
    assert isinstance(ann, LabelMaskAnnotation) and (ann.width, ann.height) == (4542, 4594)
    assert ann.report.unmapped == {"value 0": 9678238}
    raw = np.asarray(Image.open(mask_path))
    full = ann.labels(Region(0, 0, 4542, 4594), (4594, 4542))
    lut = {0: 255, 1: 1, 2: 2, 3: 3, 7: 255, 13: 255, 18: 255}
    for v, mapped in lut.items():
        assert (full[raw == v] == mapped).all()
    # nearest read at a reduced resolution: the block-centre pixel (coords rule)
    box = Region(1000, 2000, 800, 600)
    low = ann.labels(box, (150, 200))
    rows = np.floor(box.y + (np.arange(150) + 0.5) * 4).astype(int)
    cols = np.floor(box.x + (np.arange(200) + 0.5) * 4).astype(int)
    assert np.array_equal(low, full[np.ix_(rows, cols)])


def test_bcss_size_check(shared_data):
    mask_path, codes = _bcss(shared_data)
    ann = load_annotation(mask_path, BCSS_CLASSES, value_names=codes, ignore_unmapped=True)
    ann.check_slide_size((4542, 4594), "slide.svs")
    ann.check_slide_size((4543, 4593), "slide.svs")  # rounding: within one downsample
    with pytest.raises(WsisegError) as e:
        ann.check_slide_size((4000, 4594), "other-slide.svs")
    msg = str(e.value)
    assert str(mask_path) in msg and "other-slide.svs" in msg and "4542x4594" in msg and "4000x4594" in msg
    ann2 = load_annotation(mask_path, BCSS_CLASSES, value_names=codes, ignore_unmapped=True, downsample=2)
    ann2.check_slide_size((9084, 9188), "slide.svs")
    ann2.check_slide_size((9085, 9187), "slide.svs")
    with pytest.raises(WsisegError):
        ann2.check_slide_size((4542, 4594), "slide.svs")


def test_label_mask_png_and_tiff_agree(tmp_path):
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 3, (37, 53), dtype=np.uint8)
    mask[0, 0] = IGNORE_INDEX
    Image.fromarray(mask).save(tmp_path / "m.png")
    tifffile.imwrite(tmp_path / "m.tif", np.pad(mask, ((0, 11), (0, 11)))[:37, :53].copy(), tile=(16, 16))
    cm = ClassMap.from_names(["bg", "a", "b"])
    png = load_annotation(tmp_path / "m.png", cm, downsample=2)
    tif = load_annotation(tmp_path / "m.tif", cm, downsample=2)
    boxes = [(Region(0, 0, 106, 74), (37, 53)), (Region(5, 9, 60, 40), (17, 31)), (Region(3, 3, 7, 7), (14, 14))]
    for box, shape in boxes:
        a, b = png.labels(box, shape), tif.labels(box, shape)
        assert np.array_equal(a, b)
        xs = box.x + (np.arange(shape[1]) + 0.5) * box.width / shape[1]
        ys = box.y + (np.arange(shape[0]) + 0.5) * box.height / shape[0]
        assert np.array_equal(a, mask[np.ix_((ys // 2).astype(int), (xs // 2).astype(int))])
    assert np.array_equal(png.labels(Region(0, 0, 106, 74), (37, 53)), mask)
    # values without a class
    mask[5, 5] = 9
    Image.fromarray(mask).save(tmp_path / "bad.png")
    with pytest.raises(WsisegError, match="unmapped classes: value 9"):
        load_annotation(tmp_path / "bad.png", cm)
    ok = load_annotation(tmp_path / "bad.png", cm, ignore_unmapped=True)
    assert ok.labels(Region(0, 0, 53, 37), (37, 53))[5, 5] == IGNORE_INDEX


def test_label_mask_errors(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(WsisegError, match="single-channel"):
        load_annotation(tmp_path / "rgb.png", ALL)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(WsisegError, match="broken.png"):
        load_annotation(tmp_path / "broken.png", ALL)
    vector = _write_geojson(tmp_path / "a.geojson", [])
    with pytest.raises(WsisegError, match="label masks only"):
        load_annotation(vector, ALL, downsample=4)


def test_clean_shapes_in_memory():
    shapes, report = clean_shapes(
        [("Tumor", sbox(0, 0, 2, 2)), ("x", shapely.Point(1, 1))], ClassMap.from_names(["bg", "tumor"])
    )
    assert [v for v, _ in shapes] == [1] and report.non_area == {"Point": 1}
    assert "1 areas" in report.summary()
