"""`wsiseg segment --format ome-tiff,ome-zarr`: OME outputs streamed from the finished mask, on a real slide."""

from __future__ import annotations

import errno
import json
import shutil
import tracemalloc
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from wsiseg.cli import main
from wsiseg.demo import demo_model
from wsiseg.errors import ConfigError
from wsiseg.models.io import load_deformseg
from wsiseg.output import ome
from wsiseg.output.classes import default_classes
from wsiseg.output.mask import mask_levels, write_label_pyramid
from wsiseg.segment import SegmentOptions
from wsiseg.slide import open_slide

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
    r = _segment(str(slides_dir / CMU), "--model", str(demo_model()), "--out", str(out), "--no-qc", "--no-geojson",
                 "--format", "tiff,ome-tiff", "--format", "ome-zarr")
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
    assert np.array_equal(zarr.open_array(str(out / "boxes.ome.zarr/labels/segmentation/0"), mode="r")[:],
                          _mask_levels(out / "boxes.mask.tif")[0])
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
    with pytest.raises(ConfigError, match="ome-tiff"):
        SegmentOptions(formats="png")


@pytest.mark.parametrize("value", ["png", "tiff,ome-tif"])
def test_unknown_format_is_a_usage_error(slides_dir, tmp_path, value):
    r = _segment(str(slides_dir / "boxes.tiff"), "--model", str(demo_model()), "--out", str(tmp_path / "o"),
                 "--format", value)
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
    else:
        real_copy = ome._copy_level

        def copy(src, dst, **kw):  # level 0 written, then level 1 fails
            if dst.path.endswith("/1"):
                full()
            return real_copy(src, dst, **kw)

        monkeypatch.setattr(ome, "_copy_level", copy)


@pytest.mark.parametrize("fmt", ["ome-tiff", "ome-zarr"])
def test_failure_mid_write_leaves_no_partial_output(run, tmp_path, monkeypatch, fmt):
    out, stem, _ = run
    mask = out / f"{stem}.mask.tif"
    target = tmp_path / f"x{ome.FORMAT_SUFFIXES[fmt]}"

    def write(**kw):
        if fmt == "ome-tiff":
            return ome.ome_tiff_from_mask(mask, target, **kw)
        return ome.ome_zarr_from_mask(mask, target, default_classes(3), **kw)

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


def test_large_mask_is_streamed_in_bounded_memory(tmp_path):
    # 12288 x 12288 labels (151 MB as one array) in tiles of three labels: both writers hold a few tiles at most
    side = 12288
    mask = tmp_path / "big.mask.tif"
    write_label_pyramid(mask, side, side, lambda lv, x0, y0, w, h: (x0 // 512 + 2 * (y0 // 512)) % 3, mpp=0.25)
    tracemalloc.start()
    try:
        ome.ome_tiff_from_mask(mask, tmp_path / "big.mask.ome.tif")
        tiff_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        stats = ome.ome_zarr_from_mask(mask, tmp_path / "big.ome.zarr", default_classes(3))
        zarr_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tiff_peak < 4e6 and zarr_peak < 32e6, (tiff_peak, zarr_peak)
    assert stats.levels == len(mask_levels(side, side))
    level = zarr.open_array(str(tmp_path / "big.ome.zarr/labels/segmentation/0"), mode="r")
    yy, xx = np.mgrid[5000:5600, 9000:9100]
    assert np.array_equal(level[5000:5600, 9000:9100], (xx // 512 + 2 * (yy // 512)) % 3)
    with tifffile.TiffFile(tmp_path / "big.mask.ome.tif") as tif:
        assert [lv.shape for lv in tif.series[0].levels] == [(lv.height, lv.width) for lv in mask_levels(side, side)]
