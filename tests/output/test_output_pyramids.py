"""Every label pyramid of `wsiseg segment` on real slides, from 16 x 16 to CMU-1: consistent levels, and
every TIFF output opens in libvips (pyvips), tifffile and OpenSlide, every level read in full."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import pyvips
import tifffile
import zarr
from click.testing import CliRunner

from wsiseg.cli.app import main
from wsiseg.output import ome, read_classes_json
from wsiseg.output.mask import mask_levels
from wsiseg.sampling.coords import reduce_nearest

# output stem -> slide under ../shared/data/slides: real files from 16 x 16 to 2220 x 2967
SLIDES = {
    "CMU-1-Small-Region": "CMU-1-Small-Region.svs",
    "boxes": "boxes.tiff",
    "dicom-sm": "dicom-sm/sm_image.dcm",
    "small": "small.svs",
}
TILE = 512  # the default of wsiseg segment --tile


@pytest.fixture(scope="module")
def out(slides_dir, tmp_path_factory):
    """The four slides segmented in one batch with the shipped demo model, in every mask format."""
    folder = tmp_path_factory.mktemp("pyramids")
    slides = [str(slides_dir / name) for name in SLIDES.values()]
    args = [
        "segment",
        *slides,
        "--model",
        "demo",
        "--out",
        str(folder),
        "--format",
        "ome-tiff,ome-zarr",
        "--no-qc",
        "--no-geojson",
        "--device",
        "cpu",
        "--progress",
        "none",
    ]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return folder


def _pages(path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [page.asarray() for page in tif.pages]


def _vips(path, **kwargs) -> np.ndarray:
    """Every pixel of one image of a TIFF as libvips decodes it, ``(h, w, bands)``."""
    pyvips.cache_set_max(0)  # no cached image of another module's file of the same name
    image = pyvips.Image.new_from_file(str(path), **kwargs)
    return np.ndarray(buffer=image.write_to_memory(), dtype=np.uint8, shape=(image.height, image.width, image.bands))


@pytest.mark.parametrize("stem", SLIDES)
def test_every_level_of_every_format_is_level0_subsampled(out, stem):
    # The pyramid rule (wsiseg.sampling.coords.reduce_nearest): a viewer shows the same labels at every zoom.
    levels = _pages(out / f"{stem}.mask.tif")
    level0 = levels[0]
    height, width = level0.shape
    assert [lv.shape for lv in levels] == [(g.height, g.width) for g in mask_levels(width, height, TILE)]
    for lv in levels[1:]:
        assert np.array_equal(lv, reduce_nearest(level0, lv.shape))
    # the other formats hold the same levels (copied from the mask, never rebuilt)
    for expect, got in zip(levels, _pages(out / f"{stem}.overlay.tif"), strict=True):
        assert np.array_equal(got, expect)
    with tifffile.TiffFile(out / f"{stem}.mask.ome.tif") as tif:
        for expect, got in zip(levels, tif.series[0].levels, strict=True):
            assert np.array_equal(got.asarray(), expect)
    image = zarr.open_group(str(out / f"{stem}.ome.zarr"), mode="r", zarr_format=2)["labels"][ome.LABEL_NAME]
    for i, expect in enumerate(levels):
        assert np.array_equal(image[str(i)][:], expect)
    if stem == "CMU-1-Small-Region":  # a real pyramid with class boundaries, not a trivial case
        assert len(levels) == 4 and len(np.unique(level0)) > 1


@pytest.mark.parametrize("stem", SLIDES)
def test_every_tiff_output_opens_in_libvips_tifffile_and_openslide(out, stem):
    levels = _pages(out / f"{stem}.mask.tif")  # tifffile decodes every tile of every level
    height, width = levels[0].shape
    geometry = mask_levels(width, height, TILE)
    colours = np.zeros((256, 3), np.uint8)
    for c in read_classes_json(out / f"{stem}.classes.json"):
        colours[c.value] = c.color
    mask, overlay, ome_tiff = (out / f"{stem}{suffix}" for suffix in (".mask.tif", ".overlay.tif", ".mask.ome.tif"))

    for path in (mask, overlay):
        with tifffile.TiffFile(path) as tif:  # small levels are one tile of a multiple of 16 covering them
            assert [(p.tilewidth, p.tilelength) for p in tif.pages] == [(g.tile_edge(TILE),) * 2 for g in geometry]
    for k, expect in enumerate(levels):
        assert np.array_equal(_vips(mask, page=k)[..., 0], expect)
        assert np.array_equal(_vips(overlay, page=k)[..., :3], colours[expect])  # palette applied
        # OME-TIFF: level 0 in the main IFD, the reduced levels in its SubIFDs
        assert np.array_equal(_vips(ome_tiff, subifd=k - 1)[..., 0], expect)

    for path, values in ((mask, lambda rgba: rgba[..., 0]), (overlay, lambda rgba: rgba[..., :3])):
        with openslide.OpenSlide(str(path)) as slide:
            assert slide.level_dimensions == tuple((g.width, g.height) for g in geometry)
            for g, expect in zip(geometry, levels):
                rgba = np.asarray(slide.read_region((0, 0), g.index, (g.width, g.height)))
                wanted = expect if path == mask else colours[expect]
                assert np.array_equal(values(rgba), wanted)
    # OpenSlide reads an OME-TIFF as a generic TIFF and does not see SubIFD pyramids: level 0 only
    with openslide.OpenSlide(str(ome_tiff)) as slide:
        assert slide.level_dimensions == ((width, height),)
        assert np.array_equal(np.asarray(slide.read_region((0, 0), 0, (width, height)))[..., 0], levels[0])
