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
    h=st.integers(1, 60000), w=st.integers(1, 60000), side=st.integers(8, 128),
    ratio=st.sampled_from([0.5, 1.0, 2.0]), sig=st.floats(0.5, 8.0),
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

    from wsiseg.data import _open_image
    from wsiseg.evaluate import evaluate_model
    from wsiseg.models.io import LoadedModel
    from wsiseg.models.net import DeformSegNet
    from wsiseg.output.classes import default_classes
    from wsiseg.segment import SegmentOptions, segment_region
    from wsiseg.train import TrainConfig, build_net, train

    src = shared_data / "labelled-regions" / "bcss_mostly_tumor_large"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    # A real, non-square H&E region (4096 x 2048) and its tumour mask, saved at 1/8 as a slide-sized image.
    rgb = Image.open(src / "images" / "1015.jpg").convert("RGB").reduce(8)
    mask = (np.asarray(Image.open(src / "masks" / "1015.jpg").convert("L").reduce(8)) >= 128).astype(np.int64)
    image_path = tmp_path / "region.png"
    rgb.save(image_path)
    H, W = mask.shape  # 256 x 512
    tiny = {"arch": "unet", "encoder": "tu-resnet10t", "encoder_depth": 3, "decoder_channels": (32, 16, 8),
            "out_size": (16, 16), "map_size": (32, 32), "batch_size": 1, "flips": False, "device": "cpu",
            "epochs": 1, "patience": None}
    classes = default_classes(["other", "tumour"])

    seen: list = []
    original = DeformSegNet.grid

    def recording(self, d, geometry=None):
        g = original(self, d, geometry)
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
    assert eval_geo.grid == (16, 32) and eval_map == seg_map == eval_geo.map
    assert torch.equal(eval_grid, seg_grid)
    assert seg.grid_size == seg_geo.grid and seg.map_size == seg_geo.map
