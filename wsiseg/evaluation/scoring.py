"""Evaluating one model: segmentation quality against sampling cost on a labelled data set.

Every labelled region of a data set (:func:`wsiseg.training.dataset.build_dataset`) is
evaluated at its *working resolution*: the unpadded ``h x w`` raster the
region is read at (``downsample`` level-0 pixels per working pixel). The net
sees the low-resolution view of that raster (``map_size``) and samples its
``out_size`` grid from it, exactly as inference does on a slide region;
padding never enters. A model that records its physical scale
(:mod:`wsiseg.models.scale`) samples each region whose items carry ``mpp``
(micrometres per working pixel) at its sample spacing in micrometres instead
(the physical mode of :func:`wsiseg.sampling.geometry.region_geometry`, as
``wsiseg segment`` does); other regions and older models by the pixel rule.

Metrics (confusion matrices accumulated over the whole data set, see
:mod:`wsiseg.metrics`)
------------------------------------------------------------------------
deformed
    Prediction on the grid points vs. the labels read at the same points
    (nearest, :func:`~wsiseg.sampling.sample.sample_labels`): what the
    segmenter is trained on.
full
    The prediction reverse-sampled to the working raster
    (:func:`~wsiseg.sampling.reverse.reverse_sample`, nearest) vs. the
    labels: what a user gets.
upsampling, mIoU(Y', Y)
    ``Y' = reverse(sample(Y))`` on the same grid vs. ``Y``: the information
    the *sampler* loses, whatever the segmenter (1 = lossless; higher is
    better). Ignored labels read back onto counted pixels count as wrong.
trimap accuracy
    Full-resolution pixel accuracy within bands of ``1, 2, 4, 8, 16``
    working pixels around the label boundaries
    (:func:`~wsiseg.metrics.trimap_counts`).
cost
    Fraction of the region's *level-0* pixels the grid samples,
    ``h_out * w_out / (H0 * W0)`` per region (capped at 1), averaged: the
    same axis as ``wsiseg segment``'s report (level 0 of a plain image is
    its native pixels). The fraction of the working-resolution pixels,
    ``h_out * w_out / (h * w)``, is kept next to it.
samples on glass
    Fraction of the grid points that fall on glass, a tissue score
    (:func:`~wsiseg.slide.tissue.tissue_score`) at most
    :data:`~wsiseg.slide.tissue.GLASS_SCORE`, of each region's working
    image, next to the same fraction for a uniform grid of the same size:
    how much of the budget a sampler spends on background. (A fixed score,
    not the slide detector's Otsu threshold: regions that are all tissue
    would be split in two.)
class frequency
    Fraction of (non-ignored) pixels per class in ``Y`` and among the
    sampled labels: how a sampler shifts the class balance (paper Fig. 13).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from wsiseg.device import resolve_device
from wsiseg.errors import WsisegError
from wsiseg.evaluation.results import DEFAULT_TRIMAP_WIDTHS, EvalResult
from wsiseg.metrics import ConfusionMatrix, class_share_error, trimap_counts
from wsiseg.slide.tissue import GLASS_SCORE, tissue_score

__all__ = [
    "evaluate_model",
]


# ---------------------------------------------------------------------------
# evaluating one model
# ---------------------------------------------------------------------------


def _item_size(item: Mapping[str, Any]) -> tuple[int, int]:
    size = item.get("size")
    if size is None:
        return tuple(int(s) for s in torch.as_tensor(item["labels"]).shape[-2:])  # type: ignore[return-value]
    return int(size[0]), int(size[1])


def _batch_key(item: Mapping[str, Any]) -> tuple:
    from wsiseg.training.dataset import known_mpp

    # the grid depends on the size and, at a model's physical scale, on the micrometres per pixel
    return _item_size(item), known_mpp(item)


def _batches(dataset, batch_size: int):
    """Lists of items whose unpadded sizes and MPP agree (so they stack and share a grid), in data set order."""
    batch: list[dict] = []
    for i in range(len(dataset)):
        item = dataset[i]
        if batch and (len(batch) >= batch_size or _batch_key(item) != _batch_key(batch[0])):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _level0_size(item: Mapping[str, Any], h: int, w: int) -> tuple[int, int]:
    """Level-0 ``(height, width)`` of an item's region whose working raster is ``h x w``.

    The level-0 box when the item has one; else the working size scaled by
    its ``downsample`` (rounded); else the working size (it is level 0).
    """
    box = item.get("box")
    if box is not None:
        return int(box[3]), int(box[2])
    ds = item.get("downsample")
    if ds is not None:
        return max(1, round(h * float(ds))), max(1, round(w * float(ds)))
    return h, w


def _check_labels(labels: torch.Tensor, k: int, ignore_index: int, names: Sequence[str]) -> None:
    valid = labels[labels != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= k):
        bad = int(valid.max()) if int(valid.max()) >= k else int(valid.min())
        raise WsisegError(
            f"label value {bad} in {', '.join(n for n in names if n) or 'a region'} is not a class index "
            f"in 0..{k - 1} (or the ignore value {ignore_index})"
        )


@torch.no_grad()
def evaluate_model(
    model,
    dataset,
    classes: Sequence | None = None,
    *,
    device: str | torch.device = "auto",
    batch_size: int = 4,
    widths: Sequence[float] = DEFAULT_TRIMAP_WIDTHS,
    ignore_index: int = 255,
    name: str | None = None,
    log: Callable[[str], None] | None = None,
    grid_scale: float = 1.0,
    tta: bool = False,
    glass_weight: float = 1.0,
    grid_iterations: int | None = None,
) -> EvalResult:
    """Evaluate a model on a data set of labelled regions.

    Parameters
    ----------
    model : LoadedModel or DeformSegNet
        A loaded model file (:func:`wsiseg.models.io.load_deformseg`) or a net.
    dataset : torch.utils.data.Dataset
        Items as :func:`wsiseg.training.dataset.build_dataset` makes them: ``image``
        uint8 ``(3, H, W)``, ``labels`` int64 ``(H, W)`` holding class
        *indices in channel order* (``ignore_index`` ignored, padding too),
        optional ``size`` (unpadded ``(h, w)``, default the whole item),
        ``box`` (level-0 ``(x, y, w, h)``: the level-0 pixels of the cost),
        ``downsample`` (else level-0 pixels = working pixels * downsample²;
        with neither, the working raster is level 0), ``mpp`` (micrometres
        per working pixel: with a model that records its scale, the region
        is sampled at the model's sample spacing) and ``name``.
    classes : sequence of ClassInfo or str, optional
        Class names in channel order; default the model file's classes.
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    batch_size : int
        Regions per forward pass (only regions of one size are batched).
    widths : sequence of float
        Trimap band widths in working-resolution pixels.
    ignore_index : int
    name : str, optional
        Method name for tables; default the net's sampler.
    log : callable, optional
        Receives a progress line every few regions.
    grid_scale : float
        Sample every region this many times as densely per axis as its
        geometry says (``scale`` of
        :func:`wsiseg.sampling.geometry.region_geometry`): how the scores
        hold up when a slide is sampled off the model's scale.
    tta : bool
        Test-time augmentation (:meth:`wsiseg.models.net.DeformSegNet.segment_probs`):
        the segmenter's mean over the deformed image and its flips.
    glass_weight : float
        In ``(0, 1]``: a learned sampler's grid built on a warp away from the
        map nodes whose tissue score is at most
        :data:`~wsiseg.slide.tissue.GLASS_SCORE` (the glass of the
        samples-on-glass measure; :meth:`DeformSegNet.glass_prior`), as
        ``segment --glass-weight`` does with the slide's tissue mask; 1: off.
    grid_iterations : int, optional
        Attraction steps instead of the model's own (``segment --grid-iterations``).

    Returns
    -------
    EvalResult

    Raises
    ------
    WsisegError
        Empty data set, labels that are not class indices.
    """
    from wsiseg.models.net import DeformSegNet

    net = model if isinstance(model, DeformSegNet) else model.net
    scale = None if isinstance(model, DeformSegNet) else getattr(model, "scale", None)
    spacing = scale.sample_spacing_um if scale is not None else None
    if classes is None:
        if isinstance(model, DeformSegNet):
            raise ValueError("classes are required when evaluating a bare DeformSegNet")
        classes = model.classes
    names = [c if isinstance(c, str) else c.name for c in classes]
    k = len(names)
    if net.num_classes is not None and net.num_classes != k:
        raise WsisegError(f"the model predicts {net.num_classes} classes but {k} class names were given")
    if len(dataset) == 0:
        raise WsisegError("nothing to evaluate: the data set is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dev = resolve_device(device)
    net.to(dev)
    widths = tuple(float(w) for w in widths)

    res = _empty_result(model, net, names, widths, ignore_index, name, spacing, grid_scale)
    res.tta = bool(tta)
    res.glass_weight, res.grid_iterations = float(glass_weight), grid_iterations
    t0 = time.perf_counter()
    for batch in _batches(dataset, batch_size):
        _score_batch(
            res,
            net,
            batch,
            dev,
            spacing=spacing,
            grid_scale=grid_scale,
            widths=widths,
            ignore_index=ignore_index,
            tta=tta,
            glass_weight=glass_weight,
            grid_iterations=grid_iterations,
        )
        if log is not None and (res.regions % 50 < len(batch)):
            log(f"{res.name}: {res.regions}/{len(dataset)} regions")
    res.seconds = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------
# the steps of evaluate_model: one batch of regions predicted and scored
# ---------------------------------------------------------------------------


def _empty_result(
    model,
    net,
    names: list[str],
    widths: tuple[float, ...],
    ignore_index: int,
    name: str | None,
    spacing: float | None,
    grid_scale: float,
) -> EvalResult:
    """An :class:`EvalResult` with every count at zero."""
    k = len(names)
    return EvalResult(
        name=name or net.sampler,
        sampler=net.sampler,
        class_names=names,
        out_size=tuple(net.out_size),
        map_size=tuple(net.map_size),
        deformed=ConfusionMatrix(k, ignore_index),
        full=ConfusionMatrix(k, ignore_index),
        # Column k: an ignored label read back onto a counted pixel (wrong, but no class).
        upsampling=ConfusionMatrix(k + 1, ignore_index),
        trimap_widths=widths,
        trimap_correct=np.zeros(len(widths), np.int64),
        trimap_total=np.zeros(len(widths), np.int64),
        freq_original=np.zeros(k, np.int64),
        freq_sampled=np.zeros(k, np.int64),
        model_path=getattr(model, "path", None),
        model_hash=getattr(model, "hash", None),
        sample_spacing_um=spacing,
        grid_scale=float(grid_scale),
    )


def _score_batch(
    res: EvalResult,
    net,
    batch: list[dict],
    dev,
    *,
    spacing: float | None,
    grid_scale: float,
    widths: tuple[float, ...],
    ignore_index: int,
    tta: bool = False,
    glass_weight: float = 1.0,
    grid_iterations: int | None = None,
) -> None:
    """Predict a batch of regions (one size, one MPP: :func:`_batches`) and add it to the counts of ``res``."""
    from wsiseg.models.net import lowres_view
    from wsiseg.sampling.geometry import PhysicalScale
    from wsiseg.sampling.reverse import inverse_map, lookup_nearest
    from wsiseg.sampling.sample import sample_labels

    k = len(res.class_names)
    h, w = _item_size(batch[0])
    image = torch.stack([torch.as_tensor(it["image"])[:, :h, :w] for it in batch]).to(dev)
    labels = torch.stack([torch.as_tensor(it["labels"])[:h, :w].long() for it in batch]).to(dev)
    item_names = [str(it.get("name", "")) for it in batch]
    _check_labels(labels, k, ignore_index, item_names)
    image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
    mpp = _batch_key(batch[0])[1]  # one per batch (_batches)
    physical = PhysicalScale(float(mpp), spacing) if spacing is not None and mpp is not None else None
    # segment's geometry for this region (training's pixel rule when no physical scale applies)
    geo = net.geometry(h, w, physical=physical, scale=grid_scale)
    if grid_iterations is not None:
        geo = dataclasses.replace(geo, iterations=grid_iterations)
    x_lr = lowres_view(image, geo.map)
    glass = _glass(x_lr) if net.uses_glass(glass_weight) else None
    # The edge baseline is an oracle: it places its samples from the labels.
    pred = net.predict_lowres(
        x_lr,
        image,
        labels=labels if net.sampler == "edge" else None,
        geometry=geo,
        tta=tta,
        glass=glass,
        glass_weight=glass_weight,
    )
    grid = pred.grid.float()
    y_lr = sample_labels(labels, grid)
    index = inverse_map(grid, (h, w))  # shared by the prediction and Y'
    full = lookup_nearest(pred.labels, index)
    y_up = lookup_nearest(y_lr, index)

    res.deformed.update(pred.labels, y_lr)
    for name, f, lab in zip(item_names, full, labels):  # counted per region, for how much of it is called which class
        one = ConfusionMatrix(k, ignore_index)
        one.update(f, lab)
        res.full += one
        res.region_shares.append((name, class_share_error(one.matrix)))
    res.upsampling.update(torch.where(y_up == ignore_index, k, y_up), labels)
    c, t = trimap_counts(full.cpu().numpy(), labels.cpu().numpy(), widths, ignore_index)
    res.trimap_correct += c
    res.trimap_total += t
    for counts, lab in ((res.freq_original, labels), (res.freq_sampled, y_lr)):
        valid = lab[lab != ignore_index]
        counts += torch.bincount(valid.flatten().cpu(), minlength=k).numpy()[:k]
    _count_glass(res, image, grid, dev)
    _count_regions(res, batch, h, w, grid, physical is not None)


def _glass(image: torch.Tensor) -> torch.Tensor:
    """``(B, h, w)`` bool: pixels of ``(B, 3, h, w)`` images in ``[0, 1]`` whose tissue score is glass's.

    A fixed threshold, not Otsu: Otsu per region would split an all-tissue region in two.
    """
    rgb = (image * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return torch.from_numpy(np.stack([tissue_score(x) <= GLASS_SCORE for x in rgb])).to(image.device)


def _count_glass(res: EvalResult, image: torch.Tensor, grid: torch.Tensor, dev) -> None:
    """Add the batch's grid points on glass, and those of a uniform grid of the same size, to ``res``."""
    from wsiseg.sampling.coords import uniform_grid
    from wsiseg.sampling.sample import sample_labels

    gh, gw = grid.shape[1:3]
    tissue = ~_glass(image).to(dev)
    res.glass_model += int((~sample_labels(tissue, grid)).sum())
    res.glass_uniform += int((~sample_labels(tissue, uniform_grid(gh, gw, device=dev))).sum())


def _count_regions(res: EvalResult, batch: list[dict], h: int, w: int, grid: torch.Tensor, physical: bool) -> None:
    """Add the batch's regions, samples, pixels and sampled fractions (the cost) to ``res``."""
    from wsiseg.sampling.sizes import sample_fraction

    gh, gw = grid.shape[1:3]
    for it in batch:
        h0, w0 = _level0_size(it, h, w)
        res.regions += 1
        res.regions_physical += physical
        res.samples += gh * gw
        res.pixels += h * w
        res.pixels_level0 += h0 * w0
        res.fractions.append(sample_fraction(gh, gw, h, w))
        res.fractions_level0.append(sample_fraction(gh, gw, h0, w0))
        if it.get("downsample") is not None:
            res.downsamples.append(float(it["downsample"]))
