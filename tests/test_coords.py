"""The coordinate convention of wsiseg.sampling.coords."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsiseg.sampling.coords import nearest_index, normalised_nearest_index, to_pixels, to_torch_grid, uniform_grid


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
