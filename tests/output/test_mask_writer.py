"""Pyramidal label-mask writer: geometry, layout, content, overlay, atomicity."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import openslide
import pytest
import pyvips
import tifffile
import zarr

from wsiseg.bench.output import bench_mask_write, random_blobs
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.output import (
    ClassInfo,
    LevelGeometry,
    class_colormap,
    default_classes,
    default_palette,
    mask_levels,
    overlay_from_mask,
    read_classes_json,
    write_classes_json,
    write_label_pyramid,
    write_overlay_pyramid,
)

CLASSES = default_classes(["background", "tissue", "tumour", "stroma"])
VALUES = {c.value for c in CLASSES}


@dataclass(frozen=True)
class Discs:
    """Analytic test source: discs (x, y, r, label) in level-0 pixels over background 0.

    Reports a tile as constant (an int) only when it is provably outside every
    disc or inside the topmost one it touches; renders it otherwise.
    """

    discs: tuple[tuple[float, float, float, int], ...]
    constants: bool = True

    def full(self, level: LevelGeometry, x0=0, y0=0, w=None, h=None) -> np.ndarray:
        """Direct per-pixel evaluation: the reference."""
        w = level.width if w is None else w
        h = level.height if h is None else h
        sx, sy = level.downsample
        x = (np.arange(x0, x0 + w) + 0.5)[None, :] * sx
        y = (np.arange(y0, y0 + h) + 0.5)[:, None] * sy
        out = np.zeros((h, w), np.uint8)
        for cx, cy, r, label in self.discs:
            out[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = label
        return out

    def __call__(self, level, x0, y0, w, h):
        if self.constants:
            sx, sy = level.downsample
            xa, xb = (x0 + 0.5) * sx, (x0 + w - 0.5) * sx
            ya, yb = (y0 + 0.5) * sy, (y0 + h - 0.5) * sy
            for cx, cy, r, label in reversed(self.discs):
                near = (np.clip(cx, xa, xb) - cx) ** 2 + (np.clip(cy, ya, yb) - cy) ** 2
                if near > r * r * (1 + 1e-9):
                    continue
                far = max(abs(xa - cx), abs(xb - cx)) ** 2 + max(abs(ya - cy), abs(yb - cy)) ** 2
                if far < r * r * (1 - 1e-9):
                    return label
                break
            else:
                return 0
        return self.full(level, x0, y0, w, h)


def discs_for(width: int, height: int) -> Discs:
    s = min(width, height)
    return Discs(
        (
            (0.45 * width, 0.5 * height, 0.42 * s, 1),
            (0.40 * width, 0.45 * height, 0.12 * s, 2),
            (0.75 * width, 0.30 * height, 0.08 * s, 3),
            (0.20 * width, 0.80 * height, 0.03 * s, 2),
        )
    )


# (width, height, tile, mpp): a multiple-ish size at 512 and a ragged one at 256
CASES = [(3000, 2000, 512, 0.25), (1234, 777, 256, (0.5, 0.6))]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}x{c[1]}t{c[2]}")
def written(request, tmp_path_factory):
    width, height, tile, mpp = request.param
    path = tmp_path_factory.mktemp("mask") / "mask.tiff"
    source = discs_for(width, height)
    stats = write_label_pyramid(path, width, height, source, tile=tile, mpp=mpp)
    return path, stats, source, width, height, tile, mpp


def test_mask_levels_geometry():
    got = [(g.index, g.width, g.height) for g in mask_levels(3000, 2000)]
    assert got == [(0, 3000, 2000), (1, 1500, 1000), (2, 750, 500), (3, 375, 250)]
    levels = mask_levels(1234, 777, tile=256)
    assert [(g.width, g.height) for g in levels] == [(1234, 777), (617, 389), (309, 195), (155, 98)]
    assert levels[2].downsample == (1234 / 309, 777 / 195)
    assert [(g.width, g.height) for g in mask_levels(512, 512)] == [(512, 512)]
    assert [(g.width, g.height) for g in mask_levels(513, 3)] == [(513, 3), (257, 2)]
    assert [(g.width, g.height) for g in mask_levels(1, 1)] == [(1, 1)]
    assert levels[1].tile_grid(256) == (3, 2) and levels[1].n_tiles(256) == 6
    with pytest.raises(ConfigError):
        mask_levels(100, 100, tile=100)
    with pytest.raises(WsisegError):
        mask_levels(0, 100)


def test_openslide_reads_geometry_mpp_and_labels(written):
    path, stats, source, width, height, tile, mpp = written
    levels = mask_levels(width, height, tile)
    mx, my = (mpp, mpp) if np.isscalar(mpp) else mpp
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert slide.level_count == len(levels)
        assert slide.level_dimensions == tuple((g.width, g.height) for g in levels)
        assert slide.dimensions == (width, height)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mx, rel=1e-6)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(my, rel=1e-6)
        for g in levels:
            rgba = np.asarray(slide.read_region((0, 0), g.index, (g.width, g.height)))
            # greyscale: every channel carries the label
            np.testing.assert_array_equal(rgba[..., 0], source.full(g))
            assert (rgba[..., 3] == 255).all()


def test_tifffile_layout_and_every_level(written):
    path, stats, source, width, height, tile, mpp = written
    levels = mask_levels(width, height, tile)
    mx, my = (mpp, mpp) if np.isscalar(mpp) else mpp
    with tifffile.TiffFile(path) as tf:
        assert tf.is_bigtiff
        assert len(tf.pages) == len(levels)  # main IFD chain, no SubIFDs
        assert len(tf.series) == 1 and len(tf.series[0].levels) == len(levels)
        assert "wsiseg" in tf.pages[0].description and tf.pages[0].software.startswith("wsiseg")
        for g, page in zip(levels, tf.pages):
            assert page.shape == (g.height, g.width)
            assert page.dtype == np.uint8
            edge = tile if g.index < len(levels) - 1 else g.tile_edge(tile)  # the last level fits one tile
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (edge, edge)
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert page.photometric == tifffile.PHOTOMETRIC.MINISBLACK
            assert page.subfiletype == (1 if g.index else 0)
            assert not page.subifds
            assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
            xr, yr = page.resolution
            assert xr == pytest.approx(1e4 / (mx * g.downsample[0]), rel=1e-6)
            assert yr == pytest.approx(1e4 / (my * g.downsample[1]), rel=1e-6)
            labels = page.asarray()
            np.testing.assert_array_equal(labels, source.full(g))
            assert set(np.unique(labels)) <= VALUES
    assert len(np.unique(source.full(levels[0]))) == 4  # every class really appears


def test_zarr_view(written):
    path, stats, source, width, height, tile, mpp = written
    levels = mask_levels(width, height, tile)
    with tifffile.imread(path, aszarr=True) as store:
        group = zarr.open(store, mode="r")
        for g in levels:
            arr = group[str(g.index)]
            assert arr.shape == (g.height, g.width) and arr.chunks == (g.tile_edge(tile),) * 2
            np.testing.assert_array_equal(arr[:], source.full(g))


def test_tile_edge_of_small_levels():
    # Levels larger than a tile keep it; a smaller one is one tile of the smallest multiple of 16 covering it.
    assert [g.tile_edge(512) for g in mask_levels(3000, 2000)] == [512, 512, 512, 384]
    assert [g.tile_edge(256) for g in mask_levels(1234, 777, 256)] == [256, 256, 256, 160]
    assert [g.tile_edge(512) for g in mask_levels(16, 16)] == [16]
    assert [g.tile_edge(512) for g in mask_levels(1, 1)] == [16]
    assert [g.tile_edge(512) for g in mask_levels(513, 3)] == [512, 272]
    assert [g.tile_edge(512) for g in mask_levels(300, 250)] == [304]


def _read_vips(path, **kwargs) -> np.ndarray:
    """Every pixel of one TIFF image as libvips decodes it (the cache off: files are rewritten in place)."""
    pyvips.cache_set_max(0)
    image = pyvips.Image.new_from_file(str(path), **kwargs)
    return np.ndarray(buffer=image.write_to_memory(), dtype=np.uint8, shape=(image.height, image.width, image.bands))


@pytest.mark.parametrize(
    ("width", "height", "tile"),
    [(1, 1, 512), (16, 16, 512), (50, 50, 512), (128, 128, 512), (120, 20, 512), (300, 250, 512), (700, 600, 256)],
)
def test_small_masks_open_in_libvips(tmp_path, width, height, tile):
    # libvips 8.18 refused 512 tiles on images of 128 x 128 or less ("tile size out of range").
    source = Discs(((0.5 * width, 0.5 * height, 0.3 * max(width, height), 2),))
    mask, overlay = tmp_path / "m.tiff", tmp_path / "o.tiff"
    write_label_pyramid(mask, width, height, source, tile=tile)
    write_overlay_pyramid(overlay, width, height, source, CLASSES, tile=tile)
    colours = np.zeros((256, 3), np.uint8)
    for c in CLASSES:
        colours[c.value] = c.color
    for g in mask_levels(width, height, tile):
        expect = source.full(g)
        np.testing.assert_array_equal(_read_vips(mask, page=g.index)[..., 0], expect)
        np.testing.assert_array_equal(_read_vips(overlay, page=g.index)[..., :3], colours[expect])  # the palette
    with tifffile.TiffFile(mask) as tf:
        assert all(
            p.tilelength == p.tilewidth == g.tile_edge(tile) for p, g in zip(tf.pages, mask_levels(width, height, tile))
        )


def test_stats_and_constant_tiles(written, tmp_path):
    path, stats, source, width, height, tile, mpp = written
    levels = mask_levels(width, height, tile)
    assert stats.path == path and (stats.width, stats.height, stats.levels) == (width, height, len(levels))
    assert stats.tiles == sum(g.n_tiles(tile) for g in levels)
    assert 0 < stats.constant_tiles < stats.tiles
    assert stats.file_bytes == path.stat().st_size
    assert stats.megapixels_per_second > 0
    # A source that never flags constant tiles gives the very same file: array
    # tiles with one value are detected and take the same cached encoding.
    slow = Discs(source.discs, constants=False)
    stats2 = write_label_pyramid(tmp_path / "b.tiff", width, height, slow, tile=tile, mpp=mpp)
    assert stats2.constant_tiles == stats.constant_tiles
    assert (tmp_path / "b.tiff").read_bytes() == path.read_bytes()


def test_threads_do_not_change_the_file(tmp_path):
    source = discs_for(1234, 777)
    a = write_label_pyramid(tmp_path / "a.tiff", 1234, 777, source, tile=256, workers=0)
    b = write_label_pyramid(tmp_path / "b.tiff", 1234, 777, source, tile=256, workers=3)
    assert (a.tiles, a.constant_tiles) == (b.tiles, b.constant_tiles)
    assert (tmp_path / "a.tiff").read_bytes() == (tmp_path / "b.tiff").read_bytes()


def test_all_constant_mask(tmp_path):
    path = tmp_path / "bg.tiff"
    stats = write_label_pyramid(path, 1500, 700, lambda level, x0, y0, w, h: 0)
    assert stats.constant_tiles == stats.tiles == 3 * 2 + 2 * 1 + 1
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions == ((1500, 700), (750, 350), (375, 175))
        assert openslide.PROPERTY_NAME_MPP_X not in slide.properties  # never invented
        assert not np.asarray(slide.read_region((0, 0), 0, (1500, 700)))[..., 0].any()


@pytest.mark.parametrize("compression", ["zstd", "lzw", "none"])
def test_other_lossless_compressions(tmp_path, compression):
    source = discs_for(700, 600)
    path = tmp_path / "m.tiff"
    write_label_pyramid(path, 700, 600, source, tile=256, compression=compression)
    with tifffile.TiffFile(path) as tf:
        for g, page in zip(mask_levels(700, 600, 256), tf.pages):
            np.testing.assert_array_equal(page.asarray(), source.full(g))


def test_lossy_compression_refused(tmp_path):
    with pytest.raises(ConfigError, match="lossless"):
        write_label_pyramid(tmp_path / "m.tiff", 100, 100, lambda *a: 0, compression="jpeg")
    assert os.listdir(tmp_path) == []


def _failing_source(source, level_index):
    def tile_source(level, x0, y0, w, h):
        if level.index == level_index and x0 > 0:
            raise RuntimeError("out of GPU memory")
        return source(level, x0, y0, w, h)

    return tile_source


@pytest.mark.parametrize("level_index", [0, 2])
def test_failure_leaves_no_file(tmp_path, level_index):
    path = tmp_path / "m.tiff"
    with pytest.raises(RuntimeError, match="GPU"):
        write_label_pyramid(path, 3000, 2000, _failing_source(discs_for(3000, 2000), level_index), workers=2)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "bad, error",
    [
        (lambda lv, x0, y0, w, h: np.zeros((h, w), np.int32), TypeError),
        (lambda lv, x0, y0, w, h: np.zeros((w, h), np.uint8), ValueError),
        (lambda lv, x0, y0, w, h: 256, ValueError),
    ],
    ids=["dtype", "shape", "label"],
)
def test_bad_tile_source_is_refused(tmp_path, bad, error):
    with pytest.raises(error):
        write_label_pyramid(tmp_path / "m.tiff", 700, 300, bad, tile=256)
    assert os.listdir(tmp_path) == []


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "m.tiff"
    path.write_bytes(b"precious")
    with pytest.raises(WsisegError, match="exists"):
        write_label_pyramid(path, 600, 400, lambda *a: 1)
    assert path.read_bytes() == b"precious"
    write_label_pyramid(path, 600, 400, lambda *a: 1, overwrite=True)
    assert tifffile.imread(path).shape == (400, 600)
    assert sorted(os.listdir(tmp_path)) == ["m.tiff"]


def _check_overlay(path, source, width, height, tile, classes):
    palette = np.zeros((256, 3), np.uint8)
    for c in classes:
        palette[c.value] = c.color
    levels = mask_levels(width, height, tile)
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions == tuple((g.width, g.height) for g in levels)
        for g in levels:
            rgba = np.asarray(slide.read_region((0, 0), g.index, (g.width, g.height)))
            np.testing.assert_array_equal(rgba[..., :3], palette[source.full(g)])
    with tifffile.TiffFile(path) as tf:
        assert len(tf.pages) == len(levels)
        for g, page in zip(levels, tf.pages):
            assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
            assert page.subfiletype == (1 if g.index else 0)
            np.testing.assert_array_equal(page.colormap, class_colormap(classes))
            np.testing.assert_array_equal(page.asarray(), source.full(g))


def test_overlay_pyramid_shows_class_colours(tmp_path):
    source = discs_for(1234, 777)
    path = tmp_path / "overlay.tiff"
    stats = write_overlay_pyramid(path, 1234, 777, source, CLASSES, tile=256, mpp=0.5)
    assert stats.constant_tiles > 0
    _check_overlay(path, source, 1234, 777, 256, CLASSES)
    with openslide.OpenSlide(str(path)) as slide:
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)


def test_overlay_from_mask_copies_tiles(written, tmp_path):
    path, stats, source, width, height, tile, mpp = written
    out = tmp_path / "overlay.tiff"
    ostats = overlay_from_mask(path, out, CLASSES)
    assert ostats.tiles == stats.tiles and ostats.levels == stats.levels
    _check_overlay(out, source, width, height, tile, CLASSES)
    with tifffile.TiffFile(path) as a, tifffile.TiffFile(out) as b:
        for pa, pb in zip(a.pages, b.pages):
            assert pa.databytecounts == pb.databytecounts  # byte-identical tiles
            assert pa.resolution == pb.resolution
    with openslide.OpenSlide(str(path)) as m, openslide.OpenSlide(str(out)) as o:
        assert m.properties[openslide.PROPERTY_NAME_MPP_X] == o.properties[openslide.PROPERTY_NAME_MPP_X]
        # distinct files for viewers that cache by quickhash
        assert m.properties["openslide.quickhash-1"] != o.properties["openslide.quickhash-1"]
    with pytest.raises(WsisegError, match="exists"):
        overlay_from_mask(path, out, CLASSES)


def test_classes_json_round_trip(tmp_path):
    path = tmp_path / "mask.classes.json"
    write_classes_json(path, CLASSES)
    table = json.loads(path.read_text())
    assert table["0"] == {"name": "background", "color": [0, 0, 0]}
    assert list(table) == ["0", "1", "2", "3"]
    assert read_classes_json(path) == CLASSES
    with pytest.raises(WsisegError, match="exists"):
        write_classes_json(path, CLASSES)


def test_class_table_validation_and_palette():
    pal = default_palette(40)
    assert pal[0] == (0, 0, 0) and len(set(pal)) == 40
    assert all(0 <= v <= 255 for c in pal for v in c)
    assert [c.name for c in default_classes(3)] == ["background", "class_1", "class_2"]
    with pytest.raises(WsisegError):
        ClassInfo(256, "x", (0, 0, 0))
    with pytest.raises(WsisegError):
        ClassInfo(1, "x", (0, 0, 300))
    with pytest.raises(WsisegError, match="unique"):
        class_colormap([ClassInfo(1, "a", (1, 2, 3)), ClassInfo(1, "b", (1, 2, 3))])
    cmap = class_colormap(CLASSES)
    assert cmap.shape == (3, 256) and cmap.dtype == np.uint16
    assert tuple(cmap[:, 1] // 257) == CLASSES[1].color


def test_bench_blobs_constant_tiles_are_exact():
    # the benchmark's analytic source must agree with its own per-pixel render
    blobs = random_blobs(2000, 1500, n_islands=40, island_size=(0.01, 0.05), seed=3)
    constant = 0
    for g in mask_levels(2000, 1500, tile=256):
        full = blobs.render(g, 0, 0, g.width, g.height)
        for y0 in range(0, g.height, 256):
            for x0 in range(0, g.width, 256):
                w, h = min(256, g.width - x0), min(256, g.height - y0)
                got = blobs(g, x0, y0, w, h)
                ref = full[y0 : y0 + h, x0 : x0 + w]
                if isinstance(got, int):
                    constant += 1
                    assert (ref == got).all()
                else:
                    np.testing.assert_array_equal(got, ref)
    assert constant > 0


def test_bench_mask_write_smoke():
    res = bench_mask_write(3000, 2000, workers=0)
    assert res.tiles == sum(g.n_tiles(512) for g in mask_levels(3000, 2000))
    assert 0 < res.constant_tiles < res.tiles
    assert res.mp_per_s > 0 and res.peak_rss_mb >= res.peak_rss_before_mb > 0
    assert set(res.as_dict()) >= {"mp_per_s", "peak_rss_mb", "seconds"}
