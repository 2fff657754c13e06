"""Joint training loop: loss goes down, exact resume, divergence, early stopping, files, CLI."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from _training import CLASSES, TINY, NuclsTiles
from PIL import Image

from wsiseg.errors import ConfigError, WsisegError
from wsiseg.training.checkpoint import load_checkpoint, read_checkpoint_config
from wsiseg.training.config import TrainConfig, build_net, load_train_config
from wsiseg.training.log import LOG_COLUMNS
from wsiseg.training.loop import train


@pytest.fixture(scope="module")
def data(nucls):
    return NuclsTiles(nucls / "train", 4), NuclsTiles(nucls / "test", 2)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = train(TrainConfig(**TINY, epochs=4), *data, CLASSES, out, progress=False)
    return out, result


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


# -- a real run ------------------------------------------------------------


def test_training_reduces_loss_and_writes_a_loadable_model(trained, data):
    from wsiseg.models.io import load_deformseg

    out, r = trained
    assert r.epochs == 4 and r.steps == 8 and not r.stopped_early
    first, last = r.history[0], r.history[-1]
    assert last["loss"] < first["loss"] and last["seg"] < first["seg"]
    assert 0.0 <= r.best_val_miou_full <= 1.0 and 0.0 <= r.best_val_miou_deformed <= 1.0
    assert r.best_val_miou_full == max(row["val_miou_full"] for row in r.history)

    m = load_deformseg(out / "model.safetensors")
    assert [c.name for c in m.classes] == [c.name for c in CLASSES]
    t = m.metadata["training"]
    assert t["config"]["encoder"] == "tu-resnet10t" and t["best"]["epoch"] == r.best_epoch
    assert t["seconds_per_iter"] > 0 and t["epochs"] == r.best_epoch
    item = data[1][0]
    pred = m.net.predict_lowres(None, item["image"][None])
    assert pred.labels.shape == (1, 32, 32) and int(pred.labels.max()) < 3


def test_log_csv_and_curves(trained):
    out, _ = trained
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == LOG_COLUMNS
    assert [int(x["epoch"]) for x in rows] == [1, 2, 3, 4]
    assert [int(x["step"]) for x in rows] == [2, 4, 6, 8]
    assert all(float(x["val_miou_full"]) >= 0 and float(x["sec_per_iter"]) > 0 for x in rows)
    # both loss terms' gradients on the deformation net, logged per epoch
    assert all(float(x["grad_seg"]) > 0 and float(x["grad_edge"]) > 0 for x in rows)
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] >= 400 and im.mode == "RGB"
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something is drawn
    assert TrainConfig.from_file(out / "train_config.yaml") == TrainConfig(**TINY, epochs=4)
    assert read_checkpoint_config(out)["epochs"] == 4


def test_refuses_to_clobber_a_previous_run(trained, data):
    out, _ = trained
    with pytest.raises(WsisegError, match="previous training run"):
        train(_cfg(epochs=1), *data, CLASSES, out, progress=False)


# -- exact resume ----------------------------------------------------------


def test_resume_matches_an_uninterrupted_run(data, tmp_path):
    pytest.importorskip("wsiseg.training.dataset")  # flips and rotations come from wsiseg.training.dataset.augment
    aug = {"flips": True, "rot90": True, "color_jitter": 0.1, "scale_jitter": 1.5}
    straight = train(_cfg(epochs=2, **aug), *data, CLASSES, tmp_path / "a", progress=False)
    train(_cfg(epochs=1, **aug), *data, CLASSES, tmp_path / "b", progress=False)
    resumed = train(_cfg(epochs=2, **aug), *data, CLASSES, tmp_path / "b", resume=True, progress=False)

    assert resumed.steps == straight.steps == 4
    key = ("epoch", "step", "lr", "loss", "seg", "edge", "val_miou_deformed", "val_miou_full")
    assert [[row[k] for k in key] for row in resumed.history] == [[row[k] for k in key] for row in straight.history]
    a = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")
    assert a.model.keys() == b.model.keys()
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    sa, sb = a.state["optimizer"]["state"], b.state["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)

    # Done already: resuming again does nothing; changing the model is refused.
    again = train(_cfg(epochs=2, **aug), *data, CLASSES, tmp_path / "b", resume=True, progress=False)
    assert again.steps == 4 and again.epochs == 2
    with pytest.raises(ConfigError, match="lr"):
        train(_cfg(epochs=3, lr=0.01, **aug), *data, CLASSES, tmp_path / "b", resume=True, progress=False)


def test_freeze_bn_after_keeps_running_statistics_fixed(data, tmp_path):
    runs = {
        "one": _cfg(epochs=1, val_fraction=0.0),
        "frozen": _cfg(epochs=3, val_fraction=0.0, freeze_bn_after=1),
        "free": _cfg(epochs=3, val_fraction=0.0),
    }
    state = {}
    for name, cfg in runs.items():
        train(cfg, *data, CLASSES, tmp_path / name, progress=False)
        state[name] = load_checkpoint(tmp_path / name / "checkpoint.safetensors").model
    keys = [k for k in state["one"] if k.endswith(("running_mean", "running_var"))]
    assert keys
    # frozen after epoch 1 (which is the same in all three runs): epochs 2-3 leave the statistics as they were
    assert all(torch.equal(state["frozen"][k], state["one"][k]) for k in keys)
    # without freezing they keep moving; the weights train on either way
    assert any(not torch.equal(state["free"][k], state["one"][k]) for k in keys)
    weights = [k for k in state["one"] if k.endswith("weight")]
    assert any(not torch.equal(state["frozen"][k], state["one"][k]) for k in weights)


def test_scale_jitter_samples_each_batch_on_a_rescaled_grid(data, tmp_path, monkeypatch):
    import wsiseg.training.step as train_mod  # one step and validation sample at training_geometry

    seen: list[tuple[tuple[int, int], float]] = []
    real = train_mod.training_geometry

    def spy(net, shape, mpp, spacing_um, factor=1.0):
        geo = real(net, shape, mpp, spacing_um, factor)
        seen.append((geo.grid, factor))
        # the map and kernel follow the grid by the model's rule, as for any region of that grid
        assert geo == net.geometry(*shape, grid=geo.grid)
        return geo

    monkeypatch.setattr(train_mod, "training_geometry", spy)
    train(_cfg(epochs=3, scale_jitter=1.5, val_fraction=0.0), *data, CLASSES, tmp_path / "a", progress=False)
    train_steps = [(g, f) for g, f in seen if f != 1.0]
    assert len(train_steps) == 6  # 4 tiles, batch 2, 3 epochs: each batch on its own scale
    assert all(1 / 1.5 <= f <= 1.5 and g[0] == g[1] == round(32 * f) for g, f in train_steps)
    assert len({g for g, _ in train_steps}) > 1
    seen.clear()
    train(_cfg(epochs=1, val_fraction=0.0), *data, CLASSES, tmp_path / "b", progress=False)
    assert seen and all(g == (32, 32) and f == 1.0 for g, f in seen)  # off by default: the region's own grid


def test_physical_training_samples_every_region_at_one_spacing(nucls, tmp_path, monkeypatch):
    """Regions of two resolutions, trained at 4 um per sample: grids follow each region's extent."""
    import wsiseg.training.step as train_mod  # one step and validation sample at training_geometry
    from wsiseg.models.io import load_deformseg

    fine, coarse = NuclsTiles(nucls / "train", 4), NuclsTiles(nucls / "train", 2, size=(64, 64))

    class WithMpp(torch.utils.data.Dataset):
        """Both sets, each with its MPP (as wsiseg.training.dataset.RegionDataset describes its items)."""

        parts = [(fine, 0.25)] * len(fine) + [(coarse, 0.5)] * len(coarse)

        def __len__(self):
            return len(self.parts)

        def _at(self, i):
            base, mpp = self.parts[i]
            return base, i if i < len(fine) else i - len(fine), mpp

        def __getitem__(self, i):
            base, j, mpp = self._at(i)
            return {**base[j], "mpp": mpp}

        def item_mpp(self, i):
            return self._at(i)[2], "items"

    ds = WithMpp()
    grids = []
    real = train_mod.training_geometry
    monkeypatch.setattr(
        train_mod, "training_geometry", lambda *a, **k: grids.append(real(*a, **k).grid) or real(*a, **k)
    )
    out = tmp_path / "run"
    train(_cfg(epochs=1, sample_spacing_um=4.0, val_fraction=0.0), ds, None, CLASSES, out, progress=False)
    # 128 px x 0.25 um and 64 px x 0.5 um: both 32 um wide, 8 samples at 4 um (not the 32 x 32 pixel-rule grid)
    assert grids and set(grids) == {(8, 8)}
    model = load_deformseg(out / "model.safetensors")
    assert model.scale.sample_spacing_um == 4.0 and model.scale.regions == 6

    with pytest.raises(WsisegError, match="needs an MPP for every training region"):
        train(
            _cfg(epochs=1, sample_spacing_um=4.0, val_fraction=0.0), fine, None, CLASSES, tmp_path / "x", progress=False
        )


def test_checkpoint_state_round_trips_without_pickle(tmp_path):
    from wsiseg.training.checkpoint import _pack, _unpack

    state = {
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}],
        },
        "rng": {"numpy": np.random.get_state(), "python": __import__("random").getstate()},
    }
    tensors: dict = {}
    packed = _pack(state, "s", tensors)
    import json

    back = _unpack(json.loads(json.dumps(packed)), tensors)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["optimizer"]["state"][0]["m"], torch.ones(2))
    assert back["rng"]["python"] == state["rng"]["python"]
    np.testing.assert_array_equal(back["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert back["rng"]["numpy"][1].dtype == np.uint32


# -- failure modes ----------------------------------------------------------


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(data, tmp_path, monkeypatch):
    import wsiseg.training.loop as T

    real = T.JointLoss
    calls = {"n": 0}

    class Poisoned(real):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 3:  # first step of epoch 2
                out.total = out.total * float("nan")
            return out

    monkeypatch.setattr(T, "JointLoss", Poisoned)
    with pytest.raises(
        WsisegError, match=r"training diverged: loss is NaN at epoch 2 step 3; the last good checkpoint"
    ):
        train(_cfg(epochs=3), *data, CLASSES, tmp_path, progress=False)
    ck = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert ck.meta["run"]["epoch"] == 1 and ck.meta["run"]["step"] == 2
    assert all(torch.isfinite(v.float()).all() for v in ck.model.values())
    assert (tmp_path / "model.safetensors").is_file()
    # ... and the run can be continued from it.
    monkeypatch.setattr(T, "JointLoss", real)
    r = train(_cfg(epochs=2), *data, CLASSES, tmp_path, resume=True, progress=False)
    assert r.epochs == 2 and math.isfinite(r.history[-1]["loss"])


def test_early_stopping(data, tmp_path, monkeypatch):
    import wsiseg.training.loop as T

    monkeypatch.setattr(T, "validate", lambda *a, **k: T.Scores(0.5, 0.5, 3))
    r = train(_cfg(epochs=20, patience=1), data[0], data[1], CLASSES, tmp_path, progress=False)
    assert r.stopped_early and r.epochs == 2 and r.best_epoch == 1
    assert train(_cfg(epochs=20, patience=1), *data, CLASSES, tmp_path, resume=True, progress=False).epochs == 2


def test_one_class_validation_warns(data, tmp_path):
    class Background(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            item = dict(data[1][0])
            item["labels"] = torch.zeros_like(item["labels"])
            return item

    messages: list[str] = []
    with pytest.warns(UserWarning, match="only 1 class"):
        r = train(
            _cfg(epochs=1, sampler="uniform"),
            data[0],
            Background(),
            CLASSES,
            tmp_path,
            progress=False,
            log=messages.append,
        )
    assert r.best_val_miou_full is not None and any("only 1 class" in m for m in messages)


def test_bad_labels_are_refused(data, tmp_path):
    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            item = dict(data[0][i])
            item["labels"] = torch.full_like(item["labels"], 7)
            return item

    with pytest.raises(WsisegError, match="label value 7"):
        train(_cfg(epochs=1), Bad(), None, CLASSES, tmp_path, progress=False)


# -- samplers ----------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["uniform", "edge"])
def test_fixed_samplers_train_through_the_same_loop(sampler, data, tmp_path):
    from wsiseg.models.io import load_deformseg

    r = train(_cfg(epochs=1, sampler=sampler), data[0], None, CLASSES, tmp_path, progress=False)
    assert r.epochs == 1 and r.best_epoch == 1 and r.best_val_miou_full is None
    assert r.history[0]["edge"] == 0.0  # no trainable density: the edge term is off
    m = load_deformseg(tmp_path / "model.safetensors")
    assert m.net.sampler == sampler and m.net.deform is None


# -- configuration -------------------------------------------------------------


def test_config_round_trip_and_validation(tmp_path):
    cfg = TrainConfig(out_size="48x64", decoder_channels=[32, 16, 8], lr="1e-3")
    assert cfg.out_size == (64, 48) and cfg.decoder_channels  # "WxH" string -> (h, w) == (32, 16, 8) and cfg.lr == 1e-3
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig(joint=False).effective_gamma_edge == 0.0
    assert TrainConfig(sampler="uniform").effective_gamma_edge == 0.0
    assert TrainConfig().effective_gamma_edge == 10.0
    assert TrainConfig(patience=0).patience is None
    assert build_net(TrainConfig(grid_iterations="3", encoder="resnet18"), 2).grid_iterations == 3

    bad = [
        ({"epoch": 3}, "unknown training option 'epoch'"),
        ({"sampler": "random"}, "'sampler'"),
        ({"loss": "dice"}, "'loss'"),
        ({"out_size": (0, 4)}, "'out_size'"),
        ({"map_size": "big"}, "'map_size'"),
        ({"lr": 0}, "'lr'"),
        ({"lr": "fast"}, "'lr'"),
        ({"batch_size": 1.5}, "'batch_size'"),
        ({"flips": "yes"}, "'flips'"),
        ({"val_fraction": 1.0}, "'val_fraction'"),
        ({"support": 4}, "'support'"),
        ({"device": "gpu"}, "'device'"),
        ({"gamma_edge": -1}, "'gamma_edge'"),
        ({"scale_jitter": 0.5}, "'scale_jitter'"),
        ({"grid_iterations": 0}, "'grid_iterations'"),
        ({"grid_iterations": 2.5}, "'grid_iterations'"),
        ({"grid_iterations": 65}, "'grid_iterations': must be at most 64"),
    ]
    for d, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            TrainConfig.from_dict(d)

    p = tmp_path / "train.yaml"
    p.write_text("train:\n  epochs: 3\n  lr: 1e-4\n  out_size: [64, 32]\n")
    cfg = TrainConfig.from_dict(load_train_config(p))
    assert cfg.epochs == 3 and cfg.lr == 1e-4 and cfg.out_size == (64, 32)
    p.write_text("epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(p)


def test_unavailable_device_and_unknown_encoder(data, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            train(_cfg(epochs=1, device="cuda"), data[0], None, CLASSES, tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="encoder"):
        train(_cfg(epochs=1, encoder="no-such-encoder"), data[0], None, CLASSES, tmp_path / "b", progress=False)


# -- command line ----------------------------------------------------------------


def test_cli_train_end_to_end(nucls, tmp_path):
    pytest.importorskip("wsiseg.training.dataset")
    from click.testing import CliRunner

    from wsiseg.cli.app import main
    from wsiseg.models.io import load_deformseg

    classes = tmp_path / "classes.yaml"
    classes.write_text("classes:\n  - {value: 1, name: non-tumour nucleus}\n  - {value: 2, name: tumour nucleus}\n")
    config = tmp_path / "train.yaml"
    config.write_text("encoder: tu-resnet10t\nencoder_depth: 3\ndecoder_channels: [32, 16, 8]\nrot90: false\n")
    overlay = tmp_path / "overlay.yaml"  # a second --config overrides the first
    overlay.write_text("rot90: true\ncolor_jitter: 0.05\n")
    out = tmp_path / "run"
    args = [
        "train",
        str(nucls / "train"),
        "--classes",
        str(classes),
        "--out",
        str(out),
        "--config",
        str(config),
        "--config",
        str(overlay),
        "--epochs",
        "1",
        "--out-size",
        "32x32",
        "--map-size",
        "16",
        "--hr-size",
        "128x128",
        "--device",
        "cpu",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "8 training pairs" in r.output and "model: " in r.output and "val mIoU full-res" in r.output
    m = load_deformseg(out / "model.safetensors")
    assert [c.name for c in m.classes] == ["background", "non-tumour nucleus", "tumour nucleus"]
    trained = m.metadata["training"]["config"]
    assert len(m.metadata["training"]["data_hash"]) == 64 and trained["rot90"] is True
    assert trained["color_jitter"] == 0.05 and trained["encoder"] == "tu-resnet10t"  # both files, in order
    # where it was trained: weights are reproducible on one CPU model, not across them
    env = m.metadata["training"]["environment"]
    assert env["device"] == "cpu" and env["gpu"] is None and env["torch_threads"] >= 1
    assert env["torch"] == torch.__version__.split("+")[0]
    assert env["cpu"] and env["wsiseg"]

    # Same folder again: refused before any work; --resume continues with the stored options.
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "previous training run" in r.output
    r = CliRunner().invoke(
        main, ["train", str(nucls / "train"), "--classes", str(classes), "--out", str(out), "--resume", "--epochs", "2"]
    )
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output and "epoch 2/2" in r.output
    r = CliRunner().invoke(main, args[:-2] + ["--out-size", "0x3"])
    assert r.exit_code == 2 and "WIDTHxHEIGHT" in r.output


def test_gradient_norms_split_the_two_terms(data, tmp_path):
    """grad_seg + grad_edge are the two terms' shares of the deformation net's gradient."""
    from wsiseg.models.losses import JointLoss
    from wsiseg.training.config import build_net
    from wsiseg.training.step import edge_gradient, gradient_norms

    torch.manual_seed(0)
    net = build_net(_cfg(), len(CLASSES))
    items = [data[0][i] for i in range(2)]
    image = torch.stack([it["image"] for it in items]).float() / 255
    labels = torch.stack([it["labels"] for it in items])
    crit = JointLoss("focal", 100.0)

    def grads(which):
        net.zero_grad(set_to_none=True)
        out = net(None, image, labels)
        t = crit(out.logits, out.labels, out.d, out.edge_target)
        g_edge = edge_gradient(net, t.edge, crit.gamma_edge)
        {"seg": t.seg, "edge": crit.gamma_edge * t.edge, "total": t.total}[which].backward()
        return g_edge, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.deform.parameters()]

    g_edge, total = grads("total")
    norms = gradient_norms(net, g_edge)
    _, seg_only = grads("seg")
    _, edge_only = grads("edge")
    ref_seg = torch.sqrt(sum(g.double().square().sum() for g in seg_only))
    ref_edge = torch.sqrt(sum(g.double().square().sum() for g in edge_only))
    assert float(norms[0]) == pytest.approx(float(ref_seg), rel=1e-3)
    assert float(norms[1]) == pytest.approx(float(ref_edge), rel=1e-3)
    assert float(norms[0]) > 0 and float(norms[1]) > 0
    # the single-loss variant has no edge share
    assert edge_gradient(net, torch.zeros(()), 0.0) is None


# -- physical scale ------------------------------------------------------------------


def test_model_without_mpp_records_an_unknown_scale_and_says_so_once(data, tmp_path):
    lines: list[str] = []
    from wsiseg.models.io import load_deformseg

    train(_cfg(epochs=1), data[0], None, CLASSES, tmp_path / "run", progress=False, log=lines.append)

    scale = load_deformseg(tmp_path / "run" / "model.safetensors").metadata["scale"]
    assert scale == {
        "mpp_working": None,
        "sample_spacing_um": None,
        "source": "unknown",
        "regions": 0,
        "regions_without_mpp": 4,
    }
    said = [line for line in lines if "MPP" in line]
    assert len(said) == 1 and "no physical scale" in said[0]


def test_cli_train_with_mpp_records_the_scale(nucls, tmp_path):
    """256 px NuCLS tiles at --mpp 0.25, read at 128 px (downsample 2) on a 32 x 32 grid: 0.5 um per working
    pixel, one sample every 128 * 0.5 / 32 = 2 um."""
    from click.testing import CliRunner

    from wsiseg.training.classmap import load_class_map
    from wsiseg.cli.app import main
    from wsiseg.training.dataset import build_dataset
    from wsiseg.training.pairs import load_pairs, with_mpp
    from wsiseg.models.io import load_deformseg
    from wsiseg.training.batches import training_scale
    from wsiseg.training.config import build_net

    classes = tmp_path / "classes.yaml"
    classes.write_text("classes:\n  - {value: 1, name: non-tumour nucleus}\n  - {value: 2, name: tumour nucleus}\n")
    out = tmp_path / "run"
    args = [
        "train",
        str(nucls / "train"),
        "--classes",
        str(classes),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--encoder",
        "tu-resnet10t",
        "--out-size",
        "32",
        "--map-size",
        "16",
        "--hr-size",
        "128",
        "--device",
        "cpu",
        "--mpp",
        "0.25",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "scale: 0.5 um per working pixel, one sample every 2 um (mpp option, 8 regions)" in r.output
    m = load_deformseg(out / "model.safetensors")
    assert m.metadata["scale"] == {
        "mpp_working": 0.5,
        "sample_spacing_um": 2.0,
        "source": "mpp option",
        "regions": 8,
        "regions_without_mpp": 0,
    }
    assert m.scale.sample_spacing_um == 2.0

    # --mpp fills only pairs without an MPP; items carry mpp; the spacing is measured with each region's own
    # training geometry: a 128 x 64 working raster gets a 64 x 32 grid (short side to the model's 32), 1 um.
    pairs = with_mpp(load_pairs(nucls / "train"), 0.25)[:2]
    assert with_mpp(pairs, 9.0) == pairs and with_mpp(pairs, None) == pairs
    ds = build_dataset(pairs, load_class_map(classes), hr_size=(128, 128))
    assert [ds.item_mpp(i) for i in range(2)] == [(0.5, "mpp option")] * 2 and ds[0]["mpp"] == 0.5
    net = build_net(_cfg(), 3)
    assert training_scale(net, ds).sample_spacing_um == 2.0
    thin = training_scale(net, [{"labels": torch.zeros(128, 64), "mpp": 0.5}])
    assert (thin.sample_spacing_um, thin.source) == (1.0, "items")


def test_region_alone_in_its_batch_is_left_out_or_refused_never_a_crash(nucls, tmp_path):
    """A batch of one region whose grid is 1 x 1 at the encoder's deepest level breaks BatchNorm in training."""
    from wsiseg.training.batches import size_batches

    # Depth 5 (stride 32) on a 32 x 32 grid: the deepest maps are 1 x 1, so one region alone cannot train.
    deep = TrainConfig(**{**TINY, "encoder_depth": 5, "decoder_channels": (32, 16, 8, 8, 8), "epochs": 1})
    pair = NuclsTiles(nucls / "train", 2)  # two 128 x 128 regions: one batch of two
    odd = NuclsTiles(nucls / "test", 1, size=(96, 96))  # the only region of its shape
    said: list[str] = []
    train(
        deep,
        torch.utils.data.ConcatDataset([pair, odd]),
        None,
        CLASSES,
        tmp_path / "a",
        progress=False,
        log=said.append,
    )
    assert any("1 of 3 training regions are left out" in line for line in said), said
    with pytest.raises(WsisegError, match="no training batch can run") as err:
        train(deep, odd, None, CLASSES, tmp_path / "b", progress=False)
    assert "\n" not in str(err.value)
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 4), (4, 4), (4, 4), (2, 2), (8, 8)]
    batches = size_batches(shapes, 2, shuffle=True, generator=gen, alone=lambda s: s != (2, 2))
    # (4, 4): a pair, the third item's batch of one dropped; (2, 2) cannot train alone: dropped; (8, 8) can: kept.
    assert [4] in batches and sorted(len(b) for b in batches) == [1, 2] and not any(3 in b for b in batches)
    assert sorted(size_batches(shapes, 2, shuffle=False)) == [[0, 1], [2], [3], [4]]


def test_hostile_checkpoint_metadata_is_refused_in_one_line(tmp_path):
    """--resume reads a checkpoint's JSON: deep nesting and ``format_version: true`` are refused, not crashes."""
    from safetensors.torch import save_file

    from wsiseg.training.checkpoint import CHECKPOINT_FORMAT, _META_KEY

    path = tmp_path / "checkpoint.safetensors"
    head = '{"format": "%s", "format_version": %s' % (CHECKPOINT_FORMAT, "%s")
    for version, extra, fragment in (
        ("1", ', "x": ' + "[" * 100_000 + "]" * 100_000, "nested deeper"),
        ("true", "", "format version True"),
    ):
        save_file({"w": torch.zeros(1)}, str(path), metadata={_META_KEY: head % version + extra + "}"})
        with pytest.raises(WsisegError, match=fragment) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
