"""GroupNorm segmenters: each region normalised by its own statistics, in training and at inference alike."""

from __future__ import annotations

import pytest
import torch

from wsiseg.errors import ConfigError, ModelConfigError
from wsiseg.models.io import load_deformseg, save_deformseg
from wsiseg.models.segmenter import build_segmenter, to_group_norm
from wsiseg.output.classes import default_classes
from wsiseg.training.config import TrainConfig, build_net

SMALL = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}


def _norms(module: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in module.modules() if "Norm" in type(m).__name__}


def test_group_norm_replaces_every_batchnorm_and_keeps_timm_activations():
    seg = build_segmenter("unet", "tu-mobilenetv3_small_100", 3, norm="group", **SMALL)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in seg.modules())
    assert _norms(seg) == {"GroupNorm", "GroupNormAct"}
    bn = build_segmenter("unet", "tu-mobilenetv3_small_100", 3, **SMALL)
    # the activations of timm's BatchNormAct2d survive: same activation modules, in the same places
    acts = [type(m.act).__name__ for m in bn.modules() if hasattr(m, "act") and isinstance(m, torch.nn.BatchNorm2d)]
    gacts = [type(m.act).__name__ for m in seg.modules() if type(m).__name__ == "GroupNormAct"]
    assert acts == gacts and "Hardswish" in acts
    assert seg.config()["norm"] == "group" and "norm" not in bn.config()  # older model files keep their spec


def test_a_region_is_labelled_the_same_whatever_else_is_in_its_batch():
    """BatchNorm in training mixes the batch's statistics; GroupNorm does not, so training sees what inference
    will."""
    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 64)
    for norm, independent in (("group", True), ("batch", False)):
        seg = build_segmenter("unet", "resnet18", 2, norm=norm, **SMALL).train()
        with torch.no_grad():
            together, alone = seg(x)[0], seg(x[:2])[0]
        assert torch.allclose(together, alone, atol=1e-5) is independent, norm


def test_group_count_divides_the_channels():
    m = to_group_norm(torch.nn.Sequential(torch.nn.BatchNorm2d(24), torch.nn.BatchNorm2d(20), torch.nn.BatchNorm2d(7)))
    assert [(g.num_groups, g.num_channels) for g in m] == [(8, 24), (4, 20), (1, 7)]


def test_group_norm_model_file_round_trips(tmp_path):
    cfg = TrainConfig(arch="unet", encoder="resnet18", norm="group", out_size=(32, 32), map_size=(16, 16), **SMALL)
    net = build_net(cfg, 3).eval()
    path = tmp_path / "gn.safetensors"
    save_deformseg(path, net, default_classes(["a", "b", "c"]))
    loaded = load_deformseg(path).net
    assert _norms(loaded.segmenter) == {"GroupNorm"}
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(None, x).logits, loaded(None, x).logits)


def test_pretrained_encoder_keeps_its_convolutions_and_each_batchnorm_scale_in_its_groupnorm(tmp_path):
    """Weights load into the BatchNorm encoder they were made for; each GroupNorm takes its layer's scale/shift."""
    from safetensors.torch import save_file

    from wsiseg.models.pretrained import find_encoder

    torch.manual_seed(5)
    state = find_encoder(build_segmenter("unet", "resnet18", 2, **SMALL)).state_dict()
    state = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    seg = build_segmenter("unet", "resnet18", 2, norm="group", encoder_weights=tmp_path / "w.safetensors", **SMALL)
    got = find_encoder(seg).state_dict()
    assert _norms(seg) == {"GroupNorm"}
    assert torch.equal(got["conv1.weight"], state["conv1.weight"])
    assert torch.equal(got["layer2.0.conv2.weight"], state["layer2.0.conv2.weight"])
    for name in ("bn1", "layer1.1.bn2", "layer2.0.downsample.1"):
        assert torch.equal(got[f"{name}.weight"], state[f"{name}.weight"]), name
        assert torch.equal(got[f"{name}.bias"], state[f"{name}.bias"]), name
    assert not any(k.endswith("running_mean") for k in got)  # BatchNorm's statistics are gone
    assert seg.encoder_init["source"] != "random"
    # a fresh GroupNorm net keeps the identity affine of a fresh BatchNorm
    fresh = build_segmenter("unet", "resnet18", 2, norm="group", **SMALL)
    assert torch.equal(find_encoder(fresh).state_dict()["bn1.weight"], torch.ones(64))
    assert TrainConfig(norm="group", encoder_weights="imagenet").norm == "group"


def test_unknown_norms_are_refused():
    with pytest.raises(ConfigError, match="norm"):
        TrainConfig(norm="layer")
    with pytest.raises(ModelConfigError, match="unknown norm 'layer'"):
        build_segmenter("unet", "resnet18", 2, norm="layer")


def test_frozen_batchnorm_is_the_layer_at_inference_in_training_too():
    # A BatchNorm (plain, and timm's with its activation) with learnt statistics: the frozen layer gives what
    # it gives in eval mode, in any mode, whatever the batch.
    from timm.layers import BatchNormAct2d

    from wsiseg.models.segmenter import FrozenBatchNorm

    torch.manual_seed(2)
    x = torch.randn(4, 6, 5, 7)
    for bn in (torch.nn.BatchNorm2d(6), BatchNormAct2d(6, act_layer=torch.nn.ReLU6)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
        frozen = FrozenBatchNorm(bn).train()
        with torch.no_grad():
            want = bn.eval()(x)
            torch.testing.assert_close(frozen(x), want)
            torch.testing.assert_close(frozen(x[:1]), want[:1])
        assert [n for n, _ in frozen.named_parameters()] == ["weight", "bias"]


def test_frozen_norm_keeps_the_pretrained_statistics_in_the_encoder_and_round_trips(tmp_path):
    """norm: frozen with a weights file: the encoder normalises with the file's statistics, the decoder per
    region; a region's labels do not depend on its batch in training; the model file rebuilds it."""
    from safetensors.torch import save_file

    from wsiseg.models.pretrained import find_encoder
    from wsiseg.models.segmenter import FrozenBatchNorm

    torch.manual_seed(6)
    state = find_encoder(build_segmenter("unet", "resnet18", 2, **SMALL)).state_dict()
    state = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.abs() + 0.1 if k.endswith("running_var") else v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    seg = build_segmenter("unet", "resnet18", 2, norm="frozen", encoder_weights=tmp_path / "w.safetensors", **SMALL)
    enc = find_encoder(seg)
    assert _norms(enc) == {"FrozenBatchNorm"} and _norms(seg) == {"FrozenBatchNorm", "GroupNorm"}
    scale = state["bn1.weight"] / torch.sqrt(state["bn1.running_var"] + 1e-5)
    torch.testing.assert_close(enc.state_dict()["bn1.weight"], scale)
    torch.testing.assert_close(enc.state_dict()["bn1.bias"], state["bn1.bias"] - state["bn1.running_mean"] * scale)
    assert seg.config()["norm"] == "frozen"
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(seg.train()(x)[0], seg(x[:1])[0], atol=1e-5, rtol=1e-5)
    cfg = TrainConfig(arch="unet", encoder="resnet18", norm="frozen", out_size=(32, 32), map_size=(16, 16), **SMALL)
    net = build_net(cfg, 3).eval()
    assert any(isinstance(m, FrozenBatchNorm) for m in net.modules())
    save_deformseg(tmp_path / "f.safetensors", net, default_classes(["a", "b", "c"]))
    loaded = load_deformseg(tmp_path / "f.safetensors").net
    with torch.no_grad():
        assert torch.equal(net(None, x[:1]).logits, loaded(None, x[:1]).logits)
