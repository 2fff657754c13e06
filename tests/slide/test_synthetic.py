"""Synthetic pyramidal JPEG slides: layout OpenSlide accepts, pixels from the real source."""

from __future__ import annotations

import numpy as np
import pytest

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")

from wsiseg.errors import WsisegError  # noqa: E402
from wsiseg.slide.synthetic import pyramid_shapes, write_synthetic_slide  # noqa: E402

W, H, TILE = 3000, 2000, 256


@pytest.fixture(scope="module")
def source_path(slides_dir):
    return slides_dir / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def slide(source_path, tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("syn") / "s.tiff", W, H, source_path, tile=TILE, mpp=0.5)


def _os_rgb(osr, level, size, location=(0, 0)) -> np.ndarray:
    return np.asarray(osr.read_region(location, level, size))[..., :3].astype(np.int16)


def test_pyramid_shapes():
    assert pyramid_shapes(3000, 2000, 256) == [(3000, 2000), (1500, 1000), (750, 500), (375, 250), (188, 125)]
    assert pyramid_shapes(256, 100, 256) == [(256, 100)]
    assert pyramid_shapes(1000, 1000, 256, levels=2) == [(1000, 1000), (500, 500)]


def test_openslide_geometry_and_mpp(slide):
    with openslide.OpenSlide(str(slide)) as osr:
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert osr.dimensions == (W, H)
        assert osr.level_count == 5
        assert list(osr.level_dimensions) == pyramid_shapes(W, H, TILE)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert not osr.associated_images


def test_tiff_layout(slide):
    with tifffile.TiffFile(slide) as tif:
        assert tif.is_bigtiff
        pages = list(tif.pages)
        assert len(pages) == 5
        for k, page in enumerate(pages):
            assert page.is_tiled and page.tile == (TILE, TILE)
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.subfiletype == (1 if k else 0)
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            num, den = page.tags["XResolution"].value
            assert num / den == pytest.approx(2e4 * page.imagewidth / W, rel=1e-6)  # pixels per cm
        # tifffile's zarr store sees the whole pyramid
        group = zarr.open(tif.series[0].aszarr(), mode="r")
        assert [group[str(k)].shape for k in range(5)] == [(h, w, 3) for w, h in pyramid_shapes(W, H, TILE)]


def test_pixels_are_the_mirror_tiled_source(slide, source_path):
    src = tifffile.imread(source_path).astype(np.int16)  # 2967 x 2220 level 0
    # documented crop: centred, each side a multiple of the coarsest downsample (16)
    hs, ws = (src.shape[0] // 16) * 16, (src.shape[1] // 16) * 16
    y0, x0 = (src.shape[0] - hs) // 2, (src.shape[1] - ws) // 2
    crop = src[y0 : y0 + hs, x0 : x0 + ws]
    with openslide.OpenSlide(str(slide)) as osr:
        img = _os_rgb(osr, 0, (W, H))
    direct = np.abs(img[:, :ws] - crop[:H])
    mirrored = np.abs(img[:, ws:] - crop[:H, ::-1][:, : W - ws])  # reflected at the right edge
    for err in (direct, mirrored):
        assert err.mean() < 4  # JPEG q90
        assert np.percentile(err, 99) < 25


def test_levels_are_box_means_of_level0(slide):
    with openslide.OpenSlide(str(slide)) as osr:
        full = _os_rgb(osr, 0, (2048, 1024)).astype(np.float64)
        lv2 = _os_rgb(osr, 2, (512, 256)).astype(np.float64)
    box = full.reshape(256, 4, 512, 4, 3).mean(axis=(1, 3))
    assert np.abs(box - lv2).mean() < 4


def test_png_source_with_alpha(shared_data, tmp_path):
    png = shared_data / "textures" / "target_image.png"
    path = write_synthetic_slide(tmp_path / "p.tiff", 700, 500, png, tile=128, quality=80, mpp=0.25)
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_count == 4
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "kwargs",
    [{"tile": 100}, {"quality": 0}, {"mpp": 0}, {"width": 0}, {"source": "/nonexistent.png"}],
)
def test_bad_arguments(source_path, tmp_path, kwargs):
    args = {"width": 500, "height": 500, "source": source_path, **kwargs}
    with pytest.raises(WsisegError):
        write_synthetic_slide(tmp_path / "x.tiff", **args)
