"""Training on windows at one working MPP: regions of every source share a batch (real labelled regions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests._training import TINY
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.models.io import load_deformseg
from wsiseg.output.classes import default_classes
from wsiseg.slide.tissue import Region
from wsiseg.training.batches import Augmented, make_loader
from wsiseg.training.classmap import ClassMap
from wsiseg.training.config import TrainConfig
from wsiseg.training.dataset import build_dataset, physical_shape, random_crop
from wsiseg.training.loop import train
from wsiseg.training.pairs import TrainingPair

CLASSES = default_classes(["background", "non-tumour", "tumour"])
# Two sources at different scanner resolutions (CAMELYON ~1.0 um/px, an estimate; OCDC 20x, 0.5 um/px).
SOURCES = {"camelyon_lymphnode": (["10072", "10073", "10670"], 1.0), "ocdc_oral_scc": (["1009009_r27c5"], 0.5)}


@pytest.fixture(scope="module")
def two_sources(shared_data: Path, tmp_path_factory) -> list[TrainingPair]:
    """Image/label pairs of two real sources, tumour masks thresholded at 128 (non-tumour 1, tumour 2)."""
    root = shared_data / "labelled-regions"
    out = tmp_path_factory.mktemp("labels")
    pairs = []
    for source, (stems, mpp) in SOURCES.items():
        for stem in stems:
            image = root / source / "images" / f"{stem}.jpg"
            if not image.is_file():
                pytest.skip(f"labelled regions not found at {image}")
            mask = np.array(Image.open(root / source / "masks" / f"{stem}.jpg").convert("L"))
            label = out / f"{source}-{stem}.png"
            Image.fromarray(np.where(mask >= 128, 2, 1).astype(np.uint8)).save(label)
            pairs.append(TrainingPair(str(image), str(label), mpp=mpp))
    return pairs


def _source(name: str) -> str:
    """Item name -> source: OCDC stems name their tile by row and column (``..._r27c5``)."""
    return "ocdc_oral_scc" if "_r" in name else "camelyon_lymphnode"


def _class_map() -> ClassMap:
    return ClassMap.from_classes(CLASSES)


def _cfg(**kw) -> TrainConfig:
    base = {**TINY, "val_fraction": 0.0, "sample_spacing_um": 8.0, "working_mpp": 2.0, "crop_size": (64, 64)}
    return TrainConfig(**{**base, **kw})


def test_physical_shape_is_the_extent_over_the_working_pixel():
    assert physical_shape(Region(0, 0, 640, 480), (0.5, 0.5), 1.0) == (240, 320)
    assert physical_shape(Region(0, 0, 512, 512), (2.0, 2.0), 1.0) == (1024, 1024)  # coarser images up-sampled
    assert physical_shape(Region(5, 5, 1, 1), (0.25, 0.25), 8.0) == (1, 1)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    ch=st.integers(1, 50),
    cw=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_crop_is_an_aligned_window(h, w, ch, cw, seed):
    index = torch.arange(h * w).reshape(h, w)
    image = torch.stack([index, index + 1, index + 2])
    img, lab = random_crop(image, index, (ch, cw), np.random.default_rng(seed))
    assert lab.shape == (min(h, ch), min(w, cw)) and img.shape == (3, *lab.shape)
    assert torch.equal(img[0], lab) and torch.equal(img[2], lab + 2)  # image and labels cut at one place
    y, x = divmod(int(lab[0, 0]), w)
    assert torch.equal(lab, index[y : y + lab.shape[0], x : x + lab.shape[1]])  # a contiguous window


def test_crops_and_working_mpp_need_physical_mode():
    for key, value in (("working_mpp", 1.0), ("crop_size", (64, 64))):
        with pytest.raises(ConfigError, match=f"{key}.*needs sample_spacing_um"):
            TrainConfig(**{key: value})
    assert TrainConfig(sample_spacing_um=8, crop_size="48x32").crop_size == (32, 48)


def test_regions_of_two_scanners_read_at_one_working_mpp(two_sources):
    ds = build_dataset(two_sources, _class_map(), regions="whole", working_mpp=1.0)
    shapes = {_source(it.name): it.shape for it in ds.items}
    # CAMELYON 512 px at 1.0 um stays 512; OCDC 640 px at 0.5 um is 320 um, so 320 px
    assert shapes == {"camelyon_lymphnode": (512, 512), "ocdc_oral_scc": (320, 320)}
    assert {ds.item_mpp(i)[0] for i in range(len(ds))} == {1.0}
    image, labels = ds.arrays(len(ds) - 1)
    assert image.shape == (320, 320, 3) and set(np.unique(labels)) <= {1, 2}

    no_mpp = [TrainingPair(p.image, p.annotation) for p in two_sources[:1]]
    with pytest.raises(WsisegError, match=r"10072\.jpg: working_mpp needs the image's MPP"):
        build_dataset(no_mpp, _class_map(), regions="whole", working_mpp=1.0)
    with pytest.raises(WsisegError, match="use a coarser working_mpp"):
        build_dataset(two_sources[:1], _class_map(), regions="whole", working_mpp=0.05)


def test_windows_let_batches_mix_sources(two_sources):
    """Whole regions batch by shape, so OCDC trains alone; windows at one MPP put both sources in one batch."""
    ds = build_dataset(two_sources, _class_map(), regions="whole", working_mpp=2.0)
    g = torch.Generator().manual_seed(0)
    whole = make_loader(
        Augmented(ds, _cfg(crop_size=None)),
        _cfg(crop_size=None),
        shuffle=False,
        generator=g,
        device=torch.device("cpu"),
    )
    assert all(len({_source(n) for n in b["name"]}) == 1 for b in whole)

    cfg = _cfg(batch_size=4)
    crops = Augmented(ds, cfg)
    crops.epoch = 3
    batches = list(make_loader(crops, cfg, shuffle=True, generator=g, device=torch.device("cpu")))
    assert len(batches) == 1 and len({_source(n) for n in batches[0]["name"]}) == 2
    assert batches[0]["image"].shape == (4, 3, 64, 64) and batches[0]["mpp"] == [2.0] * 4
    # the window moves from epoch to epoch, reproducibly
    again = Augmented(ds, cfg)
    again.epoch = 3
    assert torch.equal(again[0]["image"], crops[0]["image"])
    again.epoch = 4
    assert not torch.equal(again[0]["image"], crops[0]["image"])


def test_training_on_windows_samples_the_window_at_the_spacing(two_sources, tmp_path, monkeypatch):
    import wsiseg.training.step as step

    ds = build_dataset(two_sources, _class_map(), regions="whole", working_mpp=2.0)
    grids = []
    real = step.training_geometry
    monkeypatch.setattr(step, "training_geometry", lambda *a, **k: grids.append(real(*a, **k).grid) or real(*a, **k))
    train(_cfg(epochs=1, batch_size=4), ds, None, CLASSES, tmp_path / "run", progress=False)
    # a 64 px window at 2 um is 128 um: 16 samples at 8 um, for every batch
    assert grids and set(grids) == {(16, 16)}
    model = load_deformseg(tmp_path / "run" / "model.safetensors")
    assert model.scale.mpp_working == 2.0 and model.scale.sample_spacing_um == 8.0
    assert model.metadata["training"]["config"]["crop_size"] == [64, 64]


def test_windows_whose_deepest_maps_are_one_pixel_are_refused_with_a_warning():
    from wsiseg.models.net import DeformSegNet
    from wsiseg.training.batches import window_problem
    from wsiseg.training.config import build_net

    net: DeformSegNet = build_net(_cfg(), 3)  # TINY: encoder depth 3, stride 8
    # 64 px at 2 um over 8 um: 16 nodes, 2 x 2 at stride 8
    assert window_problem(net, _cfg()) is None
    # 24 px: 6 nodes, one deepest value
    why = window_problem(net, _cfg(crop_size=(24, 24)))
    assert why is not None and "deepest maps (stride 8) are 1 x 1" in why and "at least 36 px" in why
    assert window_problem(net, _cfg(crop_size=None)) is None
