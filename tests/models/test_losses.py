"""Segmentation losses (focal, cross-entropy), edge loss and the joint loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from wsiseg.models.losses import (
    CrossEntropyLoss,
    FocalLoss,
    JointLoss,
    edge_loss,
    normalise_density,
    segmentation_loss,
)
from wsiseg.sampling.edges import edge_target

IGNORE = 255


def _batch(seed, b=2, k=3, h=5, w=7, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, h, w, generator=g) * 3
    target = torch.randint(0, k, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < ignore_frac] = IGNORE
    return logits, target


@given(st.integers(0, 10_000), st.floats(0.0, 0.9))
@settings(deadline=None, max_examples=25)
def test_focal_gamma0_equals_cross_entropy(seed, ignore_frac):
    logits, target = _batch(seed, ignore_frac=ignore_frac)
    if (target != IGNORE).any():
        ref = F.cross_entropy(logits, target, ignore_index=IGNORE)
        assert torch.allclose(FocalLoss(gamma=0.0, ignore_index=IGNORE)(logits, target), ref, atol=1e-6)
        assert torch.allclose(CrossEntropyLoss(ignore_index=IGNORE)(logits, target), ref, atol=1e-6)


def test_focal_gamma0_equals_weighted_cross_entropy():
    logits, target = _batch(1)
    w = torch.tensor([0.2, 1.0, 3.0])
    ref = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE)
    assert torch.allclose(FocalLoss(0.0, IGNORE, weight=w)(logits, target), ref, atol=1e-6)
    assert torch.allclose(CrossEntropyLoss(IGNORE, weight=w)(logits, target), ref, atol=1e-6)


def test_focal_hand_computed():
    # Two pixels, logits (0, ln 3): p = (1/4, 3/4). Targets 1 and 0, one ignored pixel.
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).expand(1, 2, 1, 3).contiguous()
    target = torch.tensor([[[1, 0, IGNORE]]])
    expected = 0.5 * (0.25**2 * -math.log(0.75) + 0.75**2 * -math.log(0.25))
    got = FocalLoss(gamma=2.0, ignore_index=IGNORE)(logits, target)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() == pytest.approx(0.398886, abs=1e-6)


def test_focal_ignores_ignored_pixels():
    logits, target = _batch(3)
    crit = FocalLoss()
    base = crit(logits, target)
    noisy = logits.clone()
    noisy[(target == IGNORE).unsqueeze(1).expand_as(noisy)] = 1e4  # junk where ignored
    assert torch.allclose(crit(noisy, target), base)
    # Equals the mean over the valid pixels alone.
    valid = target != IGNORE
    flat_logits = logits.permute(0, 2, 3, 1)[valid]
    ref = crit(flat_logits.T.unsqueeze(0).unsqueeze(-1), target[valid].view(1, -1, 1))
    assert torch.allclose(base, ref, atol=1e-6)


@pytest.mark.parametrize("name", ["focal", "ce"])
def test_all_ignored_gives_zero_not_nan(name):
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE)
    for weight in (None, [1.0, 2.0, 3.0]):
        loss = segmentation_loss(name, IGNORE, weight=weight)(logits, target)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()
        logits.grad = None


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_focal_stable_for_confident_logits(gamma):
    logits = torch.tensor([[200.0, -200.0], [-80.0, 80.0]]).T.reshape(1, 2, 1, 2).requires_grad_()
    target = torch.tensor([[[0, 1]]])  # both pixels right with p == 1 in float32
    loss = FocalLoss(gamma)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(logits.grad).all()
    wrong = FocalLoss(gamma)(logits.detach(), 1 - target)
    assert torch.isfinite(wrong) and wrong.item() > 50


def test_half_precision_logits():
    logits, target = _batch(5)
    loss = FocalLoss()(logits.half(), target)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, FocalLoss()(logits.half().float(), target))


def test_factory_names_and_errors():
    assert isinstance(segmentation_loss("focal"), FocalLoss)
    assert isinstance(segmentation_loss("ce"), CrossEntropyLoss)
    assert isinstance(segmentation_loss("cross_entropy"), CrossEntropyLoss)
    assert segmentation_loss("focal", 7, gamma=1.5).gamma == 1.5
    assert segmentation_loss("focal", 7).ignore_index == 7
    with pytest.raises(ValueError, match="available: focal, ce"):
        segmentation_loss("dice")
    with pytest.raises(ValueError):
        FocalLoss(gamma=-1.0)
    with pytest.raises(ValueError, match="does not match"):
        FocalLoss()(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 4, dtype=torch.long))


def test_loss_weight_is_a_buffer():
    crit = FocalLoss(weight=[1.0, 2.0])
    assert list(crit.parameters()) == []
    assert "weight" in dict(crit.named_buffers())


# -- edge loss ----------------------------------------------------------------


def test_edge_loss_finite_on_constant_label():
    labels = torch.full((2, 8, 8), 1)
    target = edge_target(labels)
    assert (target == 0).all()
    d = torch.softmax(torch.randn(2, 64), 1).view(2, 1, 8, 8).requires_grad_()
    loss = edge_loss(d, target)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(d.grad).all()
    # A uniform density is what a boundary-free target asks for.
    assert edge_loss(torch.full((2, 1, 8, 8), 1 / 64), target).item() == pytest.approx(0.0, abs=1e-12)


def test_edge_loss_zero_at_normalised_target():
    labels = torch.zeros(1, 12, 12, dtype=torch.long)
    labels[:, 3:8, 4:10] = 2
    target = edge_target(labels)
    assert target.sum() > 0
    d = target / target.sum()  # a density proportional to the target
    assert edge_loss(d, target).item() == pytest.approx(0.0, abs=1e-10)
    assert edge_loss(torch.full_like(d, 1 / d.numel()), target).item() > 0


@given(st.integers(0, 10_000), st.floats(1e-6, 1e6))
@settings(deadline=None, max_examples=25)
def test_edge_loss_scale_invariant(seed, c):
    g = torch.Generator().manual_seed(seed)
    d = torch.softmax(torch.randn(3, 1, 6, 5, generator=g).view(3, -1), 1).view(3, 1, 6, 5)
    target = torch.rand(3, 1, 6, 5, generator=g)
    ref = edge_loss(d, target)
    assert torch.allclose(edge_loss(d * c, target), ref, rtol=1e-4, atol=1e-7)
    assert torch.allclose(edge_loss(d, target * c), ref, rtol=1e-4, atol=1e-7)


def test_edge_loss_valid_mask_ignores_invalid_positions():
    g = torch.Generator().manual_seed(5)
    d = torch.softmax(torch.randn(2, 48, generator=g), 1).view(2, 1, 6, 8)
    target = torch.rand(2, 1, 6, 8, generator=g)
    valid = torch.ones(2, 1, 6, 8, dtype=torch.bool)
    # all valid: the unmasked loss
    assert torch.allclose(edge_loss(d, target, valid), edge_loss(d, target), rtol=1e-6)
    valid[:, :, :, 5:] = False
    ref = edge_loss(d, target, valid)
    # whatever the density or target on invalid positions: same loss
    d2, t2 = d.clone(), target.clone()
    d2[..., 5:] *= 50.0
    t2[..., 5:] = 0.0
    assert torch.allclose(edge_loss(d2, t2, valid), ref, rtol=1e-5)
    # equals the unmasked loss on the valid crop (normalised over it)
    assert torch.allclose(ref, edge_loss(d[..., :5], target[..., :5]), rtol=1e-5)
    # (B, hd, wd) masks are read as (B, 1, hd, wd)
    assert torch.allclose(edge_loss(d, target, valid[:, 0]), ref)


def test_edge_loss_all_invalid_is_zero_with_gradient():
    d = torch.softmax(torch.randn(2, 16), 1).view(2, 1, 4, 4).requires_grad_()
    valid = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    loss = edge_loss(d, torch.rand(2, 1, 4, 4), valid)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(d.grad).all()
    # one empty sample, one single-class sample (zero target over its valid part)
    valid[1, :, :2] = True
    target = torch.zeros(2, 1, 4, 4)
    assert edge_loss(torch.full((2, 1, 4, 4), 1 / 16), target, valid).item() == pytest.approx(0.0, abs=1e-12)


def test_edge_loss_on_padded_labels_matches_unpadded():
    """Ignore padding: the target and the loss see only the labelled area."""
    labels = torch.zeros(1, 10, 10, dtype=torch.long)
    labels[:, 3:7, 2:6] = 1
    padded = F.pad(labels, (0, 6, 0, 0), value=IGNORE)
    g = torch.Generator().manual_seed(2)
    d = torch.softmax(torch.randn(1, 160, generator=g), 1).view(1, 1, 10, 16)
    loss = edge_loss(d, edge_target(padded), padded.unsqueeze(1) != IGNORE)
    assert torch.allclose(loss, edge_loss(d[..., :10], edge_target(labels)), rtol=1e-5)


def test_normalise_density():
    x = torch.rand(2, 1, 4, 5)
    x[1] = 0
    n = normalise_density(x)
    assert torch.allclose(n[0].mean(), torch.tensor(1.0))
    assert (n[1] == 1).all()
    valid = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    assert torch.equal(normalise_density(x, valid=valid), n)
    valid[:, :, 0] = False
    nv = normalise_density(x, valid=valid)
    assert torch.allclose(nv[0, :, 1:].mean(), torch.tensor(1.0)) and (nv[:, :, 0] == 0).all()
    assert (nv[1, :, 1:] == 1).all()
    with pytest.raises(ValueError):
        edge_loss(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5))


def test_joint_loss_terms():
    logits, target = _batch(7, h=8, w=8)
    d = torch.softmax(torch.randn(2, 16), 1).view(2, 1, 4, 4)
    t = torch.rand(2, 1, 4, 4)
    crit = JointLoss("ce", gamma_edge=100.0)
    total, l_s, l_e = crit(logits, target, d, t)
    assert torch.allclose(l_s, CrossEntropyLoss()(logits, target))
    assert torch.allclose(l_e, edge_loss(d, t))
    assert torch.allclose(total, l_s + 100.0 * l_e)
    valid = torch.rand(2, 1, 4, 4) > 0.3
    assert torch.allclose(crit(logits, target, d, t, valid).edge, edge_loss(d, t, valid))
    out = crit(logits, target)  # no density: segmentation only
    assert out.edge.item() == 0.0 and torch.allclose(out.total, out.seg)
    assert JointLoss().gamma_edge == 10.0  # balances the two terms' gradients (the paper's is 100)
    assert isinstance(JointLoss().seg_loss, FocalLoss)
    with pytest.raises(ValueError):
        JointLoss(gamma_edge=-1)


def test_edge_loss_sum_normalisation_is_the_paper_distribution_mse():
    torch.manual_seed(0)
    d = torch.rand(2, 1, 6, 7) + 0.1
    t = torch.rand(2, 1, 6, 7)
    ref = F.mse_loss(d / d.sum(dim=(1, 2, 3), keepdim=True), t / t.sum(dim=(1, 2, 3), keepdim=True))
    assert float(edge_loss(d, t, norm="sum")) == pytest.approx(float(ref), rel=1e-5)
    assert float(edge_loss(d, t, norm="sum")) == pytest.approx(float(edge_loss(d, t)) / 42**2, rel=1e-5)
    valid = torch.ones(2, 6, 7, dtype=torch.bool)
    assert float(edge_loss(d, t, valid, norm="sum")) == pytest.approx(float(ref), rel=1e-5)
    with pytest.raises(ValueError, match="normalisation"):
        edge_loss(d, t, norm="max")
    with pytest.raises(ValueError, match="normalisation"):
        JointLoss(edge_norm="max")
