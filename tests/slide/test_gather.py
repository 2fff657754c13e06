"""Level-of-detail gather: against independent bilinear references and a real JPEG pyramid."""

from __future__ import annotations

import math
from collections import Counter

import dask.array as da
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsiseg.errors import WsisegError
from wsiseg.slide.gather import choose_levels, gather, sample_spacing
from wsiseg.slide.multiscale import Multiscale

# ---------------------------------------------------------------------------
# references (tests only)


def ref_bilinear(img: np.ndarray, xl: np.ndarray, yl: np.ndarray) -> np.ndarray:
    """Bilinear read of ``img`` at continuous level coordinates by torch's grid_sample.

    ``align_corners=False`` + ``padding_mode="border"``: the rule that
    wsiseg.sampling.coords states for images. Returns ``(n, C)`` float64.
    """
    h, w = img.shape[:2]
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float64)).permute(2, 0, 1)[None]
    g = torch.stack([torch.from_numpy(xl / w * 2 - 1), torch.from_numpy(yl / h * 2 - 1)], -1)
    out = F.grid_sample(t, g.reshape(1, -1, 1, 2), mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, :, 0].T.numpy()


def ref_spacing(p: np.ndarray) -> np.ndarray:
    """Jacobian spacing written out by hand: central differences, one-sided at the border."""

    def diff(axis):
        q = np.moveaxis(p, axis, 0)
        d = np.zeros_like(q)
        if q.shape[0] > 1:
            d[1:-1] = (q[2:] - q[:-2]) / 2
            d[0] = q[1] - q[0]
            d[-1] = q[-1] - q[-2]
        return np.linalg.norm(np.moveaxis(d, 0, axis), axis=-1)

    return np.maximum(diff(0), diff(1))


def uniform_points(h: int, w: int, x0: float, y0: float, width: float, height: float) -> np.ndarray:
    """``h x w`` pixel-centre grid over a level-0 rectangle, as (x, y)."""
    ys = y0 + (np.arange(h) + 0.5) / h * height
    xs = x0 + (np.arange(w) + 0.5) / w * width
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx, gy], axis=-1)


# ---------------------------------------------------------------------------
# in-memory pyramids with chunk-read counting


class CountingArray:
    """Array-like that records every chunk read (dask calls ``__getitem__`` once per chunk)."""

    def __init__(self, a: np.ndarray):
        self.a = a
        self.shape, self.dtype, self.ndim = a.shape, a.dtype, a.ndim
        self.reads: Counter = Counter()

    def __getitem__(self, key):
        out = self.a[key]
        if out.size:
            self.reads[(key[0].start or 0, key[1].start or 0)] += 1
        return out


@st.composite
def pyramids(draw):
    w0 = draw(st.integers(1, 48))
    h0 = draw(st.integers(1, 48))
    nlev = draw(st.integers(1, 4))
    chunk = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    arrays = [
        rng.integers(0, 256, (math.ceil(h0 / 2**k), math.ceil(w0 / 2**k), 3), dtype=np.uint8) for k in range(nlev)
    ]
    return arrays, chunk, seed


def counting_multiscale(arrays, chunk):
    counters = [CountingArray(a) for a in arrays]
    meta = np.empty((0, 0, 3), np.uint8)
    levels = [da.from_array(c, chunks=(chunk, chunk, 3), meta=meta) for c in counters]
    return Multiscale.from_arrays(levels), counters


def random_points(rng, ms, h, w, margin=3.0):
    x = rng.uniform(-margin, ms.width + margin, (h, w))
    y = rng.uniform(-margin, ms.height + margin, (h, w))
    return np.stack([x, y], axis=-1)


def expected_blocks(ms, k, pts):
    """Chunks (row0, col0) of level ``k`` holding a bilinear tap with non-zero weight."""
    lv = ms.levels[k]
    cr, cc = lv.chunk_shape
    sx, sy = lv.downsample
    blocks = set()
    for x, y in pts.reshape(-1, 2):
        xl = min(max(x / sx - 0.5, 0.0), lv.width - 1)
        yl = min(max(y / sy - 0.5, 0.0), lv.height - 1)
        cols = {math.floor(xl)} | ({math.floor(xl) + 1} if xl > math.floor(xl) else set())
        rows = {math.floor(yl)} | ({math.floor(yl) + 1} if yl > math.floor(yl) else set())
        blocks |= {((r // cr) * cr, (c // cc) * cc) for r in rows for c in cols}
    return blocks


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(pyramids(), st.integers(1, 7), st.integers(1, 7))
def test_exact_equals_reference_bilinear(pyr, h, w):
    arrays, chunk, seed = pyr
    ms, _ = counting_multiscale(arrays, chunk)
    pts = random_points(np.random.default_rng(seed), ms, h, w)
    res = gather(ms, pts, "exact", dtype=np.float32)
    ref = ref_bilinear(arrays[0], pts[..., 0].ravel(), pts[..., 1].ravel())
    assert res.image.dtype == np.float32 and res.image.shape == (h, w, 3)
    np.testing.assert_allclose(res.image.reshape(-1, 3), ref, atol=1e-3)
    assert np.all(res.level == 0)
    u8 = gather(ms, pts, "exact").image
    assert u8.dtype == np.uint8
    assert np.abs(u8.reshape(-1, 3).astype(float) - ref).max() <= 0.5 + 1e-3


@SETTINGS
@given(pyramids(), st.integers(1, 7), st.integers(1, 7), st.sampled_from([0.0, 0.5, -1.0, 1.0]))
def test_lod_reads_the_rule_level_bilinearly(pyr, h, w, bias):
    arrays, chunk, seed = pyr
    ms, _ = counting_multiscale(arrays, chunk)
    rng = np.random.default_rng(seed)
    # a random monotone grid: uneven spacing, so several levels get used
    xs = np.sort(rng.uniform(-2, ms.width + 2, w))
    ys = np.sort(rng.uniform(-2, ms.height + 2, h))
    pts = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1)
    res = gather(ms, pts, "lod", bias, dtype=np.float32)
    spacing = ref_spacing(pts)
    want = np.array([ms.level_for_downsample(s * 2**bias) for s in spacing.ravel()]).reshape(h, w)
    np.testing.assert_array_equal(res.level, want)
    for k in np.unique(want):
        sel = want.ravel() == k
        sx, sy = ms.levels[k].downsample
        ref = ref_bilinear(arrays[k], pts[..., 0].ravel()[sel] / sx, pts[..., 1].ravel()[sel] / sy)
        np.testing.assert_allclose(res.image.reshape(-1, 3)[sel], ref, atol=1e-3)


@SETTINGS
@given(pyramids(), st.integers(1, 6), st.integers(1, 6), st.sampled_from(["lod", "exact"]))
def test_each_touched_chunk_decoded_once_and_counted(pyr, h, w, mode):
    arrays, chunk, seed = pyr
    ms, counters = counting_multiscale(arrays, chunk)
    pts = random_points(np.random.default_rng(seed), ms, h, w)
    res = gather(ms, pts, mode)
    assert res.stats.samples == h * w
    for k, (lv, counter, st_k) in enumerate(zip(ms.levels, counters, res.stats.levels)):
        used = pts[res.level == k]
        want = expected_blocks(ms, k, used) if used.size else set()
        assert set(counter.reads) == want  # exactly the chunks with a non-zero tap
        assert all(n == 1 for n in counter.reads.values())  # each decoded once
        assert st_k.chunks == len(want) and st_k.samples == len(used)
        assert st_k.pixels == sum(min(chunk, lv.height - r) * min(chunk, lv.width - c) for r, c in want)
    assert res.stats.fraction == pytest.approx(res.stats.pixels / (ms.width * ms.height))


@SETTINGS
@given(pyramids(), st.integers(1, 40))
def test_pixel_centres_reproduce_pixels_exactly(pyr, n):
    arrays, chunk, seed = pyr
    ms, counters = counting_multiscale(arrays, chunk)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, ms.height, n)
    j = rng.integers(0, ms.width, n)
    pts = np.stack([j + 0.5, i + 0.5], axis=-1)[None].astype(np.float64)
    res = gather(ms, pts, "exact")
    np.testing.assert_array_equal(res.image[0], arrays[0][i, j])
    np.testing.assert_array_equal(
        gather(ms, pts, "exact", dtype=np.float32).image[0], arrays[0][i, j].astype(np.float32)
    )
    # a centre touches only its own chunk
    assert set(counters[0].reads) == {((r // chunk) * chunk, (c // chunk) * chunk) for r, c in zip(i, j)}


def test_spacing_and_levels():
    pts = uniform_points(4, 5, 0, 0, 50, 80)  # 10 px across, 20 px down
    np.testing.assert_allclose(sample_spacing(pts), 20.0)
    np.testing.assert_allclose(sample_spacing(pts[:1]), 10.0)  # one row: only the j direction
    assert sample_spacing(pts[:1, :1]).item() == 0.0
    ms = Multiscale.from_arrays([np.zeros((64 // 2**k, 64 // 2**k, 3), np.uint8) for k in range(4)])
    np.testing.assert_array_equal(
        choose_levels(ms, np.array([0.0, 1.0, 1.9, 2.0, 7.9, 8.0, 100.0])), [0, 0, 0, 1, 2, 3, 3]
    )
    np.testing.assert_array_equal(choose_levels(ms, np.array([1.0, 4.0]), bias=1.0), [1, 3])


def test_bad_input():
    ms = Multiscale.from_arrays([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(WsisegError):
        gather(ms, np.zeros((4, 2)))
    with pytest.raises(WsisegError):
        gather(ms, np.full((1, 1, 2), np.nan))
    with pytest.raises(WsisegError):
        gather(ms, np.zeros((1, 1, 2)), mode="nearest")
    with pytest.raises(WsisegError):
        gather(ms, np.zeros((1, 1, 2)), dtype=np.int16)


# ---------------------------------------------------------------------------
# a real 20k x 20k JPEG pyramid (tile 512), built once


SIZE, TILE = 20000, 512


@pytest.fixture(scope="module")
def big_slide(slides_dir, tmp_path_factory):
    from wsiseg.slide.synthetic import write_synthetic_slide

    path = tmp_path_factory.mktemp("gather") / "s20k.tiff"
    return write_synthetic_slide(path, SIZE, SIZE, slides_dir / "CMU-1-Small-Region.svs", tile=TILE)


@pytest.fixture
def big(big_slide):
    from wsiseg.slide.open import open_slide

    return open_slide(big_slide)  # fresh per test: nothing cached between gathers


def read_window(path, level, y0, y1, x0, x1) -> np.ndarray:
    """Direct read of a level window through tifffile's zarr store (independent of wsiseg)."""
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        return np.asarray(zarr.open(tif.series[0].aszarr(level=level), mode="r")[y0:y1, x0:x1])


def test_lod_uniform_decodes_far_fewer_pixels_than_exact(big):
    pts = uniform_points(256, 256, 0, 0, SIZE, SIZE)
    lod = gather(big, pts, "lod")
    exact = gather(big, pts, "exact")
    assert lod.stats.samples == exact.stats.samples == 256 * 256
    assert np.all(lod.level == 6)  # spacing 78 px -> the 64x level
    assert exact.stats.levels[0].chunks == 39 * 39  # every full level-0 tile is touched
    assert lod.stats.pixels < 0.1 * exact.stats.pixels
    assert lod.stats.fraction < 0.01
    # same picture: mean colours agree (the exact read aliases, the LOD read is box-filtered)
    assert np.abs(lod.image.mean((0, 1)) - exact.image.mean((0, 1))).max() < 5


@pytest.mark.parametrize(
    "window",  # level-0 window (x0, y0, size) the random points fall in; points may leave the slide
    [(-20, -20, 1100), (900, 900, 300), (SIZE - 1080, SIZE - 1080, 1100)],
    ids=["top-left-border", "chunk-corner", "bottom-right-border"],
)
def test_exact_equals_direct_bilinear_read(big, big_slide, window):
    x0, y0, size = window
    rng = np.random.default_rng(0)
    pts = np.stack([rng.uniform(x0, x0 + size, 2000), rng.uniform(y0, y0 + size, 2000)], -1)[None]
    res = gather(big, pts, "exact", dtype=np.float32)
    # window holding every tap; it reaches the slide edge where the points do (border replication)
    rx0, ry0 = max(0, math.floor(x0) - 2), max(0, math.floor(y0) - 2)
    rx1, ry1 = min(SIZE, math.ceil(x0 + size) + 2), min(SIZE, math.ceil(y0 + size) + 2)
    img = read_window(big_slide, 0, ry0, ry1, rx0, rx1)
    ref = ref_bilinear(img, pts[0, :, 0] - rx0, pts[0, :, 1] - ry0)
    np.testing.assert_allclose(res.image[0], ref, atol=1e-3)


def test_lod_dense_grid_reads_level0_like_exact(big):
    pts = uniform_points(100, 120, 4700.3, 7000.7, 120, 100)  # 1 px spacing, off-centre, one tile
    lod, exact = gather(big, pts, "lod"), gather(big, pts, "exact")
    assert np.all(lod.level == 0)
    np.testing.assert_array_equal(lod.image, exact.image)
    assert lod.stats.chunks == exact.stats.chunks == 1
    # 1.9 px spacing is still below the 2x level
    assert np.all(gather(big, uniform_points(50, 50, 9000, 9000, 95, 95), "lod").level == 0)


def test_lod_coarse_grid_matches_chosen_level_and_box_filter(big, big_slide):
    ox, oy, n, s = 4096, 8192, 64, 32  # 64 x 64 samples, 32 px apart, on level-5 pixel centres
    pts = uniform_points(n, n, ox, oy, n * s, n * s)
    res = gather(big, pts, "lod", dtype=np.float32)
    assert np.all(res.level == 5) and big.levels[5].downsample == (32.0, 32.0)
    lv5 = read_window(big_slide, 5, 0, big.levels[5].height, 0, big.levels[5].width)
    ref = ref_bilinear(lv5, pts[..., 0].ravel() / s, pts[..., 1].ravel() / s)
    np.testing.assert_allclose(res.image.reshape(-1, 3), ref, atol=1e-3)
    # and it is the 32 x 32 box mean of level 0 (JPEG at both levels)
    full = read_window(big_slide, 0, oy, oy + n * s, ox, ox + n * s).astype(np.float64)
    box = full.reshape(n, s, n, s, 3).mean(axis=(1, 3))
    assert np.abs(res.image - box).mean() < 4
    assert res.stats.levels[5].chunks == 1 and res.stats.chunks == 1
    # bias moves one octave per unit
    assert np.all(gather(big, pts, "lod", bias=1.0).level == 6)
    assert np.all(gather(big, pts, "lod", bias=-1.0).level == 4)
