"""Forward sampling (images, labels) and reverse sampling (inverse map, read-back)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from wsiseg.metrics import ConfusionMatrix, upsampling_error
from wsiseg.sampling.coords import uniform_grid
from wsiseg.sampling.edges import edge_density
from wsiseg.sampling.grid import density_to_grid
from wsiseg.sampling.reverse import (
    _augment,
    _newton_inverse,
    _scan_inverse,
    folded_cells,
    grid_at_index,
    inverse_map,
    lookup_linear,
    lookup_nearest,
    reverse_sample,
)
from wsiseg.sampling.sample import downsample_labels, sample_image, sample_labels

FAST = settings(deadline=None, max_examples=50)
F64 = torch.float64
seeds = st.integers(0, 2**31 - 1)


def random_grid(seed: int, h: int, w: int, sigma: float, contrast: float, dtype=F64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    d = torch.exp(contrast * torch.randn(1, 1, h, w, generator=gen, dtype=F64))
    return density_to_grid(d, sigma).to(dtype)


def folds(grid: torch.Tensor) -> int:
    """Number of grid cells that are not strictly convex with one orientation."""

    def cross(u, v):
        return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]

    a, b, c, d = grid[:, :-1, :-1], grid[:, :-1, 1:], grid[:, 1:, 1:], grid[:, 1:, :-1]
    cr = torch.stack([cross(b - a, c - b), cross(c - b, d - c), cross(d - c, a - d), cross(a - d, b - a)])
    return int((cr <= 0).sum())


# ---------------------------------------------------------------- forward


def test_sample_image_identity_and_integer_factor():
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 8, 12, generator=gen, dtype=F64)
    out = sample_image(img, uniform_grid(8, 12, dtype=F64)[None])
    assert torch.allclose(out, img, atol=1e-12)
    # factor 2: centres fall on pixel corners -> mean of the 2x2 block
    out2 = sample_image(img, uniform_grid(4, 6, dtype=F64))
    blocks = img.reshape(2, 3, 4, 2, 6, 2).mean(dim=(3, 5))
    assert torch.allclose(out2, blocks, atol=1e-12)
    with pytest.raises(TypeError):
        sample_image(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), uniform_grid(2, 2))


@FAST
@given(seed=seeds, h=st.integers(1, 12), w=st.integers(1, 12), oh=st.integers(1, 10), ow=st.integers(1, 10))
def test_sampled_labels_only_take_values_present(seed, h, w, oh, ow):
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor([3, 7, 250, 11])
    y = values[torch.randint(0, 4, (2, h, w), generator=gen)]
    g = torch.rand(2, oh, ow, 2, generator=gen) * 1.2 - 0.1  # also outside [0, 1]: clamped reads
    out = sample_labels(y, g)
    assert out.shape == (2, oh, ow) and out.dtype == y.dtype
    for b in range(2):
        assert set(out[b].unique().tolist()) <= set(y[b].unique().tolist())


@FAST
@given(seed=seeds, h=st.integers(1, 7), w=st.integers(1, 7), k=st.integers(1, 7))
def test_uniform_sampling_at_integer_factor_is_block_centre(seed, h, w, k):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 9, (2, h * k, w * k), generator=gen)
    expect = y[:, k // 2 :: k, k // 2 :: k]
    for dtype in (torch.float32, F64):
        assert torch.equal(sample_labels(y, uniform_grid(h, w, dtype=dtype)), expect)
    assert torch.equal(downsample_labels(y, (h, w)), expect)


@FAST
@given(seed=seeds, hh=st.integers(1, 60), ww=st.integers(1, 60), h=st.integers(1, 60), w=st.integers(1, 60))
def test_downsample_labels_any_size(seed, hh, ww, h, w):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 100, (1, hh, ww), generator=gen)
    rows = np.minimum((2 * np.arange(h) + 1) * hh // (2 * h), hh - 1)
    cols = np.minimum((2 * np.arange(w) + 1) * ww // (2 * w), ww - 1)
    expect = y[0].numpy()[np.ix_(rows, cols)]
    assert np.array_equal(downsample_labels(y, (h, w))[0].numpy(), expect)


def test_sample_labels_broadcast_and_errors():
    y = torch.arange(16).reshape(1, 4, 4).repeat(3, 1, 1)
    assert sample_labels(y, uniform_grid(2, 2)).shape == (3, 2, 2)
    with pytest.raises(ValueError):
        sample_labels(y[0], uniform_grid(2, 2))
    with pytest.raises(ValueError):
        sample_labels(y, uniform_grid(2, 2)[None].expand(2, -1, -1, -1))


# ---------------------------------------------------------------- reverse: uniform


@FAST
@given(seed=seeds, h=st.integers(1, 8), w=st.integers(1, 8), k=st.integers(1, 7), f32=st.booleans())
def test_forward_then_reverse_uniform_is_nearest_down_up(seed, h, w, k, f32):
    dtype = torch.float32 if f32 else F64
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (2, h * k, w * k), generator=gen)
    g = uniform_grid(h, w, dtype=dtype)[None].expand(2, -1, -1, -1)
    low = sample_labels(y, g)
    assert torch.equal(low, y[:, k // 2 :: k, k // 2 :: k])
    up = reverse_sample(low, g, (h * k, w * k))
    assert torch.equal(up, torch.from_numpy(np.repeat(np.repeat(low.numpy(), k, axis=1), k, axis=2)))
    # block-constant labels aligned to k survive exactly: mIoU 1
    blocks = torch.randint(0, 5, (2, h, w), generator=gen).repeat_interleave(k, 1).repeat_interleave(k, 2)
    assert upsampling_error(blocks, g) == 1.0
    cm = ConfusionMatrix(5)
    cm.update(reverse_sample(sample_labels(blocks, g), g, (h * k, w * k)), blocks)
    assert cm.miou() == 1.0 and cm.pixel_accuracy() == 1.0


@FAST
@given(h=st.integers(1, 20), w=st.integers(1, 20), hh=st.integers(1, 70), ww=st.integers(1, 70), f32=st.booleans())
def test_inverse_map_of_uniform_grid_is_the_convention(h, w, hh, ww, f32):
    dtype = torch.float32 if f32 else F64
    idx = inverse_map(uniform_grid(h, w, dtype=dtype), (hh, ww))
    rows = (torch.arange(hh, dtype=F64) + 0.5) * h / hh - 0.5
    cols = (torch.arange(ww, dtype=F64) + 0.5) * w / ww - 0.5
    atol = 1e-4 if f32 else 1e-9
    assert idx.shape == (1, hh, ww, 2) and idx.dtype == dtype
    assert torch.allclose(idx[0, :, :, 0].double(), rows[:, None].expand(hh, ww), atol=atol)
    assert torch.allclose(idx[0, :, :, 1].double(), cols[None, :].expand(hh, ww), atol=atol)


def test_inverse_map_region_is_a_window_of_the_full_map():
    g = random_grid(5, 9, 11, 2.0, 1.5)
    full = inverse_map(g, (90, 70))
    part = inverse_map(g, (90, 70), region=(13, 20, 31, 17))
    assert torch.allclose(part, full[:, 13:44, 20:37], atol=1e-9)


# ---------------------------------------------------------------- reverse: deformed


def mirrored_ring(grid: np.ndarray) -> np.ndarray:
    """The documented virtual ring: outer nodes mirrored across the region's edges."""
    x, y = grid[..., 0], grid[..., 1]
    x = np.concatenate([-x[:, :1], x, 2 - x[:, -1:]], axis=1)
    y = np.concatenate([y[:, :1], y, y[:, -1:]], axis=1)
    x = np.concatenate([x[:1], x, x[-1:]], axis=0)
    y = np.concatenate([-y[:1], y, 2 - y[-1:]], axis=0)
    return np.stack([x, y], axis=-1)


def brute_force_inverse(grid: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exhaustive search: invert every cell's bilinear map in closed form, keep the cell that contains the query.

    Independent of the Newton solver. Cell ``(i, j)`` maps local ``(a, b)`` in
    ``[0, 1]^2`` to ``p00 + b e + a v + a b f``; eliminating ``a`` gives a
    quadratic in ``b``. Returns fractional ``(row, col)`` indices (``nan``
    where no cell contains the query).
    """

    def cross(u, v):
        return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]

    g = mirrored_ring(grid)
    p00, p01, p10, p11 = g[:-1, :-1], g[:-1, 1:], g[1:, :-1], g[1:, 1:]
    e, v, f = p01 - p00, p10 - p00, p11 - p10 - p01 + p00
    ii, jj = np.meshgrid(np.arange(g.shape[0] - 1), np.arange(g.shape[1] - 1), indexing="ij")
    e, v, f, p00, ii, jj = (t.reshape(-1, *t.shape[2:]) for t in (e, v, f, p00, ii, jj))
    q = queries.reshape(-1, 1, 2) - p00[None]  # (N, M, 2)
    qa, qb, qc = -cross(e, f)[None], cross(q, f) - cross(e, v)[None], cross(q, v)
    out = np.full((q.shape[0], 2), np.nan)
    tol = 1e-9
    with np.errstate(divide="ignore", invalid="ignore"):
        disc = np.sqrt(np.maximum(qb * qb - 4 * qa * qc, 0))
        # the cancellation-free form: near-affine cells (qa ~ 0) keep their root in qc / qq
        qq = -0.5 * (qb + np.copysign(disc, qb))
        roots = [qq / qa, qc / qq]
        for bb in roots:
            dvec = v[None] + bb[..., None] * f[None]
            aa = ((q - bb[..., None] * e[None]) * dvec).sum(-1) / (dvec * dvec).sum(-1)
            ok = (aa >= -tol) & (aa <= 1 + tol) & (bb >= -tol) & (bb <= 1 + tol)
            ok &= np.abs(q - bb[..., None] * e[None] - aa[..., None] * dvec).max(-1) < 1e-9
            n, m = np.nonzero(ok)
            out[n, 0] = ii[m] + aa[n, m] - 1  # the ring shifts indices by one
            out[n, 1] = jj[m] + bb[n, m] - 1
    return out.reshape(*queries.shape[:-1], 2)


@settings(deadline=None, max_examples=40)
@given(
    seed=seeds,
    h=st.integers(1, 8),
    w=st.integers(1, 8),
    sigma=st.floats(1.0, 3.0),
    contrast=st.floats(0.0, 2.5),
    oh=st.integers(1, 30),
    ow=st.integers(1, 30),
)
def test_reverse_on_deformed_grid_matches_brute_force(seed, h, w, sigma, contrast, oh, ow):
    grid = random_grid(seed, h, w, sigma, contrast)
    assume(folds(torch.from_numpy(mirrored_ring(grid[0].numpy()))[None]) == 0)
    idx = inverse_map(grid, (oh, ow))[0]
    queries = uniform_grid(oh, ow, dtype=F64)
    # 1. the solution maps back onto the query (residual in cell units)
    back = grid_at_index(grid, idx[None])[0]
    assert ((back - queries) * torch.tensor([w, h], dtype=F64)).abs().max() < 1e-6
    # 2. it is the cell-by-cell closed-form inverse
    brute = torch.from_numpy(brute_force_inverse(grid[0].numpy(), queries.numpy()))
    assert not torch.isnan(brute).any()
    assert torch.allclose(idx, brute, atol=1e-6)
    # 3. nearest read-back = the node nearest to the brute-force index (away from ties)
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, 1000, (1, h, w), generator=gen)
    got = lookup_nearest(pred, idx[None])[0]
    ib = torch.floor(brute + 0.5).long()
    want = pred[0, ib[..., 0].clamp(0, h - 1), ib[..., 1].clamp(0, w - 1)]
    clear = ((brute - torch.floor(brute) - 0.5).abs() > 1e-6).all(dim=-1)
    assert torch.equal(got[clear], want[clear])
    # 4. without folds every centre lies in a cell, whose closed form gives it; Newton's method
    # (still used near folded cells) solves the same equation to its tolerance
    g, window = _augment(grid), (0, 0, oh, ow)
    assert _scan_inverse(g.numpy(), (oh, ow), window, 1e-9, 1 << 20)[1].all()
    newton = _newton_inverse(g, (oh, ow), window, torch.arange(oh * ow), 30, 1e-9, 1 << 20) - 1.0
    assert torch.allclose(idx, newton.reshape(oh, ow, 2), atol=1e-6)


def test_inverse_map_handles_clamped_border_nodes():
    """A density spike at the border clamps several nodes onto the edge (collapsed cells)."""
    d = torch.ones(1, 1, 16, 16, dtype=F64)
    d[..., 0, :] = 200.0
    d[..., :, -1] = 200.0
    grid = density_to_grid(d, 3.0, border="replicate")  # the rule of older models: nodes pulled past the edge
    assert (grid[..., 1] == 0).sum() >= 16  # nodes collapsed on the top edge
    idx = inverse_map(grid, (64, 64))
    back = grid_at_index(grid, idx)
    assert torch.isfinite(idx).all()
    err = ((back - uniform_grid(64, 64, dtype=F64)) * 16).abs().amax(-1)
    assert err.max() < 1e-6


def test_lookup_linear_and_modes():
    g = uniform_grid(4, 5)[None]
    labels = torch.randint(0, 3, (1, 4, 5), generator=torch.Generator().manual_seed(1))
    probs = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    idx = inverse_map(g, (4, 5))
    assert torch.allclose(lookup_linear(probs, idx), probs, atol=1e-5)
    up = reverse_sample(probs, g, (12, 15), mode="linear")
    assert up.shape == (1, 12, 15)
    # block centres (k = 3, odd) sit exactly on nodes
    assert torch.equal(up[:, 1::3, 1::3], labels)
    assert torch.equal(reverse_sample(probs, g, (12, 15)), reverse_sample(labels, g, (12, 15)))
    with pytest.raises(ValueError):
        reverse_sample(labels, g, (12, 15), mode="linear")
    with pytest.raises(ValueError):
        reverse_sample(labels, g, (12, 15), mode="cubic")


def test_inverse_map_degenerate_grid_sizes():
    for h, w in [(1, 1), (1, 6), (5, 1)]:
        idx = inverse_map(uniform_grid(h, w), (3 * h, 2 * w))
        rows = (torch.arange(3 * h) + 0.5) / 3 - 0.5
        cols = (torch.arange(2 * w) + 0.5) / 2 - 0.5
        assert torch.allclose(idx[0, :, 0, 0], rows, atol=1e-5)
        assert torch.allclose(idx[0, 0, :, 1], cols, atol=1e-5)


def test_large_output_stays_exact():
    grid = random_grid(7, 12, 10, 2.0, 1.0)
    idx = inverse_map(grid, (300, 257))  # many output pixels per cell
    back = grid_at_index(grid, idx)
    err = ((back - uniform_grid(300, 257, dtype=F64)) * torch.tensor([10, 12])).abs().max()
    assert err < 1e-6
    small = inverse_map(grid, (300, 257), region=(100, 100, 20, 20))  # a window of it
    assert torch.allclose(small, idx[:, 100:120, 100:120], atol=1e-6)


def folded_grid(h: int = 6, w: int = 7) -> torch.Tensor:
    """A uniform grid with one node pushed past its right-hand neighbour: its cells fold."""
    g = uniform_grid(h, w, dtype=F64).clone()
    g[2, 3, 0] = g[2, 4, 0] + 0.3 / w
    return g[None]


def test_folded_cells_counts_cells_that_cross():
    assert folded_cells(uniform_grid(5, 9)[None]) == 0
    # the node pushed past its neighbour turns the two cells on its right over (and none elsewhere)
    assert folded_cells(folded_grid()) == 2
    assert folded_cells(torch.cat([folded_grid(), folded_grid()])) == 4  # summed over the batch
    # level-0 points of a region (numpy, any positive scale and shift) fold where the normalised grid does
    assert folded_cells(folded_grid().numpy() * [4000.0, 3000.0] + [123.0, 45.0]) == 2
    with pytest.raises(ValueError, match="grid must be"):
        folded_cells(uniform_grid(3, 3))


@FAST
@given(seed=seeds, sigma=st.floats(0.5, 3.0), contrast=st.floats(0.0, 4.0))
def test_folded_cells_only_where_cells_are_not_convex(seed, sigma, contrast):
    g = random_grid(seed, 9, 11, sigma, contrast)
    # a folded cell has a corner turning the wrong way; the stricter count above also counts flat corners
    assert folded_cells(g) <= folds(g)


@pytest.mark.parametrize("size", [(30, 35), (200, 180)])  # the larger one: Newton from a coarse raster
def test_folded_cells_keep_the_newton_solution(size):
    # Folded cells overlap others: a pixel centre they may cover can have several preimages, so it
    # gets Newton's best effort, as before. Every other centre has one, the closed form's. An
    # unfolded grid in the same batch is not affected.
    oh, ow = size
    grid = folded_grid()
    ring = mirrored_ring(grid[0].numpy())
    assert folds(torch.from_numpy(ring)[None]) > 0
    g = _augment(grid)
    _, claimed = _scan_inverse(g.numpy(), size, (0, 0, oh, ow), 1e-9, 1 << 20)
    claimed = claimed.reshape(oh, ow)
    near_fold = np.zeros(size, bool)
    px = ring * [ow, oh] - 0.5  # pixel (i, j) has its centre at (j, i)
    for i in range(ring.shape[0] - 1):
        for j in range(ring.shape[1] - 1):
            if folds(torch.from_numpy(ring[i : i + 2, j : j + 2])[None]):
                c = px[i : i + 2, j : j + 2].reshape(-1, 2)
                lo, hi = np.ceil(c.min(0)).astype(int), np.floor(c.max(0)).astype(int)
                near_fold[max(lo[1], 0) : hi[1] + 1, max(lo[0], 0) : hi[0] + 1] = True
    assert near_fold.any() and not claimed[near_fold].any()
    assert claimed.mean() > 0.8  # the rest of the map is solved in closed form
    rc = _newton_inverse(g, size, (0, 0, oh, ow), torch.arange(oh * ow), 30, 1e-9, 1 << 20) - 1.0
    newton = torch.stack([rc[:, 0].clamp(-0.5, 5.5), rc[:, 1].clamp(-0.5, 6.5)], dim=-1).reshape(oh, ow, 2)
    smooth = random_grid(2, 6, 7, 2.0, 1.0)
    both = inverse_map(torch.cat([grid, smooth]), size)
    unclaimed = torch.from_numpy(~claimed)
    assert torch.equal(both[0][unclaimed], newton[unclaimed])
    assert torch.allclose(both[0], newton, atol=1e-9)
    assert torch.equal(both[1:], inverse_map(smooth, size))


def test_inverse_map_chunks_change_nothing():
    # Candidates are processed in chunks that split cells; centres on shared cell edges
    # (a uniform grid at an odd factor has them) go to the same cell whatever the chunk.
    grids = torch.cat([random_grid(5, 9, 11, 2.0, 1.5), uniform_grid(9, 11, dtype=F64)[None]])
    full = inverse_map(grids, (90, 77))
    for chunk in (13, 101):
        assert torch.equal(inverse_map(grids, (90, 77), chunk=chunk), full)
    assert torch.equal(inverse_map(grids[1:], (90, 77)), full[1:])


# ---------------------------------------------------------------- real labels (BCSS)


@pytest.fixture(scope="module")
def bcss_labels(shared_data):
    from PIL import Image

    paths = sorted((shared_data / "annotations").glob("*mag-BASE.png"))
    if not paths:
        pytest.skip("BCSS label map not found in shared data")
    Image.MAX_IMAGE_PIXELS = None
    y = torch.from_numpy(np.asarray(Image.open(paths[0])).astype(np.int64))[None]
    return downsample_labels(y, (574, 568))  # 1/8 of 4594 x 4542, for speed


def test_bcss_upsampling_error_uniform_and_edge(bcss_labels):
    y = bcss_labels
    uni = {n: upsampling_error(y, uniform_grid(n, n)[None]) for n in (32, 64, 128)}
    # lossy, and less so with more samples
    assert uni[32] < uni[64] < uni[128] < 1.0
    # edge-based sampler (paper A.5): density from the low-res label edges
    y_lr = downsample_labels(y, (64, 64))
    d = edge_density(y_lr, radius=1.0)
    edge = {n: upsampling_error(y, density_to_grid(d, 4.0, out_size=(n, n))) for n in (64, 128)}
    # measured: uniform 0.734 / 0.834, edge 0.753 / 0.869 (64 / 128 samples per side)
    assert edge[64] > uni[64]
    assert edge[128] > uni[128]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_reverse_runs_on_cuda():
    grid = random_grid(1, 8, 9, 2.0, 1.0, dtype=torch.float32)
    labels = torch.randint(0, 4, (1, 8, 9))
    cpu = reverse_sample(labels, grid, (40, 45))
    gpu = reverse_sample(labels.cuda(), grid.cuda(), (40, 45))
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() != cpu).float().mean() < 0.01  # float differences only at ties
    y = torch.randint(0, 4, (1, 40, 45)).cuda()
    assert torch.equal(sample_labels(y, grid.cuda()).cpu(), sample_labels(y.cpu(), grid))


def test_lod_sampling_matches_the_slide_gather_rule():
    """In-memory level-of-detail samples: level 0 where dense, the area-averaged level where sparse."""
    import torch.nn.functional as F

    from wsiseg.sampling.sample import grid_spacing, sample_image_lod

    torch.manual_seed(0)
    img = torch.rand(1, 3, 64, 64)
    dense = uniform_grid(64, 64)[None]  # spacing 1: level 0, identical to bilinear
    assert torch.allclose(sample_image_lod(img, dense), sample_image(img, dense))
    sparse = uniform_grid(8, 8)[None]  # spacing 8 -> level 3 (8 x 8 block means)
    assert torch.allclose(grid_spacing(sparse, 64, 64), torch.full((1, 8, 8), 8.0, dtype=torch.float64))
    want = F.avg_pool2d(img, 8)
    assert torch.allclose(sample_image_lod(img, sparse), want, atol=1e-6)
    # an aliased point sample differs from the block mean
    assert not torch.allclose(sample_image(img, sparse), want, atol=1e-3)
    # gradients reach the grid through the chosen level
    g = sparse.clone().requires_grad_(True)
    sample_image_lod(img, g).sum().backward()
    assert g.grad is not None and torch.isfinite(g.grad).all() and g.grad.abs().sum() > 0
