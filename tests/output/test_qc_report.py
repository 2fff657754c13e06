"""QC figure and slide reports: panels on a real thumbnail, area arithmetic, JSON/CSV round trips."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from PIL import Image

from wsiseg.errors import ConfigError, WsisegError
from wsiseg.mpp import IgnoredMpp
from wsiseg.output.classes import ClassInfo
from wsiseg.output.report import (
    TISSUE_DEFINITION,
    SlideReport,
    class_areas,
    read_report_json,
    tissue_area,
    versions,
    write_batch_csv,
    write_report_json,
)
from wsiseg.slide import open_slide
from wsiseg.slide.tissue import Region, tissue_score
from wsiseg.viz.qc import (
    MAX_DOTS,
    OVERLAY_ALPHA,
    PANELS,
    colormap,
    compose_qc,
    overlay_classes,
    rasterise_density,
    render_qc,
    sample_dots,
)

K = 5  # 2220 x 2967 level 0 -> 444 x 593 thumbnail
CLASSES = [
    ClassInfo(0, "background", (0, 0, 0)),
    ClassInfo(1, "stroma", (60, 180, 75)),
    ClassInfo(2, "tumour", (0, 130, 200)),
]
# Region boxes in thumbnail pixels (x, y, w, h); the bottom-left corner stays unsampled.
BOXES = [(20.0, 30.0, 200.0, 300.0), (240.0, 100.0, 180.0, 400.0)]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def thumb(slides_dir) -> np.ndarray:
    ms = open_slide(slides_dir / "CMU-1-Small-Region.svs")
    level0 = ms.levels[0].array
    assert level0.shape[:2] == (2967, 2220)
    small = da.coarsen(np.mean, level0.astype(np.float32), {0: K, 1: K}, trim_excess=True)
    return np.rint(small.compute()).astype(np.uint8)


@pytest.fixture(scope="module")
def labels(thumb) -> np.ndarray:
    score = tissue_score(thumb)
    lab = np.zeros(score.shape, np.uint8)
    lab[score > 0.15] = 1
    lab[score > 0.35] = 2
    assert 0.05 < (lab > 0).mean() < 0.95 and (lab == 2).any()
    return lab


def warped_grid(box, n: int = 64) -> np.ndarray:
    """n x n sample positions in a box, spaced closely in the middle and widely at the edges."""
    x, y, w, h = box
    u = (np.arange(n) + 0.5) / n
    v = 0.5 + 0.5 * np.sign(u - 0.5) * np.abs(2 * u - 1) ** 2
    gx, gy = np.meshgrid(x + v * w, y + v * h)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def bump(n: int = 16) -> np.ndarray:
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n
    return np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.05)


@pytest.fixture(scope="module")
def figure(thumb, labels):
    samples = [warped_grid(b) for b in BOXES]
    density = [(bump(), b) for b in BOXES]
    fig, layout = compose_qc(
        thumb, labels, CLASSES, samples, density, BOXES, title="CMU-1-Small-Region.svs", return_layout=True
    )
    return fig, layout, samples


def crop(fig, layout, name):
    x, y, w, h = layout[name]
    return fig[y : y + h, x : x + w]


# ---------------------------------------------------------------------------
# QC figure


def test_render_qc_writes_png_atomically(tmp_path, thumb, labels, figure):
    fig, _, samples = figure
    out = render_qc(
        tmp_path / "qc.png",
        thumb,
        labels,
        CLASSES,
        samples,
        [(bump(), b) for b in BOXES],
        BOXES,
        title="CMU-1-Small-Region.svs",
    )
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (fig.shape[1], fig.shape[0])
        assert np.array_equal(np.asarray(im), fig)
    assert [p.name for p in tmp_path.iterdir()] == ["qc.png"]
    with pytest.raises(WsisegError, match="exists"):
        render_qc(out, thumb, labels, CLASSES)
    render_qc(out, thumb, labels, CLASSES, overwrite=True)  # no samples, no density: still four panels
    assert no_temp_files(tmp_path)


def test_layout_four_panels_at_thumbnail_scale(figure, thumb):
    fig, layout, _ = figure
    assert tuple(layout) == PANELS
    h, w = thumb.shape[:2]
    rects = list(layout.values())
    for x, y, pw, ph in rects:
        assert (pw, ph) == (w, h)  # 593 px long side: shown 1:1
        assert x >= 0 and y >= 0 and x + pw <= fig.shape[1] and y + ph <= fig.shape[0]
    for i, a in enumerate(rects):
        for b in rects[i + 1 :]:
            assert a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1]


def test_large_thumbnail_is_shrunk_and_layout_options(labels):
    big = np.full((3000, 1500, 3), 240, np.uint8)
    fig, layout = compose_qc(big, labels, CLASSES, layout="grid", max_panel=600, return_layout=True)
    assert all((w, h) == (300, 600) for _, _, w, h in layout.values())
    xs = sorted({x for x, _, _, _ in layout.values()})
    ys = sorted({y for _, y, _, _ in layout.values()})
    assert len(xs) == 2 and len(ys) == 2  # 2 x 2
    assert fig.shape[1] < 2 * 300 + 100
    _, layout = compose_qc(big, labels, CLASSES, layout="row", max_panel=600, return_layout=True)
    assert len({y for _, y, _, _ in layout.values()}) == 1


def test_overlay_panel_tints_classes_only(figure, thumb, labels):
    fig, layout, _ = figure
    panel = crop(fig, layout, "classes").astype(int)
    bg = labels == 0
    assert np.array_equal(panel[bg], thumb[bg])
    changed = (panel[~bg] != thumb[~bg]).any(axis=1)
    assert changed.mean() > 0.99
    # alpha 0.45 towards the class colour
    for c in CLASSES[1:]:
        sel = labels == c.value
        expect = np.rint((1 - OVERLAY_ALPHA) * thumb[sel] + OVERLAY_ALPHA * np.array(c.color))
        assert np.abs(panel[sel] - expect).max() <= 1
    assert np.array_equal(overlay_classes(thumb, labels, CLASSES), panel)


def test_overlay_unknown_values_and_shape_checks():
    rgb = np.full((4, 4, 3), 200, np.uint8)
    lab = np.zeros((4, 4), np.uint8)
    lab[0, 0] = 9  # not in the table: tinted grey, not ignored
    out = overlay_classes(rgb, lab, CLASSES)
    assert not np.array_equal(out[0, 0], rgb[0, 0]) and np.array_equal(out[1:], rgb[1:])
    with pytest.raises(ValueError):
        overlay_classes(rgb, lab[:3], CLASSES)
    with pytest.raises(ValueError):
        compose_qc(rgb.astype(np.float32), lab, CLASSES)


def test_regions_panel_draws_boxes(figure, thumb):
    fig, layout, _ = figure
    panel = crop(fig, layout, "regions")
    for x, y, w, h in BOXES:
        edge = panel[int(y + h / 2), int(x)]
        assert edge[2] > 200 and edge[0] < 50  # box blue
    assert np.array_equal(panel[-40:, :10], thumb[-40:, :10])  # untouched away from boxes


def test_heatmap_follows_density(figure):
    fig, layout, _ = figure
    panel = crop(fig, layout, "density").astype(int)
    for x, y, w, h in BOXES:
        peak = panel[int(y + h / 2), int(x + w / 2)]
        low = panel[int(y + 3), int(x + 3)]
        assert peak[0] - peak[2] > 100  # yellow: high end of the map
        assert low[2] - low[0] > 10  # violet: low end of the map
    outside = panel[-40:, :10]
    assert (np.ptp(outside, axis=-1) == 0).all()  # grey thumbnail outside the regions


def test_colormap_and_rasterised_density():
    c = colormap(np.linspace(0, 1, 50)).astype(float)
    lum = c @ [0.2125, 0.7154, 0.0721]
    assert (np.diff(lum) > 0).all()  # perceptual order: darker to lighter
    assert colormap(1.0)[2] < 80 and colormap(1.0)[0] > 200 and colormap(0.0).max() < 100
    assert np.array_equal(colormap(2.0), colormap(1.0)) and np.array_equal(colormap(np.nan), colormap(0.0))
    # Bilinear between pixel centres with border replication: [0, 1] over 4 pixels.
    field = rasterise_density((2, 6), [(np.array([[0.0, 1.0]]), (1, 0, 4, 1))])
    np.testing.assert_allclose(field[0, 1:5], [0, 0.25, 0.75, 1])
    assert np.isnan(field[0, [0, 5]]).all() and np.isnan(field[1]).all()
    # Scale: the box moves with the panel.
    field = rasterise_density((4, 12), [(np.full((3, 3), 2.0), (1, 0, 4, 1))], scale=(2.0, 4.0))
    assert np.isfinite(field[:, 2:10]).all() and np.isnan(field[:, [0, 1, 10, 11]]).all()


def test_dots_where_samples_are(figure):
    fig, layout, samples = figure
    panel = crop(fig, layout, "samples").astype(int)
    dot = (panel[..., 0] - panel[..., 1]) > 100  # red dots over a grey thumbnail
    for pts in samples:
        cols, rows = np.floor(pts[:, 0]).astype(int), np.floor(pts[:, 1]).astype(int)
        assert dot[rows, cols].all()
    assert not dot[-40:, :10].any()  # no samples in the bottom-left corner
    # Dense sampling -> dense dots: the centre of a box against a corner window.
    x, y, w, h = (int(v) for v in BOXES[0])
    centre = dot[y + h // 2 - 20 : y + h // 2 + 20, x + w // 2 - 20 : x + w // 2 + 20].mean()
    corner = dot[y : y + 40, x : x + 40].mean()
    assert centre > 2 * corner > 0


def test_sample_dots_subsamples():
    rng = np.random.default_rng(1)
    pts = [rng.uniform(0, 100, (60_000, 2)), rng.uniform(0, 100, (40_000, 2))]
    hits, total, shown = sample_dots((100, 100), pts, max_dots=MAX_DOTS)
    assert total == 100_000 and shown == MAX_DOTS
    assert 0.8 < hits.mean() < 0.9  # 20k random dots on 10k pixels
    hits, total, shown = sample_dots((10, 10), [np.array([[0.5, 0.5], [9.99, 9.99], [10.0, 3.0], [np.nan, 1]])])
    assert (total, shown) == (3, 2) and hits[0, 0] and hits[9, 9] and hits.sum() == 2


# ---------------------------------------------------------------------------
# class areas


def test_class_areas_arithmetic():
    counts = {0: 1_000_000, 1: 4_000_000, 2: 5_000_000}
    rows = class_areas(counts, CLASSES, 0.5)
    by = {r["name"]: r for r in rows}
    assert [r["value"] for r in rows] == [0, 1, 2]
    assert by["stroma"]["pixels"] == 4_000_000
    assert by["stroma"]["area_um2"] == pytest.approx(1e6)  # 4e6 px * 0.25 um^2
    assert by["stroma"]["area_mm2"] == pytest.approx(1.0)
    # tissue = the 9e6 non-background pixels: 4/9 and 5/9 of it; background is not tissue
    assert by["stroma"]["percent_of_tissue"] == pytest.approx(400 / 9)
    assert by["tumour"]["percent_of_tissue"] == pytest.approx(500 / 9)
    assert by["background"]["percent_of_tissue"] is None
    assert by["stroma"]["percent_of_slide"] == pytest.approx(40.0)
    assert by["tumour"]["area_mm2"] == pytest.approx(1.25)
    # a histogram gives the same rows
    hist = np.bincount(np.repeat([0, 1, 2], [1_000_000, 4_000_000, 5_000_000]), minlength=256)
    assert class_areas(hist, CLASSES, 0.5) == rows
    # anisotropic pixels
    assert class_areas({1: 100}, CLASSES, (0.5, 0.25))[1]["area_um2"] == pytest.approx(12.5)


@pytest.mark.parametrize("counts", [{0: 987_810, 1: 5_345_579, 2: 253_351}, {0: 3, 1: 1, 2: 1, 9: 1}, {1: 7}])
def test_percentages_sum_to_100_and_tissue_says_what_it_is(counts):
    rows = class_areas(counts, CLASSES, 0.499)
    tissue_rows = [r for r in rows if r["value"] != 0]
    assert sum(r["percent_of_tissue"] for r in tissue_rows) == pytest.approx(100.0)
    assert sum(r["percent_of_slide"] for r in rows) == pytest.approx(100.0)
    tissue = tissue_area(rows)
    assert tissue["definition"] == TISSUE_DEFINITION and "background (value 0)" in TISSUE_DEFINITION
    assert tissue["pixels"] == sum(n for v, n in counts.items() if v != 0)
    assert tissue["area_mm2"] == pytest.approx(tissue["pixels"] * 0.499**2 / 1e6)
    assert tissue["percent_of_slide"] == pytest.approx(100.0 * tissue["pixels"] / sum(counts.values()))


def test_only_background_has_no_tissue_percentages():
    rows = class_areas({0: 50}, CLASSES, None)
    assert all(r["percent_of_tissue"] is None for r in rows)
    assert tissue_area(rows) == {
        "definition": TISSUE_DEFINITION,
        "pixels": 0,
        "area_um2": None,
        "area_mm2": None,
        "percent_of_slide": 0.0,
    }


def test_class_areas_without_mpp_and_unknown_values():
    rows = class_areas(np.array([10, 0, 30, 0, 0, 0, 0, 60]), CLASSES, None)
    by = {r["name"]: r for r in rows}
    assert all(r["area_um2"] is None and r["area_mm2"] is None for r in rows)
    assert tissue_area(rows)["area_mm2"] is None and tissue_area(rows)["pixels"] == 90
    # percentages need no MPP; an unknown value is a tissue class like the others
    assert by["tumour"]["percent_of_tissue"] == pytest.approx(100 / 3)
    assert by["value 7"]["percent_of_tissue"] == pytest.approx(200 / 3)
    assert by["stroma"]["pixels"] == 0 and by["tumour"]["pixels"] == 30
    assert by["value 7"]["pixels"] == 60 and by["value 7"]["percent_of_slide"] == pytest.approx(60.0)
    for bad in (0.0, -1, float("nan"), (0.5, float("inf"))):
        with pytest.raises(ConfigError, match="mpp must be positive and finite"):
            class_areas({1: 5}, CLASSES, bad)


# ---------------------------------------------------------------------------
# report JSON and batch CSV


def make_report(tmp_path, **kw) -> SlideReport:
    rows = class_areas({0: np.int64(500), 1: np.int64(4_000_000), 2: np.int64(1_000)}, CLASSES, 0.5)
    base = {
        "slide": tmp_path / "a.svs",
        "width": np.int64(2220),
        "height": np.int64(2967),
        "mpp": (np.float32(0.5), np.float64(0.5)),
        "mpp_source": "openslide.mpp",
        "vendor": "aperio",
        "model": "model.safetensors",
        "model_hash": "0123456789abcdef",
        "device": "cpu",
        "regions": [Region(0, 0, 100, 200), np.array([10, 20, 30, 40])],
        "class_areas": rows,
        "fraction_sampled": np.float32(0.25),
        "gather": {"chunks": {0: np.int64(12)}, "pixels": np.array([1, 2])},
        "timings": {"read": np.float64(1.5), "model": 2.0, "nan": float("nan")},
        "config": {"threshold": None, "size": (512, 512)},
        "outputs": {"mask": "a.mask.tiff", "qc": "a.qc.png"},
    }
    base.update(kw)
    return SlideReport(**base)


def test_report_json_round_trip(tmp_path):
    rep = make_report(tmp_path)
    path = write_report_json(tmp_path / "a.report.json", rep)
    assert no_temp_files(tmp_path)
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    d = read_report_json(path)
    assert d["format"] == "wsiseg-report" and d["slide"] == str(tmp_path / "a.svs")
    assert (d["width"], d["height"], d["mpp"]) == (2220, 2967, [0.5, 0.5])
    assert d["regions"] == [[0, 0, 100, 200], [10, 20, 30, 40]]
    assert d["fraction_sampled"] == 0.25
    assert d["gather"] == {"chunks": {"0": 12}, "pixels": [1, 2]}
    assert d["timings"] == {"read": 1.5, "model": 2.0, "nan": None}
    assert d["seconds_total"] is None  # a NaN stage makes the total unknown, not invented
    assert d["config"] == {"threshold": None, "size": [512, 512]}
    assert d["class_areas"][1]["area_mm2"] == pytest.approx(1.0)
    keys = list(d)
    assert keys[keys.index("class_areas") + 1] == "tissue"  # the base of percent_of_tissue, next to it
    assert d["tissue"]["pixels"] == 4_001_000 and d["tissue"]["definition"] == TISSUE_DEFINITION
    assert d["mpp_ignored"] is None
    assert d["status"] == "ok" and d["error"] is None
    assert d["versions"]["numpy"] == np.__version__ and d["versions"]["python"]
    # the plain dict writes back identically
    again = write_report_json(tmp_path / "b.report.json", d)
    assert read_report_json(again) == d
    with pytest.raises(WsisegError, match="exists"):
        write_report_json(path, rep)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(WsisegError, match="not a wsiseg report"):
        read_report_json(tmp_path / "bad.json")


def test_report_records_an_ignored_mpp(tmp_path):
    rep = make_report(
        tmp_path, mpp=None, mpp_source="ignored-implausible", mpp_ignored=IgnoredMpp((352.78, 352.78), "openslide")
    )
    d = read_report_json(write_report_json(tmp_path / "a.report.json", rep))
    assert d["mpp"] is None and d["mpp_source"] == "ignored-implausible"
    assert d["mpp_ignored"] == {"mpp": [352.78, 352.78], "source": "openslide", "plausible_range": [0.05, 20.0]}


def test_versions_lists_packages():
    v = versions()
    for key in (
        "wsiseg",
        "torch",
        "numpy",
        "tifffile",
        "openslide",
        "zarr",
        "dask",
        "segmentation_models_pytorch",
        "python",
        "platform",
    ):
        assert key in v
    assert v["numpy"] == np.__version__


def test_batch_csv_union_of_classes(tmp_path):
    a = make_report(tmp_path, timings={"read": 1.0, "model": 2.5})
    other = [ClassInfo(0, "background", (0, 0, 0)), ClassInfo(3, "necrosis", (1, 2, 3))]
    b = make_report(
        tmp_path,
        slide="b.tiff",
        mpp=None,
        mpp_source="missing",
        class_areas=class_areas({0: 7, 3: 90}, other, None),
        timings={"total": 9.0},
    )
    failed = {"slide": "c.svs", "status": "failed", "error": "cannot open"}
    b_read = read_report_json(write_report_json(tmp_path / "b.json", b))
    path = write_batch_csv(tmp_path / "batch.csv", [a, b_read, failed])
    assert no_temp_files(tmp_path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames
        rows = list(reader)
    assert cols[:9] == [
        "slide",
        "status",
        "width",
        "height",
        "mpp",
        "mpp_y",
        "seconds_total",
        "fraction_sampled",
        "area_unit",
    ]
    assert cols[9:] == ["area_background", "area_stroma", "area_tumour", "area_necrosis"]
    ra, rb, rc = rows
    assert ra["area_unit"] == "mm2" and float(ra["area_stroma"]) == pytest.approx(1.0)
    assert float(ra["seconds_total"]) == pytest.approx(3.5) and float(ra["mpp"]) == 0.5
    assert ra["area_necrosis"] == ""
    assert rb["area_unit"] == "px" and rb["area_necrosis"] == "90" and rb["mpp"] == ""
    assert float(rb["seconds_total"]) == 9.0 and rb["area_stroma"] == ""
    assert rc["status"] == "failed" and rc["width"] == "" and rc["area_background"] == ""
