"""Edge-loss target (paper eq. 4, footnote 4) and the fixed densities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsiseg.sampling.coords import uniform_grid
from wsiseg.sampling.edges import blur, edge_density, edge_target, uniform_density
from wsiseg.sampling.grid import density_to_grid

FAST = settings(deadline=None, max_examples=50)


def test_edge_target_step_by_hand():
    """Vertical step between columns 7 and 8 of a 5 x 16 map, classes 0 | 1."""
    y = torch.zeros(1, 5, 16, dtype=torch.long)
    y[..., 8:] = 1
    out = edge_target(y, dtype=torch.float64)
    assert out.shape == (1, 1, 5, 16)

    # Blur (sigma 1, taps t = -3..3, normalised) of the class-1 indicator s along a
    # row, borders replicated: b[c] = sum_t g[t] * s[clamp(c + t)].
    g = [math.exp(-(t * t) / 2.0) for t in range(-3, 4)]
    g = [v / sum(g) for v in g]
    s = [0.0] * 8 + [1.0] * 8
    b = [sum(g[t + 3] * s[min(max(c + t, 0), 15)] for t in range(-3, 4)) for c in range(16)]
    # Rows are identical, so the 8-neighbour filter reduces to
    # 8 b[c] - 3 b[c-1] - 3 b[c+1] - 2 b[c] = 6 b[c] - 3 (b[c-1] + b[c+1]).
    bp = [b[0]] + b + [b[-1]]
    resp = [abs(6 * bp[c + 1] - 3 * (bp[c] + bp[c + 2])) for c in range(16)]
    # Class 0's indicator is 1 - s: the same magnitude; summed and halved -> resp.
    expect = torch.tensor(resp, dtype=torch.float64).expand(5, 16)
    assert torch.allclose(out[0, 0], expect, atol=1e-12)
    # a few values written out: zero far from the edge, symmetric, both sides
    assert torch.all(out[0, 0, :, :4] == 0) and torch.all(out[0, 0, :, 12:] == 0)
    assert torch.allclose(out[..., 7], out[..., 8]) and torch.allclose(out[..., 6], out[..., 9])
    assert out[0, 0, 0, 7] > 0.4 and out[0, 0, 0, 6] > out[0, 0, 0, 7]  # LoG peaks one pixel out


@pytest.mark.parametrize("value", [0, 3, 255, -1])
def test_edge_target_constant_label_is_exactly_zero(value):
    y = torch.full((3, 7, 9), value, dtype=torch.long)
    out = edge_target(y)
    assert torch.equal(out, torch.zeros(3, 1, 7, 9))


def test_edge_target_per_sample_single_class_is_zero():
    y = torch.zeros(2, 10, 10, dtype=torch.long)
    y[1, :, 5:] = 2  # sample 1 has an edge, sample 0 none; class 2 absent from sample 0
    out = edge_target(y)
    assert torch.equal(out[0], torch.zeros(1, 10, 10))
    assert out[1].max() > 0
    assert not torch.isnan(out).any()


@FAST
@given(seed=st.integers(0, 2**31 - 1), h=st.integers(1, 12), w=st.integers(1, 12), k=st.integers(1, 5))
def test_edge_target_ignores_label_ids(seed, h, w, k):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (2, h, w), generator=gen)
    ids = torch.tensor([17, 2, 255, 4, 9])  # an arbitrary relabelling
    a, b = edge_target(y), edge_target(ids[y])
    assert torch.allclose(a, b, atol=1e-6)
    assert (a >= 0).all() and torch.isfinite(a).all()


def test_edge_target_two_classes_equals_binary_map_filter():
    gen = torch.Generator().manual_seed(3)
    y = (torch.rand(1, 12, 12, generator=gen) > 0.5).long()
    out = edge_target(y, dtype=torch.float64)
    # filter of the blurred {0, 1} mask itself via a plain conv with replicate padding
    kern = -torch.ones(1, 1, 3, 3, dtype=torch.float64)
    kern[0, 0, 1, 1] = 8
    bl = blur(y[:, None].double(), 1.0)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(bl, (1, 1, 1, 1), mode="replicate"), kern).abs()
    assert torch.allclose(out, ref, atol=1e-12)


def test_blur_constant_is_bitwise_constant():
    x = torch.full((1, 2, 9, 13), 0.3)
    assert torch.equal(blur(x, 1.7), torch.full_like(x, blur(x, 1.7)[0, 0, 0, 0].item()))
    with pytest.raises(ValueError):
        blur(x, 0.0)


def test_edge_density_properties():
    y = torch.zeros(2, 20, 20, dtype=torch.long)
    y[1, :, 10:] = 1
    d = edge_density(y, radius=2.0)
    assert d.shape == (2, 1, 20, 20)
    assert (d > 0).all()
    assert torch.allclose(d.sum(dim=(1, 2, 3)), torch.ones(2))
    assert torch.allclose(d[0], torch.full((1, 20, 20), 1 / 400))  # single class: uniform
    row = d[1, 0, 5]
    assert row[9] == row.max() and row[10] == row.max()  # densest at the boundary
    assert row[0] < row[5] < row[9]
    # the uniform part gives the uniform grid; the edge part attracts samples
    g = density_to_grid(d, 3.0)
    assert torch.allclose(g[0], uniform_grid(20, 20), atol=1e-6)
    centre = g[1, 5, :, 0]
    assert (centre - 0.5).abs().mean() < (uniform_grid(20, 20)[5, :, 0] - 0.5).abs().mean()
    with pytest.raises(ValueError):
        edge_density(y, 1.0, floor=0.0)


def test_uniform_density():
    d = uniform_density(3, 4, 5, dtype=torch.float64)
    assert d.shape == (3, 1, 4, 5)
    assert np.allclose(d.sum(dim=(1, 2, 3)).numpy(), 1.0)
    assert torch.allclose(density_to_grid(d, 2.0), uniform_grid(4, 5, dtype=torch.float64)[None], atol=1e-12)
