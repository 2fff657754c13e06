"""The coordinate convention of wsiseg.sampling.coords."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsiseg.sampling.coords import (
    level_source_index,
    nearest_index,
    normalised_nearest_index,
    reduce_nearest,
    to_pixels,
    to_torch_grid,
    uniform_grid,
)


@given(st.integers(1, 40), st.integers(1, 40))
@settings(deadline=None, max_examples=30)
def test_uniform_grid_is_pixel_centres(h, w):
    g = uniform_grid(h, w, dtype=torch.float64)
    px = to_pixels(g, w, h)
    # Pixel centres of an h x w raster sit at integer + 0.5.
    assert torch.allclose(px[..., 0], torch.arange(w, dtype=torch.float64)[None, :] + 0.5)
    assert torch.allclose(px[..., 1], torch.arange(h, dtype=torch.float64)[:, None] + 0.5)


@given(st.integers(1, 8), st.integers(1, 12))
@settings(deadline=None, max_examples=30)
def test_uniform_grid_reads_block_centres_by_nearest(k, n):
    # A uniform n-node grid over k*n pixels reads pixel k*j + k//2 (Y[k//2::k]).
    # Even k puts samples exactly on pixel edges: the tie goes to the lower-right pixel,
    # independent of floating-point rounding, in float32 and float64.
    size = k * n
    for dtype in (torch.float32, torch.float64):
        x = uniform_grid(1, n, dtype=dtype)[0, :, 0]
        assert normalised_nearest_index(x, size).tolist() == list(range(k // 2, size, k))


def test_grid_sample_agrees_on_pixel_centres():
    img = torch.arange(12, dtype=torch.float64).reshape(1, 1, 3, 4)
    g = uniform_grid(3, 4, dtype=torch.float64)[None]
    out = torch.nn.functional.grid_sample(img, to_torch_grid(g), mode="bilinear", align_corners=False)
    assert torch.allclose(out, img, atol=1e-12)


def test_nearest_index_clamps_and_handles_numpy():
    assert nearest_index(np.array([-3.0, 0.0, 0.999, 1.0, 9.5]), 5).tolist() == [0, 0, 0, 1, 4]


# ------------------------------------------------------------ pyramid levels of label masks


@st.composite
def label_pyramids(draw):
    """A random label map and the sizes of its mask pyramid (halved, rounded up) or any smaller size."""
    hh, ww = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    labels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, draw(st.integers(1, 6)), (hh, ww))
    sizes, h, w = [], hh, ww
    while h > 1 or w > 1:
        h, w = -(-h // 2), -(-w // 2)
        sizes.append((h, w))
    sizes.append((draw(st.integers(1, hh)), draw(st.integers(1, ww))))
    return labels.astype(np.uint8), sizes


@given(label_pyramids())
@settings(deadline=None, max_examples=200)
def test_reduced_level_reads_a_covered_level0_pixel(case):
    # Each level pixel is a level-0 pixel that it covers: its label occurs in its footprint.
    labels, sizes = case
    hh, ww = labels.shape
    for h, w in sizes:
        level = reduce_nearest(labels, (h, w))
        assert level.shape == (h, w) and level.dtype == labels.dtype
        for n0, n in ((hh, h), (ww, w)):
            j = np.arange(n)
            src = level_source_index(n0, n)
            # footprint of pixel j in level-0 pixels: [floor(j n0 / n), ceil((j + 1) n0 / n))
            assert ((j * n0 // n <= src) & (src < -(-(j + 1) * n0 // n))).all()
        rows, cols = level_source_index(hh, h), level_source_index(ww, w)
        assert np.array_equal(level, labels[rows][:, cols])


@given(st.integers(1, 500), st.integers(1, 500))
@settings(deadline=None, max_examples=200)
def test_level_source_index_is_the_nearest_rule_exactly(n0, n):
    # floor((j + 0.5) * n0 / n) in exact rationals: the nearest rule at the level pixel's centre.
    expect = [int((Fraction(2 * j + 1, 2) * Fraction(n0, n)).__floor__()) for j in range(n)]
    assert level_source_index(n0, n).tolist() == expect
    assert level_source_index(n0, n).dtype == np.int64


@given(st.integers(1, 20), st.integers(1, 20), st.integers(1, 5), st.integers(0, 2**32 - 1))
@settings(deadline=None, max_examples=50)
def test_integer_reduction_is_the_block_centre(h, w, k, seed):
    # At factor k the level is Y[k//2::k]; for 2x, the lower-right pixel of each 2 x 2 block.
    labels = np.random.default_rng(seed).integers(0, 9, (h * k, w * k))
    assert np.array_equal(reduce_nearest(labels, (h, w)), labels[k // 2 :: k, k // 2 :: k])
    assert np.array_equal(reduce_nearest(labels, labels.shape), labels)
    if k == 2:
        assert np.array_equal(reduce_nearest(labels, (h, w)), labels[1::2, 1::2])


def test_level_source_index_refuses_empty_sizes():
    with pytest.raises(ValueError):
        level_source_index(0, 1)
    with pytest.raises(ValueError):
        level_source_index(5, 0)
