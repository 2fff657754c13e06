"""Segmentation metrics: confusion matrix, IoU, trimap accuracy, upsampling error.

Conventions
-----------
* The confusion matrix is indexed ``[target, prediction]`` and accumulated
  over a whole data set; per-class IoU is ``sum of intersections / sum of
  unions`` over that data set (not a mean of per-image IoUs).
* mIoU averages over *present* classes: those that occur in the targets or
  in the predictions (union > 0). A class absent from both has no IoU and is
  excluded; a class predicted but never true counts with IoU 0.
* Pixels whose target equals ``ignore_index`` are excluded everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "ConfusionMatrix",
    "boundary_map",
    "class_share_error",
    "trimap_accuracy",
    "trimap_counts",
    "upsampling_error",
]


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class ConfusionMatrix:
    """Accumulating ``num_classes x num_classes`` confusion matrix.

    Parameters
    ----------
    num_classes : int
        Class ids are ``0 .. num_classes - 1``.
    ignore_index : int, optional
        Target value to skip (e.g. 255).

    Examples
    --------
    >>> cm = ConfusionMatrix(2)
    >>> cm.update([0, 1, 1], [0, 1, 0])
    >>> cm.miou()
    0.5
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reset(self) -> None:
        """Zero the counts."""
        self.matrix[:] = 0

    def update(self, pred, target) -> None:
        """Add a prediction/target pair (numpy or torch, any equal shapes).

        Raises
        ------
        ValueError
            On shape mismatch, or a (non-ignored) id outside ``[0, num_classes)``.
        """
        p = _to_numpy(pred).astype(np.int64, copy=False).ravel()
        t = _to_numpy(target).astype(np.int64, copy=False).ravel()
        if p.shape != t.shape:
            raise ValueError(f"pred and target differ in size: {p.size} vs {t.size}")
        if self.ignore_index is not None:
            keep = t != self.ignore_index
            p, t = p[keep], t[keep]
        k = self.num_classes
        if t.size and (t.min() < 0 or t.max() >= k or p.min() < 0 or p.max() >= k):
            raise ValueError(f"class ids must lie in [0, {k}) (or be ignore_index in the target)")
        self.matrix += np.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:  # noqa: PYI034
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge confusion matrices of different sizes")
        self.matrix += other.matrix
        return self

    def intersection_union(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-class intersection and union counts."""
        tp = np.diag(self.matrix)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        return tp, union

    def iou(self) -> np.ndarray:
        """Per-class IoU; ``nan`` for classes absent from targets and predictions."""
        tp, union = self.intersection_union()
        out = np.full(self.num_classes, np.nan)
        np.divide(tp, union, out=out, where=union > 0)
        return out

    def miou(self) -> float:
        """Mean IoU over present classes (``nan`` if nothing was counted)."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        """Fraction of counted pixels predicted correctly (``nan`` if none)."""
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")


def class_share_error(matrix, targets: Sequence[bool] | None = None) -> float:
    """How far the predicted class shares are from the targets', over the pixels of some target classes.

    Over the pixels whose target is one of ``targets`` (a mask over the
    classes; default all), the total variation distance between the targets'
    class shares and the predictions' (half the sum of the absolute
    differences): the share of those pixels given to the wrong class on
    balance, whatever the boundaries. With two classes, the predicted share
    of one minus its true share, in absolute value.

    Parameters
    ----------
    matrix : array-like
        ``(K, K)`` confusion matrix, ``[target, prediction]``.
    targets : sequence of bool, optional
        Length ``K``: the target classes whose pixels count.

    Returns
    -------
    float
        In ``[0, 1]``; ``nan`` when no pixel counts.

    Examples
    --------
    >>> round(class_share_error([[0, 0, 0], [0, 60, 20], [0, 0, 20]], [False, True, True]), 6)
    0.2
    """
    m = np.asarray(matrix, dtype=np.float64)
    keep = np.ones(len(m), dtype=bool) if targets is None else np.asarray(targets, dtype=bool)
    m = m[keep]
    n = m.sum()
    if n == 0:
        return float("nan")
    truth = np.zeros(len(keep))
    truth[keep] = m.sum(1) / n
    return float(0.5 * np.abs(m.sum(0) / n - truth).sum())


def boundary_map(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label (both sides of each boundary).

    Parameters
    ----------
    labels : np.ndarray
        2-D label map.

    Returns
    -------
    np.ndarray
        Boolean map of the same shape.
    """
    lab = np.asarray(labels)
    out = np.zeros(lab.shape, dtype=bool)
    dv = lab[1:, :] != lab[:-1, :]
    dh = lab[:, 1:] != lab[:, :-1]
    out[1:, :] |= dv
    out[:-1, :] |= dv
    out[:, 1:] |= dh
    out[:, :-1] |= dh
    return out


def trimap_counts(
    pred, target, widths: Sequence[float], ignore_index: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Correct and total pixel counts in bands around the target's label boundaries.

    The counts behind :func:`trimap_accuracy`; summing them over images
    gives the data-set accuracy (``correct.sum() / total.sum()`` per width),
    which averaging per-image accuracies would not.

    Parameters
    ----------
    pred, target : array-like
        Label maps ``(H, W)`` or batches ``(B, H, W)`` (numpy or torch).
    widths : sequence of float
        Band widths in pixels (> 0).
    ignore_index : int, optional
        Target value excluded from the counts (it still forms boundaries).

    Returns
    -------
    (correct, total) : np.ndarray
        ``int64`` counts per width.
    """
    p = _to_numpy(pred)
    t = _to_numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in shape: {p.shape} vs {t.shape}")
    if t.ndim == 2:
        p, t = p[None], t[None]
    widths = [float(w) for w in widths]
    if any(not w > 0 for w in widths):
        raise ValueError(f"widths must be positive, got {widths}")
    correct = np.zeros(len(widths), dtype=np.int64)
    total = np.zeros(len(widths), dtype=np.int64)
    for pi, ti in zip(p, t):
        edge = boundary_map(ti)
        if not edge.any():
            continue
        dist = ndimage.distance_transform_edt(~edge)
        valid = np.ones(ti.shape, bool) if ignore_index is None else ti != ignore_index
        hit = (pi == ti) & valid
        for n, w in enumerate(widths):
            band = (dist < w) & valid
            total[n] += band.sum()
            correct[n] += (hit & band).sum()
    return correct, total


def trimap_accuracy(pred, target, widths: Sequence[float], ignore_index: int | None = None) -> np.ndarray:
    """Pixel accuracy in bands around the target's label boundaries.

    The band of width ``w`` holds the pixels whose centre is less than ``w``
    pixels (Euclidean) from a boundary pixel's centre, boundary pixels being
    both sides of every label change (:func:`boundary_map`). Width 1 is the
    boundary pixels themselves; for a straight boundary, width ``w`` covers
    ``w`` pixels on each side.

    Parameters
    ----------
    pred, target : array-like
        Label maps ``(H, W)`` or batches ``(B, H, W)`` (numpy or torch).
    widths : sequence of float
        Band widths in pixels (> 0).
    ignore_index : int, optional
        Target value excluded from the counts (it still forms boundaries).

    Returns
    -------
    np.ndarray
        Accuracy per width (``nan`` where a band holds no counted pixel).
    """
    correct, total = trimap_counts(pred, target, widths, ignore_index)
    out = np.full(len(total), np.nan)
    np.divide(correct, total, out=out, where=total > 0)
    return out


def upsampling_error(
    labels,
    grid: torch.Tensor,
    num_classes: int | None = None,
    ignore_index: int | None = None,
) -> float:
    """mIoU between labels and their forward-then-reverse sampled copy.

    ``Y' = reverse(sample(Y))`` with nearest label sampling at ``grid`` and
    nearest read-back (:mod:`wsiseg.sampling.reverse`). This is the paper's
    measure of the information a sampler loses: 1 means lossless, so *higher
    is better* despite the name.

    Parameters
    ----------
    labels : array-like
        Integer labels ``(B, H, W)`` or ``(H, W)`` (numpy or torch).
    grid : torch.Tensor
        Normalised grid ``(B, h, w, 2)`` (or batch 1, broadcast).
    num_classes : int, optional
        Default ``max label + 1`` (excluding ``ignore_index``).
    ignore_index : int, optional
        Target value excluded from the counts.

    Returns
    -------
    float
        mIoU over present classes.
    """
    from wsiseg.sampling.reverse import reverse_sample
    from wsiseg.sampling.sample import sample_labels

    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    y = y.long().to(grid.device)
    if y.dim() == 2:
        y = y.unsqueeze(0)
    g = grid if grid.dim() == 4 else grid.unsqueeze(0)
    if g.shape[0] == 1 and y.shape[0] != 1:
        g = g.expand(y.shape[0], -1, -1, -1)
    y_lr = sample_labels(y, g)
    y_up = reverse_sample(y_lr, g, tuple(y.shape[-2:]), mode="nearest")
    if num_classes is None:
        valid = y if ignore_index is None else y[y != ignore_index]
        num_classes = int(valid.max().item()) + 1 if valid.numel() else 1
    if ignore_index is None:
        cm = ConfusionMatrix(num_classes)
        cm.update(y_up, y)
        return cm.miou()
    # Read-back can carry the ignore value onto counted pixels: count those
    # as wrong (an extra prediction column) without making it a class.
    cm = ConfusionMatrix(num_classes + 1, ignore_index)
    cm.update(torch.where(y_up == ignore_index, num_classes, y_up), y)
    tp, union = cm.intersection_union()
    tp, union = tp[:num_classes], union[:num_classes]
    return float(np.mean(tp[union > 0] / union[union > 0])) if (union > 0).any() else float("nan")
