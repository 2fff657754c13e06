"""Evaluation: metrics of a model with known predictions, the evaluate command, baselines, sweeps, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from wsiseg.cli.app import main
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.evaluation.results import SWEEP_METHODS, EvalResult, format_table
from wsiseg.evaluation.run import parse_sizes
from wsiseg.evaluation.scoring import evaluate_model
from wsiseg.evaluation.sweep import _scaled_config, format_sweep_table
from wsiseg.metrics import trimap_accuracy, upsampling_error
from wsiseg.models.net import DeformSegNet
from wsiseg.sampling.coords import uniform_grid
from wsiseg.viz.eval_figures import draw_class_frequency, draw_sweep, method_label

IGNORE = 255
NAMES = ["background", "light", "dark"]
LEVELS = np.array([20, 128, 230], dtype=np.uint8)  # red levels; the thresholded segmenter maps them to 0, 1, 2


class RedThreshold(nn.Module):
    """Known 'segmenter': class = red < 1/3, < 2/3, else (one-hot logits)."""

    num_classes = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0]
        cls = (red >= 1 / 3).long() + (red >= 2 / 3).long()
        return torch.nn.functional.one_hot(cls, 3).permute(0, 3, 1, 2).float() * 10.0


def _known_net() -> DeformSegNet:
    # Identity standardisation, so the segmenter sees the raw [0, 1] image.
    return DeformSegNet(
        RedThreshold(),
        sampler="uniform",
        map_size=(8, 8),
        out_size=(16, 16),
        image_mean=(0.0, 0.0, 0.0),
        image_std=(1.0, 1.0, 1.0),
    )


def _block_item(rng, name: str, size: tuple[int, int], grid: tuple[int, int] = (16, 16)):
    """A region made of constant blocks, one block per node of its grid (integer factors)."""
    h, w = size
    gh, gw = grid
    fh, fw = h // gh, w // gw
    red_cls = rng.integers(0, 3, grid)
    lab = rng.integers(0, 3, grid)
    lab[rng.random(grid) < 0.1] = IGNORE
    red = np.repeat(np.repeat(LEVELS[red_cls], fh, 0), fw, 1)
    image = np.zeros((3, h, w), np.uint8)
    image[0] = red
    image[1] = rng.integers(0, 256, (h, w))  # other channels do not matter
    labels = np.repeat(np.repeat(lab, fh, 0), fw, 1).astype(np.int64)
    item = {
        "image": torch.from_numpy(image),
        "labels": torch.from_numpy(labels),
        "name": name,
        "box": None,
        "downsample": 2.0,
        "size": (h, w),
    }
    return item, red_cls, lab, (fh, fw)


def _confusion(target: np.ndarray, pred: np.ndarray, k: int = 3) -> np.ndarray:
    keep = target != IGNORE
    return np.bincount(target[keep] * k + pred[keep], minlength=k * k).reshape(k, k)


def _iou(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def test_evaluate_reproduces_metrics_of_a_model_with_known_predictions():
    rng = np.random.default_rng(0)
    # Two 64x64 regions (factor 4, batched together) and one 48x96 region, which the shared
    # geometry rule (short side to the model's 16) samples on a 16x32 grid (factor 3).
    parts = [
        _block_item(rng, "a", (64, 64)),
        _block_item(rng, "b", (64, 64)),
        _block_item(rng, "c", (48, 96), grid=(16, 32)),
    ]
    dataset = [p[0] for p in parts]
    r = evaluate_model(_known_net(), dataset, NAMES, device="cpu", batch_size=2)

    # Independent expectations: on a uniform grid at integer factors every sample hits its block.
    cm_def = sum(_confusion(lab, red_cls) for _, red_cls, lab, _ in parts)
    cm_full = sum(
        _confusion(np.repeat(np.repeat(lab, fh, 0), fw, 1), np.repeat(np.repeat(red_cls, fh, 0), fw, 1))
        for _, red_cls, lab, (fh, fw) in parts
    )
    np.testing.assert_array_equal(r.deformed.matrix, cm_def)
    np.testing.assert_array_equal(r.full.matrix, cm_full)
    np.testing.assert_array_equal(r.full.iou(), _iou(cm_full))
    np.testing.assert_array_equal(r.deformed.iou(), _iou(cm_def))
    assert r.miou_full == np.nanmean(_iou(cm_full)) and r.miou_deformed == np.nanmean(_iou(cm_def))
    assert r.full.matrix.sum() == sum(((lab != IGNORE) * fh * fw).sum() for _, _, lab, (fh, fw) in parts)

    # Cost: 256, 256 and 512 samples of 64*64, 64*64 and 48*96 working pixels, at downsample 2 (no box):
    # four times as many level-0 pixels.
    assert r.cost_working == pytest.approx(np.mean([256 / 4096, 256 / 4096, 512 / 4608]), abs=0, rel=1e-15)
    assert r.cost == pytest.approx(r.cost_working / 4, abs=0, rel=1e-15)
    assert (r.samples, r.pixels, r.pixels_level0, r.regions) == (4 * 256, 2 * 4096 + 4608, 4 * (2 * 4096 + 4608), 3)

    # A uniform grid at an integer factor on a block image loses nothing.
    assert r.upsampling_miou == 1.0
    assert (r.upsampling.matrix[:, 3] == 0).all()

    # Class frequency: pixels per class in Y vs among the samples (one per block).
    orig = sum(np.bincount(lab[lab != IGNORE], minlength=3) * fh * fw for _, _, lab, (fh, fw) in parts)
    samp = sum(np.bincount(lab[lab != IGNORE], minlength=3) for _, _, lab, _ in parts)
    np.testing.assert_array_equal(r.freq_original, orig)
    np.testing.assert_array_equal(r.freq_sampled, samp)
    fo, fs = r.class_frequency()
    assert fo.sum() == pytest.approx(1) and fs.sum() == pytest.approx(1)

    # Class shares per region: half the L1 distance between its labelled and predicted class shares.
    def share_error(lab, pred):
        keep = lab != IGNORE
        t, p = (np.bincount(x[keep], minlength=3) / keep.sum() for x in (lab, pred))
        return 0.5 * np.abs(t - p).sum()

    expected = [
        (name, share_error(np.repeat(np.repeat(lab, fh, 0), fw, 1), np.repeat(np.repeat(red, fh, 0), fw, 1)))
        for name, (_, red, lab, (fh, fw)) in zip("abc", parts)
    ]
    assert [n for n, _ in r.region_shares] == [n for n, _ in expected]
    np.testing.assert_allclose([e for _, e in r.region_shares], [e for _, e in expected], rtol=1e-12)
    assert max(e for _, e in expected) > 0 and r.class_share_error == pytest.approx(np.mean([e for _, e in expected]))

    d = r.to_dict()
    assert d["class_shares"]["regions"] == [{"name": n, "error": pytest.approx(e)} for n, e in expected]
    assert d["class_shares"]["max"] == pytest.approx(max(e for _, e in expected))
    assert d["deformed"]["resolution"] == "deformed"
    assert d["full"]["resolution"] == "full (working resolution, downsample 2)"
    assert d["upsampling"]["miou"] == 1.0 and d["cost"]["fraction_level0"] == r.cost
    assert d["cost"]["fraction_working"] == r.cost_working and d["cost"]["pixels_level0"] == r.pixels_level0
    assert set(d["samples_on_glass"]) == {"model", "uniform", "what"}
    assert d["full"]["iou"]["dark"] == _iou(cm_full)[2]
    json.dumps(d, allow_nan=False)
    table = r.format_table()
    assert "uniform" in table and "mIoU(Y', Y)" in table and "downsample 2" in table and "trimap" in table
    assert "cost (% of level-0 px)" in table and "cost (% of working px)" in table
    assert "class-share error (mean)" in table


def test_cost_counts_level0_pixels_of_the_region_box():
    rng = np.random.default_rng(5)
    item = _block_item(rng, "a", (64, 64))[0]
    item = {**item, "box": (100, 50, 256, 128)}  # the box wins over downsample x working size
    r = evaluate_model(_known_net(), [item], NAMES, device="cpu")
    assert r.cost == 256 / (256 * 128) and r.cost_working == 256 / 4096 and r.pixels_level0 == 256 * 128
    plain = {**item, "box": None, "downsample": None}  # neither: the working raster is level 0
    r = evaluate_model(_known_net(), [plain], NAMES, device="cpu")
    assert r.cost == r.cost_working == 256 / 4096
    assert "cost (% of working px)" not in r.format_table()


def test_model_scale_samples_items_with_mpp_at_its_spacing():
    """A model that records 4 um spacing: a 64 px region at 1 um/px gets 16 x 16 samples, at 2 um/px 32 x 32, without
    MPP the pixel rule's 16 x 16; regions of one size but different MPP are not batched onto one grid."""
    from wsiseg.models.io import LoadedModel
    from wsiseg.models.scale import ModelScale
    from wsiseg.output.classes import default_classes

    rng = np.random.default_rng(7)
    items = [{**_block_item(rng, n, (64, 64))[0], "mpp": mpp} for n, mpp in (("a", 1.0), ("b", 2.0), ("c", None))]
    net = _known_net()
    scaled = LoadedModel(net, default_classes(NAMES), {"scale": ModelScale(1.0, 4.0, "slide", 3).to_dict()}, "m", "h")
    r = evaluate_model(scaled, items, device="cpu", batch_size=4)
    assert (r.regions, r.regions_physical, r.samples) == (3, 2, 256 + 1024 + 256)
    assert r.to_dict()["scale"]["mode"] == "mixed" and r.to_dict()["scale"]["sample_spacing_um"] == 4.0
    # the first region's grid is the model's own: every sample hits its block, as in the pixel-rule test above
    one = evaluate_model(scaled, items[:1], device="cpu")
    assert one.upsampling_miou == 1.0 and one.to_dict()["scale"]["mode"] == "physical"
    # an old model (no scale) and a bare net: the pixel rule for every region
    for m in (LoadedModel(net, default_classes(NAMES), {}, "m", "h"), net):
        r = evaluate_model(m, items, NAMES, device="cpu", batch_size=4)
        assert (r.regions_physical, r.samples) == (0, 3 * 256) and r.to_dict()["scale"]["mode"] == "pixels"


def test_samples_on_glass_uses_a_fixed_tissue_score():
    """Left half glass (white), right half stain: a uniform grid puts half its points on glass."""
    from wsiseg.slide.tissue import GLASS_SCORE, tissue_score

    item = _block_item(np.random.default_rng(6), "a", (64, 64))[0]
    image = item["image"].clone()
    image[:, :64, :32] = 245  # glass
    image[:, :64, 32:64] = torch.tensor([150, 60, 160], dtype=torch.uint8)[:, None, None]  # eosin-ish stain
    item = {**item, "image": image}
    assert (tissue_score(image[:, :64, :32].permute(1, 2, 0).numpy()) <= GLASS_SCORE).all()
    r = evaluate_model(_known_net(), [item], NAMES, device="cpu")
    assert r.samples_on_glass == {"model": 0.5, "uniform": 0.5}  # the uniform sampler's grid is the uniform one
    # A density that packs the samples into the stained half puts fewer of them on glass.
    net = _known_net()
    d = torch.full((1, 1, 8, 8), 1e-3)
    d[..., 4:] = 1.0
    net.density = lambda *args, **kwargs: d / d.sum()
    net.sampler = "edge"  # a sampler that turns its density into a grid (uniform skips the attraction)
    net.sigma, net.support = 2.0, 9  # a kernel wide enough to pull samples across the 8-node map
    r = evaluate_model(net, [item], NAMES, device="cpu")
    assert r.samples_on_glass["uniform"] == 0.5 and r.samples_on_glass["model"] < 0.4
    assert "samples on glass (model)" in r.format_table()


def test_all_tissue_region_has_almost_no_samples_on_glass(shared_data):
    """A real CAMELYON tile that is all tissue: Otsu per region would call its paler tissue glass, the fixed
    score does not."""
    from PIL import Image

    from wsiseg.slide.tissue import threshold_tissue

    path = shared_data / "labelled-regions" / "camelyon_lymphnode" / "images" / "10672.jpg"
    if not path.is_file():
        pytest.skip(f"labelled regions not found at {path}")
    rgb = np.array(Image.open(path).convert("RGB"))
    assert (~threshold_tissue(rgb)[0]).mean() > 0.05  # what the old per-region Otsu rule called glass
    item = {
        "image": torch.from_numpy(rgb).permute(2, 0, 1).contiguous(),
        "labels": torch.zeros(512, 512).long(),
        "name": "camelyon",
    }
    r = evaluate_model(_known_net(), [item], NAMES, device="cpu")
    assert r.samples_on_glass["uniform"] < 0.02


def test_glass_weight_moves_the_learned_samples_off_real_glass(shared_data):
    """A real H&E tile with glass (35 % by the tissue score), the shipped tumour model: its grid built on a warp
    away from glass puts far fewer samples there (measured 0.337 -> 0.231), at the same budget."""
    from wsiseg import demo
    from wsiseg.models.io import load_deformseg

    path = shared_data / "textures" / "tissue-level2-3000-7666-7096-11763.png"
    if not path.is_file():
        pytest.skip(f"shared textures not found at {path}")
    rgb = np.array(Image.open(path).convert("RGB"))
    item = {"image": torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), "labels": torch.zeros(512, 512).long()}
    model = load_deformseg(demo.demo_model("tumour"))
    plain = evaluate_model(model, [item], device="cpu")
    weighted = evaluate_model(model, [item], device="cpu", glass_weight=0.1, grid_iterations=2)
    assert plain.samples_on_glass["uniform"] == weighted.samples_on_glass["uniform"] > 0.3
    assert weighted.samples_on_glass["model"] < plain.samples_on_glass["model"] - 0.07
    assert weighted.samples == plain.samples  # the same budget, placed elsewhere
    doc = weighted.to_dict()
    assert doc["glass_weight"] == 0.1 and doc["grid_iterations"] == 2
    assert "glass weight" in weighted.format_table() and "glass weight" not in plain.format_table()


def test_grid_scale_samples_every_region_that_much_more_densely():
    rng = np.random.default_rng(8)
    items = [_block_item(rng, "a", (64, 64))[0]]
    base = evaluate_model(_known_net(), items, NAMES, device="cpu")
    twice = evaluate_model(_known_net(), items, NAMES, device="cpu", grid_scale=2.0)
    assert twice.samples == 4 * base.samples and twice.cost == pytest.approx(4 * base.cost)
    assert twice.to_dict()["scale"]["grid_scale"] == 2.0 and "grid scale" in twice.format_table()
    assert "grid scale" not in base.format_table()


def test_trimap_and_upsampling_match_the_metric_functions_on_one_region():
    rng = np.random.default_rng(1)
    item, red_cls, _, (fh, fw) = _block_item(rng, "a", (64, 64))
    r = evaluate_model(_known_net(), [item], NAMES, device="cpu", widths=(1, 3))
    pred = np.repeat(np.repeat(red_cls, fh, 0), fw, 1)
    target = item["labels"].numpy()
    np.testing.assert_array_equal(r.trimap_accuracy(), trimap_accuracy(pred, target, (1, 3), IGNORE))
    assert r.upsampling_miou == upsampling_error(target, uniform_grid(16, 16), 3, IGNORE)


def test_upsampling_error_is_below_one_when_blocks_are_finer_than_the_grid():
    rng = np.random.default_rng(2)
    item = _block_item(rng, "a", (64, 64))[0]
    labels = rng.integers(0, 3, (64, 64))  # pixel noise: a 16x16 grid cannot keep it
    item = {**item, "labels": torch.from_numpy(labels)}
    r = evaluate_model(_known_net(), [item], NAMES, device="cpu")
    assert r.upsampling_miou < 0.6
    assert r.upsampling_miou == pytest.approx(upsampling_error(labels, uniform_grid(16, 16), 3))


def test_evaluate_model_bad_input():
    with pytest.raises(WsisegError, match="empty"):
        evaluate_model(_known_net(), [], NAMES, device="cpu")
    item = _block_item(np.random.default_rng(3), "x", (64, 64))[0]
    item["labels"][0, 0] = 7
    with pytest.raises(WsisegError, match="label value 7 in x"):
        evaluate_model(_known_net(), [item], NAMES, device="cpu")
    with pytest.raises(WsisegError, match="predicts 3 classes"):
        evaluate_model(_known_net(), [item], NAMES[:2], device="cpu")


def test_parse_sizes_and_figures(tmp_path):
    assert parse_sizes("32, 48,96x64,32") == [(32, 32), (48, 48), (64, 96)]
    for bad in ("", "0", "3x", "a,b"):
        with pytest.raises(ConfigError):
            parse_sizes(bad)
    rows = [
        {"method": m, "cost": c, "miou_full": v, "upsampling_miou": u}
        for m, off in (("learned", 0.05), ("uniform", 0.0), ("edge", 0.02))
        for c, v, u in ((0.0156, 0.4 + off, 0.7), (0.035, 0.5 + off, 0.8), (0.0625, None, 0.9))
    ]
    p = draw_sweep(rows, tmp_path / "sweep.png")
    im = Image.open(p)
    assert im.size == (880, 340)
    a = np.asarray(im)
    # The three method colours are drawn.
    for colour in ((214, 39, 40), (31, 119, 180), (44, 160, 44)):
        assert (a == colour).all(-1).any()
    p = draw_class_frequency(
        NAMES, [0.8, 0.15, 0.05], {"learned": [0.6, 0.25, 0.15], "uniform": [0.8, 0.15, 0.05]}, tmp_path / "freq.png"
    )
    b = np.asarray(Image.open(p))
    assert (b == (150, 150, 150)).all(-1).any() and (b == (214, 39, 40)).all(-1).any()


def test_sweep_figure_names_every_method_and_fits_its_legend(tmp_path):
    rows = [
        {"method": m, "cost": c, "miou_full": 0.5 + off, "upsampling_miou": 0.8}
        for m, off in (("learned", 0.05), ("single", 0.03), ("uniform", 0.0), ("edge", 0.02))
        for c in (0.0156, 0.0625)
    ]
    im = Image.open(draw_sweep(rows, tmp_path / "sweep.png"))
    a = np.asarray(im)
    # Four labels in one legend row per panel: the figure widens to fit them.
    assert im.size[0] > 880
    for colour in ((214, 39, 40), (255, 127, 14), (31, 119, 180), (44, 160, 44)):
        assert (a == colour).all(-1).any()
    assert method_label("single") == "learned (single loss)" and method_label("learned") == "learned (joint loss)"
    assert method_label("other") == "other"


def test_sweep_methods_change_only_the_sampler_and_the_loss():
    from wsiseg.training.config import TrainConfig

    base = TrainConfig(out_size=(64, 64), map_size=(32, 32), sigma=2.0, joint=True, epochs=20)
    cfgs = {m: _scaled_config(base, (32, 16), m, 3, "cpu") for m in SWEEP_METHODS}
    assert (cfgs["learned"].sampler, cfgs["learned"].joint) == ("learned", True)
    assert (cfgs["single"].sampler, cfgs["single"].joint) == ("learned", False)
    assert cfgs["single"].effective_gamma_edge == 0 and cfgs["learned"].effective_gamma_edge == 10
    assert cfgs["uniform"].sampler == "uniform" and cfgs["edge"].sampler == "edge"
    for c in cfgs.values():
        assert (c.out_size, c.map_size, c.epochs, c.sigma) == ((32, 16), (16, 8), 3, 1.0)
    # Baselines and sweep runs start from the model's encoder weights, frozen alike.
    pretrained = TrainConfig(encoder_weights="enc.pt", freeze_encoder_epochs=2)
    for m in SWEEP_METHODS:
        c = _scaled_config(pretrained, (32, 16), m, 3, "cpu")
        assert (c.encoder_weights, c.freeze_encoder_epochs) == ("enc.pt", 2)
    # A model trained with the single loss still gets a joint-loss "learned" run in its sweep.
    single_model = TrainConfig(joint=False)
    assert _scaled_config(single_model, (16, 16), "learned", 1, "cpu").joint is True
    with pytest.raises(ConfigError, match="unknown sweep method"):
        _scaled_config(base, (16, 16), "random", 1, "cpu")


def test_format_sweep_table_bolds_the_best_per_budget():
    def row(m, s, v):
        return {
            "method": m,
            "out_height": s,
            "out_width": s,
            "cost": s * s / 65536,
            "miou_full": v,
            "miou_deformed": 0.5,
            "upsampling_miou": 0.9,
            "iou_full": {"a": 0.25, "b": v},
            "sec_per_iter": 0.1234,
            "epochs": 3,
            "best_epoch": 2,
        }

    table = format_sweep_table(
        [row("learned", 32, 0.7), row("single", 32, 0.6), row("uniform", 64, 0.8), row("edge", 64, None)]
    )
    lines = table.splitlines()
    assert lines[0].startswith("| grid (cost: % of level-0 px) | method |") and "(a / b)" in lines[0]
    assert (
        lines[2] == "| 32x32 (1.56 %) | learned (joint loss) | **0.7000** | 0.5000 | 0.9000 | 0.250 / 0.700 | "
        "0.123 | 3 (2) |"
    )
    assert "| learned (single loss) | 0.6000 |" in lines[3]
    assert "| uniform | **0.8000** |" in lines[4] and "| edge (oracle) | n/a |" in lines[5]


def test_format_table_has_one_column_per_method():
    rng = np.random.default_rng(4)
    ds = [_block_item(rng, "a", (64, 64))[0]]
    r1 = evaluate_model(_known_net(), ds, NAMES, device="cpu", name="learned")
    r2 = evaluate_model(_known_net(), ds, NAMES, device="cpu", name="edge")
    assert isinstance(r1, EvalResult)
    header = format_table([r1, r2]).splitlines()[1]
    assert header.split() == ["learned", "edge"]


# -- the command on real NuCLS tiles ----------------------------------------------

HR = (64, 64)
TINY = {
    "arch": "unet",
    "encoder": "resnet18",
    "encoder_depth": 3,
    "decoder_channels": (16, 8, 8),
    "out_size": (16, 16),
    "map_size": (8, 8),
    "hr_size": HR,
    "batch_size": 2,
    "epochs": 1,
    "flips": False,
    "device": "cpu",
    "seed": 0,
}
CLASSES_YAML = "classes:\n  - {value: 1, name: non-tumour nucleus}\n  - {value: 2, name: tumour nucleus}\n"


@pytest.fixture(scope="module")
def classes_yaml(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cls") / "classes.yaml"
    p.write_text(CLASSES_YAML)
    return p


@pytest.fixture(scope="module")
def model(nucls, classes_yaml, tmp_path_factory) -> Path:
    """A tiny model trained for one epoch on 4 NuCLS training tiles."""
    from wsiseg.training.classmap import load_class_map
    from wsiseg.training.dataset import build_dataset
    from wsiseg.training.pairs import load_pairs
    from wsiseg.training.config import TrainConfig
    from wsiseg.training.loop import train

    cmap = load_class_map(classes_yaml)
    ds = build_dataset(load_pairs(nucls / "train")[:4], cmap, hr_size=HR)
    out = tmp_path_factory.mktemp("model")
    return train(TrainConfig(**TINY), ds, None, cmap.to_classes(), out, progress=False).model_path


@pytest.fixture(scope="module")
def train_csv(nucls, tmp_path_factory) -> Path:
    """Four training pairs for baselines and sweeps (three train, one validation): keeps them quick."""
    p = tmp_path_factory.mktemp("pairs") / "train.csv"
    images = sorted((nucls / "train" / "images").glob("*.png"))[:4]
    rows = [f"{img},{nucls / 'train' / 'labels' / img.name}" for img in images]
    p.write_text("image,annotation\n" + "\n".join(rows) + "\n")
    return p


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_evaluate_writes_deformed_and_full_resolution_sections(model, nucls, classes_yaml, tmp_path):
    out = tmp_path / "ev"
    r = _run("evaluate", model, nucls, "--classes", classes_yaml, "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "tumour nucleus" in r.output and "mIoU(Y', Y)" in r.output
    doc = json.loads((out / "eval.json").read_text())
    assert doc["split"] == "test" and doc["pairs"] == 5 and doc["regions"] == 5
    m = doc["methods"]["learned"]
    assert m["deformed"]["resolution"] == "deformed"
    # 256 px tiles at a 64 px working size.
    assert m["full"]["resolution"] == "full (working resolution, downsample 4)"
    # 16x16 grid: 256 samples of 64x64 working pixels, of 256x256 level-0 (native) pixels.
    assert m["cost"]["fraction_working"] == pytest.approx(256 / 4096)
    assert m["cost"]["fraction_level0"] == pytest.approx(256 / 65536)
    assert all(0 <= m["samples_on_glass"][k] <= 1 for k in ("model", "uniform"))
    assert "samples on glass (uniform)" in r.output and "cost (% of level-0 px)" in r.output
    assert 0 <= m["full"]["miou"] <= 1 and 0 < m["upsampling"]["miou"] <= 1
    assert set(m["full"]["iou"]) == {"background", "non-tumour nucleus", "tumour nucleus"}
    assert len(m["trimap"]["accuracy"]) == 5
    assert (out / "class_frequency.png").is_file()

    r = _run(
        "evaluate", model, nucls, "--classes", classes_yaml, "--out", out, "--device", "cpu", "--json", "--split", "all"
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["split"] == "all" and doc["regions"] == 15


def test_cli_evaluate_tta_scores_the_flip_average(model, nucls, classes_yaml, tmp_path):
    plain, flips = tmp_path / "plain", tmp_path / "flips"
    for out, extra in ((plain, []), (flips, ["--tta"])):
        r = _run("evaluate", model, nucls, "--classes", classes_yaml, "--out", out, "--device", "cpu", *extra)
        assert r.exit_code == 0, r.output
    a, b = (json.loads((p / "eval.json").read_text())["methods"]["learned"] for p in (plain, flips))
    assert a["tta"] is False and b["tta"] is True
    assert a["cost"] == b["cost"] and a["upsampling"] == b["upsampling"]  # the same samples
    assert a["deformed"]["confusion"] != b["deformed"]["confusion"]  # other predictions on them
    assert "test-time flips" in r.output


def test_cli_evaluate_compare_trains_the_baseline_at_the_same_budget(model, nucls, classes_yaml, train_csv, tmp_path):
    from wsiseg.models.io import load_deformseg

    out = tmp_path / "ev"
    r = _run(
        "evaluate",
        model,
        nucls,
        "--classes",
        classes_yaml,
        "--out",
        out,
        "--device",
        "cpu",
        "--compare",
        "uniform",
        "--train-data",
        train_csv,
    )
    assert r.exit_code == 0, r.output
    base = out / "baselines" / "uniform" / "model.safetensors"
    b = load_deformseg(base)
    m = load_deformseg(model)
    assert b.net.sampler == "uniform" and b.net.out_size == m.net.out_size
    # Same training config, only the sampler changed.
    bc, mc = b.metadata["training"]["config"], m.metadata["training"]["config"]
    assert {k for k in mc if mc[k] != bc[k]} == {"sampler"}
    doc = json.loads((out / "eval.json").read_text())
    assert list(doc["methods"]) == ["learned", "uniform"]
    assert doc["methods"]["uniform"]["cost"] == doc["methods"]["learned"]["cost"]
    assert r.stdout.splitlines()[1].split() == ["learned", "uniform"]

    # Given baseline file: nothing is trained.
    r = _run(
        "evaluate",
        model,
        nucls,
        "--classes",
        classes_yaml,
        "--out",
        tmp_path / "ev2",
        "--device",
        "cpu",
        "--baseline",
        f"uniform={base}",
    )
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "ev2" / "baselines").exists()


@pytest.mark.slow
def test_cli_evaluate_sweep(model, nucls, classes_yaml, train_csv, tmp_path):
    out = tmp_path / "ev"
    args = [
        "evaluate",
        model,
        nucls,
        "--classes",
        classes_yaml,
        "--out",
        out,
        "--device",
        "cpu",
        "--sweep",
        "16,24",
        "--sweep-epochs",
        "1",
        "--train-data",
        train_csv,
    ]
    r = _run(*args)
    assert r.exit_code == 0, r.output
    for f in ("sweep.png", "sweep.json", "sweep.csv", "class_frequency.png", "eval.json"):
        assert (out / f).is_file(), f
    doc = json.loads((out / "sweep.json").read_text())
    assert [(row["method"], row["out_width"]) for row in doc["rows"]] == [
        (m, s) for s in (16, 24) for m in ("learned", "single", "uniform", "edge")
    ]
    costs = {row["out_width"]: row["cost"] for row in doc["rows"]}
    assert costs[16] == pytest.approx(256 / 65536) and costs[24] == pytest.approx(576 / 65536)
    with open(out / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 8
    assert "| 16x16 (0.39 %; 6.25 % of working px) | learned (single loss) |" in r.stdout  # the sweep table
    # Resume-friendly: a second run trains nothing new.
    r = _run(*args)
    assert r.exit_code == 0, r.output
    assert not [line for line in r.stderr.splitlines() if line.startswith("training ")]
    assert "nothing to do" not in r.stdout


def test_cli_evaluate_sweep_fast(model, nucls, classes_yaml, train_csv, tmp_path, monkeypatch):
    """The sweep's plumbing with one size and one method (the full sweep is marked slow)."""
    import wsiseg.evaluation.sweep as ev

    monkeypatch.setattr(ev, "SWEEP_METHODS", ("edge",))
    out = tmp_path / "ev"
    r = _run(
        "evaluate",
        model,
        nucls,
        "--classes",
        classes_yaml,
        "--out",
        out,
        "--device",
        "cpu",
        "--sweep",
        "16",
        "--sweep-epochs",
        "1",
        "--train-data",
        train_csv,
    )
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "sweep.json").read_text())
    assert [row["method"] for row in doc["rows"]] == ["edge"]
    assert doc["rows"][0]["label"] == "edge (oracle)" and doc["rows"][0]["sec_per_iter"] > 0
    assert "| 16x16 (0.39 %; 6.25 % of working px) | edge (oracle) |" in r.stdout
    with open(out / "sweep.csv") as f:
        row = next(csv.DictReader(f))
    # The CSV keeps `cost` (now of level-0 pixels) and adds the working-resolution fraction.
    assert float(row["cost"]) == pytest.approx(256 / 65536) and float(row["cost_working"]) == pytest.approx(256 / 4096)
    assert all(0 <= row["miou_full"] <= 1 for row in doc["rows"])
    assert (out / "sweep.png").is_file() and (out / "class_frequency.png").is_file()
    assert (out / "sweep" / "edge-16x16" / "model.safetensors").is_file()


# -- bad input ---------------------------------------------------------------------


def test_cli_evaluate_class_mismatch_names_both_files(model, nucls, tmp_path):
    bad = tmp_path / "other.yaml"
    bad.write_text("classes:\n  - {value: 1, name: tumour}\n")
    r = _run("evaluate", model, nucls, "--classes", bad, "--out", tmp_path / "ev", "--device", "cpu")
    assert r.exit_code == 2
    assert str(bad) in r.output and str(model) in r.output and "do not match" in r.output


def test_cli_evaluate_empty_and_missing_data(model, nucls, classes_yaml, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run("evaluate", model, empty, "--classes", classes_yaml, "--out", tmp_path / "ev", "--device", "cpu")
    assert r.exit_code == 2 and str(empty) in r.output and "no image/annotation pairs" in r.output
    # Only training pairs: no test split to evaluate.
    csv_path = tmp_path / "pairs.csv"
    img = next((nucls / "train" / "images").glob("*.png"))
    csv_path.write_text(f"image,annotation,split\n{img},{nucls / 'train' / 'labels' / img.name},train\n")
    r = _run("evaluate", model, csv_path, "--classes", classes_yaml, "--out", tmp_path / "ev", "--device", "cpu")
    assert r.exit_code == 2 and str(csv_path) in r.output and "no test pairs" in r.output


def test_cli_evaluate_model_file_errors_are_one_line(nucls, classes_yaml, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    for path in (junk, tmp_path / "missing.safetensors"):
        r = _run("evaluate", path, nucls, "--classes", classes_yaml, "--out", tmp_path / "ev")
        assert r.exit_code == 2 and str(path) in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_evaluate_refuses_training_on_the_evaluated_pairs(model, nucls, classes_yaml, tmp_path):
    r = _run(
        "evaluate",
        model,
        nucls / "test",
        "--classes",
        classes_yaml,
        "--out",
        tmp_path / "ev",
        "--device",
        "cpu",
        "--compare",
        "edge",
    )
    assert r.exit_code == 2 and "overlaps the evaluated data" in r.output
