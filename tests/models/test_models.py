"""Deformation net, segmenter factory and the combined DeformSegNet (CPU, tiny sizes)."""

import json
import math
import socket

import numpy as np
import pytest
import torch
from torch import nn

from wsiseg.models import (
    TTA_FLIPS,
    DeformationNet,
    DeformSegNet,
    JointLoss,
    PaddedSegmenter,
    build_segmenter,
    count_parameters,
)
from wsiseg.sampling.coords import uniform_grid
from wsiseg.sampling.edges import edge_density, edge_target
from wsiseg.sampling.sample import downsample_labels, sample_image_lod

MAP = (8, 10)
OUT = (36, 40)  # the reference shape: sources of this aspect (72 x 80) get exactly this grid


@pytest.fixture()
def no_network(monkeypatch):
    """Any socket connection fails: model building must be offline."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny_segmenter():
    torch.manual_seed(0)
    return build_segmenter("linknet", "resnet18", num_classes=3)


def _net(segmenter, sampler="learned", **kw):
    torch.manual_seed(0)
    return DeformSegNet(segmenter, sampler=sampler, map_size=MAP, out_size=OUT, **kw)


# -- deformation net ----------------------------------------------------------


def test_deformation_net_density():
    torch.manual_seed(0)
    net = DeformationNet()
    d = net(torch.rand(3, 3, 7, 9))
    assert d.shape == (3, 1, 7, 9)
    assert d.dtype == torch.float32
    assert (d > 0).all()
    assert torch.allclose(d.sum(dim=(1, 2, 3)), torch.ones(3), atol=1e-5)


def test_deformation_net_layers_and_he_init():
    torch.manual_seed(0)
    net = DeformationNet()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [24, 24, 3, 1]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 3 + [(1, 1)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 3
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 3
    for conv in convs[:3]:
        fan_in = conv.in_channels * 9
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.15)
    with pytest.raises(ValueError, match="expected"):
        net(torch.rand(1, 4, 8, 8))


# -- segmenter factory ----------------------------------------------------------


@pytest.mark.parametrize(
    "arch, encoder",
    [
        ("unet", "resnet18"),
        ("fpn", "mobilenet_v2"),
        ("deeplabv3plus", "resnet18"),
        ("linknet", "tu-mobilenetv3_small_050"),
    ],
)
def test_segmenter_factory_offline_any_size(no_network, arch, encoder):
    torch.manual_seed(0)
    seg = build_segmenter(arch, encoder, num_classes=3).eval()
    assert isinstance(seg, PaddedSegmenter)
    assert seg.config()["arch"] == arch and seg.config()["encoder"] == encoder
    assert count_parameters(seg) > 0
    with torch.no_grad():
        for h, w in [(36, 80), (33, 47)]:
            assert seg(torch.rand(1, 3, h, w)).shape == (1, 3, h, w)


def test_segmenter_unknown_names():
    with pytest.raises(ValueError, match="unknown architecture 'nope'; available: .*unet"):
        build_segmenter("nope", "resnet18")
    with pytest.raises(ValueError, match="unknown encoder 'nope'; available: .*resnet18"):
        build_segmenter("unet", "nope")
    with pytest.raises(ValueError, match="timm"):
        build_segmenter("unet", "tu-not_a_timm_model")
    with pytest.raises(ValueError, match="mit_b0"):
        build_segmenter("linknet", "mit_b0")  # known names, unsupported pair
    # Encoder weights are opt-in (tests/models/test_pretrained.py); a missing file is a one-line error.
    with pytest.raises(ValueError, match="no-such-weights.pt: encoder weights file not found"):
        build_segmenter("unet", "resnet18", encoder_weights="no-such-weights.pt")


@pytest.mark.parametrize("mode", ["reflect", "replicate", "constant"])
def test_padding_wrapper_crops_back_exactly(mode):
    # An identity "model" must come back bit-for-bit: padding and crop align.
    seg = PaddedSegmenter(nn.Identity(), stride=32, pad_mode=mode)
    for h, w in [(36, 80), (5, 3), (32, 64), (1, 33)]:
        x = torch.rand(2, 3, h, w)
        assert torch.equal(seg(x), x)


# -- combined net ----------------------------------------------------------------


def test_sampler_kernel_is_not_a_parameter(tiny_segmenter):
    net = _net(tiny_segmenter)
    names = [n for n, _ in net.named_parameters()]
    assert names and all(n.startswith(("deform.", "segmenter.")) for n in names)
    assert "deformed_grid.kernel" in dict(net.named_buffers())
    assert count_parameters(net) == count_parameters(net.deform) + count_parameters(tiny_segmenter)


def test_forward_outputs(tiny_segmenter):
    net = _net(tiny_segmenter)
    x_hr = torch.rand(2, 3, 72, 80)
    labels = torch.zeros(2, 64, 80, dtype=torch.long)
    labels[:, 10:30, 20:50] = 2
    labels[1, 40:, :] = 255
    out = net(None, x_hr, labels)
    assert out.d.shape == (2, 1, *MAP)
    assert torch.allclose(out.d.sum(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)
    assert out.grid.shape == (2, *OUT, 2)
    assert out.grid.min() >= 0 and out.grid.max() <= 1
    assert out.image.shape == (2, 3, *OUT)
    assert out.logits.shape == (2, 3, *OUT)
    assert out.labels.shape == (2, *OUT) and set(out.labels.unique().tolist()) <= {0, 2, 255}
    assert torch.equal(out.labels_lr, downsample_labels(labels, MAP))
    assert torch.equal(out.edge_target, edge_target(downsample_labels(labels, MAP)))
    assert torch.equal(out.edge_valid, downsample_labels(labels, MAP).unsqueeze(1) != 255)
    assert (out.edge_target[~out.edge_valid] == 0).all()
    # the ignored band makes no edge: same target as with that band labelled like its neighbour
    relabelled = labels.clone()
    relabelled[1, 40:, :] = 0
    rows = MAP[0] * 40 // 64 - 1  # the rows above the band, away from its blur
    assert torch.equal(out.edge_target[1, :, :rows], edge_target(downsample_labels(relabelled, MAP))[1, :, :rows])
    plain = net(None, x_hr)
    assert plain.labels is None and plain.edge_target is None and plain.edge_valid is None
    with pytest.raises(ValueError, match="density map"):
        net(torch.rand(2, 3, 9, 9), x_hr)


def test_region_shape_sets_the_geometry(tiny_segmenter):
    # A region of another shape is sampled with the shared rule, not the square reference.
    net = _net(tiny_segmenter)
    x_hr = torch.rand(1, 3, 36, 400)
    geo = net.geometry(36, 400)
    assert geo.grid == (14, 160) and geo.map == (4, 40)  # long side capped at 4 x 40, map at least 4
    out = net(None, x_hr)
    assert out.grid.shape == (1, 14, 160, 2) and out.d.shape == (1, 1, 4, 40)
    fixed = net(None, x_hr, geometry=net.geometry(36, 400, grid=(9, 100)))
    assert fixed.grid.shape == (1, 9, 100, 2)


def test_gradients_reach_deformation_net_through_sampling(tiny_segmenter):
    net = _net(tiny_segmenter)
    out = net(None, torch.rand(2, 3, 72, 80))
    out.logits.square().mean().backward()  # no edge loss: only the sampling path
    for p in net.deform.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert all(c.weight.grad.abs().sum() > 0 for c in net.deform.modules() if isinstance(c, nn.Conv2d))
    net.zero_grad()


def test_gather_callable_matches_tensor_path(tiny_segmenter):
    net = _net(tiny_segmenter).eval()
    x_hr = torch.rand(1, 3, 72, 80)
    x_lr = torch.rand(1, 3, *MAP)
    seen = []

    def gather(grid):
        seen.append(grid)
        # raw pixels, read as the tensor path reads them
        return (sample_image_lod(x_hr, grid) * 255).round().to(torch.uint8).numpy()

    with torch.no_grad():
        ref = net(x_lr, x_hr)
    out = net(x_lr, gather)
    assert seen[0].shape == (1, *OUT, 2) and not seen[0].requires_grad
    assert torch.allclose(out.image, ref.image, atol=0.5 / 255 + 1e-6)
    assert torch.allclose(out.grid, ref.grid)
    out.logits.sum().backward()
    assert all(p.grad is None for p in net.deform.parameters())  # nothing flows through a gather
    net.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="gather returned"):
        net(x_lr, lambda g: torch.zeros(1, 3, 5, 5))


def test_uniform_baseline_is_uniform_grid(tiny_segmenter):
    net = _net(tiny_segmenter, "uniform")
    assert net.deform is None
    assert count_parameters(net) == count_parameters(tiny_segmenter)
    out = net(None, torch.rand(2, 3, 72, 80))
    assert torch.allclose(out.grid, uniform_grid(*OUT).expand(2, -1, -1, -1), atol=1e-6)
    assert torch.allclose(out.d, torch.full_like(out.d, 1 / (MAP[0] * MAP[1])))


def test_edge_baseline_is_an_oracle(tiny_segmenter):
    net = _net(tiny_segmenter, "edge", edge_radius=1.5)
    x_hr = torch.rand(1, 3, 72, 80)
    labels = torch.zeros(1, 64, 80, dtype=torch.long)
    labels[:, 20:40, 30:60] = 1
    out = net(None, x_hr, labels)
    assert torch.allclose(out.d, edge_density(downsample_labels(labels, MAP), 1.5))
    with pytest.raises(ValueError, match="oracle"):
        net(None, x_hr)
    pred = net.predict_lowres(None, x_hr, labels)
    assert pred.labels.shape == (1, *OUT)


def test_predict_lowres(tiny_segmenter):
    net = _net(tiny_segmenter)
    net.train()
    pred = net.predict_lowres(None, torch.rand(2, 3, 72, 80))
    assert net.training  # mode restored
    assert pred.labels.shape == (2, *OUT) and pred.labels.dtype == torch.int64
    assert pred.probs.shape == (2, 3, *OUT)
    assert torch.allclose(pred.probs.sum(1), torch.ones(2, *OUT), atol=1e-5)
    assert torch.equal(pred.labels, pred.probs.argmax(1))
    assert not pred.probs.requires_grad


def test_config_json_round_trip(no_network):
    seg = build_segmenter("unet", "resnet18", num_classes=3, decoder_channels=(64, 32, 16, 8, 8))
    net = _net(seg, sigma=2.5, edge_radius=1.0)
    cfg = json.loads(json.dumps(net.config()))
    assert cfg["sampler"] == "learned" and cfg["map_size"] == list(MAP) and cfg["out_size"] == list(OUT)
    assert cfg["sigma"] == 2.5 and cfg["support"] == 11 and cfg["segmenter"]["arch"] == "unet"
    again = DeformSegNet.from_config(cfg)
    assert again.config() == cfg
    again.load_state_dict(net.state_dict())
    net.eval(), again.eval()
    x = torch.rand(1, 3, 72, 80)
    with torch.no_grad():
        assert torch.allclose(net(None, x).logits, again(None, x).logits, atol=1e-6)


def test_bad_config():
    with pytest.raises(ValueError, match="available: learned, uniform, edge"):
        DeformSegNet(nn.Identity(), sampler="random")
    with pytest.raises(ValueError, match="map_size"):
        DeformSegNet(nn.Identity(), map_size=(0, 4))


def _nucls_batch(shared_data, n=2):
    from PIL import Image

    root = shared_data / "labelled-tiles" / "nucls" / "square" / "train"
    paths = sorted((root / "images").glob("*.png"))[:n]
    assert paths, f"no NuCLS tiles under {root}"
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    labels = [np.asarray(Image.open(root / "labels" / p.name)) for p in paths]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # uint8
    y = torch.from_numpy(np.stack(labels).astype(np.int64))
    return x, y


def test_tiny_training_reduces_joint_loss(shared_data):
    x, y = _nucls_batch(shared_data)
    torch.manual_seed(0)
    seg = build_segmenter("linknet", "resnet18", num_classes=3)
    net = DeformSegNet(seg, map_size=(16, 16), out_size=(32, 32))
    crit = JointLoss("focal", gamma_edge=100.0)  # the paper's edge weight
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def joint():
        out = net(None, x, y)
        return crit(out.logits, out.labels, out.d, out.edge_target, out.edge_valid)

    net.train()
    with torch.no_grad():
        before = joint()
    for _ in range(8):
        loss = joint()
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    with torch.no_grad():
        after = joint()
    assert torch.isfinite(after.total)
    assert after.total < 0.8 * before.total, (before, after)
    assert after.seg < before.seg and after.edge < before.edge


def test_test_time_flips_average_the_flip_group_and_commute_with_flips(tiny_segmenter):
    # The mean over an image and its three flips, each flipped back, is the same for a flipped image
    # flipped back: the four flips are a group. Without tta it is the plain softmax.
    torch.manual_seed(3)
    net = _net(tiny_segmenter, sampler="uniform").eval()
    image = torch.rand(2, 3, 24, 40)
    with torch.no_grad():
        plain = net.segment_probs(image)
        want = torch.softmax(net.segmenter(net.standardise(image)), dim=1)
        torch.testing.assert_close(plain, want)
        tta = net.segment_probs(image, tta=True)
        torch.testing.assert_close(tta.sum(dim=1), torch.ones(2, 24, 40))
        assert (tta - plain).abs().max() > 1e-3  # the flips see other context: a real average
        for dims in TTA_FLIPS:
            torch.testing.assert_close(net.segment_probs(image.flip(dims), tta=True).flip(dims), tta)
        # predict_lowres averages the same way over the image it sampled
        pred = net.predict_lowres(None, image, tta=True)
        torch.testing.assert_close(pred.probs, net.segment_probs(net(None, image).image, tta=True))
