"""Layout slides (TMA, resection, needle biopsies): shapes, tissue fraction, determinism, readers.

Built at 1/20 of the benchmark sizes (1/10 for the thin needle cores) with
the MPP scaled to match, so the tissue detector's physical morphology sizes
see the same layout; the texture itself is not scaled.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from wsiseg.bench.layouts import (
    LAYOUT_SIZES,
    Coverage,
    layout_coverage,
    make_layout,
    quilt_texture,
    texture_files,
    write_layout_slide,
)


@pytest.fixture(scope="module")
def textures(shared_data):
    return shared_data / "textures"


def _build(tmp_path, textures, name, scale, seed=0):
    w, h = LAYOUT_SIZES[name]
    w, h = w // scale, h // scale
    path = tmp_path / f"{name}-{seed}.tiff"
    info = write_layout_slide(path, name, w, h, textures, seed=seed, tile=128, mpp=0.5 * scale)
    return path, info


def _regions(path):
    from wsiseg.slide.open import open_slide
    from wsiseg.slide.tissue import detect_tissue, tissue_regions

    tissue = detect_tissue(open_slide(path))
    # every piece, however pale its texture (at 1/20 scale pale stroma can split a core in the mask)
    return tissue, tissue_regions(tissue, min_area_fraction=0)


def test_texture_files_keep_tissue_only(textures):
    names = [f.name for f in texture_files(textures)]
    assert "target_image.png" in names and "high-nuclei-score-level0.png" in names
    assert "no-tissue.png" not in names and "low-nuclei-score-level0.png" not in names  # glass, mostly glass
    assert all("ihc" not in n for n in names)  # too small
    q = quilt_texture(textures, seed=3, size=1024)
    assert q.shape == (1024, 1024, 3) and q.dtype == np.uint8
    assert q.std(axis=(0, 1)).min() > 10  # real texture, no flat colour
    assert (q.mean(axis=2) > 215).mean() < 0.2
    np.testing.assert_array_equal(q, quilt_texture(textures, seed=3, size=1024))
    assert not np.array_equal(q, quilt_texture(textures, seed=4, size=1024))


@pytest.mark.slow
def test_layout_geometry_at_full_size():
    tma = make_layout("tma", 40000, 30000)
    assert tma.pieces >= 80 and tma.nominal_fraction() >= 0.6
    res = make_layout("resection", 100000, 80000)
    assert res.pieces == 1 and res.nominal_fraction() == pytest.approx(0.70, abs=1e-3)
    x0, y0, x1, y1 = res.shapes[0].bbox()
    assert x0 > 0 and y0 > 0 and x1 < 100000 and y1 < 80000  # one piece, not cut by the slide's edge
    for seed in range(6):
        needle = make_layout("needle", 40000, 30000, seed)
        assert 3 <= needle.pieces <= 6 and len(needle.shapes) == needle.pieces
        for core in needle.shapes:
            assert 1300 < 2 * core.half_width < 1700 and 26000 < core.length <= 30000
        assert any(abs(c.angle) > np.radians(1.5) for c in needle.shapes)  # some tilted
    cov = layout_coverage(make_layout("needle", 40000, 30000))
    assert isinstance(cov, Coverage) and cov.downsample == 16 and cov.alpha.size <= 8_000_000
    assert layout_coverage(res).downsample == 32  # the 100k x 80k map stays small


def test_coverage_levels_agree():
    cov = layout_coverage(make_layout("tma", 4000, 3000), downsample=4)
    fine, coarse = cov.level(0), cov.level(3)
    a0 = fine(0, 0, 3000, 4000)
    a3 = coarse(0, 0, 375, 500)
    assert isinstance(a0, np.ndarray) and isinstance(a3, np.ndarray)
    assert a0.min() == 0 and a0.max() == 1
    box = a0.reshape(375, 8, 500, 8).mean(axis=(1, 3))
    assert np.abs(box - a3).mean() < 0.01  # level 3 ~ the box mean of level 0
    assert fine(0, 0, 16, 16) == 0.0  # a corner: glass
    assert fine(3000, 4000, 16, 16) == 0.0  # outside the slide


def test_tma_small(tmp_path, textures):
    path, info = _build(tmp_path, textures, "tma", 20)
    assert info["pieces"] >= 80 and info["tissue_fraction"] >= 0.6
    tissue, regions = _regions(path)
    # cores, not the odd pale-edged fragment the mask splits off a core at this scale
    area = np.median([r.area for r in regions])
    regions = [r for r in regions if r.area > 0.25 * area]
    assert len(regions) == info["pieces"]
    assert tissue.fraction == pytest.approx(info["tissue_fraction"], abs=0.05)
    sides = np.array([(r.width, r.height) for r in regions])
    aspect = np.abs(sides[:, 0] / sides[:, 1] - 1)
    assert np.median(aspect) < 0.05 and aspect.max() < 0.35  # round cores: square boxes (pale edges trim a few)


def test_resection_small(tmp_path, textures):
    path, info = _build(tmp_path, textures, "resection", 20)
    assert info["tissue_fraction"] == pytest.approx(0.70, abs=0.01)
    tissue, regions = _regions(path)
    assert len(regions) == 1
    assert tissue.fraction == pytest.approx(0.70, abs=0.05)


def test_needle_small(tmp_path, textures):
    path, info = _build(tmp_path, textures, "needle", 10)
    assert 3 <= info["pieces"] <= 6
    tissue, regions = _regions(path)
    assert len(regions) == info["pieces"]
    assert tissue.fraction == pytest.approx(info["tissue_fraction"], abs=0.03)
    for r in regions:
        assert r.width > 5 * r.height  # long thin cores (tilted ones have taller boxes)


def test_layout_slide_deterministic_and_readable(tmp_path, textures):
    import openslide
    import tifffile

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = _build(tmp_path / "a", textures, "needle", 40)
    b, _ = _build(tmp_path / "b", textures, "needle", 40)
    c, _ = _build(tmp_path, textures, "needle", 40, seed=1)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, c)]
    assert digest[0] == digest[1] and digest[0] != digest[2]
    with tifffile.TiffFile(a) as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG
        assert (page.imagewidth, page.imagelength) == (1000, 750) and len(tif.pages) >= 3
        assert "needle layout" in page.description
    with openslide.OpenSlide(str(a)) as osl:
        assert osl.dimensions == (1000, 750) and osl.level_count >= 3
        assert float(osl.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(20.0, rel=1e-3)
        rgb = np.asarray(osl.read_region((0, 0), 0, (1000, 750)).convert("RGB"))
    glass = (np.abs(rgb.astype(int) - np.array([240, 239, 241])) <= 3).all(axis=2).mean()
    assert 0.5 < glass < 0.9  # mostly glass (flat, up to JPEG rounding), the rest tissue
