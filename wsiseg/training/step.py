"""One training step and one validation pass of the joint training (:mod:`wsiseg.training.loop`).

:func:`train_step` is one optimiser step on one batch at its (scale-jittered) geometry, with the
gradient norms of the two loss terms on the deformation net (:func:`edge_gradient`,
:func:`gradient_norms`); :func:`validate` scores the validation split in the deformed space and at
full working resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from wsiseg.errors import WsisegError
from wsiseg.metrics import ConfusionMatrix
from wsiseg.models.net import DeformSegNet
from wsiseg.training.batches import ALONE_WHY, BATCHNORM_ALONE, check_labels, to_float
from wsiseg.training.config import TrainConfig, training_geometry

__all__ = ["Scores", "edge_gradient", "gradient_norms", "train_step", "validate"]


@dataclass
class Scores:
    """Validation mIoU in the deformed space and at full working resolution, and the classes present."""

    miou_deformed: float | None
    miou_full: float | None
    classes_present: int


@torch.no_grad()
def validate(net: DeformSegNet, loader: DataLoader, num_classes: int, config: TrainConfig, device, amp) -> Scores:
    """mIoU in the deformed space and at full working resolution."""
    from wsiseg.sampling.reverse import reverse_sample

    enabled, dtype, _ = amp
    cm_def = ConfusionMatrix(num_classes, config.ignore_index)
    cm_full = ConfusionMatrix(num_classes, config.ignore_index)
    net.eval()
    for batch in loader:
        image = to_float(batch["image"].to(device, non_blocking=True))
        labels = batch["labels"].to(device, non_blocking=True)
        check_labels(labels, num_classes, config.ignore_index, batch["name"])
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled):
            geometry = training_geometry(
                net, (int(image.shape[-2]), int(image.shape[-1])), batch["mpp"][0], config.sample_spacing_um
            )
            out = net(None, image, labels, geometry=geometry, ignore_index=config.ignore_index)
        pred = out.logits.argmax(dim=1)
        cm_def.update(pred, out.labels)
        full = reverse_sample(pred, out.grid.float(), tuple(labels.shape[-2:]))
        cm_full.update(full, labels)
    present = int((cm_full.matrix.sum(axis=1) > 0).sum())

    def score(cm: ConfusionMatrix) -> float | None:
        v = cm.miou()
        return v if math.isfinite(v) else None

    return Scores(score(cm_def), score(cm_full), present)


def edge_gradient(net: DeformSegNet, edge: torch.Tensor, gamma: float) -> list[torch.Tensor] | None:
    """Gradient of ``gamma * L_e`` on the deformation net's parameters (None when there is none).

    The edge term reaches only the deformation net, so this is one small
    extra backward pass through it; the segmentation term's share is then the
    total gradient minus this (:func:`gradient_norms`).
    """
    if net.deform is None or gamma == 0.0 or not edge.requires_grad:
        return None
    params = [p for p in net.deform.parameters() if p.requires_grad]
    grads = torch.autograd.grad(gamma * edge, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def gradient_norms(net: DeformSegNet, g_edge: list[torch.Tensor] | None) -> torch.Tensor:
    """L2 norms ``(segmentation term, gamma * edge term)`` of the deformation net's gradient.

    Logged per epoch (``grad_seg``, ``grad_edge``) to show which term steers
    the sampler; call after ``backward`` of the total (unscaled gradients).
    """
    if net.deform is None:
        return torch.zeros(2, dtype=torch.float64)
    params = [p for p in net.deform.parameters() if p.requires_grad]
    # Summed on the parameters' device and read back once: one device sync per step, not one per tensor.
    sums = torch.zeros(2, dtype=torch.float64, device=params[0].device)
    for i, p in enumerate(params):
        total = p.grad if p.grad is not None else torch.zeros_like(p)
        e = g_edge[i] if g_edge is not None else torch.zeros_like(p)
        sums[0] += (total.double() - e.double()).square().sum()
        sums[1] += e.double().square().sum()
    return sums.sqrt().cpu()


def train_step(
    net,
    batch,
    cfg: TrainConfig,
    criterion,
    optimizer,
    scaler,
    amp,
    device,
    num_classes: int,
    jitter_rng: torch.Generator,
    *,
    diverged: Callable[[str], str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on one batch (at its scale-jittered geometry).

    Returns
    -------
    values : torch.Tensor
        ``(3,)`` float64: the total loss, the segmentation and the edge term.
    norms : torch.Tensor
        ``(2,)`` float64: the L2 norms of the two terms' gradients on the
        deformation net (:func:`gradient_norms`).

    Raises
    ------
    WsisegError
        A batch of one region BatchNorm refuses, or a loss that is not
        finite (``diverged(what)`` is the message).
    """
    image = to_float(batch["image"].to(device, non_blocking=True))
    labels = batch["labels"].to(device, non_blocking=True)
    check_labels(labels, num_classes, cfg.ignore_index, batch["name"])
    try:
        factor = 1.0
        if cfg.scale_jitter > 1.0:
            span = math.log(cfg.scale_jitter)
            factor = math.exp(float(torch.empty(()).uniform_(-span, span, generator=jitter_rng)))
        geometry = training_geometry(
            net, (int(image.shape[-2]), int(image.shape[-1])), batch["mpp"][0], cfg.sample_spacing_um, factor
        )
        with torch.autocast(device_type=device.type, dtype=amp[1], enabled=amp[0]):
            out_ = net(None, image, labels, geometry=geometry, ignore_index=cfg.ignore_index)
            terms = criterion(out_.logits, out_.labels, out_.d, out_.edge_target, out_.edge_valid)
    except ValueError as exc:  # a layer trains_alone could not foresee on the meta device
        if BATCHNORM_ALONE not in str(exc):
            raise
        raise WsisegError(
            f"cannot train on a batch of one region of shape {tuple(image.shape[-2:])}: "
            f"{ALONE_WHY}; use --batch-size 2 or more, or a larger --out-size"
        ) from exc
    values = torch.stack([terms.total.detach(), terms.seg.detach(), terms.edge.detach()]).double().cpu()
    if not torch.isfinite(values).all():
        raise WsisegError(diverged("NaN" if torch.isnan(values).any() else "infinite"))
    optimizer.zero_grad(set_to_none=True)
    g_edge = edge_gradient(net, terms.edge, criterion.gamma_edge)
    if scaler is not None:
        scaler.scale(terms.total).backward()
        scaler.unscale_(optimizer)  # true gradients for the norms below
        norms = gradient_norms(net, g_edge)
        scaler.step(optimizer)
        scaler.update()
    else:
        terms.total.backward()
        norms = gradient_norms(net, g_edge)
        optimizer.step()
    return values, norms
