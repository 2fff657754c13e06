"""Every label pyramid of `wsiseg segment` on real slides, from 16 x 16 to CMU-1: consistent levels."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner

from wsiseg.cli import main
from wsiseg.output import ome
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
    args = ["segment", *slides, "--model", "demo", "--out", str(folder), "--format", "ome-tiff,ome-zarr",
            "--no-qc", "--no-geojson", "--device", "cpu", "--progress", "none"]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return folder


def _pages(path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [page.asarray() for page in tif.pages]


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
