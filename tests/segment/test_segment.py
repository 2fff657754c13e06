"""Whole-slide segmentation: tile-wise reverse sampling and wsiseg segment on real slides."""

from __future__ import annotations

import csv
import errno
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch
import zarr
from _polygons import overlap_areas, rasterise
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from wsiseg.cli.app import main
from wsiseg.errors import ConfigError
from wsiseg.models.io import load_deformseg, save_deformseg
from wsiseg.models.net import DeformSegNet
from wsiseg.output.classes import default_classes
from wsiseg.output.geojson import read_qupath_geojson
from wsiseg.output.mask import mask_levels
from wsiseg.sampling.coords import level_source_index, reduce_nearest, uniform_grid
from wsiseg.sampling.grid import density_to_grid
from wsiseg.sampling.reverse import reverse_sample
from wsiseg.sampling.tiles import RegionPrediction, ReverseTiler, coarse_inverse
from wsiseg.segment import SegmentOptions, reduced_mask_level, segment_region, segment_regions, segment_slide
from wsiseg.slide import open_slide

SEG = {"arch": "unet", "encoder": "resnet18", "num_classes": 3, "encoder_depth": 3, "decoder_channels": [32, 16, 8]}


def render(tiler: ReverseTiler, width: int, height: int, tile: int, level: int = 0) -> np.ndarray:
    """Assemble one level from the tiler, as the mask writer would call it."""
    lv = mask_levels(width, height, tile)[level]
    out = np.zeros((lv.height, lv.width), np.uint8)
    for y in range(0, lv.height, tile):
        for x in range(0, lv.width, tile):
            w, h = min(tile, lv.width - x), min(tile, lv.height - y)
            out[y : y + h, x : x + w] = tiler(lv, x, y, w, h)
    return out


@given(
    st.integers(1, 12),
    st.integers(1, 12),
    st.integers(1, 6),
    st.sampled_from([16, 32, 64]),
    st.integers(0, 10**6),
    st.sampled_from([0, 65536]),
)
@settings(deadline=None, max_examples=40)
def test_uniform_grid_reads_back_as_nearest_upsampling(h, w, k, tile, seed, dense):
    # dense=0: every part goes through the block classification, however small
    labels = np.random.default_rng(seed).integers(0, 4, (h, w)).astype(np.uint8)
    grid = uniform_grid(h, w, dtype=torch.float64)
    reg = RegionPrediction((0, 0, w * k, h * k), labels, coarse_inverse(grid, (h * k, w * k)))
    tiler = ReverseTiler([reg], w * k, h * k, dense=dense)
    out = render(tiler, w * k, h * k, tile)
    assert np.array_equal(out, np.repeat(np.repeat(labels, k, 0), k, 1))
    assert tiler.counts[:4].tolist() == (np.bincount(labels.ravel(), minlength=4) * k * k).tolist()


def test_deformed_grid_matches_in_memory_reverse_sampler():
    torch.manual_seed(0)
    d = (torch.rand(1, 1, 16, 16) ** 4 + 0.05).double()
    grid = density_to_grid(d, 2.0, 7, out_size=(30, 40))
    # Smooth labels (blobs), as a segmenter produces, so most tiles are constant.
    yy, xx = np.mgrid[0:30, 0:40]
    labels = (((yy - 15) ** 2 + (xx - 20) ** 2) < 80).astype(np.uint8) + (xx > 34)
    W, H = 1000, 800
    reg = RegionPrediction((0, 0, W, H), labels.astype(np.uint8), coarse_inverse(grid, (H, W)))
    tiler = ReverseTiler([reg], W, H)
    out = render(tiler, W, H, 128)
    ref = reverse_sample(torch.from_numpy(labels).long()[None], grid, (H, W))[0].numpy()
    assert (out == ref).mean() > 0.999
    assert tiler.pixels_refined < 0.5 * W * H  # constant blocks skipped
    # Skipping constant blocks is exact: the same as reading every pixel.
    assert np.array_equal(out, reg.read(np.arange(W) + 0.5, np.arange(H) + 0.5))


@pytest.mark.parametrize(
    ("mode", "chunk", "dense"),
    [("nearest", 2048, 0), ("linear", 2048, 0), ("nearest", 72, 0), ("nearest", 4096, 65536)],
)
def test_block_classification_is_exact_on_noisy_labels(mode, chunk, dense):
    # Noisy labels (an untrained net) put boundaries everywhere: the blocks proven constant
    # and the pixels read one by one must together equal reading every pixel, at every level
    # (a reduced level's pixel is read at the centre of the level-0 pixel it stands for).
    rng = np.random.default_rng(3)
    torch.manual_seed(3)
    d = (torch.rand(1, 1, 12, 9) ** 3 + 0.05).double()
    grid = density_to_grid(d, 2.0, 7, out_size=(37, 23))
    scores = rng.random((3, 37, 23)).astype(np.float32)
    values = np.array([0, 1, 2], np.uint8)
    box = (13, 7, 700, 1100)
    reg = RegionPrediction(box, values[scores.argmax(0)], coarse_inverse(grid, (1100, 700)), scores, values)
    W, H = 760, 1130
    # regions split into column chunks (72: not a multiple of the tile): the same pixels
    # dense=0: every part is classified in blocks (by default the small parts of the coarse levels are
    # read pixel by pixel outright)
    tiler = ReverseTiler([reg], W, H, mode=mode, chunk=chunk, dense=dense)
    level0 = render(ReverseTiler([reg], W, H, mode=mode), W, H, 128)
    for level in (0, 1, 2):
        lv = mask_levels(W, H, 128)[level]
        out = render(tiler, W, H, 128, level)
        xs, ys = level_source_index(W, lv.width) + 0.5, level_source_index(H, lv.height) + 0.5
        cx, cy = (xs >= 13) & (xs < 713), (ys >= 7) & (ys < 1107)
        assert np.array_equal(out[np.ix_(cy, cx)], reg.read(xs[cx], ys[cy], mode))
        assert (out[~cy] == 0).all() and (out[:, ~cx] == 0).all()
        assert np.array_equal(out, reduce_nearest(level0, out.shape))
    assert tiler.counts.tolist() == np.bincount(level0.ravel(), minlength=256).tolist()
    assert 0 < tiler.pixels_refined < 3 * W * H  # some blocks were painted


@given(
    st.integers(0, 2**31 - 1),
    st.integers(40, 300),
    st.integers(40, 300),
    st.sampled_from([16, 32]),
    st.sampled_from(["nearest", "linear"]),
    st.sampled_from([0, 65536]),
)
@settings(deadline=None, max_examples=25)
def test_every_reduced_level_is_level0_subsampled(seed, W, H, tile, mode, dense):
    # The pyramid rule (wsiseg.sampling.coords): every reduced level is level 0 read at the
    # level's pixel centres, so a viewer shows the same labels at every zoom.
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    h, w = int(rng.integers(3, 30)), int(rng.integers(3, 30))
    grid = density_to_grid((torch.rand(1, 1, 8, 8) ** 3 + 0.05).double(), 1.5, 5, out_size=(h, w))
    scores = rng.random((3, h, w)).astype(np.float32)
    values = np.array([0, 2, 5], np.uint8)
    bx, by = int(rng.integers(0, W // 4)), int(rng.integers(0, H // 4))
    bw, bh = int(rng.integers(W // 2, W - bx + 1)), int(rng.integers(H // 2, H - by + 1))
    reg = RegionPrediction((bx, by, bw, bh), values[scores.argmax(0)], coarse_inverse(grid, (bh, bw)), scores, values)
    tiler = ReverseTiler([reg], W, H, background=1, mode=mode, dense=dense)
    levels = mask_levels(W, H, tile)
    level0 = render(tiler, W, H, tile)
    assert len(levels) > 1
    for lv in levels[1:]:
        assert np.array_equal(render(tiler, W, H, tile, lv.index), reduce_nearest(level0, (lv.height, lv.width)))


def test_tiles_in_any_order_and_counted_once():
    # The writer asks row by row; anything else (a viewer, a retry) must get the same tiles,
    # and class counts must not grow when a strip is computed twice.
    torch.manual_seed(5)
    d = (torch.rand(1, 1, 10, 10) ** 3 + 0.05).double()
    grid = density_to_grid(d, 2.0, 7, out_size=(20, 25))
    labels = np.random.default_rng(5).integers(0, 3, (20, 25)).astype(np.uint8)
    W, H = 500, 430
    reg = RegionPrediction((20, 10, 450, 400), labels, coarse_inverse(grid, (400, 450)))
    ref = ReverseTiler([reg], W, H)
    expect = render(ref, W, H, 64)
    lv = mask_levels(W, H, 64)[0]
    order = [(x, y) for y in range(0, H, 64) for x in range(0, W, 64)]
    tiler = ReverseTiler([reg], W, H, dense=0)  # the block classification (64-row strips are small parts)
    for x, y in order[::-1] + order[::3]:
        w, h = min(64, W - x), min(64, H - y)
        got = tiler(lv, x, y, w, h)
        assert np.array_equal(np.broadcast_to(got, (h, w)), expect[y : y + h, x : x + w])
    assert tiler.counts.tolist() == ref.counts.tolist()
    assert tiler.counts.sum() == W * H


def test_regions_and_background_and_constant_tiles():
    a = RegionPrediction((0, 0, 50, 50), np.full((5, 5), 2, np.uint8), coarse_inverse(uniform_grid(5, 5), (50, 50)))
    b = RegionPrediction((100, 20, 40, 60), np.full((6, 4), 1, np.uint8), coarse_inverse(uniform_grid(6, 4), (60, 40)))
    tiler = ReverseTiler([a, b], 200, 100, background=0)
    lv = mask_levels(200, 100, 32)[0]
    assert tiler(lv, 0, 0, 32, 32) == 2  # inside region a: one constant tile
    assert tiler(lv, 160, 0, 32, 32) == 0  # outside every region
    out = render(tiler, 200, 100, 32)
    expect = np.zeros((100, 200), np.uint8)
    expect[0:50, 0:50] = 2
    expect[20:80, 100:140] = 1
    assert np.array_equal(out, expect)
    # A reduced level is level 0 subsampled: at 2x, the lower-right pixel of each 2 x 2 block.
    lv1 = render(tiler, 200, 100, 32, level=1)
    assert np.array_equal(lv1, expect[1::2, 1::2])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    net = DeformSegNet(SEG, map_size=(32, 32), out_size=(64, 64)).eval()
    save_deformseg(path, net, default_classes(3))
    return path


@pytest.fixture(scope="module")
def uniform_model_file(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("model") / "uniform.safetensors"
    net = DeformSegNet(SEG, sampler="uniform", map_size=(32, 32), out_size=(64, 64)).eval()
    save_deformseg(path, net, default_classes(3))
    return path


@pytest.fixture(scope="module")
def cmu_run(slides_dir, model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg")
    model = load_deformseg(model_file)
    outputs = segment_slide(str(slides_dir / "CMU-1-Small-Region.svs"), model, out, "cmu", SegmentOptions())
    return out, outputs


def test_mask_opens_everywhere_with_slide_geometry(cmu_run, slides_dir):
    out, outputs = cmu_run
    src = openslide.OpenSlide(str(slides_dir / "CMU-1-Small-Region.svs"))
    mask = openslide.OpenSlide(str(out / outputs["mask"]))
    assert mask.dimensions == src.dimensions
    assert mask.level_count == len(mask_levels(*src.dimensions, 512))
    assert float(mask.properties["openslide.mpp-x"]) == pytest.approx(float(src.properties["openslide.mpp-x"]), 1e-4)
    with tifffile.TiffFile(out / outputs["mask"]) as tif:
        assert tif.is_bigtiff
        level0 = tif.pages[0].asarray()
        assert level0.dtype == np.uint8 and level0.shape == (src.dimensions[1], src.dimensions[0])
        assert set(np.unique(level0)) <= {0, 1, 2}
        z = zarr.open(tif.pages[0].aszarr(), mode="r")
        assert np.array_equal(z[100:200, 300:400], level0[100:200, 300:400])
    overlay = openslide.OpenSlide(str(out / outputs["overlay"]))
    assert overlay.dimensions == src.dimensions


def test_report_areas_add_up(cmu_run, slides_dir):
    out, outputs = cmu_run
    report = json.loads((out / outputs["report"]).read_text())
    with tifffile.TiffFile(out / outputs["mask"]) as tif:
        level0 = tif.pages[0].asarray()
    counts = np.bincount(level0.ravel(), minlength=3)
    assert [a["pixels"] for a in report["class_areas"]] == counts[:3].tolist()
    mpp = report["mpp"][0]
    assert report["class_areas"][1]["area_um2"] == pytest.approx(counts[1] * mpp * report["mpp"][1])
    # tissue = the non-background classes: their shares sum to 100 %, every class's % of slide too
    rows, tissue = report["class_areas"], report["tissue"]
    assert tissue["pixels"] == counts[1:].sum() and "background (value 0)" in tissue["definition"]
    assert rows[0]["percent_of_tissue"] is None
    assert sum(r["percent_of_tissue"] for r in rows[1:]) == pytest.approx(100.0)
    assert sum(r["percent_of_slide"] for r in rows) == pytest.approx(100.0)
    assert tissue["area_mm2"] == pytest.approx(sum(r["area_mm2"] for r in rows[1:]))
    assert 0 < report["detected_tissue_pixels"] < level0.size  # the detector's estimate, kept apart
    assert (report["mpp"], report["mpp_source"], report["mpp_ignored"]) == ([0.499, 0.499], "openslide", None)
    assert 0 < report["fraction_sampled"] < 0.01
    assert report["model_hash"] and report["status"] == "ok"
    assert set(report["timings"]) >= {"open", "regions", "sample+segment", "mask", "total"}
    assert report["regions"] and all(len(r) == 4 for r in report["regions"])
    assert "label" not in json.dumps(report["outputs"])  # associated images never copied


def test_report_samples_on_glass(cmu_run, slides_dir):
    """The fraction of sampling points on glass, checked against the tissue mask looked up by hand."""
    from wsiseg.slide.tissue import detect_tissue

    out, outputs = cmu_run
    report = json.loads((out / outputs["report"]).read_text())
    glass = report["samples_on_glass"]
    assert set(glass) == {"model", "uniform"} and all(0 <= v <= 1 for v in glass.values())
    # The uniform reference: the same grid sizes over the same regions, on the same tissue mask.
    tissue = detect_tissue(open_slide(str(slides_dir / "CMU-1-Small-Region.svs")))
    mh, mw = tissue.mask.shape
    on_glass = total = 0
    for (x, y, w, h), reg in zip(report["regions"], report["gather"]["regions"]):
        gh, gw = reg["grid"]
        xs = x + (np.arange(gw) + 0.5) * w / gw
        ys = y + (np.arange(gh) + 0.5) * h / gh
        cols = np.minimum((xs / tissue.downsample[0]).astype(int), mw - 1)
        rows = np.minimum((ys / tissue.downsample[1]).astype(int), mh - 1)
        on_glass += int((~tissue.mask[np.ix_(rows, cols)]).sum())
        total += gh * gw
    assert glass["uniform"] == pytest.approx(on_glass / total)
    assert 0.1 < glass["uniform"] < 0.9  # CMU-1-Small-Region: tissue with glass between and around it


def test_geojson_rasterises_back_onto_mask(cmu_run):
    from skimage.draw import polygon2mask

    out, outputs = cmu_run
    with tifffile.TiffFile(out / outputs["mask"]) as tif:
        level0 = tif.pages[0].asarray()
    with gzip.open(out / outputs["geojson"], "rt") as f:
        fc = json.load(f)
    assert fc["type"] == "FeatureCollection" and fc["features"]
    shapes = read_qupath_geojson(out / outputs["geojson"])
    names = {c.name: c.value for c in default_classes(3)}
    ds = 4  # compare on a 4x reduced raster of level-0 pixel centres
    h, w = level0.shape[0] // ds, level0.shape[1] // ds
    raster = np.zeros((h, w), np.uint8)
    for name, geom in shapes:
        polys = getattr(geom, "geoms", [geom])
        for p in polys:
            ext = np.asarray(p.exterior.coords) / ds - 0.5
            m = polygon2mask((h, w), ext[:, ::-1])
            for hole in p.interiors:
                m &= ~polygon2mask((h, w), (np.asarray(hole.coords) / ds - 0.5)[:, ::-1])
            raster[m] = names[name]
    ref = level0[ds // 2 :: ds, ds // 2 :: ds][:h, :w]
    assert (raster == ref).mean() > 0.95


def test_geojson_classes_tile_the_traced_level(cmu_run):
    # Neighbouring classes share their simplified boundaries: no overlaps, no gaps, every pixel centre
    # of the traced mask level in its own class's polygon (background: in none).
    out, outputs = cmu_run
    items = read_qupath_geojson(out / outputs["geojson"])
    labels, ds = reduced_mask_level(out / outputs["mask"], 8192)  # what segment_slide traces
    assert len({name for name, _ in items}) == 2  # both classes, with shared boundaries
    areas = overlap_areas(items)
    assert len(areas) and areas.max() == 0
    back = rasterise(items, labels.shape, ds, {c.name: c.value for c in default_classes(3)})
    assert np.array_equal(back, labels)


def test_qc_png_written(cmu_run):
    from PIL import Image

    out, outputs = cmu_run
    with Image.open(out / outputs["qc"]) as im:
        assert im.size[0] > 500 and im.mode in ("RGB", "RGBA")


def test_uniform_model_mask_is_nearest_upsampling(slides_dir, uniform_model_file, tmp_path):
    # boxes.tiff is 300 x 250: a 60 x 50 grid is an integer factor of 5.
    model = load_deformseg(uniform_model_file)
    options = SegmentOptions(regions="whole", out_size=(50, 60), geojson=False, qc=False)
    outputs = segment_slide(str(slides_dir / "boxes.tiff"), model, tmp_path, "boxes", options)
    ms = open_slide(slides_dir / "boxes.tiff")
    res = segment_region(ms, (0, 0, 300, 250), model, options, torch.device("cpu"))
    with tifffile.TiffFile(tmp_path / outputs["mask"]) as tif:
        level0 = tif.pages[0].asarray()
    assert np.array_equal(level0, np.repeat(np.repeat(res.prediction.labels, 5, 0), 5, 1))


def test_regions_batched_through_the_nets_segment_as_one_by_one(slides_dir):
    # The shipped real-tissue model on CMU-1-Small-Region, at its physical sample spacing: six like-sized
    # boxes (one geometry) and two others; batches of up to four regions against one region per call.
    from wsiseg.demo import TUMOUR_MODEL

    model = load_deformseg(TUMOUR_MODEL)
    ms = open_slide(slides_dir / "CMU-1-Small-Region.svs")
    boxes = [(x, y, 700, 700) for x in (0, 700, 1400) for y in (0, 700)] + [(100, 1500, 900, 600), (0, 0, 2220, 2967)]
    options, cpu = SegmentOptions(regions="whole", interp="linear"), torch.device("cpu")
    single = [segment_region(ms, box, model, options, cpu) for box in boxes]
    h, w = single[0].grid_size
    assert len({r.grid_size for r in single}) == 3 and h * w > 1000
    done = []
    batched = segment_regions(ms, boxes, model, options, cpu, batch_samples=4 * h * w, progress=done.append)
    assert done == [0.5, 0.75, 0.875, 1.0]  # 4 + 2 like-sized boxes, then each of the others
    for box, res, one in zip(boxes, batched, single):
        assert res.box == box and res.grid_size == one.grid_size and res.map_size == one.map_size
        # batched convolutions round differently in the last bits: the same grid to well under a pixel
        np.testing.assert_allclose(res.points, one.points, atol=1e-3)
        np.testing.assert_allclose(res.density, one.density, rtol=1e-4)
        np.testing.assert_allclose(res.prediction.scores, one.prediction.scores, atol=1e-4)
        assert (res.prediction.labels == one.prediction.labels).mean() >= 0.999
        np.testing.assert_allclose(res.prediction.inverse, one.prediction.inverse, atol=1e-3)
        assert res.gather_stats["samples"] == one.gather_stats["samples"]


def test_test_time_flips_change_a_few_labels_and_the_fingerprint(slides_dir, tmp_path):
    # The shipped tumour model on CMU-1-Small-Region with and without --tta: the same grid, most labels
    # the same, some changed; the option is recorded (and so redoes a finished slide) only when on.
    from wsiseg.demo import TUMOUR_MODEL

    model = load_deformseg(TUMOUR_MODEL)
    ms = open_slide(slides_dir / "CMU-1-Small-Region.svs")
    box, cpu = (0, 0, ms.width, ms.height), torch.device("cpu")
    plain = segment_region(ms, box, model, SegmentOptions(regions="whole"), cpu)
    flips = segment_region(ms, box, model, SegmentOptions(regions="whole", tta=True), cpu)
    assert np.array_equal(plain.points, flips.points)
    same = (plain.prediction.labels == flips.prediction.labels).mean()
    assert 0.8 < same < 1.0
    assert "tta" not in SegmentOptions().resolved() and SegmentOptions(tta=True).resolved()["tta"] is True
    args = [str(slides_dir / "boxes.tiff"), "--model", str(TUMOUR_MODEL), "--progress", "none", "--no-qc"]
    r = _segment([*args, "--no-geojson", "--out", str(tmp_path), "--tta"])
    assert r.exit_code == 0, r.output
    report = json.loads(next(tmp_path.glob("*.report.json")).read_text())
    assert report["config"]["options"]["tta"] is True


def test_glass_weight_moves_samples_off_glass_and_needs_the_tissue_mask(slides_dir):
    # CMU-1-Small-Region (about half glass) with the shipped tumour model through segment_region: the net's
    # density is the same, the grid is built on a warp away from the detector's glass, so fewer samples
    # land there (measured 0.584 -> 0.302 of the points over the whole slide); without a mask it is refused.
    from wsiseg.demo import TUMOUR_MODEL
    from wsiseg.segment.regions import find_regions

    model = load_deformseg(TUMOUR_MODEL)
    ms = open_slide(slides_dir / "CMU-1-Small-Region.svs")
    box, cpu = (0, 0, ms.width, ms.height), torch.device("cpu")
    _, _, tissue = find_regions(ms, SegmentOptions(regions="whole"))
    plain = segment_region(ms, box, model, SegmentOptions(regions="whole"), cpu)
    opts = SegmentOptions(regions="whole", glass_weight=0.1)
    weighted = segment_region(ms, box, model, opts, cpu, tissue=tissue)
    np.testing.assert_array_equal(weighted.density, plain.density)
    assert weighted.points.shape == plain.points.shape

    def on_glass(points):
        return 1.0 - tissue.tissue_at(points.reshape(-1, 2)).mean()

    assert on_glass(plain.points) > 0.5 and on_glass(weighted.points) < on_glass(plain.points) - 0.2
    with pytest.raises(ValueError, match="tissue mask"):
        segment_region(ms, box, model, opts, cpu)


def _segment(args):
    return CliRunner().invoke(main, ["segment", *args], catch_exceptions=False)


def test_default_dpi_slide_gets_no_areas_unless_mpp_is_given(slides_dir, model_file, tmp_path, caplog):
    """boxes.tiff's 72 dpi tags (352.8 um/px) are ignored: no km^2 areas, the report says why; --mpp wins."""
    slide = slides_dir / "boxes.tiff"
    args = [str(slide), "--model", str(model_file), "--progress", "none", "--no-qc", "--no-geojson"]
    with caplog.at_level("WARNING"):
        r = _segment([*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    warned = [m for m in (rec.getMessage() for rec in caplog.records) if "implausible" in m]
    assert len(warned) == 1 and warned[0].startswith(f"{slide}: ") and "352.778 um/px" in warned[0]
    report = json.loads((tmp_path / "a" / "boxes.report.json").read_text())
    assert report["mpp"] is None and report["mpp_source"] == "ignored-implausible"
    assert report["mpp_ignored"]["mpp"] == [pytest.approx(352.7778)] * 2
    assert all(row["area_mm2"] is None for row in report["class_areas"])
    # the mask does not repeat the bogus size
    assert "openslide.mpp-x" not in openslide.OpenSlide(str(tmp_path / "a" / "boxes.mask.tif")).properties

    r = _segment([*args, "--out", str(tmp_path / "b"), "--mpp", "0.25"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "b" / "boxes.report.json").read_text())
    assert (report["mpp"], report["mpp_source"], report["mpp_ignored"]) == ([0.25, 0.25], "override", None)
    assert all(row["area_mm2"] == pytest.approx(row["pixels"] * 0.25**2 / 1e6) for row in report["class_areas"])
    assert openslide.OpenSlide(str(tmp_path / "b" / "boxes.mask.tif")).properties["openslide.mpp-x"].startswith("0.25")


def test_cli_batch_resume_and_failures(slides_dir, model_file, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(slides_dir / "boxes.tiff", src / "boxes.tiff")
    shutil.copy(slides_dir / "small.svs", src / "small.svs")
    data = (slides_dir / "boxes.tiff").read_bytes()
    (src / "cut.tiff").write_bytes(data[: len(data) // 3])  # truncated slide
    out = tmp_path / "out"
    args = [str(src), "--model", str(model_file), "--out", str(out), "--progress", "none", "--no-qc"]
    r = _segment(args)
    assert r.exit_code == 1, r.output
    status = {row.split(",")[1]: row.split(",")[2] for row in (out / "status.csv").read_text().splitlines()[1:]}
    assert status == {"boxes": "ok", "small": "ok", "cut": "failed"}
    assert not list(out.glob("cut.*.tif"))  # nothing presented as complete
    assert (out / "report.csv").read_text().count("\n") == 4

    (src / "cut.tiff").unlink()
    mtime = (out / "boxes.mask.tif").stat().st_mtime_ns
    r = _segment(args)
    assert r.exit_code == 0, r.output
    assert "2 skipped" in r.output
    assert (out / "boxes.mask.tif").stat().st_mtime_ns == mtime
    # Changed options redo the slides.
    r = _segment([*args, "--interp", "linear"])
    assert r.exit_code == 0 and "2 ok" in r.output
    assert (out / "boxes.mask.tif").stat().st_mtime_ns != mtime


def test_cli_refuses_bad_model_before_work(slides_dir, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    r = CliRunner().invoke(
        main, ["segment", str(slides_dir / "boxes.tiff"), "--model", str(junk), "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 2
    assert str(junk) in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_edge_sampler_model_is_refused(slides_dir, tmp_path):
    path = tmp_path / "edge.safetensors"
    save_deformseg(path, DeformSegNet(SEG, sampler="edge", map_size=(32, 32), out_size=(64, 64)), default_classes(3))
    r = CliRunner().invoke(
        main, ["segment", str(slides_dir / "boxes.tiff"), "--model", str(path), "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 2 and "oracle" in r.stderr


def test_disk_full_mid_write_fails_slide_and_batch_goes_on(slides_dir, model_file, tmp_path, monkeypatch):
    import wsiseg.output.mask as mask_mod

    real = mask_mod.write_label_pyramid
    calls = {"n": 0}

    def flaky(path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:

            def failing_source(level, x0, y0, w, h, _src=a[2]):
                raise OSError(errno.ENOSPC, "No space left on device")

            return real(path, a[0], a[1], failing_source, **kw)
        return real(path, *a, **kw)

    monkeypatch.setattr(mask_mod, "write_label_pyramid", flaky)
    out = tmp_path / "out"
    r = _segment(
        [
            str(slides_dir / "boxes.tiff"),
            str(slides_dir / "small.svs"),
            "--model",
            str(model_file),
            "--out",
            str(out),
            "--progress",
            "none",
            "--no-qc",
            "--no-geojson",
        ]
    )
    assert r.exit_code == 1
    rows = (out / "status.csv").read_text()
    assert "No space left on device" in rows
    assert not (out / "boxes.mask.tif").exists()
    assert (out / "small.mask.tif").exists()
    assert not list(out.glob(".*tmp*"))


# --- sliding-window mode


def _colour_segmenter() -> torch.nn.Module:
    """A per-pixel segmenter (1x1 conv on the standardised colour): each label depends on its own
    pixel only, so a sliding-window mask can be checked against the whole image segmented at once."""
    conv = torch.nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        conv.bias.zero_()
    return conv.eval()


@pytest.fixture
def colour_model(model_file):
    model = load_deformseg(model_file)
    model.net.segmenter = _colour_segmenter()
    return model


def test_sliding_window_option_is_validated_and_part_of_the_fingerprint():
    assert SegmentOptions().mode == "deformed"
    assert SegmentOptions(mode="sliding-window").resolved()["mode"] == "sliding-window"
    with pytest.raises(ConfigError):
        SegmentOptions(mode="tiles")


def test_sliding_window_mask_on_cmu(slides_dir, colour_model, tmp_path):
    slide = slides_dir / "CMU-1-Small-Region.svs"
    # the net's own labels (--background model), to compare them pixel by pixel; QC: see the CLI test
    options = SegmentOptions(mode="sliding-window", background="model", geojson=False, qc=False)
    outputs = segment_slide(str(slide), colour_model, tmp_path, "cmu", options)
    src = openslide.OpenSlide(str(slide))
    mask = openslide.OpenSlide(str(tmp_path / outputs["mask"]))
    assert mask.dimensions == src.dimensions
    assert mask.level_count == len(mask_levels(*src.dimensions, 512)) > 2
    assert float(mask.properties["openslide.mpp-x"]) == pytest.approx(float(src.properties["openslide.mpp-x"]), 1e-4)

    report = json.loads((tmp_path / outputs["report"]).read_text())
    assert report["mode"] == "sliding-window" and report["config"]["options"]["mode"] == "sliding-window"
    assert report["folded_cells"] is None  # no sampling grid
    boxes = report["regions"]
    assert boxes and report["gather"]["windows"] == sum(-(-w // 512) * -(-h // 512) for _, _, w, h in boxes)
    with tifffile.TiffFile(tmp_path / outputs["mask"]) as tif:
        levels = [p.asarray() for p in tif.pages]
    level0 = levels[0]
    assert set(np.unique(level0)) <= {c.value for c in default_classes(3)}

    # Inside the regions: the net's own per-pixel labels; outside: background.
    net = colour_model.net
    rgb = np.asarray(open_slide(slide).levels[0].array.compute())
    with torch.no_grad():
        logits = net.segmenter(net.standardise(torch.from_numpy(rgb).permute(2, 0, 1)[None]))
    expect = logits.argmax(dim=1)[0].numpy().astype(np.uint8)  # class index == value for default_classes(3)
    inside = np.zeros(level0.shape, bool)
    for x, y, w, h in boxes:
        inside[y : y + h, x : x + w] = True
    assert (level0[~inside] == 0).all()
    assert (level0[inside] == expect[inside]).mean() > 0.9999
    assert len(np.unique(level0[inside])) > 1

    # Reduced levels: the level-0 pixel under each level pixel's centre.
    H, W = level0.shape
    for lv in levels[1:]:
        h, w = lv.shape
        rows = np.floor((np.arange(h) + 0.5) * (H / h)).astype(int)
        cols = np.floor((np.arange(w) + 0.5) * (W / w)).astype(int)
        assert np.array_equal(lv, level0[np.ix_(rows, cols)])

    counts = np.bincount(level0.ravel(), minlength=3)
    assert [a["pixels"] for a in report["class_areas"]] == counts[:3].tolist()
    assert report["fraction_sampled"] == pytest.approx(sum(w * h for _, _, w, h in boxes) / (H * W))
    assert report["samples_on_glass"] is None  # no sampling points
    assert not list(tmp_path.glob(".*"))  # the temporary label store is gone


def test_sliding_window_store_removed_when_segmenter_fails(slides_dir, colour_model, tmp_path, monkeypatch):
    real = colour_model.net.segmenter
    calls = {"n": 0}

    class Failing(torch.nn.Module):
        def forward(self, x):
            calls["n"] += 1
            if calls["n"] == 3:
                assert list(tmp_path.glob(f".cmu.sliding-window.tmp-{os.getpid()}"))  # the store is there mid-way
                raise RuntimeError("segmenter failed mid-way")
            return real(x)

    monkeypatch.setattr(colour_model.net, "segmenter", Failing())
    with pytest.raises(RuntimeError, match="mid-way"):
        segment_slide(
            str(slides_dir / "CMU-1-Small-Region.svs"),
            colour_model,
            tmp_path,
            "cmu",
            SegmentOptions(mode="sliding-window"),
        )
    assert calls["n"] == 3
    assert not list(tmp_path.glob(".*")) and not list(tmp_path.glob("cmu.*"))


def test_cli_sliding_window_on_boxes(slides_dir, model_file, tmp_path):
    out = tmp_path / "out"
    args = [
        str(slides_dir / "boxes.tiff"),
        "--model",
        str(model_file),
        "--out",
        str(out),
        "--progress",
        "none",
        "--mode",
        "sliding-window",
    ]
    r = _segment(args)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "boxes.report.json").read_text())
    assert report["mode"] == "sliding-window" and report["gather"]["windows"] >= 1
    assert (out / "boxes.qc.png").stat().st_size > 0  # QC without sampling points or density
    mask = openslide.OpenSlide(str(out / "boxes.mask.tif"))
    assert mask.dimensions == openslide.OpenSlide(str(slides_dir / "boxes.tiff")).dimensions
    with tifffile.TiffFile(out / "boxes.mask.tif") as tif:
        assert set(np.unique(tif.pages[0].asarray())) <= {0, 1, 2}
    assert not list(out.glob(".*sliding-window*"))
    # The mode is part of the resume fingerprint: deformed mode redoes the slide.
    r = _segment(args[:-2])
    assert r.exit_code == 0 and "1 ok" in r.output
    assert json.loads((out / "boxes.report.json").read_text())["mode"] == "deformed"


def _small_disk_available() -> bool:
    """Whether this machine lets an unprivileged process mount a tmpfs in its own user and mount namespace."""
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not _small_disk_available(), reason="needs `unshare --user --mount` to mount a small tmpfs")
def test_full_disk_in_sliding_window_mode_fails_the_slide_not_the_batch(slides_dir, model_file, tmp_path):
    """A real full disk: a 1 MiB tmpfs, mounted in a private namespace, as the output folder.

    CMU-1-Small-Region's level-0 labels need 6.6 MB; the label store used to be a memory map, and
    writing to it on a full disk killed the whole batch with SIGBUS.
    """
    disk, out = tmp_path / "disk", tmp_path / "disk" / "out"
    disk.mkdir()
    script = f"""
        mount -t tmpfs -o size=1m tmpfs {disk} || exit 97
        {sys.executable} -m wsiseg segment {slides_dir / "CMU-1-Small-Region.svs"} {slides_dir / "boxes.tiff"} \\
            --model {model_file} --out {out} --mode sliding-window --regions whole --no-qc --no-geojson \\
            --progress none >/dev/null
        echo "exit=$?"
        echo "--- status"
        cat {out}/status.csv
        echo "--- files"
        ls -a {out}
    """
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    head, rest = r.stdout.split("--- status\n")
    status_text, files = rest.split("--- files\n")
    assert head.strip() == "exit=1", r.stdout + r.stderr  # SIGBUS was exit=135, with no status for either slide
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO(status_text))}
    assert rows["CMU-1-Small-Region"]["status"] == "failed"
    assert rows["CMU-1-Small-Region"]["error"].startswith("disk full: No space left on device")
    assert rows["boxes"]["status"] == "ok"  # the batch went on
    names = files.split()
    assert "boxes.mask.tif" in names and "CMU-1-Small-Region.mask.tif" not in names
    assert not [n for n in names if ".tmp" in n or n.endswith(".lock")]  # the label store is gone too


def test_write_error_in_the_label_store_fails_the_slide_and_the_batch_goes_on(
    slides_dir, model_file, tmp_path, monkeypatch
):
    """Where no small disk can be mounted: the store's first write fails as a full disk does."""
    real, calls = os.pwrite, []

    def full_once(fd, data, offset):
        calls.append(offset)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_once)
    out = tmp_path / "out"
    r = _segment(
        [
            str(slides_dir / "boxes.tiff"),
            str(slides_dir / "small.svs"),
            "--model",
            str(model_file),
            "--out",
            str(out),
            "--mode",
            "sliding-window",
            "--progress",
            "none",
            "--no-qc",
            "--no-geojson",
        ]
    )
    assert r.exit_code == 1
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO((out / "status.csv").read_text()))}
    assert rows["boxes"]["status"] == "failed" and rows["small"]["status"] == "ok"
    assert rows["boxes"]["error"] == (
        f"disk full: No space left on device ({out / f'.boxes.sliding-window.tmp-{os.getpid()}'})"
    )
    assert not list(out.glob(".*")) and not list(out.glob("boxes.*"))


_KILLED_SLIDING_WINDOW = """
import os, signal, sys
from pathlib import Path
import numpy as np
from wsiseg.batch.jobs import SlideJob
from wsiseg.batch.runner import execute_slide
from wsiseg.segment import LabelStore

out, slide, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

def process(job, out_dir, *, fingerprint, overwrite, progress):
    store = LabelStore(out_dir, job.name, 2220, 2967)  # what sliding-window mode holds while it runs
    store.write(0, 0, np.ones((64, 64), np.uint8))
    (out_dir / f".{job.name}.mask.tif.old-{os.getpid()}").write_bytes(b"the previous mask, moved aside")
    os.kill(os.getpid(), signal.SIGKILL)

execute_slide(SlideJob(slide, name), out, process, fingerprint="fp")
"""


def test_temporaries_of_a_killed_run_are_removed_by_the_next_run(slides_dir, model_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    slide, name = slides_dir / "CMU-1-Small-Region.svs", "CMU-1-Small-Region"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_SLIDING_WINDOW, str(out), str(slide), name],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    pid = json.loads((out / f"{name}.lock").read_text())["pid"]
    assert (out / f".{name}.mask.tif.old-{pid}").exists()
    assert list(out.glob(f".{name}.sliding-window*"))  # the label store the killed run held
    r = _segment(
        [str(slide), "--model", str(model_file), "--out", str(out), "--progress", "none", "--no-qc", "--no-geojson"]
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".lock") == []


# --- physical scale: a model that records its sample spacing in micrometres


@pytest.fixture(scope="module")
def scale_model_file(tmp_path_factory):
    """A tiny net that says it was trained at 0.5 um per working pixel, one sample every 16 um."""
    from wsiseg.models.scale import ModelScale

    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("model") / "scaled.safetensors"
    net = DeformSegNet(SEG, map_size=(32, 32), out_size=(64, 64)).eval()
    save_deformseg(path, net, default_classes(3), extra={"scale": ModelScale(0.5, 16.0, "slide", 1, 0).to_dict()})
    return path


def test_same_region_at_two_resolutions_is_sampled_at_the_model_spacing(slides_dir, scale_model_file, model_file):
    """CMU-1-Small-Region read as 0.5 and as 1.0 um/px: the grid keeps the model's 16 um spacing; an old model's
    pixel rule gives the same grid at both."""
    slide = str(slides_dir / "CMU-1-Small-Region.svs")
    scaled, old = load_deformseg(scale_model_file), load_deformseg(model_file)
    grids, old_grids = {}, set()
    for mpp in (0.5, 1.0):
        ms = open_slide(slide, mpp=mpp)
        box = (0, 0, ms.width, ms.height)
        res = segment_region(ms, box, scaled, SegmentOptions(regions="whole"), torch.device("cpu"))
        h, w = grids[mpp] = res.grid_size
        # extent / nodes is the model's spacing, up to rounding half a node
        assert abs(ms.height * mpp / h - 16.0) <= 8.0 / h + 1e-9 and abs(ms.width * mpp / w - 16.0) <= 8.0 / w + 1e-9
        assert res.points.shape[:2] == (h, w)
        old_grids.add(segment_region(ms, box, old, SegmentOptions(regions="whole"), torch.device("cpu")).grid_size)
    assert grids == {0.5: (93, 69), 1.0: (185, 139)}  # 2967 x 2220 px; 1483.5 / 16 -> 93, 1110 / 16 -> 69
    assert old_grids == {old.net.geometry(2967, 2220).grid} == {(85, 64)}


def test_whole_slide_splits_into_sub_boxes_that_tile_it(slides_dir, scale_model_file, tmp_path):
    from wsiseg.sampling.geometry import PhysicalScale, split_region

    model = load_deformseg(scale_model_file)
    options = SegmentOptions(regions="whole", max_grid=(64, 64), geojson=False, qc=False)
    outputs = segment_slide(str(slides_dir / "CMU-1-Small-Region.svs"), model, tmp_path, "cmu", options)
    report = json.loads((tmp_path / outputs["report"]).read_text())
    assert report["scale"] == {
        "mode": "physical",
        "sample_spacing_um": 16.0,
        "mpp": [0.499, 0.499],
        "max_grid": [64, 64],
        "grids": 4,
    }
    # 2967 x 2220 px at 0.499 um/px: a 93 x 69 grid, over the 64 x 64 cap -> 2 x 2 sub-boxes
    regions = report["gather"]["regions"]
    boxes = [tuple(r["box"]) for r in regions]
    assert boxes == split_region((0, 0, 2220, 2967), PhysicalScale(0.499, 16.0), (64, 64))
    assert boxes == [(0, 0, 1110, 1483), (1110, 0, 1110, 1483), (0, 1483, 1110, 1484), (1110, 1483, 1110, 1484)]
    assert [tuple(r["grid"]) for r in regions] == [(46, 35), (46, 35), (46, 35), (46, 35)]
    assert report["regions"] == [list(b) for b in boxes]
    assert report["fraction_sampled"] == pytest.approx(4 * 46 * 35 / (2220 * 2967))
    with tifffile.TiffFile(tmp_path / outputs["mask"]) as tif:
        assert tif.pages[0].shape == (2967, 2220)
    # a box over the cap is refused by segment_region itself: it is what the split is for
    with pytest.raises(ValueError, match="over the cap"):
        segment_region(
            open_slide(str(slides_dir / "CMU-1-Small-Region.svs")),
            (0, 0, 2220, 2967),
            model,
            options,
            torch.device("cpu"),
        )


def test_slide_without_mpp_warns_once_and_records_the_fallback(slides_dir, scale_model_file, tmp_path, caplog):
    slide = str(slides_dir / "rgba_geotiff.tiff")  # 600 x 600, no MPP in any form
    model = load_deformseg(scale_model_file)
    options = SegmentOptions(regions="whole", geojson=False, qc=False)
    with caplog.at_level("WARNING"):
        outputs = segment_slide(slide, model, tmp_path / "a", "geo", options)
    warned = [r.getMessage() for r in caplog.records if "MPP" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{slide}: ") and "--mpp" in warned[0]
    assert "\n" not in warned[0]
    report = json.loads((tmp_path / "a" / outputs["report"]).read_text())
    assert report["scale"] == {"mode": "pixels", "reason": "slide has no MPP; pass --mpp"}
    assert report["gather"]["regions"][0]["grid"] == list(model.net.geometry(600, 600).grid)

    # --mpp gives it one (command line, with --max-grid): 600 px * 2 um / 16 um = 75 samples per side
    out = tmp_path / "b"
    r = _segment(
        [
            slide,
            "--model",
            str(scale_model_file),
            "--out",
            str(out),
            "--regions",
            "whole",
            "--mpp",
            "2",
            "--max-grid",
            "40x30",
            "--progress",
            "none",
            "--no-qc",
            "--no-geojson",
        ]
    )
    assert r.exit_code == 0, r.output
    report = json.loads((out / "rgba_geotiff.report.json").read_text())
    assert report["scale"] == {
        "mode": "physical",
        "sample_spacing_um": 16.0,
        "mpp": [2.0, 2.0],
        "max_grid": [30, 40],
        "grids": 6,
    }  # ceil(75 / 30) = 3 rows, ceil(75 / 40) = 2 columns
    assert all(r["grid"][0] <= 30 and r["grid"][1] <= 40 for r in report["gather"]["regions"])
    assert report["config"]["options"]["max_grid"] == [30, 40]
    r = _segment([slide, "--model", str(scale_model_file), "--out", str(out), "--max-grid", "0x3"])
    assert r.exit_code == 2 and "WIDTHxHEIGHT" in r.output


def test_old_model_and_fixed_grids_use_the_pixel_rule(cmu_run, model_file, scale_model_file):
    """A model file without scale metadata segments as before; --size and --long-side also select pixels."""
    from wsiseg.segment import NO_MODEL_SCALE, scale_plan

    out, outputs = cmu_run
    report = json.loads((out / outputs["report"]).read_text())
    assert report["scale"] == {"mode": "pixels", "reason": NO_MODEL_SCALE}
    assert "max_grid" not in report["config"]["options"]  # the default leaves old fingerprints alone
    net = load_deformseg(model_file).net
    for r in report["gather"]["regions"]:
        assert tuple(r["grid"]) == net.geometry(r["box"][3], r["box"][2]).grid
    scaled = load_deformseg(scale_model_file)
    assert scale_plan(scaled, (0.5, 0.5), SegmentOptions()).physical.spacing_um == 16.0
    assert scale_plan(scaled, (0.5, 0.5), SegmentOptions(out_size=(8, 8))).reason == "--size fixes the grid"
    assert scale_plan(scaled, (0.5, 0.5), SegmentOptions(long_side=100)).physical is None
    assert scale_plan(scaled, None, SegmentOptions()).reason == "slide has no MPP; pass --mpp"
    with pytest.raises(ConfigError):
        SegmentOptions(max_grid=(0, 5))


def test_cli_slide_timeout_fails_a_slow_slide_and_a_generous_one_changes_nothing(slides_dir, model_file, tmp_path):
    out = tmp_path / "out"
    base = [
        str(slides_dir / "boxes.tiff"),
        "--model",
        str(model_file),
        "--out",
        str(out),
        "--progress",
        "none",
        "--no-qc",
        "--no-geojson",
    ]
    r = _segment([*base, "--slide-timeout", "0"])
    assert r.exit_code == 2 and "--slide-timeout" in r.output and not out.exists()
    # 0.2 s: less than a worker process takes to start Python and torch
    r = _segment([*base, "--slide-timeout", "0.2"])
    assert r.exit_code == 1 and "0 ok, 0 skipped, 1 failed" in r.output
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO((out / "status.csv").read_text()))}
    assert (rows["boxes"]["status"], rows["boxes"]["error"]) == ("failed", "timed out after 0.2 s")
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "status.csv"]  # no temporaries, no lock
    # in time: the slide, segmented in its own process, gives the mask an in-process run gives
    r = _segment([*base, "--slide-timeout", "300"])
    assert r.exit_code == 0 and "1 ok" in r.output, r.output
    inline = tmp_path / "inline"
    r = _segment([*base[:4], str(inline), *base[5:]])
    assert r.exit_code == 0, r.output
    assert np.array_equal(tifffile.imread(out / "boxes.mask.tif"), tifffile.imread(inline / "boxes.mask.tif"))
