"""Edge-loss target (paper eq. 4, footnote 4) and the fixed densities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsiseg.sampling.coords import uniform_grid
from wsiseg.sampling.edges import IGNORE_INDEX, blur, edge_density, edge_target, uniform_density, weight_glass
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
    ids = torch.tensor([17, 2, 254, 4, 9])  # an arbitrary relabelling (255 is the ignore value)
    a, b = edge_target(y), edge_target(ids[y])
    assert torch.allclose(a, b, atol=1e-6)
    assert (a >= 0).all() and torch.isfinite(a).all()


# -- ignored / padded pixels -------------------------------------------------


def _labels(seed, b, h, w, k):
    gen = torch.Generator().manual_seed(seed)
    # blocky maps (upsampled noise) have runs of constant label like real ones
    coarse = torch.randint(0, k, (b, (h + 2) // 3, (w + 2) // 3), generator=gen)
    return coarse.repeat_interleave(3, 1).repeat_interleave(3, 2)[:, :h, :w]


#: Strategies of a random blocky label batch: seed, height, width, classes.
MAPS = dict(seed=st.integers(0, 2**31 - 1), h=st.integers(1, 12), w=st.integers(1, 12), k=st.integers(1, 4))


@FAST
@given(**MAPS, pad=st.tuples(*[st.integers(0, 6)] * 4))
def test_edge_target_ignore_padding_leaves_inside_unchanged(seed, h, w, k, pad):
    """Region padding (label 255) never changes the target on the labelled area."""
    y = _labels(seed, 2, h, w, k)
    top, bottom, left, right = pad
    padded = torch.nn.functional.pad(y, (left, right, top, bottom), value=IGNORE_INDEX)
    ref, out = edge_target(y), edge_target(padded)
    assert torch.equal(out[..., top : top + h, left : left + w], ref)
    outside = padded.unsqueeze(1) == IGNORE_INDEX
    assert (out[outside] == 0).all()
    d_ref, d = edge_density(y, 1.5), edge_density(padded, 1.5)
    inside = d[..., top : top + h, left : left + w]
    # the oracle density inside is the unpadded one up to scale; the padding gets the floor only
    assert torch.allclose(inside / inside.sum(dim=(1, 2, 3), keepdim=True), d_ref, atol=1e-6)
    assert torch.allclose(d[outside], d.amin(dim=(1, 2, 3), keepdim=True).expand_as(d)[outside])


@FAST
@given(**MAPS, frac=st.floats(0.0, 1.0))
def test_edge_target_zero_and_finite_on_ignored_pixels(seed, h, w, k, frac):
    y = _labels(seed, 3, h, w, k)
    gen = torch.Generator().manual_seed(seed + 1)
    y[_labels(seed + 1, 3, h, w, 2).bool() & (torch.rand(3, h, w, generator=gen) < frac)] = IGNORE_INDEX
    y[2] = IGNORE_INDEX  # one sample without any label
    t = edge_target(y)
    assert torch.isfinite(t).all() and (t >= 0).all()
    assert (t[(y == IGNORE_INDEX).unsqueeze(1)] == 0).all()
    assert torch.equal(t[2], torch.zeros(1, h, w))
    d = edge_density(y, 1.0)
    assert torch.isfinite(d).all() and (d > 0).all()
    assert torch.allclose(d.sum(dim=(1, 2, 3)), torch.ones(3))
    assert torch.allclose(d[2], torch.full((1, h, w), 1 / (h * w)))  # nothing labelled: uniform


def test_class_ignore_boundary_is_no_edge():
    y = torch.zeros(2, 10, 12, dtype=torch.long)
    y[:, :, 6:] = IGNORE_INDEX  # class 0 | ignore: no edge
    y[1, 2:5, 1:3] = 1  # a real boundary in sample 1
    t = edge_target(y)
    assert torch.equal(t[0], torch.zeros(1, 10, 12))
    assert t[1].max() > 0 and (t[1, :, :, 6:] == 0).all()
    # the ignore value counted as a class (the old behaviour) would have made an edge there
    assert edge_target(y, ignore_index=None)[0].max() > 0
    d = edge_density(y, 1.0)
    assert torch.allclose(d[0], torch.full((1, 10, 12), 1 / 120))
    # an explicit mask wins over the ignore value
    valid = torch.ones(2, 10, 12, dtype=torch.bool)
    assert torch.equal(edge_target(y, valid=valid), edge_target(y, ignore_index=None))


def test_edge_across_a_thin_ignore_gap_survives():
    """Annotations often leave an unlabelled line between classes: still an edge."""
    y = torch.zeros(1, 8, 16, dtype=torch.long)
    y[..., 8:] = 1
    gapped = y.clone()
    gapped[..., 7:9] = IGNORE_INDEX
    t = edge_target(gapped)
    assert t[..., 6].min() > 0.1 and t[..., 9].min() > 0.1
    assert (t[..., 7:9] == 0).all()


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


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    hd=st.integers(1, 12),
    wd=st.integers(1, 12),
    weight=st.floats(1e-3, 1.0),
)
def test_weight_glass_moves_mass_off_glass_by_the_weight(seed, hd, wd, weight):
    """The glass share of the mass is w G / (w G + T); the shape within glass and within tissue is kept."""
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(2, 1, hd, wd, generator=g, dtype=torch.float64) + 1e-3
    glass = torch.rand(2, hd, wd, generator=g) < 0.5
    out = weight_glass(d, glass, weight)
    assert out.shape == d.shape and torch.allclose(out.sum(dim=(1, 2, 3)), torch.ones(2, dtype=torch.float64))
    p = d / d.sum(dim=(1, 2, 3), keepdim=True)
    for b in range(2):
        gm = float(p[b, 0][glass[b]].sum())
        want = weight * gm / (weight * gm + (1 - gm))
        assert float(out[b, 0][glass[b]].sum()) == pytest.approx(want, abs=1e-9)
        if gm < 1.0 and gm > 0.0:  # proportional inside each part
            t = ~glass[b]
            assert torch.allclose(out[b, 0][t] / out[b, 0][t].sum(), p[b, 0][t] / p[b, 0][t].sum())
    # weight 1, or a map all glass or all tissue: the normalised density, unchanged
    assert torch.allclose(weight_glass(d, glass, 1.0), p)
    assert torch.allclose(weight_glass(d, torch.ones_like(glass), weight), p)
    assert torch.allclose(weight_glass(d, torch.zeros_like(glass), weight), p)


def test_weight_glass_refuses_bad_weights_and_shapes():
    d, glass = uniform_density(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool)
    for bad in (0.0, -0.5, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"glass weight must be in \(0, 1\]"):
            weight_glass(d, glass, bad)
    with pytest.raises(ValueError, match="glass"):
        weight_glass(d, glass[:, :3], 0.5)
