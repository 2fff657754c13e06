"""open_slide on the real test slides, against OpenSlide, plus refused and broken inputs."""

from __future__ import annotations

import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")

from wsiseg.errors import ConfigError, SlideError  # noqa: E402
from wsiseg.mpp import MAX_PLAUSIBLE_MPP, MIN_PLAUSIBLE_MPP, is_plausible_mpp, mpp_pair  # noqa: E402
from wsiseg.slide import Multiscale, open_slide  # noqa: E402
from wsiseg.slide.common import MAX_PIXELS, check_dimensions, composite_on_white  # noqa: E402

# name -> (vendor, reader); each DICOM series is a folder.
SLIDES = {
    "CMU-1-Small-Region.svs": ("aperio", "tifffile"),
    "boxes.tiff": ("generic-tiff", "tifffile"),
    "small.svs": ("aperio", "tifffile"),
    "dicom-boxes": ("dicom", "openslide"),
    "dicom-sm": ("dicom", "openslide"),
    "yb10kx5k.zstd.tiff": ("generic-tiff", "tifffile"),
    "test_orient0.tif": ("generic-tiff", "tifffile"),
    "test_orient3.tif": ("generic-tiff", "tifffile"),
    "rgba_geotiff.tiff": ("generic-tiff", "tifffile"),
}


def _openslide_file(path: Path) -> Path:
    """OpenSlide wants a file of a DICOM series, not its folder."""
    return sorted(path.glob("*.dcm"))[0] if path.is_dir() else path


def _os_rgb(osr, location, level, size) -> np.ndarray:
    rgba = np.asarray(osr.read_region(location, level, size))
    return composite_on_white(rgba[..., :3], rgba[..., 3])


def test_every_shared_slide_is_listed(slides_dir):
    present = {p.name for p in slides_dir.iterdir()}
    assert present == set(SLIDES) | {"dicom-sm-grayscale"}, "new test slide: add it to SLIDES"


@pytest.mark.parametrize("name", sorted(SLIDES))
def test_matches_openslide_geometry(slides_dir, name):
    path = slides_dir / name
    ms = open_slide(path)
    with openslide.OpenSlide(str(_openslide_file(path))) as osr:
        assert isinstance(ms, Multiscale)
        assert (ms.vendor, ms.reader) == SLIDES[name]
        assert ms.dimensions == osr.dimensions
        assert len(ms.levels) == osr.level_count
        for lv, (w, h), ds in zip(ms.levels, osr.level_dimensions, osr.level_downsamples):
            assert (lv.width, lv.height) == (w, h)
            assert lv.array.shape == (h, w, 3) and lv.array.dtype == np.uint8
            # OpenSlide averages the x and y ratios; ours are per axis.
            assert lv.downsample == pytest.approx((ms.width / w, ms.height / h))
            assert np.mean(lv.downsample) == pytest.approx(ds, rel=1e-3)
        mx, my = osr.properties.get("openslide.mpp-x"), osr.properties.get("openslide.mpp-y")
        if mx is None:
            assert ms.mpp is None and ms.mpp_source == "missing"
        elif MIN_PLAUSIBLE_MPP <= float(mx) <= MAX_PLAUSIBLE_MPP:
            assert ms.mpp == pytest.approx((float(mx), float(my)))
            assert ms.mpp_source == "openslide" and ms.mpp_ignored is None
        else:  # OpenSlide passes on a TIFF's 72 dpi default
            assert ms.mpp is None and ms.mpp_source == "ignored-implausible"
            assert ms.mpp_ignored.mpp == pytest.approx((float(mx), float(my)))
        assert set(ms.associated) == set(osr.associated_images)
    assert ms.path == str(path)


def test_refused_16bit_dicom(slides_dir):
    folder = slides_dir / "dicom-sm-grayscale"
    with pytest.raises(SlideError) as err:
        open_slide(folder)
    msg = str(err.value)
    assert "sm_image_grayscale.dcm" in msg and "16-bit" in msg and "\n" not in msg
    with pytest.raises(SlideError, match="16-bit"):
        open_slide(folder / "sm_image_grayscale.dcm")


def test_chunks_are_tiles(slides_dir):
    assert open_slide(slides_dir / "CMU-1-Small-Region.svs").levels[0].chunk_shape == (240, 240)
    assert open_slide(slides_dir / "boxes.tiff").levels[0].chunk_shape == (64, 64)
    yb = open_slide(slides_dir / "yb10kx5k.zstd.tiff")
    assert yb.levels[0].chunk_shape == (1024, 1024)
    assert yb.levels[0].array.numblocks[:2] == (5, 10)


@pytest.mark.parametrize(
    "name, tolerance",
    [
        # JPEG: OpenSlide and imagecodecs both use libjpeg-turbo here (measured
        # max difference 0); allow a few DN for other decoder builds.
        ("CMU-1-Small-Region.svs", 3),
        ("boxes.tiff", 0),  # deflate: lossless, must be identical
        ("yb10kx5k.zstd.tiff", 0),
        ("test_orient0.tif", 3),
        ("small.svs", 3),
    ],
)
def test_pixels_match_openslide(slides_dir, name, tolerance):
    path = slides_dir / name
    ms = open_slide(path)
    rng = np.random.default_rng(1)
    with openslide.OpenSlide(str(path)) as osr:
        for level, lv in enumerate(ms.levels):
            ds = osr.level_downsamples[level]
            regions = [(0, 0, lv.width, lv.height)] if lv.width * lv.height <= 400_000 else []
            for _ in range(4):
                w, h = min(lv.width, int(rng.integers(1, 300))), min(lv.height, int(rng.integers(1, 300)))
                x, y = int(rng.integers(0, lv.width - w + 1)), int(rng.integers(0, lv.height - h + 1))
                if level == 0 or float(ds).is_integer():
                    # OpenSlide resamples windows that do not start on a
                    # whole level-0 pixel (non-integer downsamples).
                    regions.append((x, y, w, h))
            for x, y, w, h in regions:
                ours = lv.array[y : y + h, x : x + w].compute()
                ref = _os_rgb(osr, (int(round(x * ds)), int(round(y * ds))), level, (w, h))
                diff = np.abs(ours.astype(int) - ref.astype(int))
                assert diff.max() <= tolerance, (level, x, y, w, h, diff.max())
                if tolerance:
                    assert diff.mean() < 0.5


def test_rgba_composited_on_white(slides_dir):
    path = slides_dir / "rgba_geotiff.tiff"
    ms = open_slide(path)
    raw = tifffile.imread(path)  # (H, W, 4), unassociated alpha
    assert raw.shape[-1] == 4 and (raw[..., 3] == 0).any()
    ours = ms.levels[0].array.compute()
    assert np.array_equal(ours, composite_on_white(raw[..., :3], raw[..., 3]))
    assert (ours[raw[..., 3] == 0] == 255).all()  # transparent -> white
    with openslide.OpenSlide(str(path)) as osr:
        ref = _os_rgb(osr, (0, 0), 0, osr.dimensions)
    # OpenSlide premultiplies then un-premultiplies: off by one at most.
    assert np.abs(ours.astype(int) - ref).max() <= 1


def test_grayscale_expanded_and_orientation_ignored(slides_dir):
    a = open_slide(slides_dir / "test_orient0.tif")
    b = open_slide(slides_dir / "test_orient3.tif")
    for la, lb in zip(a.levels, b.levels):
        pa, pb = la.array.compute(), lb.array.compute()
        assert np.array_equal(pa, pb)  # same stored pixels; the Orientation tag is ignored
        assert np.array_equal(pa[..., 0], pa[..., 1]) and np.array_equal(pa[..., 0], pa[..., 2])
    raw = tifffile.imread(slides_dir / "test_orient0.tif")
    assert np.array_equal(a.levels[0].array[..., 0].compute(), raw)


def test_mpp_override_and_validation(slides_dir):
    ms = open_slide(slides_dir / "boxes.tiff", mpp=0.25)
    assert ms.mpp == (0.25, 0.25) and ms.mpp_source == "override"
    assert open_slide(slides_dir / "dicom-sm", mpp=(0.5, 0.6)).mpp == (0.5, 0.6)
    for bad in (0, -1, float("nan"), "x"):
        with pytest.raises(ConfigError):
            open_slide(slides_dir / "boxes.tiff", mpp=bad)


# Real files whose resolution tags carry a writer's 72 dpi default (25400 / 72 = 352.8 um/px).
DEFAULT_DPI = {"boxes.tiff": 352.778, "yb10kx5k.zstd.tiff": 352.858, "test_orient0.tif": 352.858}


@pytest.mark.parametrize("name", sorted(DEFAULT_DPI))
def test_default_dpi_resolution_is_ignored_with_one_warning(slides_dir, caplog, name):
    path = slides_dir / name
    with caplog.at_level("WARNING", logger="wsiseg.slide.open"):
        ms = open_slide(path)
    assert ms.mpp is None and ms.mpp_source == "ignored-implausible"
    assert ms.mpp_ignored.mpp == pytest.approx((DEFAULT_DPI[name],) * 2, abs=1e-3)
    assert ms.mpp_ignored.source == "openslide"
    (msg,) = [r.getMessage() for r in caplog.records if r.name == "wsiseg.slide.open"]  # not tifffile's notes
    assert msg.startswith(f"{path}: ") and f"{DEFAULT_DPI[name]} um/px" in msg and "\n" not in msg
    assert "ignored" in msg and "--mpp" in msg


def test_plausible_and_overridden_mpp_are_kept_without_warning(slides_dir, caplog):
    with caplog.at_level("WARNING", logger="wsiseg.slide.open"):
        cmu = open_slide(slides_dir / "CMU-1-Small-Region.svs")
        boxes = open_slide(slides_dir / "boxes.tiff", mpp=0.25)
        big = open_slide(slides_dir / "boxes.tiff", mpp=50)  # --mpp is taken as given, even outside the range
    assert (cmu.mpp, cmu.mpp_source, cmu.mpp_ignored) == ((0.499, 0.499), "openslide", None)
    assert (boxes.mpp, boxes.mpp_source, boxes.mpp_ignored) == ((0.25, 0.25), "override", None)
    assert big.mpp == (50.0, 50.0) and big.mpp_source == "override"
    assert caplog.records == []


def test_plausible_range_bounds():
    assert is_plausible_mpp((MIN_PLAUSIBLE_MPP, MAX_PLAUSIBLE_MPP)) and is_plausible_mpp((0.25, 0.26))
    for bad in ((0.049, 0.5), (0.5, 20.01), (352.8, 352.8), (264.58, 264.58), (0.0254, 0.0254)):
        assert not is_plausible_mpp(bad)
    assert mpp_pair(0.5) == (0.5, 0.5) and mpp_pair(("0.25", 0.5)) == (0.25, 0.5) and mpp_pair(None) is None
    for bad in (0, -1, float("nan"), float("inf"), "x", (1, 2, 3)):
        with pytest.raises(ConfigError, match="mpp must be"):
            mpp_pair(bad)


def test_implausible_tags_fall_back_to_ome_or_are_ignored(tmp_path, caplog):
    rgb = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    # 72 dpi tags, but OME-XML gives the real pixel size: the plausible source wins, silently
    ome = tmp_path / "dpi.ome.tif"
    tifffile.imwrite(
        ome,
        rgb,
        photometric="rgb",
        resolution=(72, 72),
        resolutionunit="INCH",
        metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
    )
    # 1 million dpi: 0.0254 um/px, below any optical resolution
    fine = tmp_path / "fine.tif"
    tifffile.imwrite(fine, rgb, photometric="rgb", resolution=(1e6, 1e6), resolutionunit="INCH")
    with caplog.at_level("WARNING", logger="wsiseg.slide.open"):
        a = open_slide(ome)
        assert caplog.records == []
        b = open_slide(fine)
    assert (a.mpp, a.mpp_source, a.mpp_ignored) == ((0.25, 0.25), "ome", None)
    assert b.mpp is None and b.mpp_source == "ignored-implausible" and b.mpp_ignored.source == "tiff-resolution"
    assert b.mpp_ignored.mpp == pytest.approx((0.0254, 0.0254))
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith(f"{fine}: ") and "0.0254 um/px" in msg


def test_levels_pickle_and_compute_again(slides_dir):
    for name in ("boxes.tiff", "dicom-sm"):
        arr = open_slide(slides_dir / name).levels[0].array
        again = pickle.loads(pickle.dumps(arr))
        assert np.array_equal(again.compute(), arr.compute())


# ---------------------------------------------------------------------------
# synthetic TIFFs: metadata sources and refusals


def test_synthetic_tiff_variants(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (130, 150, 3), dtype=np.uint8)

    ome = tmp_path / "rgb.ome.tif"
    tifffile.imwrite(
        ome,
        rgb,
        tile=(64, 64),
        photometric="rgb",
        metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.26},
    )
    ms = open_slide(ome)
    assert (ms.vendor, ms.mpp, ms.mpp_source) == ("ome-tiff", (0.25, 0.26), "ome")
    assert np.array_equal(ms.levels[0].array.compute(), rgb)

    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.moveaxis(rgb, -1, 0).copy(), photometric="rgb", planarconfig="separate", tile=(64, 64))
    ms = open_slide(planar)
    assert ms.levels[0].chunk_shape == (64, 64) and ms.levels[0].array.chunksize[2] == 3
    assert np.array_equal(ms.levels[0].array.compute(), rgb)

    cm = tmp_path / "cm.tif"
    tifffile.imwrite(cm, rgb, photometric="rgb", tile=(64, 64), resolution=(40000, 20000), resolutionunit="CENTIMETER")
    assert open_slide(cm).mpp == pytest.approx((0.25, 0.5))

    none = tmp_path / "none.tif"  # ResolutionUnit NONE says nothing about size
    tifffile.imwrite(none, rgb, photometric="rgb", tile=(64, 64), resolution=(4, 4), resolutionunit="NONE")
    ms = open_slide(none)
    assert ms.mpp is None and ms.mpp_source == "missing"

    strips = tmp_path / "strips.tif"
    gray = rng.integers(0, 256, (70, 50), dtype=np.uint8)
    tifffile.imwrite(strips, gray, rowsperstrip=16)
    ms = open_slide(strips)
    assert np.array_equal(ms.levels[0].array.compute(), np.repeat(gray[..., None], 3, axis=2))

    white = tmp_path / "miniswhite.tif"  # not handled by the tifffile path: OpenSlide reads it
    inverted = rng.integers(0, 256, (128, 128), dtype=np.uint8)
    tifffile.imwrite(white, inverted, photometric="miniswhite", tile=(64, 64))
    ms = open_slide(white)
    assert ms.reader == "openslide"
    assert np.array_equal(ms.levels[0].array[..., 1].compute(), 255 - inverted)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("uint16", "16-bit"),
        ("five", "5 channels"),
        ("fluo3", "fluorescence"),
        ("fluo1", "fluorescence"),
        ("stack", "more than one plane"),
    ],
)
def test_refuses_non_brightfield(tmp_path, kind, match):
    rng = np.random.default_rng(0)
    path = tmp_path / f"{kind}.ome.tif"
    if kind == "uint16":
        tifffile.imwrite(path, rng.integers(0, 65535, (64, 64, 3), dtype=np.uint16), tile=(16, 16), photometric="rgb")
    elif kind == "five":
        data = rng.integers(0, 256, (64, 64, 5), dtype=np.uint8)
        tifffile.imwrite(path, data, tile=(16, 16), photometric="rgb", extrasamples=["unassalpha", "unspecified"])
    elif kind == "fluo3":
        data = rng.integers(0, 256, (3, 64, 64), dtype=np.uint8)
        tifffile.imwrite(path, data, tile=(16, 16), photometric="minisblack", metadata={"axes": "CYX"})
    elif kind == "fluo1":
        data = rng.integers(0, 256, (64, 64), dtype=np.uint8)
        meta = {"axes": "YX", "Channel": {"Name": "DAPI", "IlluminationType": "Epifluorescence"}}
        tifffile.imwrite(path, data, tile=(16, 16), photometric="minisblack", metadata=meta)
    else:
        tifffile.imwrite(path, rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), photometric="rgb", metadata=None)
    with pytest.raises(SlideError, match=match) as err:
        open_slide(path)
    assert path.name in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------
# broken inputs


def absurd_tiff(path: Path, width: int = 3_000_000_000, height: int = 3_000_000_000) -> Path:
    """A classic little-endian TIFF whose only IFD claims a huge tiled RGB image."""
    tags = [  # (tag, type, count, value); type 3 SHORT, 4 LONG
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (277, 3, 1, 3),
        (284, 3, 1, 1),
        (322, 3, 1, 256),
        (323, 3, 1, 256),
        (324, 4, 1, 200),
        (325, 4, 1, 256 * 256 * 3),
    ]
    ifd = struct.pack("<H", len(tags))
    for tag, typ, count, value in tags:
        packed = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, count) + packed
    ifd += struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(64))
    return path


def bad_inputs(tmp: Path, slides_dir: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, expected words in the message); all built in ``tmp``."""
    boxes = (slides_dir / "boxes.tiff").read_bytes()
    out = {}
    out["missing"] = (tmp / "nope.svs", "no such file")
    (tmp / "folder").mkdir()
    (tmp / "folder" / "notes.txt").write_text("hello")
    out["directory"] = (tmp / "folder", "not a slide")
    (tmp / "empty.svs").write_bytes(b"")
    out["zero-byte"] = (tmp / "empty.svs", "empty")
    for n in (1000, 3000, 5000, len(boxes) - 6):
        p = tmp / f"boxes-truncated-{n}.tiff"
        p.write_bytes(boxes[:n])
        out[f"truncated-{n}"] = (p, "corrupt")
    # tifffile writes the IFD first: cutting the tail only loses tile data.
    lossless = tmp / "tail.tif"
    tifffile.imwrite(lossless, np.zeros((100, 120, 3), np.uint8) + 7, tile=(32, 32), compression="zlib")
    p = tmp / "tail-truncated.tif"
    p.write_bytes(lossless.read_bytes()[:-50])
    out["truncated-data"] = (p, "truncated")
    p = tmp / "random.svs"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    out["random"] = (p, "unsupported")
    p = tmp / "random-tiff-header.tif"
    p.write_bytes(b"II*\x00" + np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    out["random-tiff"] = (p, "TIFF")
    out["absurd"] = (absurd_tiff(tmp / "absurd.tif"), "absurd size")
    p = tmp / "notes.txt"
    p.write_text("not a slide\n")
    out["text"] = (p, "unsupported")
    return out


BAD_NAMES = [
    "missing",
    "directory",
    "zero-byte",
    "truncated-1000",
    "truncated-3000",
    "truncated-5000",
    "truncated-7690",
    "truncated-data",
    "random",
    "random-tiff",
    "absurd",
    "text",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_raises_slide_error(tmp_path, slides_dir, name):
    path, words = bad_inputs(tmp_path, slides_dir)[name]
    with pytest.raises(SlideError) as err:
        open_slide(path)
    msg = str(err.value)
    assert str(path) in msg, msg
    assert words.lower() in msg.lower(), msg
    assert "\n" not in msg
    assert err.value.path is not None


def test_absurd_header_refused_before_allocation(tmp_path):
    import tracemalloc

    path = absurd_tiff(tmp_path / "absurd.tif")
    tracemalloc.start()
    try:
        with pytest.raises(SlideError, match="absurd"):
            open_slide(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


def test_check_dimensions():
    check_dimensions([(100, 80), (50, 40), (25, 20)], Path("x"))
    with pytest.raises(SlideError, match="inconsistent"):
        check_dimensions([(100, 80), (150, 40)], Path("x"))
    with pytest.raises(SlideError, match="absurd"):
        check_dimensions([(MAX_PIXELS, 2)], Path("x"))
    with pytest.raises(SlideError, match="empty"):
        check_dimensions([(0, 10)], Path("x"))


def test_dicom_file_inside_folder_and_file_itself(slides_dir, tmp_path):
    by_folder = open_slide(slides_dir / "dicom-boxes")
    by_file = open_slide(slides_dir / "dicom-boxes" / "boxes_0.dcm")
    assert by_folder.dimensions == by_file.dimensions
    assert np.array_equal(by_folder.levels[0].array.compute(), by_file.levels[0].array.compute())
    # A DICOM file without the .dcm extension is found by its DICM magic.
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(slides_dir / "dicom-sm" / "sm_image.dcm", folder / "IMG0001")
    assert open_slide(folder).dimensions == (50, 50)


def _loop_ifd_chain(src: Path, dst: Path, last: int, target: int) -> Path:
    """Copy ``src`` with IFD ``last``'s next-IFD offset pointed back at IFD ``target`` (a circular chain)."""
    with tifffile.TiffFile(src) as tif:
        offsets = [page.offset for page in tif.pages]
        fmt = tif.tiff
    data = bytearray(src.read_bytes())
    start = offsets[last]
    (count,) = struct.unpack(fmt.tagnoformat, data[start : start + fmt.tagnosize])
    at = start + fmt.tagnosize + count * fmt.tagsize
    data[at : at + fmt.offsetsize] = struct.pack(fmt.offsetformat, offsets[target])
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.timeout(60)  # before the fix, tifffile walked the loop forever with its offset list growing
@pytest.mark.parametrize(
    ("name", "last", "target"),
    [("boxes.tiff", 3, 0), ("boxes.tiff", 2, 2), ("CMU-1-Small-Region.svs", 3, 1), ("yb10kx5k.zstd.tiff", 4, 0)],
)
def test_circular_ifd_chain_is_refused_quickly(slides_dir, tmp_path, name, last, target):
    path = _loop_ifd_chain(slides_dir / name, tmp_path / f"loop-{name}", last, target)
    # OpenSlide (libtiff) refuses such a file too, only without saying why.
    with pytest.raises(openslide.OpenSlideError):
        openslide.OpenSlide(str(path))
    with pytest.raises(SlideError) as err:
        open_slide(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert "loops back" in msg and f"IFD {last}" in msg and f"IFD {target}" in msg


@pytest.mark.timeout(60)  # before the fix, tifffile followed this loop with its offset list growing (GBs)
def test_long_ifd_chain_that_loops_late_is_refused(tmp_path):
    # tifffile looks for a repeated offset only at the 100th IFD: a loop after it went unnoticed.
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tw:
        for i in range(120):
            tw.write(np.full((8, 8), i, np.uint8), photometric="minisblack", contiguous=False)
    _loop_ifd_chain(path, path, 119, 110)
    with pytest.raises(SlideError, match="loops back"):
        open_slide(path)


@pytest.mark.timeout(60)  # before the fix, reading a FIFO blocked until a writer came
def test_non_regular_files_are_refused_before_any_read(tmp_path):
    import socket

    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.tiff"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    link = tmp_path / "link.svs"
    link.symlink_to(fifo)
    try:
        for path, kind in [
            (fifo, "a FIFO"),
            (link, "a FIFO"),
            (sock_path, "a socket"),
            (Path("/dev/null"), "a character device"),
        ]:
            with pytest.raises(SlideError) as err:
                open_slide(path)
            msg = str(err.value)
            assert msg == f"{path}: not a regular file ({kind}); a slide is a file, a DICOM folder or an OME-Zarr store"
    finally:
        sock.close()


def test_ngff_dataset_that_names_a_group_is_refused(tmp_path):
    """A multiscales dataset path pointing at a group (not an array) is a one-line SlideError, not a crash."""
    import zarr

    root = zarr.open_group(str(tmp_path / "bad.zarr"), mode="w", zarr_format=2)
    root.create_group("0")
    root.attrs["multiscales"] = [
        {"version": "0.4", "axes": [{"name": "y"}, {"name": "x"}, {"name": "c"}], "datasets": [{"path": "0"}]}
    ]
    with pytest.raises(SlideError, match="names a group, not an array"):
        open_slide(tmp_path / "bad.zarr")


def _edit_entry(
    src: Path,
    dst: Path,
    ifd: int,
    code: int,
    *,
    value: int | None = None,
    typ: int | None = None,
    count: int | None = None,
) -> Path:
    """Copy ``src`` with the entry of tag ``code`` in IFD ``ifd`` changed.

    ``value`` makes the tag one LONG (LONG8 in a BigTIFF) holding it; ``typ``
    and ``count`` only overwrite the entry's type and count fields.
    """
    with tifffile.TiffFile(src) as tif:
        tag = tif.pages[ifd].tags[code]
        fmt = tif.tiff
    data = bytearray(src.read_bytes())
    if value is not None:
        typ, count = (16, 1) if fmt.offsetsize == 8 else (4, 1)
        struct.pack_into(
            fmt.byteorder + ("Q" if fmt.offsetsize == 8 else "I"), data, tag.offset + 4 + fmt.offsetsize, value
        )
    if typ is not None:
        struct.pack_into(fmt.byteorder + "H", data, tag.offset + 2, typ)
    if count is not None:
        struct.pack_into(fmt.offsetformat, data, tag.offset + 4, count)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("code", "value"), [(322, 2**31 - 1), (323, 2**31 - 1), (322, 2**20)])
def test_huge_tiles_are_refused_not_an_abort(slides_dir, tmp_path, code, value):
    """Found by `wsiseg bench fuzz` (seed 0, case 969): a coarse level claiming 2**31-px wide tiles.

    tifffile cannot decode such a tile, so the slide went to OpenSlide, which
    allocates a whole tile to read one pixel and aborts the process (GLib:
    "failed to allocate 8796093018112 bytes", SIGABRT) instead of raising.
    Run in a child process: before the fix the abort took the test process down.
    """
    import subprocess
    import sys

    path = _edit_entry(slides_dir / "yb10kx5k.zstd.tiff", tmp_path / "tiles.tiff", 4, code, value=value)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    res = subprocess.run(
        [sys.executable, "-m", "wsiseg", "info", str(path)], capture_output=True, text=True, env=env, timeout=100
    )
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wsiseg: error: {path}: "), res.stderr
    assert "tiles of" in lines[0] and "the header is corrupt" in lines[0], lines[0]
    # The OpenSlide reader checks its own tile sizes too (DICOM and the vendor formats go there first).
    code = (
        "import sys; from pathlib import Path; from wsiseg.errors import SlideError; "
        "from wsiseg.slide.openslide_reader import open_openslide\n"
        "try:\n    open_openslide(Path(sys.argv[1]), None, display_path=Path(sys.argv[1]))\n"
        "except SlideError as exc:\n    print(exc)"
    )
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=100)
    assert res.returncode == 0 and "level 4 claims tiles of" in res.stdout, (res.returncode, res.stdout, res.stderr)


def test_check_tiles():
    from wsiseg.limits import MAX_TILE_PIXELS
    from wsiseg.slide.common import check_tiles
    from wsiseg.slide.openslide_reader import _openslide_tile

    check_tiles([(240, 240), (0, 0), (16384, 16384)], Path("x"))
    assert 16384 * 16384 == MAX_TILE_PIXELS
    with pytest.raises(SlideError, match="level 1 claims tiles of 16384x16385 pixels"):
        check_tiles([(240, 240), (16384, 16385)], Path("x"))
    props = {"openslide.level[0].tile-width": "512", "openslide.level[0].tile-height": "x"}
    assert _openslide_tile(props, 0) == (512, 0) and _openslide_tile(props, 1) == (0, 0)


# Found by `wsiseg bench fuzz` (seed 0, cases 15, 139, 491, 595, 708, 921): wsiseg's own checks raised on
# hostile tag values (AttributeError, ValueError, TypeError, IndexError, OverflowError) and the last-resort
# catch turned that into "cannot read TIFF (IndexError: boolean index did not match ...)" instead of saying
# what is wrong with the file.
@pytest.mark.parametrize(
    ("name", "ifd", "code", "edit", "words"),
    [
        # tifffile's reader declines the unknown photometric (by its number) and OpenSlide says why it cannot
        (
            "rgba_geotiff.tiff",
            0,
            262,
            {"value": 481986},
            "OpenSlide cannot open this generic-tiff slide: Cannot get required TIFF tag: 262",
        ),
        ("yb10kx5k.zstd.tiff", 0, 259, {"typ": 7}, "corrupt TIFF: Compression b'P' is not an integer"),
        ("test_orient3.tif", 1, 322, {"typ": 1}, "corrupt TIFF: level 1 TileWidth b'@' is not an integer"),
        ("rgba_geotiff.tiff", 0, 322, {"typ": 5}, "corrupt TIFF: level 0 TileWidth (0, 3489660928) is not an integer"),
        # tile offsets read as LONG8: past 2**63, an OverflowError in int64
        ("boxes.tiff", 0, 324, {"typ": 16}, "truncated file: level 0 image data ends at byte 1"),
        ("boxes.tiff", 0, 325, {"count": 255}, "corrupt TIFF: level 0 has 20 tile offsets but 255 byte counts"),
        ("boxes.tiff", 0, 324, {"count": 19}, "corrupt TIFF: level 0 has 19 tile offsets but 20 byte counts"),
    ],
)
def test_hostile_tag_values_are_described_not_an_exception(slides_dir, tmp_path, name, ifd, code, edit, words):
    path = _edit_entry(slides_dir / name, tmp_path / name, ifd, code, **edit)
    with pytest.raises(SlideError) as err:
        open_slide(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert words in msg, msg
    assert not isinstance(err.value.__cause__, (AttributeError, ValueError, IndexError, TypeError, OverflowError)), msg


def test_unknown_photometric_is_named_by_its_number(slides_dir, tmp_path):
    from wsiseg.slide.tifffile_reader import NotReadable, _tiff_layout

    path = _edit_entry(slides_dir / "rgba_geotiff.tiff", tmp_path / "p.tiff", 0, 262, value=481986)
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        with pytest.raises(NotReadable, match="photometric 481986 is not handled by the tifffile reader"):
            _tiff_layout(series, series.keyframe, None)
