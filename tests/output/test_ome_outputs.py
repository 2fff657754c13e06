"""`wsiseg segment --format ome-tiff,ome-zarr`: OME outputs streamed from the finished mask, on a real slide."""

from __future__ import annotations

import errno
import json
import shutil
import tracemalloc
import xml.etree.ElementTree as ET

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner
from ome_zarr_models.v04 import Image, ImageLabel, Labels

from wsiseg.batch.jobs import BatchResult
from wsiseg.cli.app import main
from wsiseg.demo import demo_model
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.models.io import load_deformseg
from wsiseg.output import ome
from wsiseg.output.classes import default_classes
from wsiseg.output.mask import mask_levels, write_label_pyramid
from wsiseg.segment import SegmentOptions
from wsiseg.slide import Multiscale, open_slide
from wsiseg.slide.lowres import area_mean

CMU = "CMU-1-Small-Region.svs"


def _segment(*args: str):
    return CliRunner().invoke(main, ["segment", *args, "--progress", "none"], catch_exceptions=False)


def _mask_levels(path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [page.asarray() for page in tif.pages]


@pytest.fixture(scope="module")
def run(slides_dir, tmp_path_factory):
    """CMU-1-Small-Region segmented once with the shipped demo model, in all three formats."""
    out = tmp_path_factory.mktemp("ome")
    r = _segment(
        str(slides_dir / CMU),
        "--model",
        str(demo_model()),
        "--out",
        str(out),
        "--no-qc",
        "--no-geojson",
        "--format",
        "tiff,ome-tiff",
        "--format",
        "ome-zarr",
    )
    assert r.exit_code == 0, r.output
    stem = CMU.removesuffix(".svs")
    return out, stem, _mask_levels(out / f"{stem}.mask.tif")


def test_ome_tiff_holds_the_mask_as_a_subifd_pyramid(run, slides_dir):
    out, stem, levels = run
    assert len(levels) == len(mask_levels(2220, 2967)) == 4
    with tifffile.TiffFile(out / f"{stem}.mask.ome.tif") as tif:
        assert tif.is_ome and tif.is_bigtiff
        assert len(tif.pages) == 1  # level 0 alone in the main chain...
        page = tif.pages[0]
        assert len(page.subifds) == len(levels) - 1  # ...the reduced levels are its SubIFDs
        series = tif.series[0]
        assert [lv.shape for lv in series.levels] == [lv.shape for lv in levels]
        for lv, expected, g in zip(series.levels, levels, mask_levels(2220, 2967)):
            p = lv.pages[0]
            # the mask's tiles: 512, the last level (278 x 371) one tile of 384
            assert p.dtype == np.uint8 and (p.tilewidth, p.tilelength) == (g.tile_edge(512),) * 2
            assert p.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert np.array_equal(lv.asarray(), expected)
        assert [lv.pages[0].subfiletype for lv in series.levels[1:]] == [tifffile.FILETYPE.REDUCEDIMAGE] * 3
        pixels = ET.fromstring(tif.ome_metadata).find(".//{*}Pixels")
    mpp = open_slide(slides_dir / CMU).mpp
    assert float(pixels.get("PhysicalSizeX")) == mpp[0] and float(pixels.get("PhysicalSizeY")) == mpp[1]
    assert pixels.get("PhysicalSizeXUnit") == "µm"


def test_ome_zarr_holds_the_mask_as_an_ngff_label_image(run, slides_dir):
    out, stem, levels = run
    mpp = open_slide(slides_dir / CMU).mpp
    root = zarr.open_group(str(out / f"{stem}.ome.zarr"), mode="r", zarr_format=2)
    assert root["labels"].attrs["labels"] == [ome.LABEL_NAME]
    image = root["labels"][ome.LABEL_NAME]
    (multiscale,) = image.attrs["multiscales"]
    assert multiscale["version"] == "0.4"
    assert multiscale["axes"] == [{"name": n, "type": "space", "unit": "micrometer"} for n in ("y", "x")]
    assert [d["path"] for d in multiscale["datasets"]] == [str(i) for i in range(len(levels))]
    h0, w0 = levels[0].shape
    for i, (dataset, expected) in enumerate(zip(multiscale["datasets"], levels)):
        sy, sx = h0 / expected.shape[0], w0 / expected.shape[1]
        transforms = dataset["coordinateTransformations"]
        assert transforms[0] == {"type": "scale", "scale": pytest.approx([mpp[1] * sy, mpp[0] * sx])}
        if i:  # pixel centres, as wsiseg convert writes them
            assert transforms[1]["translation"] == pytest.approx([mpp[1] * (sy - 1) / 2, mpp[0] * (sx - 1) / 2])
        arr = image[str(i)]
        assert arr.dtype == np.uint8 and arr.chunks == (512, 512) and arr.compressors
        assert np.array_equal(arr[:], expected)
    classes = load_deformseg(demo_model()).classes
    label = image.attrs["image-label"]
    assert label["colors"] == [{"label-value": c.value, "rgba": [*c.color, 255]} for c in classes]
    assert [p["class"] for p in label["properties"]] == [c.name for c in classes]
    assert set(np.unique(levels[0])) <= {c.value for c in classes}


def _box_mean(img: np.ndarray, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    """Mean RGB of ``img`` over ``[y0, y1) x [x0, x1)``, each pixel weighted by its overlap (written out plainly)."""
    ys = np.arange(int(np.floor(y0)), int(np.ceil(y1)))
    xs = np.arange(int(np.floor(x0)), int(np.ceil(x1)))
    wy = np.minimum(ys + 1, y1) - np.maximum(ys, y0)
    wx = np.minimum(xs + 1, x1) - np.maximum(xs, x0)
    block = img[ys][:, xs].astype(np.float64)
    return (block * wy[:, None, None] * wx[None, :, None]).sum(axis=(0, 1)) / (wy.sum() * wx.sum())


def _check_area_means(level: np.ndarray, finer: np.ndarray, rng) -> None:
    """``level`` (y, x, 3) holds area means of ``finer``, checked at its corners and 200 random pixels."""
    h, w = level.shape[:2]
    ry, rx = finer.shape[0] / h, finer.shape[1] / w
    ii = np.r_[0, h - 1, rng.integers(0, h, 200)]
    jj = np.r_[w - 1, 0, rng.integers(0, w, 200)]
    expected = np.array([_box_mean(finer, i * ry, (i + 1) * ry, j * rx, (j + 1) * rx) for i, j in zip(ii, jj)])
    # the same means, up to rounding a half either way
    assert np.abs(level[ii, jj].astype(np.float64) - expected).max() <= 0.5 + 1e-6


def _rgb(group, path: str) -> np.ndarray:
    return np.moveaxis(group[path][:], 0, -1)


def _validate_ngff(store) -> zarr.Group:
    """The store as ome-zarr-models reads it: an Image at the root, Labels, the ImageLabel (each raises if invalid)."""
    root = zarr.open_group(str(store), mode="r", zarr_format=2)
    Image.from_zarr(root)
    Labels.from_zarr(root["labels"])
    ImageLabel.from_zarr(root["labels"][ome.LABEL_NAME])
    return root


def _datasets(group) -> list[dict]:
    (multiscale,) = group.attrs["multiscales"]
    return multiscale["datasets"]


def _assert_levels_line_up(root, label_levels: list[np.ndarray]) -> None:
    """Image level k and label level k: one shape, one scale and translation on y and x (the image adds c)."""
    image_sets, label_sets = _datasets(root), _datasets(root["labels"][ome.LABEL_NAME])
    assert len(image_sets) == len(label_sets) == len(label_levels)  # NGFF 0.4: as many label levels as image levels
    for k, (im, lab, expected) in enumerate(zip(image_sets, label_sets, label_levels)):
        assert im["path"] == lab["path"] == str(k)
        assert root[str(k)].shape == (3, *expected.shape)
        assert [t["type"] for t in im["coordinateTransformations"]] == [
            t["type"] for t in lab["coordinateTransformations"]
        ]
        for t_im, t_lab in zip(im["coordinateTransformations"], lab["coordinateTransformations"]):
            key = t_im["type"]
            assert t_im[key][0] == (1.0 if key == "scale" else 0.0)  # the channel axis
            assert t_im[key][1:] == t_lab[key]


def test_ome_zarr_root_is_the_slide_image_with_the_labels_under_it(run, slides_dir):
    out, stem, levels = run
    store = out / f"{stem}.ome.zarr"
    root = _validate_ngff(store)
    _assert_levels_line_up(root, levels)
    assert root.attrs["omero"]["rdefs"]["model"] == "color"
    wsiseg_attrs = root.attrs["wsiseg"]
    assert wsiseg_attrs["mask"] == f"{stem}.mask.tif" and wsiseg_attrs["label_image"] == f"labels/{ome.LABEL_NAME}"
    assert wsiseg_attrs["first_mask_level"] == 0 and "version" in wsiseg_attrs
    label = root["labels"][ome.LABEL_NAME].attrs["image-label"]
    assert label["source"] == {"image": "../../"}
    # pixels: labels are the TIFF mask, the RGB level 0 is the slide's, the others area means of the level above
    slide = open_slide(slides_dir / CMU).levels[0].array.compute()
    assert np.array_equal(root["labels"][ome.LABEL_NAME]["0"][:], levels[0])
    assert np.array_equal(_rgb(root, "0"), slide)
    rng = np.random.default_rng(0)
    _check_area_means(_rgb(root, "1"), slide, rng)  # 2220 x 2967 -> 1110 x 1484: 2 x 1.9993
    _check_area_means(_rgb(root, "3"), _rgb(root, "2"), rng)  # 555 x 742 -> 278 x 371: odd sides


def test_wsiseg_info_opens_the_ome_zarr(run, slides_dir):
    out, stem, levels = run
    r = CliRunner().invoke(main, ["info", "--json", str(out / f"{stem}.ome.zarr")])
    assert r.exit_code == 0, r.output
    (info,) = json.loads(r.output)
    assert (info["vendor"], info["mpp_source"]) == ("ome-zarr", "ngff")
    assert info["mpp"] == pytest.approx(list(open_slide(slides_dir / CMU).mpp))
    assert [(lv["height"], lv["width"]) for lv in info["levels"]] == [lv.shape for lv in levels]
    text = CliRunner().invoke(main, ["info", str(out / f"{stem}.ome.zarr")]).output
    assert "2220x2967" in text and "278x371" in text


def test_reduced_ome_zarr_starts_image_and_labels_at_a_mask_level(run, slides_dir, tmp_path):
    out, stem, levels = run
    ms = open_slide(slides_dir / CMU)
    store = tmp_path / "small.ome.zarr"
    # 2220 x 2967 is 6.6 Mpx, its level 1 1.6 Mpx: a 2 Mpx budget keeps levels 1...
    stats = ome.ome_zarr_from_mask(
        out / f"{stem}.mask.tif", store, default_classes(3), slide=ms, mpp=ms.mpp, max_megapixels=2
    )
    assert (stats.width, stats.height, stats.levels) == (1110, 1484, len(levels) - 1)
    root = _validate_ngff(store)
    assert root.attrs["wsiseg"]["first_mask_level"] == 1 and root.attrs["wsiseg"]["max_megapixels"] == 2
    _assert_levels_line_up(root, levels[1:])
    for k, expected in enumerate(levels[1:]):
        assert np.array_equal(root["labels"][ome.LABEL_NAME][str(k)][:], expected)
    # still in the slide's level-0 frame: the first level's pixel centres sit (s - 1) / 2 slide pixels in
    first = _datasets(root)[0]["coordinateTransformations"]
    sy, sx = 2967 / 1484, 2220 / 1110
    assert first[0]["scale"] == pytest.approx([1.0, ms.mpp[1] * sy, ms.mpp[0] * sx])
    assert first[1]["translation"] == pytest.approx([0.0, ms.mpp[1] * (sy - 1) / 2, ms.mpp[0] * (sx - 1) / 2])
    _check_area_means(_rgb(root, "0"), ms.levels[0].array.compute(), np.random.default_rng(1))
    back = open_slide(store)  # what wsiseg info shows
    assert [(lv.height, lv.width) for lv in back.levels] == [lv.shape for lv in levels[1:]]
    assert back.mpp == pytest.approx((ms.mpp[0] * sx, ms.mpp[1] * sy))


def test_ome_zarr_refuses_a_slide_of_another_size_and_bad_budgets(run, slides_dir, tmp_path):
    out, stem, _ = run
    mask = out / f"{stem}.mask.tif"
    with pytest.raises(WsisegError, match="300x250 but the mask is 2220x2967"):
        ome.ome_zarr_from_mask(mask, tmp_path / "x.ome.zarr", default_classes(3), slide=slides_dir / "boxes.tiff")
    with pytest.raises(ConfigError, match="megapixels"):
        ome.ome_zarr_from_mask(
            mask, tmp_path / "x.ome.zarr", default_classes(3), slide=slides_dir / CMU, max_megapixels=-1
        )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="megapixels"):
        SegmentOptions(ome_zarr_megapixels=-1)


def test_first_kept_level():
    shapes = [(3000, 2000), (1500, 1000), (750, 500)]
    assert [ome.first_kept_level(shapes, mpx) for mpx in (None, 0, 6, 5.99, 1.5, 0.375, 0.1)] == [0, 0, 0, 1, 1, 2, 2]


def test_area_mean_is_the_overlap_weighted_mean():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (37, 29, 3)).astype(np.float64)
    # integer ratios: block means
    assert np.allclose(
        area_mean(img[:36, :28], np.arange(19) * 2.0, np.arange(8) * 4.0),
        img[:36, :28].reshape(18, 2, 7, 4, 3).mean(axis=(1, 3)),
    )
    # any ratio, down or up: against the plain weighted sum
    for h, w in [(10, 7), (19, 15), (37, 29), (50, 40)]:
        rows, cols = np.arange(h + 1) * 37 / h, np.arange(w + 1) * 29 / w
        got = area_mean(img, rows, cols)
        expected = [[_box_mean(img, rows[i], rows[i + 1], cols[j], cols[j + 1]) for j in range(w)] for i in range(h)]
        assert np.allclose(got, expected)
    whole = area_mean(img[..., 0], np.array([0.0, 37.0]), np.array([0.0, 29.0]))
    assert whole[0, 0] == pytest.approx(img[..., 0].mean())


def test_ome_zarr_megapixels_reaches_the_writer(monkeypatch, tmp_path):
    seen = {}

    def fake_run(slides, model, out_dir, options, **kw):
        seen["options"] = options
        return BatchResult(results=[], status_path=tmp_path / "status.csv")

    monkeypatch.setattr("wsiseg.segment.run_segment", fake_run)
    args = ["segment", "x.svs", "--model", "m", "--out", str(tmp_path), "--format", "ome-zarr"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert seen["options"].ome_zarr_megapixels == ome.MAX_MEGAPIXELS  # the --help default is the writer's
    CliRunner().invoke(main, [*args, "--ome-zarr-megapixels", "0"])
    assert seen["options"].ome_zarr_megapixels == 0
    assert seen["options"].resolved()["ome_zarr_megapixels"] == 0


def test_report_and_done_marker_list_the_extra_formats(run):
    out, stem, _ = run
    expected = {"ome-tiff": f"{stem}.mask.ome.tif", "ome-zarr": f"{stem}.ome.zarr"}
    report = json.loads((out / f"{stem}.report.json").read_text())
    marker = json.loads((out / f"{stem}.done.json").read_text())
    assert expected.items() <= report["outputs"].items() and expected.items() <= marker["outputs"].items()
    assert report["config"]["options"]["formats"] == ["tiff", "ome-tiff", "ome-zarr"]
    assert {"ome-tiff", "ome-zarr"} <= set(report["timings"])
    assert not list(out.glob(".*"))  # no temporaries left


def test_resume_with_a_new_format_adds_it(slides_dir, tmp_path):
    out = tmp_path / "out"
    args = [str(slides_dir / "boxes.tiff"), "--model", str(demo_model()), "--out", str(out), "--no-qc"]
    assert _segment(*args).exit_code == 0
    assert not (out / "boxes.ome.zarr").exists()
    r = _segment(*args, "--format", "ome-zarr")
    assert r.exit_code == 0 and "1 ok" in r.output, r.output  # a changed --format redoes the slide
    assert np.array_equal(
        zarr.open_array(str(out / "boxes.ome.zarr/labels/segmentation/0"), mode="r")[:],
        _mask_levels(out / "boxes.mask.tif")[0],
    )
    r = _segment(*args, "--format", "tiff,ome-zarr")  # the same request, spelled differently
    assert "1 skipped" in r.output, r.output
    shutil.rmtree(out / "boxes.ome.zarr")  # a listed output gone: redone
    r = _segment(*args, "--format", "ome-zarr")
    assert "1 ok" in r.output and (out / "boxes.ome.zarr").is_dir()


def test_default_format_keeps_the_fingerprint():
    # --format tiff is what every run wrote before the option existed: finished folders stay done
    assert "formats" not in SegmentOptions().resolved()
    assert SegmentOptions(formats="tiff").resolved() == SegmentOptions().resolved()
    assert SegmentOptions(formats=["ome-zarr", "OME-TIFF"]).formats == ("tiff", "ome-tiff", "ome-zarr")
    # the OME-Zarr budget counts only with an OME-Zarr; with one, stores of labels alone (before the RGB) are redone
    assert SegmentOptions(ome_zarr_megapixels=3).resolved() == SegmentOptions().resolved()
    assert SegmentOptions(formats="ome-zarr").resolved()["ome_zarr_megapixels"] == ome.MAX_MEGAPIXELS
    with pytest.raises(ConfigError, match="ome-tiff"):
        SegmentOptions(formats="png")


@pytest.mark.parametrize("value", ["png", "tiff,ome-tif"])
def test_unknown_format_is_a_usage_error(slides_dir, tmp_path, value):
    r = _segment(
        str(slides_dir / "boxes.tiff"), "--model", str(demo_model()), "--out", str(tmp_path / "o"), "--format", value
    )
    assert r.exit_code == 2
    errors = [line for line in r.output.splitlines() if "Error" in line]
    assert len(errors) == 1 and all(f in errors[0] for f in ome.FORMATS), r.output
    assert not (tmp_path / "o").exists()


def test_help_names_every_format():
    r = CliRunner().invoke(main, ["segment", "--help"])
    assert "|".join(ome.FORMATS) in r.output and ".mask.ome.tif" in r.output and ".ome.zarr" in r.output


def _disk_full_mid_write(monkeypatch, fmt: str) -> None:
    """Make the next ``fmt`` write fail with ENOSPC after part of it is on disk."""

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    if fmt == "ome-tiff":
        from wsiseg.output import overlay

        real_tiles = overlay._raw_tiles

        def tiles(fh, page):  # level 0 copied, then a few tiles of level 1
            for i, blob in enumerate(real_tiles(fh, page)):
                if page.index and i == 2:
                    full()
                yield blob

        monkeypatch.setattr(overlay, "_raw_tiles", tiles)
    elif fmt == "ome-zarr":
        real_copy = ome._copy_level

        def copy(src, dst, **kw):  # the image and label level 0 written, then label level 1 fails
            if dst.path.endswith("/1"):
                full()
            return real_copy(src, dst, **kw)

        monkeypatch.setattr(ome, "_copy_level", copy)
    else:
        real_mean = ome._write_area_mean

        def mean(dst, src, chunk):  # RGB level 1 written, then level 2 fails
            if dst.path == "2":
                full()
            return real_mean(dst, src, chunk)

        monkeypatch.setattr(ome, "_write_area_mean", mean)


@pytest.mark.parametrize("fmt", ["ome-tiff", "ome-zarr", "ome-zarr-rgb"])
def test_failure_mid_write_leaves_no_partial_output(run, slides_dir, tmp_path, monkeypatch, fmt):
    out, stem, _ = run
    mask = out / f"{stem}.mask.tif"
    target = tmp_path / f"x{ome.FORMAT_SUFFIXES[fmt.removesuffix('-rgb')]}"

    def write(**kw):
        if fmt == "ome-tiff":
            return ome.ome_tiff_from_mask(mask, target, **kw)
        return ome.ome_zarr_from_mask(mask, target, default_classes(3), slide=slides_dir / CMU, **kw)

    def listing():
        return sorted((str(p.relative_to(tmp_path)), p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file())

    _disk_full_mid_write(monkeypatch, fmt)
    with pytest.raises(OSError, match="No space"):
        write()
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary
    # A redo that fails keeps the previous complete output, never a partial one.
    monkeypatch.undo()
    write()
    before = listing()
    _disk_full_mid_write(monkeypatch, fmt)
    with pytest.raises(OSError, match="No space"):
        write(overwrite=True)
    assert listing() == before


def _tile_colours(block_info=None) -> np.ndarray:
    """One grey per 512 px tile of a lazy RGB slide: ``(x0 // 512 + 2 * (y0 // 512)) % 7 * 30``."""
    (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
    return np.full((y1 - y0, x1 - x0, 3), (x0 // 512 + 2 * (y0 // 512)) % 7 * 30, dtype=np.uint8)


def test_large_mask_is_streamed_in_bounded_memory(tmp_path):
    # 8192 x 8192 labels (67 MB as one array) in tiles of three labels: both writers hold a few tiles at most...
    side = 8192
    mask = tmp_path / "big.mask.tif"
    write_label_pyramid(mask, side, side, lambda lv, x0, y0, w, h: (x0 // 512 + 2 * (y0 // 512)) % 3, mpp=0.25)
    # ...and of a slide of that size (201 MB of RGB), never in memory as a whole, a piece at a time
    rgb = da.map_blocks(_tile_colours, dtype=np.uint8, chunks=((512,) * 16, (512,) * 16, (3,)))
    slide = Multiscale.from_arrays([rgb], mpp=0.25)
    tracemalloc.start()
    try:
        ome.ome_tiff_from_mask(mask, tmp_path / "big.mask.ome.tif")
        tiff_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        stats = ome.ome_zarr_from_mask(
            mask, tmp_path / "big.ome.zarr", default_classes(3), slide=slide, max_megapixels=0
        )
        zarr_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the largest RGB piece is a 512-row band of level 0 (13 MB), held twice while dask assembles it
    assert tiff_peak < 4e6 and zarr_peak < 56e6, (tiff_peak, zarr_peak)
    assert stats.levels == len(mask_levels(side, side)) and (stats.width, stats.height) == (side, side)
    level = zarr.open_array(str(tmp_path / "big.ome.zarr/labels/segmentation/0"), mode="r")
    yy, xx = np.mgrid[5000:5600, 7000:7100]
    assert np.array_equal(level[5000:5600, 7000:7100], (xx // 512 + 2 * (yy // 512)) % 3)
    image = zarr.open_group(str(tmp_path / "big.ome.zarr"), mode="r")
    grey = (xx // 512 + 2 * (yy // 512)) % 7 * 30
    assert np.array_equal(image["0"][:, 5000:5600, 7000:7100], np.broadcast_to(grey, (3, 600, 100)))
    # level 2 (2048 px): each pixel the mean of 4 x 4 slide pixels, all of one tile
    yy, xx = np.mgrid[1000:1400, 1500:1600]
    assert np.array_equal(image["2"][0, 1000:1400, 1500:1600], (xx // 128 + 2 * (yy // 128)) % 7 * 30)
