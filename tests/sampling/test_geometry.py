"""One sampling geometry for every path (wsiseg.sampling.geometry)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsiseg.sampling.geometry import GeometryRule, SamplingGeometry, default_support, region_geometry


def test_reference_shape_gets_the_model_geometry_exactly():
    rule = GeometryRule((64, 64), (32, 32), 4.0)
    assert region_geometry(512, 512, rule) == SamplingGeometry((64, 64), (32, 32), 4.0, 17)
    assert region_geometry(5000, 5000, rule).grid == (64, 64)


def test_long_thin_core_follows_dynamic_rule_and_kernel_fits_its_map():
    rule = GeometryRule((80, 80), (40, 40), 5.0)
    g = region_geometry(368 * 10, 7986 * 10, rule, long_side=800)
    assert g.grid == (36, 800) and g.map == (18, 400)
    # sigma relative to the map: 5 / 40 of the geometric mean side
    assert g.sigma == pytest.approx(5.0 / 40.0 * math.sqrt(18 * 400))
    assert g.support == default_support(g.sigma)
    # the biopsy: 229 x 7771 px with a 64/32 model -> 7 x 256 grid, 4 x 128 map
    g = region_geometry(229, 7771, GeometryRule((64, 64), (32, 32), 4.0))
    assert g.grid == (7, 256) and g.map == (4, 128)
    assert g.sigma < 4.0  # no longer the square model's 4 nodes on a 4-row map


def test_fixed_grid_and_small_regions():
    rule = GeometryRule((64, 64), (32, 32), 4.0)
    assert region_geometry(1000, 3000, rule, grid=(10, 30)).grid == (10, 30)
    g = region_geometry(20, 30, rule)  # never more samples than pixels
    assert g.grid[0] <= 20 and g.grid[1] <= 30
    with pytest.raises(ValueError):
        region_geometry(0, 10, rule)
    with pytest.raises(ValueError):
        region_geometry(10, 10, rule, grid=(0, 3))


def test_explicit_support_stays_fixed():
    rule = GeometryRule((64, 64), (32, 32), 4.0, support=9)
    assert region_geometry(100, 4000, rule).support == 9


@settings(deadline=None, max_examples=60)
@given(
    h=st.integers(1, 60000),
    w=st.integers(1, 60000),
    side=st.integers(8, 128),
    ratio=st.sampled_from([0.5, 1.0, 2.0]),
    sig=st.floats(0.5, 8.0),
)
def test_geometry_properties(h, w, side, ratio, sig):
    rule = GeometryRule((side, side), (max(4, round(side * ratio)),) * 2, sig)
    g = region_geometry(h, w, rule)
    assert 1 <= g.grid[0] <= h and 1 <= g.grid[1] <= w
    assert g.map[0] >= 4 and g.map[1] >= 4
    assert g.sigma > 0 and g.support % 2 == 1
    # the kernel is the same fraction of the map whatever the region's shape
    assert g.sigma / math.sqrt(g.map[0] * g.map[1]) == pytest.approx(rule.sigma_rel)
    # transposing the region transposes the geometry
    t = region_geometry(w, h, rule)
    assert t.grid == g.grid[::-1] and t.map == g.map[::-1] and t.sigma == pytest.approx(g.sigma)


def test_same_region_gets_the_same_grid_on_every_path(shared_data, tmp_path, monkeypatch):
    """Training (and validation), evaluate and segment sample one real region alike."""
    import numpy as np
    import torch
    from PIL import Image

    from wsiseg.training.dataset import _open_image
    from wsiseg.evaluation.scoring import evaluate_model
    from wsiseg.models.io import LoadedModel
    from wsiseg.models.net import DeformSegNet
    from wsiseg.output.classes import default_classes
    from wsiseg.segment import SegmentOptions, segment_region
    from wsiseg.training.config import TrainConfig, build_net
    from wsiseg.training.loop import train

    src = shared_data / "labelled-regions" / "bcss_mostly_tumor_large"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    # A real, non-square H&E region (4096 x 2048) and its tumour mask, saved at 1/8 as a slide-sized image.
    rgb = Image.open(src / "images" / "1015.jpg").convert("RGB").reduce(8)
    mask = (np.asarray(Image.open(src / "masks" / "1015.jpg").convert("L").reduce(8)) >= 128).astype(np.int64)
    image_path = tmp_path / "region.png"
    rgb.save(image_path)
    H, W = mask.shape  # 256 x 512
    tiny = {
        "arch": "unet",
        "encoder": "tu-resnet10t",
        "encoder_depth": 3,
        "decoder_channels": (32, 16, 8),
        "out_size": (16, 16),
        "map_size": (32, 32),
        "batch_size": 1,
        "flips": False,
        "device": "cpu",
        "epochs": 1,
        "patience": None,
        "grid_iterations": 3,
    }
    classes = default_classes(["other", "tumour"])

    seen: list = []
    original = DeformSegNet.grid

    def recording(self, d, geometry=None, prior=None):
        assert prior is None  # no glass weight on any path here
        g = original(self, d, geometry, prior)
        seen.append((geometry, tuple(d.shape[-2:]), g.detach().clone()))
        return g

    monkeypatch.setattr(DeformSegNet, "grid", recording)

    # training and validation, on the region at working resolution (half size here)
    work = torch.from_numpy(np.array(rgb.reduce(2))).permute(2, 0, 1).contiguous()
    work_labels = torch.from_numpy(mask[1::2, 1::2].copy())
    item = {"image": work, "labels": work_labels, "name": "r", "size": tuple(work_labels.shape)}
    train(TrainConfig(**tiny), [item], [item], classes, tmp_path / "run", progress=False)
    train_geo = [s[0] for s in seen]
    assert len(train_geo) == 2  # one training step, one validation pass

    # evaluate and segment with one net (uniform sampler: the grid is the geometry's alone)
    net = build_net(TrainConfig(**{**tiny, "sampler": "uniform"}), 2).eval()
    seen.clear()
    evaluate_model(net, [item], ["other", "tumour"], device="cpu")
    model = LoadedModel(net=net, classes=classes, metadata={}, path="", hash="")
    ms = _open_image(str(image_path), None)
    seg = segment_region(ms, (0, 0, W, H), model, SegmentOptions(), torch.device("cpu"))
    (eval_geo, eval_map, eval_grid), (seg_geo, seg_map, seg_grid) = seen
    assert train_geo[0] == train_geo[1] == eval_geo == seg_geo == net.geometry(H, W)
    assert train_geo[0].iterations == 3
    assert eval_geo.grid == (16, 32) and eval_map == seg_map == eval_geo.map
    assert torch.equal(eval_grid, seg_grid)
    assert seg.grid_size == seg_geo.grid and seg.map_size == seg_geo.map


# -- physical mode: a model's sample spacing in micrometres --------------------------------------------------


def test_physical_grid_is_extent_over_spacing():
    from wsiseg.sampling.geometry import PhysicalScale

    rule = GeometryRule((64, 64), (32, 32), 4.0)
    # The whole slide: 40k x 30k level-0 px at 0.5 um/px for a model that samples every 8 um.
    pixels = region_geometry(30000, 40000, rule)
    physical = region_geometry(30000, 40000, rule, physical=PhysicalScale(0.5, 8.0))
    assert pixels.grid == (64, 85)  # one sample per ~470 px, as before
    assert physical.grid == (1875, 2500)  # 15000 um / 8, 20000 um / 8
    # map at the model's map/grid ratio
    assert physical.map == (938, 1250)
    assert physical.sigma == rule.sigma  # map nodes keep the training spacing: the same physical kernel
    # anisotropic pixels: each axis by its own pixel size
    assert region_geometry(1000, 1000, rule, physical=PhysicalScale((0.5, 1.0), 10.0)).grid == (100, 50)
    # never more samples than pixels, never fewer than one
    assert region_geometry(300, 200, rule, physical=PhysicalScale(0.5, 0.1)).grid == (300, 200)
    assert region_geometry(3, 5, rule, physical=PhysicalScale(0.5, 100.0)).grid == (1, 1)
    # a fixed grid still wins
    assert region_geometry(3000, 4000, rule, grid=(10, 20), physical=PhysicalScale(0.5, 8.0)).grid == (10, 20)
    for bad in (0.0, -1.0, float("nan"), (0.5,), "x"):
        with pytest.raises(ValueError):
            PhysicalScale(bad, 8.0)
    with pytest.raises(ValueError):
        PhysicalScale(0.5, 0.0)


@given(
    h=st.integers(8, 5000),
    w=st.integers(8, 5000),
    scale=st.floats(0.25, 4.0),
    mpp=st.floats(0.1, 2.0),
    spacing=st.floats(1.0, 50.0),
)
@settings(max_examples=200, deadline=None)
def test_scale_samples_that_many_times_as_densely(h, w, scale, mpp, spacing):
    from wsiseg.sampling.geometry import PhysicalScale

    rule = GeometryRule((64, 64), (128, 128), 4.0)
    # scale 1 is the region's own geometry, bit for bit, in both modes
    assert region_geometry(h, w, rule, scale=1.0) == region_geometry(h, w, rule)
    phys = PhysicalScale(mpp, spacing)
    assert region_geometry(h, w, rule, physical=phys, scale=1.0) == region_geometry(h, w, rule, physical=phys)
    # physical mode: the spacing over scale, the same physical kernel in nodes
    scaled = region_geometry(h, w, rule, physical=phys, scale=scale)
    assert scaled == region_geometry(h, w, rule, physical=PhysicalScale(mpp, spacing / scale))
    # pixel rule: each side of the grid times scale, within the region's pixels
    base = region_geometry(h, w, rule).grid
    grid = region_geometry(h, w, rule, scale=scale).grid
    for g, b, n in zip(grid, base, (h, w)):
        assert g == min(n, max(1, round(b * scale)))
    assert region_geometry(h, w, rule, scale=scale) == region_geometry(h, w, rule, grid=grid)
    # a fixed grid still wins
    assert region_geometry(h, w, rule, grid=(5, 7), scale=scale).grid == (5, 7)


def test_same_region_at_two_resolutions_gets_the_model_spacing():
    """One tissue area scanned at 0.5 and at 1.0 um/px: same physical spacing, the pixel rule would differ."""
    from wsiseg.sampling.geometry import PhysicalScale

    rule = GeometryRule((64, 64), (32, 32), 4.0)
    spacing = 6.0
    fine = region_geometry(2967, 2220, rule, physical=PhysicalScale(0.5, spacing))
    coarse = region_geometry(1484, 1110, rule, physical=PhysicalScale(1.0, spacing))
    assert fine.grid == coarse.grid == (247, 185)
    for geo, (h, w), mpp in ((fine, (2967, 2220), 0.5), (coarse, (1484, 1110), 1.0)):
        # extent / nodes is the model's spacing, up to rounding half a node
        assert abs(h * mpp / geo.grid[0] - spacing) <= spacing / (2 * geo.grid[0]) + 1e-9
        assert abs(w * mpp / geo.grid[1] - spacing) <= spacing / (2 * geo.grid[1]) + 1e-9


def _covers_exactly(box, subs) -> bool:
    """Sub-boxes tile ``box``: a grid of distinct row and column edges, no gaps, no overlaps."""
    x, y, w, h = box
    xs = sorted({s[0] for s in subs}) + [x + w]
    ys = sorted({s[1] for s in subs}) + [y + h]
    cells = {(s[0], s[1], s[2], s[3]) for s in subs}
    want = {(x0, y0, x1 - x0, y1 - y0) for y0, y1 in zip(ys, ys[1:]) for x0, x1 in zip(xs, xs[1:])}
    return (
        xs[0] == x
        and ys[0] == y
        and cells == want
        and len(subs) == len(want)
        and sum(s[2] * s[3] for s in subs) == w * h
    )


def test_large_region_splits_into_sub_boxes_that_fit():
    from wsiseg.sampling.geometry import PhysicalScale, physical_grid, split_region

    scale = PhysicalScale(0.5, 8.0)
    box = (100, 200, 40000, 30000)
    subs = split_region(box, scale, (512, 512))
    assert len(subs) == 4 * 5  # 1875 / 512 -> 4 rows, 2500 / 512 -> 5 columns
    assert _covers_exactly(box, subs)
    assert {(s[2], s[3]) for s in subs} == {(8000, 7500)}
    assert all(max(physical_grid(s[3], s[2], scale)) <= 512 for s in subs)
    assert sum(a * b for a, b in (physical_grid(s[3], s[2], scale) for s in subs)) == 1876 * 2500
    assert split_region((0, 0, 1000, 800), scale, (512, 512)) == [(0, 0, 1000, 800)]  # fits: itself
    with pytest.raises(ValueError):
        split_region((0, 0, 10, 10), scale, (0, 5))


@settings(deadline=None, max_examples=200)
@given(
    x=st.integers(0, 10**5),
    y=st.integers(0, 10**5),
    w=st.integers(1, 60000),
    h=st.integers(1, 60000),
    mx=st.floats(0.1, 2.0),
    my=st.floats(0.1, 2.0),
    spacing=st.floats(0.05, 64.0),
    cap_h=st.integers(1, 600),
    cap_w=st.integers(1, 600),
)
def test_split_properties(x, y, w, h, mx, my, spacing, cap_h, cap_w):
    from wsiseg.sampling.geometry import PhysicalScale, physical_grid, split_region

    scale = PhysicalScale((mx, my), spacing)
    # caps raised where they would give more than ~40 rows or columns (keeps each example fast)
    cap_h = max(cap_h, math.ceil(h * min(1.0, my / spacing) / 40))
    cap_w = max(cap_w, math.ceil(w * min(1.0, mx / spacing) / 40))
    subs = split_region((x, y, w, h), scale, (cap_h, cap_w))
    assert _covers_exactly((x, y, w, h), subs)
    grids = [physical_grid(s[3], s[2], scale) for s in subs]
    assert all(1 <= gh <= cap_h and 1 <= gw <= cap_w for gh, gw in grids)
    # equal sub-boxes: sides differ by at most one pixel
    assert max(s[2] for s in subs) - min(s[2] for s in subs) <= 1
    assert max(s[3] for s in subs) - min(s[3] for s in subs) <= 1
    # fewest: one row (column) fewer, split equally, does not fit
    rows, cols = len({s[1] for s in subs}), len({s[0] for s in subs})
    for k, n, mpp, cap in ((rows, h, my, cap_h), (cols, w, mx, cap_w)):
        if k > 1:
            edges = [i * n // (k - 1) for i in range(k)]
            sides = [b - a for a, b in zip(edges, edges[1:])]
            grid = [physical_grid(s, 1, PhysicalScale(mpp, spacing))[0] for s in sides]
            assert max(grid) > cap
