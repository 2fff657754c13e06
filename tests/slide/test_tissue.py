"""Tissue detection and tissue regions on real H&E and on a synthetic biopsy slide."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk, ellipse
from skimage.transform import downscale_local_mean

from wsiseg.errors import ConfigError
from wsiseg.slide.multiscale import Multiscale
from wsiseg.slide.tissue import (
    TissueGate,
    Region,
    TissueMask,
    detect_tissue,
    threshold_tissue,
    tissue_regions,
    tissue_score,
    whole_region,
)


def _rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path))[..., :3].copy()


def _tile(texture: np.ndarray, h: int, w: int) -> np.ndarray:
    reps = (-(-h // texture.shape[0]), -(-w // texture.shape[1]), 1)
    return np.tile(texture, reps)[:h, :w]


def _iou(a: Region, b: Region) -> float:
    ix = max(0, min(a.x1, b.x1) - max(a.x, b.x))
    iy = max(0, min(a.y1, b.y1) - max(a.y, b.y))
    inter = ix * iy
    return inter / (a.area + b.area - inter)


def _pyramid(level0: np.ndarray, factors=(4, 16)) -> list[np.ndarray]:
    """Level 0 plus block-mean reductions, as a scanner pyramid would hold."""
    out = [level0]
    for f in factors:
        out.append(np.round(downscale_local_mean(level0, (f, f, 1))).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def textures(shared_data):
    t = shared_data / "textures"
    return {
        "glass": _rgb(t / "no-tissue.png"),
        "cores": [
            _rgb(t / "target_image.png"),
            _rgb(t / "high-nuclei-score-level0.png"),
            _rgb(t / "medium-nuclei-score-level0.png"),
        ],
    }


@pytest.fixture(scope="module")
def biopsy(textures):
    """A 3200x2400 'needle biopsy': three thin tilted H&E cores on real glass, plus dust.

    Returns the level-0 image and the bounding box of every core pasted.
    """
    h, w = 2400, 3200
    img = _tile(textures["glass"], h, w).copy()
    cores = [  # centre row, centre col, half-length, half-width, rotation
        (500, 1500, 1250, 90, 0.06),
        (1200, 1700, 1150, 70, -0.04),
        (1900, 1400, 1000, 110, 0.02),
    ]
    boxes = []
    for (r, c, half_len, half_wid, rot), tex in zip(cores, textures["cores"]):
        rr, cc = ellipse(r, c, half_wid, half_len, shape=(h, w), rotation=rot)
        img[rr, cc] = _tile(tex, h, w)[rr, cc]
        boxes.append(Region(int(cc.min()), int(rr.min()), int(np.ptp(cc)) + 1, int(np.ptp(rr)) + 1))
    # Dust and debris: dark specks well below the 2500 um^2 speck size.
    for r, c, rad in [(150, 150, 6), (2300, 3100, 10), (900, 300, 25)]:
        rr, cc = disk((r, c), rad, shape=(h, w))
        img[rr, cc] = (90, 80, 100)
    return img, boxes


@pytest.fixture(scope="module")
def biopsy_tissue(biopsy) -> TissueMask:
    return detect_tissue(Multiscale.from_arrays([biopsy[0]], mpp=(0.5, 0.5)))


def test_biopsy_cores_found_one_region_each(biopsy, biopsy_tissue):
    _, boxes = biopsy
    tissue = biopsy_tissue
    assert tissue.mask.shape == (1200, 1600)  # 3200 long side -> factor 2
    assert tissue.downsample == (2.0, 2.0)
    assert tissue.method in {"otsu", "otsu-clipped"}
    regions = tissue_regions(tissue)
    assert len(regions) == len(boxes)
    for got, want in zip(regions, boxes):  # both ordered top to bottom
        assert _iou(got, want) > 0.8, (got, want)
        # Padded boxes contain the whole core.
        assert got.x <= want.x and got.y <= want.y and got.x1 >= want.x1 and got.y1 >= want.y1


def test_biopsy_reads_reduced_level_never_level0(biopsy):
    img, boxes = biopsy
    levels = _pyramid(img)

    def refuse(block):
        raise AssertionError("level 0 was read")

    poisoned = da.from_array(levels[0], chunks=(512, 512, 3)).map_blocks(refuse, dtype=np.uint8)
    ms = Multiscale.from_arrays([poisoned, *levels[1:]], mpp=(0.5, 0.5))
    tissue = detect_tissue(ms, max_size=1024)
    # Long sides 3200, 800, 200: 800 is the coarsest level >= 1024 / 2.
    assert tissue.level == 1
    assert tissue.downsample == (4.0, 4.0)
    regions = tissue_regions(tissue)
    assert len(regions) == len(boxes)
    assert all(_iou(g, w) > 0.8 for g, w in zip(regions, boxes))


def test_pyramid_level_is_block_averaged_to_max_size(biopsy):
    img, _ = biopsy
    ms = Multiscale.from_arrays(_pyramid(img, factors=(2,)), mpp=(0.5, 0.5))
    tissue = detect_tissue(ms, max_size=512)
    # Coarsest level >= 256 is level 1 (1600 long), averaged by ceil(1600 / 512) = 4.
    assert tissue.level == 1
    assert tissue.downsample == (8.0, 8.0)
    assert tissue.mask.shape == (300, 400)


def test_all_background_gives_no_regions(textures):
    glass = _tile(textures["glass"], 900, 1200)
    tissue = detect_tissue(Multiscale.from_arrays([glass]))
    assert not tissue.mask.any()
    assert tissue_regions(tissue) == []


@pytest.mark.parametrize("value", [255, 242, 0])
def test_constant_slides_do_not_crash(value):
    # White glass, off-white glass, black scanner padding: no tissue.
    ms = Multiscale.from_arrays([np.full((600, 800, 3), value, np.uint8)])
    tissue = detect_tissue(ms)
    assert tissue.method == "constant"
    assert not tissue.mask.any()
    assert tissue_regions(tissue) == []


def test_constant_stain_is_all_tissue():
    ms = Multiscale.from_arrays([np.full((600, 800, 3), (200, 120, 170), np.uint8)])
    tissue = detect_tissue(ms)
    assert tissue.mask.all()
    assert tissue_regions(tissue) == [whole_region(ms)]


def test_all_tissue_gives_one_region_covering_it(textures):
    img = textures["cores"][0]  # 1000x1000 of dense H&E, no glass
    ms = Multiscale.from_arrays([img])
    tissue = detect_tissue(ms)
    assert tissue.fraction > 0.98
    assert tissue_regions(tissue) == [whole_region(ms)] == [Region(0, 0, 1000, 1000)]


def test_threshold_override_is_monotone(biopsy):
    img, _ = biopsy
    ms = Multiscale.from_arrays(_pyramid(img, factors=(4,)), mpp=(0.5, 0.5))
    masks = []
    for t in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.8):
        tissue = detect_tissue(ms, threshold=t, max_size=800)
        assert tissue.method == "threshold" and tissue.threshold == t
        masks.append(tissue.mask)
    fractions = [m.mean() for m in masks]
    assert fractions == sorted(fractions, reverse=True)
    assert fractions[0] > 0.9 and fractions[-1] < 0.01
    # Thresholding and the cleaning steps are all increasing: masks nest.
    for hi, lo in zip(masks[1:], masks[:-1]):
        assert not (hi & ~lo).any()


@pytest.fixture(scope="module")
def cmu(slides_dir):
    import tifffile

    with tifffile.TiffFile(slides_dir / "CMU-1-Small-Region.svs") as tif:
        img = tif.series[0].asarray()
    return img, Multiscale.from_arrays([img], mpp=(0.499, 0.499))


def test_real_slide_cmu(cmu):
    img, ms = cmu
    tissue = detect_tissue(ms)
    assert tissue.mask.shape == (1484, 1110)
    assert 0.3 < tissue.fraction < 0.55  # one long piece of skin, glass on both sides
    # The mask agrees with a plain full-resolution score threshold where it is
    # confident: nearly all strongly stained pixels are inside it.
    score = tissue_score(img[::2, ::2])
    assert tissue.mask[score > 0.3].mean() > 0.97
    assert tissue.mask[score < 0.04].mean() < 0.1
    regions = tissue_regions(tissue)
    # One region: the tissue plus its strand; dust specks are dropped.
    assert len(regions) == 1
    r = regions[0]
    assert 0 < r.x < 100 and 0 < r.y < 150 and r.x1 > 1900 and r.y1 == ms.height


def test_region_padding_and_merging(biopsy, biopsy_tissue):
    img, _ = biopsy
    tissue = biopsy_tissue
    ms = Multiscale.from_arrays([img], mpp=(0.5, 0.5))
    tight = tissue_regions(tissue, pad_px=0)
    wide = tissue_regions(tissue, pad_um=100)  # 200 level-0 pixels
    for a, b in zip(tight, wide):
        assert b.x == max(0, a.x - 200) and b.y == max(0, a.y - 200)
        assert b.x1 == min(ms.width, a.x1 + 200) and b.y1 == min(ms.height, a.y1 + 200)
    # Cores ~500 px apart merge once their padded boxes overlap.
    merged = tissue_regions(tissue, pad_px=400)
    assert len(merged) == 1
    assert len(tissue_regions(tissue, pad_px=400, merge_overlapping=False)) == 3


def test_min_area_fraction_drops_small_pieces():
    mask = np.zeros((100, 200), bool)
    mask[10:90, 10:100] = True  # 7200 px
    mask[40:45, 150:155] = True  # 25 px, 0.3 %
    tissue = TissueMask(mask, (4.0, 4.0), 0.1, "threshold", 0, (800, 400))
    assert len(tissue_regions(tissue, pad_px=0)) == 1
    both = tissue_regions(tissue, pad_px=0, min_area_fraction=0)
    assert both == [Region(40, 40, 360, 320), Region(600, 160, 20, 20)]


def test_tissue_microarray_of_600_cores_keeps_every_core():
    """Real arrays hold 100-600 cores: each is a small fraction of the tissue, but none is a speck."""
    cols, rows, (h, w) = 30, 20, (1500, 2000)
    yy, xx = np.mgrid[0:h, 0:w]
    r = 0.4 * min(w / cols, h / rows)
    mask = np.zeros((h, w), bool)
    for i in range(rows):
        for j in range(cols):
            mask |= (xx - (j + 0.5) * w / cols) ** 2 + (yy - (i + 0.5) * h / rows) ** 2 < r**2
    mask[5:7, 5:7] = True  # a speck: 4 px against cores of ~600
    tissue = TissueMask(mask, (20.0, 20.0), 0.1, "threshold", 0, (40000, 30000))
    regions = tissue_regions(tissue, pad_px=0)
    assert len(regions) == cols * rows  # the speck goes, every core stays


def test_tissue_at_reads_the_mask_pixel_under_level0_points():
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = True  # level-0 [8, 12) x [4, 8) at downsample 4
    tissue = TissueMask(mask, (4.0, 4.0), 0.1, "threshold", 0, (15, 11))
    pts = np.array([[8.0, 4.0], [11.99, 7.99], [12.0, 4.0], [7.99, 5.0], [100.0, -3.0], [14.5, 10.5]])
    assert tissue.tissue_at(pts).tolist() == [True, True, False, False, False, False]
    assert tissue.tissue_at(pts.reshape(2, 3, 2)).shape == (2, 3)


def test_threshold_tissue_is_the_detectors_threshold(cmu):
    img, ms = cmu
    tissue = detect_tissue(ms)
    # a single-level slide: the detector thresholds the 2x block means it reads
    means = downscale_local_mean(img.astype(np.float32) / 255.0, (2, 2, 1)).astype(np.float32)
    mask, t, method = threshold_tissue(means)
    assert (t, method) == (tissue.threshold, tissue.method)
    assert threshold_tissue(img, threshold=0.5)[1:] == (0.5, "threshold")
    glass = np.full((8, 8, 3), 250, np.uint8)
    assert threshold_tissue(glass)[2] == "constant" and not threshold_tissue(glass)[0].any()


def test_regions_clamped_to_slide():
    # Slide 1001 x 999 at downsample 4: the last mask pixel reaches past the edge.
    mask = np.ones((250, 251), bool)
    tissue = TissueMask(mask, (4.0, 4.0), 0.1, "threshold", 0, (1001, 999))
    assert tissue_regions(tissue, pad_px=50) == [Region(0, 0, 1001, 999)]


def test_bad_arguments():
    ms = Multiscale.from_arrays([np.full((64, 64, 3), 255, np.uint8)])
    with pytest.raises(ConfigError):
        detect_tissue(ms, threshold=1.5)
    with pytest.raises(ConfigError):
        detect_tissue(ms, max_size=4)
    tissue = detect_tissue(ms)
    with pytest.raises(ConfigError, match="MPP"):
        tissue_regions(tissue, pad_um=10)
    with pytest.raises(ConfigError):
        tissue_regions(tissue, pad_um=10, pad_px=5)
    with pytest.raises(ValueError):
        Region(0, 0, 0, 5)
    r = Region(3, 4, 10, 20)
    assert (r.x1, r.y1, r.bounds, r.area) == (13, 24, (3, 4, 13, 24), 200)


def test_tissue_gate_puts_glass_to_background_on_every_level(cmu, tmp_path):
    """Glass (by the detector) is 0 in the written mask; tissue keeps the net's label; levels stay level 0
    subsampled."""
    import tifffile

    from wsiseg.output.mask import write_label_pyramid
    from wsiseg.sampling.coords import level_source_index

    img, ms = cmu
    tissue = detect_tissue(ms)
    h, w = img.shape[:2]
    rng = np.random.default_rng(0)
    noisy = rng.integers(1, 3, size=(h, w), dtype=np.uint8)  # a net that calls every pixel tissue (1 or 2)
    noisy[:, 600:] = 2

    def source(level, x0, y0, tw, th):
        rows = level_source_index(h, level.height)[y0 : y0 + th]
        cols = level_source_index(w, level.width)[x0 : x0 + tw]
        block = noisy[np.ix_(rows, cols)]
        return 2 if (block == 2).all() else block  # constant tiles as ints, as the reverse sampler gives them

    gate = TissueGate(source, tissue, w, h)
    write_label_pyramid(tmp_path / "m.tif", w, h, gate, tile=256)
    with tifffile.TiffFile(tmp_path / "m.tif") as tif:
        levels = [p.asarray() for p in tif.pages]
    level0 = levels[0]
    on_tissue = tissue.tissue_block(np.arange(w), np.arange(h))
    assert 0.3 < on_tissue.mean() < 0.55
    assert (level0[~on_tissue] == 0).all()  # glass
    assert (level0[on_tissue] > 0).all()  # the net's labels kept on tissue
    assert np.array_equal(gate.counts[:3], np.bincount(level0.ravel(), minlength=3))
    for lv in levels[1:]:
        rows = level_source_index(h, lv.shape[0])
        cols = level_source_index(w, lv.shape[1])
        assert np.array_equal(lv, level0[np.ix_(rows, cols)])
