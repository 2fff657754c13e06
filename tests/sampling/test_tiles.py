"""The reverse tiler's fast paths equal the exact ones: block-wise index maps and label counts."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wsiseg.sampling.grid import density_to_grid
from wsiseg.sampling.tiles import RegionPrediction, coarse_inverse, label_counts


def _region(seed: int, linear: bool = False) -> RegionPrediction:
    """A region on a random deformed grid, with random labels (and scores for linear read-back)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    h, w = (int(v) for v in rng.integers(2, 25, 2))
    grid = density_to_grid((torch.rand(1, 1, 8, 8) ** 3 + 0.05).double(), 1.5, 5, out_size=(h, w))
    bw, bh = (int(v) for v in rng.integers(5, 600, 2))
    box = (int(rng.integers(0, 100)), int(rng.integers(0, 100)), bw, bh)
    scores = rng.random((3, h, w)).astype(np.float32)
    values = np.array([0, 2, 5], np.uint8)
    labels = values[scores.argmax(0)]
    if linear:
        return RegionPrediction(box, labels, coarse_inverse(grid, (bh, bw)), scores, values)
    return RegionPrediction(box, labels, coarse_inverse(grid, (bh, bw)))


@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 9),
    st.integers(1, 60),
    st.integers(1, 60),
    st.sampled_from(["nearest", "linear"]),
)
@settings(deadline=None, max_examples=60)
def test_index_blocks_is_index_at_bit_for_bit(seed, b, nx, ny, mode):
    # Block-wise evaluation (first pass only under each block) must give the very floats of the
    # separable evaluation over the whole grid, hence the same labels: the tiler's pixels read
    # one by one go through it. Positions may lie past the box (the map is extended there), may
    # repeat, and blocks may overhang the grid's end (those points read the last one again).
    reg = _region(seed, linear=mode == "linear")
    rng = np.random.default_rng(seed + 1)
    x, y, bw, bh = reg.box
    xs = np.sort(rng.uniform(x - 20, x + bw + 20, nx))
    ys = np.sort(rng.uniform(y - 20, y + bh + 20, ny))
    xs[rng.random(nx) < 0.2] = xs[0]  # ties: xs stays non-decreasing
    xs.sort()
    n = int(rng.integers(1, 30))
    bi = rng.integers(0, -(-ny // b), n)
    bj = rng.integers(0, -(-nx // b), n)
    r, c = reg.index_at(xs, ys)
    rb, cb, rows, cols = reg.index_blocks(xs, ys, bi, bj, b)
    assert rows.shape == cols.shape == (b, n)
    assert np.array_equal(rows, np.minimum(bi * b + np.arange(b)[:, None], ny - 1))
    assert np.array_equal(cols, np.minimum(bj * b + np.arange(b)[:, None], nx - 1))
    grid_rows, grid_cols = rows[:, None, :], cols[None]
    assert np.array_equal(rb, r[grid_rows, grid_cols])
    assert np.array_equal(cb, c[grid_rows, grid_cols])
    labels, _, _ = reg.read_blocks(xs, ys, bi, bj, b, mode)
    assert np.array_equal(labels, reg.read(xs, ys, mode)[grid_rows, grid_cols])


@given(st.integers(0, 2**31 - 1), st.integers(0, 255), st.integers(0, 300), st.booleans())
@settings(deadline=None, max_examples=60)
def test_label_counts_is_bincount(seed, top, size, strided):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, top + 1, (size, 7)).astype(np.uint8)
    if strided:
        a = a[:, ::2]
    assert np.array_equal(label_counts(a), np.bincount(a.ravel(), minlength=256))
    assert label_counts(a).dtype == np.int64
    assert np.array_equal(label_counts(top, size), np.bincount(np.full(size, top), minlength=256))
