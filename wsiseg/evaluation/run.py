"""Evaluation: segmentation quality against sampling cost, for the learned sampler and its baselines.

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

:func:`run_evaluation` is the ``wsiseg evaluate`` command: the model on one
split, optionally against the uniform and oracle edge baselines trained with
the model's own training config at the same budget (``compare``), and the
cost-performance sweep over several output sizes (``sweep``, paper Fig. 6;
:func:`run_sweep`): the learned sampler with the joint loss (``learned``)
and with the segmentation loss only (``single``), and the uniform and edge
baselines (:data:`SWEEP_METHODS`, named in tables by :data:`METHOD_LABELS`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiseg.atomic import atomic_output
from wsiseg.device import resolve_device
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.metrics import ConfusionMatrix, trimap_counts
from wsiseg.slide.tissue import GLASS_SCORE, tissue_score

__all__ = [
    "DEFAULT_TRIMAP_WIDTHS",
    "METHOD_LABELS",
    "SWEEP_CONFIG",
    "SWEEP_METHODS",
    "EvalResult",
    "EvaluationRun",
    "chart_font",
    "draw_class_frequency",
    "draw_sweep",
    "ensure_trained",
    "evaluate_model",
    "format_sweep_table",
    "format_table",
    "method_label",
    "parse_sizes",
    "run_evaluation",
    "run_sweep",
    "sweep_row",
    "write_sweep_files",
]

#: Trimap band widths, in working-resolution pixels.
DEFAULT_TRIMAP_WIDTHS = (1, 2, 4, 8, 16)
EVAL_NAME = "eval.json"
SWEEP_JSON, SWEEP_CSV, SWEEP_PNG = "sweep.json", "sweep.csv", "sweep.png"
CLASS_FREQUENCY_PNG = "class_frequency.png"
#: The fixed-density baselines ``--compare`` can train (paper Sec. 4).
BASELINES = ("uniform", "edge")
#: Methods of a sweep, in plotting order (the names used in files and run folders).
SWEEP_METHODS = ("learned", "single", "uniform", "edge")
#: Training-config changes that make each sweep method out of the model's config.
SWEEP_CONFIG: dict[str, dict[str, Any]] = {
    "learned": {"sampler": "learned", "joint": True},  # the paper's joint loss (segmentation + edge)
    "single": {"sampler": "learned", "joint": False},  # segmentation loss only (paper's "single loss")
    "uniform": {"sampler": "uniform"},
    "edge": {"sampler": "edge"},
}
#: How tables, legends and reports name the methods.
METHOD_LABELS = {
    "learned": "learned (joint loss)",
    "single": "learned (single loss)",
    "uniform": "uniform",
    "edge": "edge (oracle)",
}
_COLORS = {"learned": (214, 39, 40), "single": (255, 127, 14), "uniform": (31, 119, 180), "edge": (44, 160, 44),
           "original": (150, 150, 150)}
_EXTRA_COLORS = ((148, 103, 189), (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207))


def _nan_to_none(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


# ---------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Metrics of one model (one sampling method) on one data set.

    Attributes
    ----------
    name : str
        Method name (column of the table): ``"learned"``, ``"uniform"``, ...
    sampler : str
        The net's sampler.
    class_names : list of str
        In channel order.
    out_size, map_size : (int, int)
        Grid and low-resolution view sizes of the net.
    deformed, full : ConfusionMatrix
        Accumulated over the data set (``[target, prediction]``).
    upsampling : ConfusionMatrix
        ``Y'`` vs ``Y`` with one extra prediction column (index ``K``) for
        ignored labels read back onto counted pixels.
    trimap_widths : tuple of float
    trimap_correct, trimap_total : np.ndarray
        Counts per width.
    freq_original, freq_sampled : np.ndarray
        Pixels per class in ``Y`` and among the sampled labels (ignore excluded).
    regions : int
    samples, pixels : int
        Grid points and unpadded working-resolution pixels, summed over regions.
    pixels_level0 : int
        Level-0 pixels of the regions (their boxes; the working pixels
        times ``downsample ** 2`` when an item has no box), summed.
    fractions : list of float
        Per-region :func:`~wsiseg.sampling.sizes.sample_fraction` of the
        working-resolution pixels.
    fractions_level0 : list of float
        The same of the level-0 pixels.
    glass_model, glass_uniform : int
        Grid points on glass (tissue detector's threshold on the region's
        image), of the model's grids and of uniform grids of the same size.
    downsamples : list of float
        Per-region level-0 pixels per working pixel (when the data set says).
    sample_spacing_um : float or None
        The model's recorded sample spacing (None: it records none).
    grid_scale : float
        Regions were sampled this many times as densely per axis as their
        geometry says (1: as ``segment`` samples them).
    regions_physical : int
        Regions sampled at that spacing (the others had no MPP).
    seconds : float
        Wall time of the evaluation.
    model_path, model_hash : str or None
    """

    name: str
    sampler: str
    class_names: list[str]
    out_size: tuple[int, int]
    map_size: tuple[int, int]
    deformed: ConfusionMatrix
    full: ConfusionMatrix
    upsampling: ConfusionMatrix
    trimap_widths: tuple[float, ...]
    trimap_correct: np.ndarray
    trimap_total: np.ndarray
    freq_original: np.ndarray
    freq_sampled: np.ndarray
    regions: int = 0
    samples: int = 0
    pixels: int = 0
    pixels_level0: int = 0
    fractions: list[float] = field(default_factory=list)
    fractions_level0: list[float] = field(default_factory=list)
    glass_model: int = 0
    glass_uniform: int = 0
    downsamples: list[float] = field(default_factory=list)
    sample_spacing_um: float | None = None
    grid_scale: float = 1.0
    regions_physical: int = 0
    seconds: float = 0.0
    model_path: str | None = None
    model_hash: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def cost(self) -> float:
        """Mean fraction of level-0 pixels sampled per region (the primary cost)."""
        return float(np.mean(self.fractions_level0)) if self.fractions_level0 else float("nan")

    @property
    def cost_working(self) -> float:
        """Mean fraction of working-resolution pixels sampled per region."""
        return float(np.mean(self.fractions)) if self.fractions else float("nan")

    @property
    def samples_on_glass(self) -> dict[str, float]:
        """``{"model": ..., "uniform": ...}``: fraction of grid points on glass (``nan`` without samples)."""
        n = self.samples
        return {k: v / n if n else float("nan") for k, v in (("model", self.glass_model),
                                                             ("uniform", self.glass_uniform))}

    @property
    def miou_full(self) -> float:
        return self.full.miou()

    @property
    def miou_deformed(self) -> float:
        return self.deformed.miou()

    def upsampling_iou(self) -> np.ndarray:
        """Per-class IoU of ``Y'`` vs ``Y`` (``nan`` for absent classes)."""
        k = self.num_classes
        tp, union = self.upsampling.intersection_union()
        tp, union = tp[:k], union[:k]
        out = np.full(k, np.nan)
        np.divide(tp, union, out=out, where=union > 0)
        return out

    @property
    def upsampling_miou(self) -> float:
        """mIoU(Y', Y) over present classes: the sampler's intrinsic loss (1 = none)."""
        iou = self.upsampling_iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def trimap_accuracy(self) -> np.ndarray:
        out = np.full(len(self.trimap_total), np.nan)
        np.divide(self.trimap_correct, self.trimap_total, out=out, where=self.trimap_total > 0)
        return out

    def class_frequency(self) -> tuple[np.ndarray, np.ndarray]:
        """Fractions of pixels per class: ``(original, sampled)``, each summing to 1 (or nan)."""

        def frac(c: np.ndarray) -> np.ndarray:
            s = c.sum()
            return c / s if s else np.full(len(c), np.nan)

        return frac(self.freq_original.astype(np.float64)), frac(self.freq_sampled.astype(np.float64))

    @property
    def resolution(self) -> str:
        """``"full (working resolution, downsample X)"``: what "full" means here."""
        ds = sorted({round(d, 3) for d in self.downsamples})
        if not ds:
            return "full (working resolution)"
        text = f"{ds[0]:g}" if len(ds) == 1 else f"{ds[0]:g}-{ds[-1]:g}"
        return f"full (working resolution, downsample {text})"

    def _iou_dict(self, iou: np.ndarray) -> dict[str, float | None]:
        return {n: _nan_to_none(v) for n, v in zip(self.class_names, iou)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary; every metric says at which resolution it was measured."""
        orig, samp = self.class_frequency()
        full_res = self.resolution
        grid = _wxh(self.out_size)
        return {
            "name": self.name,
            "sampler": self.sampler,
            "model": self.model_path,
            "model_hash": self.model_hash,
            "out_size": list(self.out_size),
            "map_size": list(self.map_size),
            "regions": self.regions,
            "cost": {
                "fraction_level0": _nan_to_none(self.cost),
                "fraction_working": _nan_to_none(self.cost_working),
                "samples": int(self.samples),
                "pixels_level0": int(self.pixels_level0),
                "pixels_working": int(self.pixels),
                "what": "grid points / level-0 pixels of the region (fraction_level0, the primary cost) and / "
                        "unpadded working-resolution pixels (fraction_working), mean over regions",
            },
            "scale": {
                "mode": "physical" if self.regions_physical == self.regions and self.regions else
                        "pixels" if not self.regions_physical else "mixed",
                "sample_spacing_um": self.sample_spacing_um,
                "regions_physical": int(self.regions_physical),
                "grid_scale": self.grid_scale,
                "what": "grids at the model's sample spacing in um (regions with an MPP, model with a scale) or by "
                        "the pixel rule; grid_scale: that many times as densely per axis (--grid-scale)",
            },
            "samples_on_glass": {
                **{k: _nan_to_none(v) for k, v in self.samples_on_glass.items()},
                "what": f"fraction of the grid points on glass (tissue score <= {GLASS_SCORE:g}) of each region's "
                        "working image: the model's grids and uniform grids of the same size",
            },
            "deformed": {
                "resolution": "deformed",
                "what": f"prediction vs labels read (nearest) at the {grid} grid points",
                "miou": _nan_to_none(self.miou_deformed),
                "pixel_accuracy": _nan_to_none(self.deformed.pixel_accuracy()),
                "iou": self._iou_dict(self.deformed.iou()),
                "confusion": self.deformed.matrix.tolist(),
            },
            "full": {
                "resolution": full_res,
                "what": "prediction reverse-sampled (nearest) to the working raster vs labels",
                "downsample": [min(self.downsamples), max(self.downsamples)] if self.downsamples else None,
                "miou": _nan_to_none(self.miou_full),
                "pixel_accuracy": _nan_to_none(self.full.pixel_accuracy()),
                "iou": self._iou_dict(self.full.iou()),
                "confusion": self.full.matrix.tolist(),
            },
            "upsampling": {
                "resolution": full_res,
                "what": "mIoU(Y', Y), Y' = reverse(sample(Y)) on the same grid: the sampler's loss, 1 = lossless",
                "miou": _nan_to_none(self.upsampling_miou),
                "iou": self._iou_dict(self.upsampling_iou()),
            },
            "trimap": {
                "resolution": full_res,
                "widths_px": [float(w) for w in self.trimap_widths],
                "accuracy": [_nan_to_none(v) for v in self.trimap_accuracy()],
                "pixels": self.trimap_total.tolist(),
            },
            "class_frequency": {
                "what": "fraction of non-ignored pixels per class in Y and among the sampled labels",
                "classes": list(self.class_names),
                "original": [_nan_to_none(v) for v in orig],
                "sampled": [_nan_to_none(v) for v in samp],
            },
            "seconds": round(self.seconds, 3),
        }

    def format_table(self) -> str:
        """Readable text table (see :func:`format_table`)."""
        return format_table([self])


def _wxh(size: Sequence[int]) -> str:
    """``(h, w)`` -> ``"WxH"``: sizes are shown width first, as the command line takes them."""
    return f"{size[1]}x{size[0]}"


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def format_table(results: Sequence[EvalResult]) -> str:
    """One column per method, one row per metric, with the resolution of each block.

    Parameters
    ----------
    results : sequence of EvalResult
        Evaluated on the same data (their class names must agree).

    Returns
    -------
    str
    """
    if not results:
        return "(no results)"
    first = results[0]
    rows: list[tuple[str, list[str]] | str] = []

    def add(label: str, values: Sequence[float | None], digits: int = 4) -> None:
        rows.append((label, [_fmt(v, digits) for v in values]))

    rows.append(("grid (out_size)", [_wxh(r.out_size) for r in results]))
    if any(r.grid_scale != 1.0 for r in results):
        add("grid scale (x as dense)", [r.grid_scale for r in results], 3)
    rows.append(("cost (% of level-0 px)", [_percent(r.cost) for r in results]))
    if any(not math.isclose(r.cost, r.cost_working) for r in results):
        rows.append(("cost (% of working px)", [_percent(r.cost_working) for r in results]))
    add("samples on glass (model)", [r.samples_on_glass["model"] for r in results])
    add("samples on glass (uniform)", [r.samples_on_glass["uniform"] for r in results])
    rows.append("-- deformed (on the sampling grid)")
    add("mIoU", [r.miou_deformed for r in results])
    for k, n in enumerate(first.class_names):
        add(f"  IoU {n}", [r.deformed.iou()[k] for r in results])
    rows.append(f"-- {first.resolution}")
    add("mIoU", [r.miou_full for r in results])
    for k, n in enumerate(first.class_names):
        add(f"  IoU {n}", [r.full.iou()[k] for r in results])
    add("pixel accuracy", [r.full.pixel_accuracy() for r in results])
    add("mIoU(Y', Y) upsampling", [r.upsampling_miou for r in results])
    for n, w in enumerate(first.trimap_widths):
        add(f"trimap accuracy {w:g} px", [r.trimap_accuracy()[n] for r in results])
    rows.append("-- class frequency (original -> sampled)")
    for k, n in enumerate(first.class_names):
        cells = []
        for r in results:
            o, s = r.class_frequency()
            cells.append(f"{_fmt(o[k], 3)}->{_fmt(s[k], 3)}")
        rows.append((f"  {n}", cells))

    names = [r.name for r in results]
    label_w = max([len(r[0]) for r in rows if isinstance(r, tuple)] + [6])
    col_w = [max(len(n), *(len(r[1][j]) for r in rows if isinstance(r, tuple))) for j, n in enumerate(names)]
    lines = [
        f"{first.regions} regions; deformed = on the {_wxh(first.out_size)} grid, {first.resolution}",
        " " * label_w + "".join(f"  {n:>{w}}" for n, w in zip(names, col_w)),
    ]
    for r in rows:
        if isinstance(r, str):
            lines.append(r)
        else:
            lines.append(f"{r[0]:<{label_w}}" + "".join(f"  {c:>{w}}" for c, w in zip(r[1], col_w)))
    return "\n".join(lines)


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

    Returns
    -------
    EvalResult

    Raises
    ------
    WsisegError
        Empty data set, labels that are not class indices.
    """
    from wsiseg.models.net import DeformSegNet, lowres_view
    from wsiseg.sampling.geometry import PhysicalScale
    from wsiseg.sampling.reverse import inverse_map, lookup_nearest
    from wsiseg.sampling.sample import sample_labels
    from wsiseg.sampling.coords import uniform_grid
    from wsiseg.sampling.sizes import sample_fraction

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

    res = EvalResult(
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
    t0 = time.perf_counter()
    for batch in _batches(dataset, batch_size):
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
        x_lr = lowres_view(image, geo.map)
        # The edge baseline is an oracle: it places its samples from the labels.
        pred = net.predict_lowres(x_lr, image, labels=labels if net.sampler == "edge" else None, geometry=geo)
        grid = pred.grid.float()
        y_lr = sample_labels(labels, grid)
        index = inverse_map(grid, (h, w))  # shared by the prediction and Y'
        full = lookup_nearest(pred.labels, index)
        y_up = lookup_nearest(y_lr, index)

        res.deformed.update(pred.labels, y_lr)
        res.full.update(full, labels)
        res.upsampling.update(torch.where(y_up == ignore_index, k, y_up), labels)
        c, t = trimap_counts(full.cpu().numpy(), labels.cpu().numpy(), widths, ignore_index)
        res.trimap_correct += c
        res.trimap_total += t
        for counts, lab in ((res.freq_original, labels), (res.freq_sampled, y_lr)):
            valid = lab[lab != ignore_index]
            counts += torch.bincount(valid.flatten().cpu(), minlength=k).numpy()[:k]
        gh, gw = grid.shape[1:3]
        # Glass by a fixed tissue score: Otsu per region would split an all-tissue region in two.
        rgb = (image * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        tissue = torch.from_numpy(np.stack([tissue_score(x) > GLASS_SCORE for x in rgb])).to(dev)
        res.glass_model += int((~sample_labels(tissue, grid)).sum())
        res.glass_uniform += int((~sample_labels(tissue, uniform_grid(gh, gw, device=dev))).sum())
        for it in batch:
            h0, w0 = _level0_size(it, h, w)
            res.regions += 1
            res.regions_physical += physical is not None
            res.samples += gh * gw
            res.pixels += h * w
            res.pixels_level0 += h0 * w0
            res.fractions.append(sample_fraction(gh, gw, h, w))
            res.fractions_level0.append(sample_fraction(gh, gw, h0, w0))
            if it.get("downsample") is not None:
                res.downsamples.append(float(it["downsample"]))
        if log is not None and (res.regions % 50 < len(batch)):
            log(f"{res.name}: {res.regions}/{len(dataset)} regions")
    res.seconds = time.perf_counter() - t0
    return res


# ---------------------------------------------------------------------------
# figures (Pillow, with the plotting helpers of wsiseg.training.charts)
# ---------------------------------------------------------------------------


def chart_font():
    """The font of every chart label (Pillow's default at 11 px, its bitmap font on old Pillow)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _method_color(name: str, n: int) -> tuple[int, int, int]:
    return _COLORS.get(name, _EXTRA_COLORS[n % len(_EXTRA_COLORS)])


def method_label(name: str) -> str:
    """How tables and legends name a method: ``"single"`` -> ``"learned (single loss)"``; others unchanged."""
    return METHOD_LABELS.get(name, name)


def draw_sweep(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Cost-performance trade-off (paper Fig. 6): mIoU vs cost per method.

    Parameters
    ----------
    rows : sequence of dict
        Sweep rows with ``method``, ``cost`` (fraction of level-0 pixels,
        plotted in %), ``miou_full`` and ``upsampling_miou`` (None for
        missing values).
    path : path-like
        Output PNG, written atomically.
    """
    from PIL import Image, ImageDraw

    from wsiseg.training.charts import chart_panel

    methods = list(dict.fromkeys(r["method"] for r in rows))
    # One x position per cost (methods at one size share the cost: same grid, same regions).
    costs = sorted({round(100.0 * float(r["cost"]), 6) for r in rows if r.get("cost") is not None})

    def series(key: str):
        out = []
        for n, m in enumerate(methods):
            ys: list[float | None] = []
            for c in costs:
                hit = [r for r in rows if r["method"] == m and r.get("cost") is not None
                       and round(100.0 * float(r["cost"]), 6) == c]
                ys.append(hit[0].get(key) if hit else None)
            out.append((method_label(m), _method_color(m, n), ys))
        return out

    font = chart_font()
    h = 340
    img = Image.new("RGB", (1, 1), "white")
    # Wide enough for each panel's one-row legend (``chart_panel``: 36 px per entry, 64 px of margins).
    legend = sum(36 + ImageDraw.Draw(img).textlength(method_label(m), font=font) for m in methods)
    w = max(880, 2 * (64 + math.ceil(legend)))
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    label = "% of level-0 pixels sampled"
    for box, title, key in (
        ((0, 0, w // 2, h), "mIoU, full resolution", "miou_full"),
        ((w // 2, 0, w, h), "mIoU(Y', Y): upsampling (sampler only)", "upsampling_miou"),
    ):
        chart_panel(draw, font, box, title, costs, series(key), x_label=label, integer_x=False)
    with atomic_output(path, overwrite=True) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def draw_class_frequency(
    class_names: Sequence[str],
    original: Sequence[float],
    sampled: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    title: str = "class frequency: original vs sampled",
) -> Path:
    """Bars per class: pixel fraction in the labels and among each method's samples (paper Fig. 13).

    Parameters
    ----------
    class_names : sequence of str
    original : sequence of float
        Fraction of pixels per class in ``Y``.
    sampled : mapping of str -> sequence of float
        Method name -> fraction per class among the sampled labels.
    path : path-like
        Output PNG, written atomically.
    title : str
    """
    from PIL import Image, ImageDraw

    from wsiseg.training.charts import chart_ticks, tick_label

    series = [("original", _COLORS["original"], list(original))]
    series += [(method_label(m), _method_color(m, n), list(v)) for n, (m, v) in enumerate(sampled.items())]
    k, nb = len(class_names), len(series)
    bar = 16
    group = nb * bar + 28
    font = chart_font()
    img = Image.new("RGB", (1, 1), "white")
    legend = sum(32 + ImageDraw.Draw(img).textlength(name, font=font) for name, _, _ in series)
    w = max(520, 70 + k * group + 20, 60 + math.ceil(legend) + 20)
    h = 340
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    black, grey, dark = (0, 0, 0), (225, 225, 225), (60, 60, 60)
    left, right, top, bottom = 60, w - 20, 50, h - 44
    draw.text((w // 2, 6), title, fill=black, font=font, anchor="mt")
    lx = left
    for name, color, _ in series:
        draw.rectangle([lx, 27, lx + 12, 37], fill=color)
        draw.text((lx + 16, 32), name, fill=black, font=font, anchor="lm")
        lx += 16 + int(draw.textlength(name, font=font)) + 16
    vals = [v for _, _, ys in series for v in ys if v is not None and math.isfinite(v)]
    yhi = max(vals) * 1.1 if vals and max(vals) > 0 else 1.0

    def py(v: float) -> float:
        return bottom - v / yhi * (bottom - top)

    for t in chart_ticks(0.0, yhi):
        if t <= yhi + 1e-12:
            draw.line([(left, py(t)), (right, py(t))], fill=grey)
            draw.text((left - 6, py(t)), tick_label(t), fill=dark, font=font, anchor="rm")
    span = (right - left) / max(k, 1)
    for c, cname in enumerate(class_names):
        gx = left + c * span + (span - nb * bar) / 2
        for b, (_, color, ys) in enumerate(series):
            v = ys[c] if c < len(ys) else None
            if v is not None and math.isfinite(v) and v > 0:
                draw.rectangle([gx + b * bar, py(v), gx + (b + 1) * bar - 2, bottom], fill=color)
        text = cname if draw.textlength(cname, font=font) <= span - 4 else cname[: max(3, int(span / 7))] + "."
        draw.text((left + (c + 0.5) * span, bottom + 6), text, fill=dark, font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=dark)
    draw.text(((left + right) // 2, h - 4), "fraction of non-ignored pixels per class", fill=dark, font=font,
              anchor="mb")
    with atomic_output(path, overwrite=True) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def _write_json(path: Path, doc: Any) -> Path:
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# the command: data, baselines, sweeps
# ---------------------------------------------------------------------------


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"32,48,96x64"`` -> ``[(32, 32), (48, 48), (64, 96)]``: ``(height, width)`` pairs.

    Each size is ``N`` (square) or ``WIDTHxHEIGHT``, written width first as
    every size on the command line; duplicates are dropped.

    Raises
    ------
    ConfigError
        Empty, non-integer or non-positive sizes.
    """
    out = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            wh = [int(v) for v in part.lower().split("x")]
        except ValueError:
            raise ConfigError(f"bad size {part!r} in {text!r}: expected N or WIDTHxHEIGHT, comma separated") from None
        if len(wh) == 1:
            wh = wh * 2
        if len(wh) != 2 or min(wh) < 1:
            raise ConfigError(f"bad size {part!r} in {text!r}: expected N or WIDTHxHEIGHT of positive integers")
        out.append((wh[1], wh[0]))
    if not out:
        raise ConfigError(f"no sizes in {text!r}")
    return list(dict.fromkeys(out))


class _Remapped(torch.utils.data.Dataset):
    """Items whose label values are turned into the model's channel indices."""

    def __init__(self, base, lut: np.ndarray):
        self.base = base
        self.lut = torch.from_numpy(lut.astype(np.int64))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[i])
        item["labels"] = self.lut[torch.as_tensor(item["labels"]).long()]
        return item


def _label_lut(model, class_map, classes_path, ignore_index: int = 255) -> np.ndarray | None:
    """Label value -> model channel, matching classes by name; None when it is the identity.

    Raises
    ------
    WsisegError
        Naming both files, when names or counts differ.
    """
    model_names = [c.name for c in model.classes]
    yaml_names = class_map.names
    values = [class_map.lookup(n) for n in model_names]
    if len(model_names) != len(yaml_names) or any(v is None or v == ignore_index for v in values):
        raise WsisegError(
            f"classes ({len(yaml_names)}: {', '.join(yaml_names)}) do not match the {len(model_names)} classes of "
            f"the model {model.path} ({', '.join(model_names)})",
            classes_path,
        )
    if values == list(range(len(values))):
        return None
    lut = np.full(256, ignore_index, dtype=np.int64)
    for channel, v in enumerate(values):
        lut[v] = channel
    return lut


def _model_train_config(model):
    """The model's training config (metadata), or one rebuilt from its net config."""
    from wsiseg.training.config import TrainConfig

    cfg = (model.metadata.get("training") or {}).get("config")
    if isinstance(cfg, dict):
        try:
            return TrainConfig.from_dict(cfg), True
        except ConfigError as exc:
            raise WsisegError(f"the model's training config is invalid ({exc})", model.path) from exc
    net = model.net.config()
    seg = dict(net.get("segmenter") or {})
    known = {"arch", "encoder", "encoder_depth", "decoder_channels"}
    opts = {k: seg[k] for k in known if k in seg}
    extra = set(seg) - known - {"num_classes", "in_channels", "pad_mode"}
    if "arch" not in opts or extra:
        raise WsisegError("the model has no training config and its segmenter cannot be rebuilt from options; "
                          "pass the baselines with --baseline NAME=PATH", model.path)
    opts.update(out_size=net["out_size"], map_size=net["map_size"], sigma=net["sigma"], support=net["support"],
                sampler=net["sampler"])
    return TrainConfig.from_dict(opts), False


def _select_pairs(pairs, split: str, cfg, data, say) -> list:
    from wsiseg.training.pairs import split_pairs

    if split == "all":
        return list(pairs)
    if split == "val":
        return split_pairs(pairs, cfg.val_fraction, cfg.seed)[1]
    marked = sorted({p.split for p in pairs if p.split})
    if not marked:
        say(f"{data}: no train/val/test marks: all {len(pairs)} pairs are evaluated as test data")
        return list(pairs)
    test = [p for p in pairs if p.split == "test"]
    if not test:
        raise WsisegError(f"no test pairs (splits found: {', '.join(marked)}); use --split val or --split all", data)
    return test


def ensure_trained(cfg, out: Path, train_ds, val_ds, classes, data_hash, say, name: str | None = None) -> Path:
    """Train into ``out`` unless done: resume an unfinished run, reuse a model without a checkpoint."""
    from wsiseg.training.checkpoint import CHECKPOINT_NAME, MODEL_NAME
    from wsiseg.training.loop import train

    model, ckpt = out / MODEL_NAME, out / CHECKPOINT_NAME
    if model.is_file() and not ckpt.is_file():
        say(f"using {model}")
        return model
    resume = ckpt.is_file()
    say(f"{'checking/resuming' if resume else 'training'} {method_label(name or cfg.sampler)} at "
        f"{_wxh(cfg.out_size)} ({cfg.epochs} epochs) in {out}")
    result = train(cfg, train_ds, val_ds, classes, out, resume=resume, progress=False, data_hash=data_hash, log=say)
    return Path(result.model_path)


@dataclass
class EvaluationRun:
    """What :func:`run_evaluation` produced.

    Attributes
    ----------
    results : list of EvalResult
        The model first, then the baselines (one table column each).
    document : dict
        The content of ``eval.json``.
    table : str
        :func:`format_table` of ``results``.
    files : dict of str -> Path
        ``eval``, ``class_frequency`` and, with a sweep, ``sweep_json``,
        ``sweep_csv``, ``sweep_png``.
    sweep : list of dict
        Sweep rows (empty without a sweep).
    """

    results: list[EvalResult]
    document: dict
    table: str
    files: dict[str, Path]
    sweep: list[dict] = field(default_factory=list)


def _scaled_config(cfg, size: tuple[int, int], method: str, epochs: int, device: str):
    """The model's training config at another output size (map and kernel scaled alike) for one sweep method."""
    if method not in SWEEP_CONFIG:
        raise ConfigError(f"unknown sweep method {method!r}; available: {', '.join(SWEEP_CONFIG)}")
    oh, ow = size
    rh, rw = cfg.map_size[0] / cfg.out_size[0], cfg.map_size[1] / cfg.out_size[1]
    mh, mw = max(4, round(oh * rh)), max(4, round(ow * rw))
    sigma = cfg.sigma * max(mh, mw) / max(cfg.map_size) if cfg.sigma is not None else None
    # An explicit support belongs to the old sigma: let the net derive it from the scaled one.
    return dataclasses.replace(cfg, out_size=(oh, ow), map_size=(mh, mw), sigma=sigma, support=None,
                               epochs=epochs, device=device, **SWEEP_CONFIG[method])


def run_sweep(
    cfg,
    sizes: Sequence[tuple[int, int]],
    out_dir: str | os.PathLike,
    train_ds,
    val_ds,
    eval_ds,
    classes: Sequence,
    *,
    data_hash: str | None = None,
    epochs: int | None = None,
    methods: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int = 4,
    widths: Sequence[float] = DEFAULT_TRIMAP_WIDTHS,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict], list[EvalResult]]:
    """Train every method at every output size from one config and evaluate each on the same data.

    The cost-performance sweep of ``wsiseg evaluate --sweep`` (paper Fig. 6),
    also used by ``wsiseg bench sampling``.

    Parameters
    ----------
    cfg : wsiseg.training.config.TrainConfig
        Base training config; each run changes only the output size (with
        ``map_size`` and ``sigma`` scaled alike), the epochs, the device and
        the fields of :data:`SWEEP_CONFIG` for its method.
    sizes : sequence of (int, int)
        Output sizes ``(h, w)``.
    out_dir : path-like
        Runs go to ``out_dir/<method>-<W>x<H>/``; a finished run there is
        reused and an unfinished one resumed (:func:`wsiseg.training.loop.train`
        refuses a checkpoint of another config or other data).
    train_ds, val_ds : torch.utils.data.Dataset
        Training and validation regions (``val_ds`` may be None).
    eval_ds : torch.utils.data.Dataset
        Held-out regions every model is evaluated on.
    classes : sequence of ClassInfo
        In channel order.
    data_hash : str, optional
        Fingerprint of the training data, stored with each model.
    epochs : int, optional
        Epochs per run (default ``cfg.epochs``).
    methods : sequence of str, optional
        Keys of :data:`SWEEP_CONFIG` (default :data:`SWEEP_METHODS`).
    device, batch_size, widths
        See :func:`evaluate_model`.
    log : callable, optional
        Progress messages.

    Returns
    -------
    rows : list of dict
        One per size and method, in that order (the ``sweep.json`` rows).
    results : list of EvalResult
        The same runs' evaluations.
    """
    from wsiseg.models.io import load_deformseg

    say = log or (lambda _m: None)
    methods = tuple(methods) if methods is not None else SWEEP_METHODS
    n_ep = epochs if epochs is not None else cfg.epochs
    if {"learned", "single"} <= set(methods) and cfg.gamma_edge == 0:
        say("note: gamma_edge is 0, so the joint and single losses are the same loss")
    dev = resolve_device(device)
    rows: list[dict] = []
    results: list[EvalResult] = []
    for size in sizes:
        for method in methods:
            mcfg = _scaled_config(cfg, size, method, n_ep, str(device))
            run_dir = Path(out_dir) / f"{method}-{size[1]}x{size[0]}"  # WIDTHxHEIGHT
            path = ensure_trained(mcfg, run_dir, train_ds, val_ds, classes, data_hash, say, method)
            model = load_deformseg(path, device=dev)
            r = evaluate_model(model, eval_ds, device=dev, batch_size=batch_size, widths=widths, name=method, log=say)
            rows.append(sweep_row(r, size, path, n_ep, model.metadata.get("training") or {}))
            results.append(r)
    return rows, results


def write_sweep_files(out_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                      doc: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``sweep.json`` (``doc`` plus the rows), ``sweep.csv`` and ``sweep.png`` into ``out_dir``.

    Returns
    -------
    dict of str -> Path
        ``sweep_json``, ``sweep_csv``, ``sweep_png``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "sweep_json": _write_json(out / SWEEP_JSON, {**doc, "rows": list(rows)}),
        "sweep_csv": _write_sweep_csv(out / SWEEP_CSV, rows),
        "sweep_png": draw_sweep(rows, out / SWEEP_PNG),
    }


def _percent(fraction: float | None) -> str:
    """A fraction in %: two decimals, or two significant digits below 0.1 % (level-0 costs are small)."""
    if fraction is None or not math.isfinite(fraction):
        return "n/a"
    v = 100.0 * fraction
    return f"{v:.2f}" if v >= 0.1 or v == 0 else f"{v:.2g}"


def _cost_text(level0: float | None, working: float | None) -> str:
    """``"0.39 %"``, or ``"0.39 %; 6.25 % of working px"`` where the working-resolution fraction differs."""
    text = f"{_percent(level0)} %"
    if working is not None and level0 is not None and not math.isclose(working, level0):
        text += f"; {_percent(working)} % of working px"
    return text


def format_sweep_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of sweep rows: one line per size and method, best full-resolution mIoU per size in bold.

    The grid column gives the cost in % of level-0 pixels, and in % of the
    working-resolution pixels where that differs.

    Parameters
    ----------
    rows : sequence of dict
        :func:`run_sweep` rows.

    Returns
    -------
    str
    """
    if not rows:
        return "(no sweep rows)"
    names = list((rows[0].get("iou_full") or {}).keys())
    lines = [
        ("| grid (cost: % of level-0 px) | method | mIoU full res. | mIoU deformed | mIoU(Y', Y) | IoU full res. "
         f"({' / '.join(names)}) | train s/it | epochs (best) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    best: dict[tuple[int, int], float] = {}
    for row in rows:
        key, v = (row["out_height"], row["out_width"]), row.get("miou_full")
        if v is not None:
            best[key] = max(best.get(key, v), v)
    for row in rows:
        key = (row["out_height"], row["out_width"])
        full = _fmt(row.get("miou_full"))
        if row.get("miou_full") is not None and row["miou_full"] == best.get(key):
            full = f"**{full}**"
        grid = f"{_wxh(key)} ({_cost_text(row.get('cost'), row.get('cost_working'))})"
        per_class = " / ".join(_fmt(v, 3) for v in (row.get("iou_full") or {}).values())
        spi = row.get("sec_per_iter")
        spi_text = "n/a" if spi is None else f"{spi:.3f}"
        epochs = f"{row.get('epochs')} ({row.get('best_epoch') if row.get('best_epoch') is not None else 'n/a'})"
        lines.append(
            f"| {grid} | {method_label(row['method'])} | {full} | {_fmt(row.get('miou_deformed'))} | "
            f"{_fmt(row.get('upsampling_miou'))} | {per_class} | {spi_text} | {epochs} |"
        )
    return "\n".join(lines)


def run_evaluation(
    model_path: str | os.PathLike,
    data: str | os.PathLike,
    classes_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    device: str = "auto",
    batch_size: int = 4,
    widths: Sequence[float] = DEFAULT_TRIMAP_WIDTHS,
    compare: Sequence[str] = (),
    baselines: Mapping[str, str] | None = None,
    epochs: int | None = None,
    sweep: Sequence[tuple[int, int]] = (),
    sweep_epochs: int | None = None,
    train_data: str | os.PathLike | None = None,
    hr_size: tuple[int, int] | None = None,
    ignore_unmapped: bool = False,
    value_names: str | os.PathLike | None = None,
    mpp: float | None = None,
    log: Callable[[str], None] | None = None,
    grid_scale: float = 1.0,
) -> EvaluationRun:
    """The ``wsiseg evaluate`` command: evaluate, compare with baselines, sweep the budget.

    Parameters
    ----------
    model_path : path-like
        wsiseg model file.
    data : path-like
        Labelled pairs (folder or CSV, :func:`wsiseg.training.pairs.load_pairs`).
    classes_path : path-like
        Classes YAML; its class names must be the model's.
    out_dir : path-like
        Receives ``eval.json``, ``class_frequency.png``, ``baselines/<name>/``
        and the sweep's ``sweep/<method>-<W>x<H>/``, ``sweep.json``,
        ``sweep.csv``, ``sweep.png``.
    split : {"test", "val", "all"}
        Pairs to evaluate: those marked test (all pairs when none carries a
        split mark), the validation split the model's training config
        draws (``val_fraction``, ``seed``), or all.
    device, batch_size, widths
        See :func:`evaluate_model`.
    compare : sequence of {"uniform", "edge"}
        Baselines to evaluate next to the model, each trained with the
        model's training config with only the sampler changed (same grid,
        same budget) into ``out_dir/baselines/<name>/`` (resumed or reused
        when already there), unless given in ``baselines``.
    baselines : mapping of str -> path, optional
        Ready baseline model files by name.
    epochs : int, optional
        Epochs for the baselines (default: the model's).
    sweep : sequence of (int, int)
        Output sizes ``(h, w)``: every method of :data:`SWEEP_METHODS`
        (learned with the joint loss, learned with the single loss, uniform,
        edge) is trained at each (the model's config with ``out_size`` and,
        proportionally, ``map_size`` and ``sigma`` changed, and the method's
        :data:`SWEEP_CONFIG`) into ``out_dir/sweep/<method>-<W>x<H>/``,
        reused or resumed when already there (:func:`run_sweep`).
    sweep_epochs : int, optional
        Epochs per sweep model (default: the model's).
    train_data : path-like, optional
        Pairs for baselines and sweeps, split into train and validation as
        the model's config says; default all of ``data``'s pairs (those
        marked test never train). Training pairs must not be evaluated.
    hr_size : (int, int), optional
        Working-resolution size ``(H, W)`` of the evaluation; default the
        model's training ``hr_size`` (baselines always train at that).
    ignore_unmapped, value_names
        As for :func:`wsiseg.training.dataset.build_dataset`.
    mpp : float, optional
        Micrometres per level-0 pixel of every image whose pair gives none
        (``--mpp``, :func:`wsiseg.training.pairs.with_mpp`), for evaluation and
        baseline training alike.
    log : callable, optional
        Progress messages.
    grid_scale : float
        Sample the evaluated regions this many times as densely per axis
        (``--grid-scale``, :func:`evaluate_model`; baselines and sweeps
        train as usual).

    Returns
    -------
    EvaluationRun

    Raises
    ------
    WsisegError
        Model file problems (:class:`~wsiseg.models.io.ModelFileError`),
        classes that do not match the model's, no pairs to evaluate, training
        data overlapping the evaluated data.
    """
    from wsiseg.training.classmap import load_class_map
    from wsiseg.training.dataset import build_dataset
    from wsiseg.training.pairs import dataset_hash, load_pairs, split_pairs, with_mpp
    from wsiseg.models.io import load_deformseg

    say = log or (lambda _m: None)
    if split not in ("test", "val", "all"):
        raise ConfigError(f"split must be test, val or all, got {split!r}")
    baselines = dict(baselines or {})
    unknown = [n for n in list(compare) + list(baselines) if n not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline {unknown[0]!r}; available: {', '.join(BASELINES)}")
    compare = list(dict.fromkeys(list(compare) + list(baselines)))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise WsisegError("output folder is a file", out)
    dev = resolve_device(device)

    model = load_deformseg(model_path, device=dev)
    class_map = load_class_map(classes_path)
    lut = _label_lut(model, class_map, classes_path)
    tcfg, has_training = _model_train_config(model)
    # Evaluation may use another working size; baselines still train at the model's.
    hr = tuple(hr_size) if hr_size is not None else tcfg.hr_size

    pairs = with_mpp(load_pairs(data), mpp)
    eval_pairs = _select_pairs(pairs, split, tcfg, data, say)
    if not eval_pairs:
        raise WsisegError(f"no pairs to evaluate in the {split} split", data)

    def dataset(ps, size=hr):
        ds = build_dataset(ps, class_map, hr_size=size, regions=tcfg.regions, seed=tcfg.seed,
                           ignore_unmapped=ignore_unmapped, value_names=value_names)
        return _Remapped(ds, lut) if lut is not None else ds

    eval_ds = dataset(eval_pairs)
    if len(eval_ds) == 0:
        raise WsisegError(f"no regions to evaluate in the {split} split", data)
    say(f"evaluating {len(eval_pairs)} {split} pairs ({len(eval_ds)} regions) at working size {_wxh(hr)}")

    def evaluate(m, name):
        return evaluate_model(m, eval_ds, device=dev, batch_size=batch_size, widths=widths, name=name, log=say,
                              grid_scale=grid_scale)

    main_name = model.net.sampler if model.net.sampler not in compare else "model"
    results = [evaluate(model, main_name)]

    # Training data for baselines and sweeps: never the evaluated pairs.
    train_parts: tuple | None = None

    def training_data():
        nonlocal train_parts
        if train_parts is None:
            tpairs = with_mpp(load_pairs(train_data), mpp) if train_data is not None else pairs
            tr, va = split_pairs(tpairs, tcfg.val_fraction, tcfg.seed)
            source = train_data if train_data is not None else data
            if not tr:
                raise WsisegError("no training pairs for the baselines (pass --train-data)", source)
            # Validation pairs only select the best epoch (as for the model, with --split val).
            evaluated = {os.path.realpath(p.image) for p in eval_pairs}
            overlap = [p for p in tr if os.path.realpath(p.image) in evaluated]
            if overlap:
                raise WsisegError(
                    f"training data for the baselines overlaps the evaluated data ({len(overlap)} pairs, e.g. "
                    f"{Path(overlap[0].image).name}); pass --train-data, or a DATA with train/ and test/ folders",
                    source,
                )
            h = dataset_hash(tpairs)  # what `wsiseg train` stores for the same data
            old = (model.metadata.get("training") or {}).get("data_hash")
            if old and old != h:
                say(f"note: the baselines' training data differs from the model's (hash {h[:12]} vs {old[:12]})")
            train_parts = (dataset(tr, tcfg.hr_size), dataset(va, tcfg.hr_size) if va else None, h)
        return train_parts

    classes = model.classes
    for name in compare:
        if name in baselines:
            path = Path(baselines[name])
        else:
            if not has_training:
                say("note: the model carries no training config; baselines use its net config with default "
                    "training options")
            cfg = dataclasses.replace(tcfg, sampler=name, device=str(device),
                                      epochs=epochs if epochs is not None else tcfg.epochs)
            tr_ds, va_ds, h = training_data()
            path = ensure_trained(cfg, out / "baselines" / name, tr_ds, va_ds, classes, h, say)
        bm = load_deformseg(path, device=dev)
        _check_same_classes(model, bm)
        if tuple(bm.net.out_size) != tuple(model.net.out_size):
            say(f"note: baseline {name} samples {bm.net.out_size} points, the model {model.net.out_size}: "
                "not the same budget")
        results.append(evaluate(bm, name))

    files: dict[str, Path] = {}
    doc = {
        "data": os.fspath(data),
        "split": split,
        "pairs": len(eval_pairs),
        "regions": len(eval_ds),
        "hr_size": list(hr),
        "model": os.fspath(model_path),
        "model_hash": model.hash,
        "resolution": {
            "deformed": "on the sampling grid (out_size points per region)",
            "full": results[0].resolution,
        },
        "methods": {r.name: r.to_dict() for r in results},
    }
    out.mkdir(parents=True, exist_ok=True)
    files["eval"] = _write_json(out / EVAL_NAME, doc)
    table = format_table(results)

    sweep_rows: list[dict] = []
    freq_results = results
    if sweep:
        n_ep = sweep_epochs if sweep_epochs is not None else tcfg.epochs
        tr_ds, va_ds, h = training_data()
        sweep_rows, sweep_results = run_sweep(
            tcfg, sweep, out / "sweep", tr_ds, va_ds, eval_ds, classes, data_hash=h, epochs=n_ep, device=device,
            batch_size=batch_size, widths=widths, log=say,
        )
        smallest = min(sweep, key=lambda s: s[0] * s[1])
        freq_results = [r for r in sweep_results if tuple(r.out_size) == tuple(smallest)]
        files.update(write_sweep_files(out, sweep_rows, {
            "data": os.fspath(data),
            "split": split,
            "regions": len(eval_ds),
            "epochs": n_ep,
            "sizes": [list(s) for s in sweep],
            "resolution": {"miou_full": results[0].resolution, "miou_deformed": "deformed"},
        }))

    first = freq_results[0]
    original = first.class_frequency()[0]
    sampled = {r.name: r.class_frequency()[1] for r in freq_results}
    files["class_frequency"] = draw_class_frequency(
        first.class_names, original, sampled, out / CLASS_FREQUENCY_PNG,
        title=f"class frequency: original vs sampled at {_wxh(first.out_size)} "
              f"(cost {_percent(first.cost)} % of level-0 pixels)",
    )
    return EvaluationRun(results=results, document=doc, table=table, files=files, sweep=sweep_rows)


def _check_same_classes(model, other) -> None:
    a, b = [c.name for c in model.classes], [c.name for c in other.classes]
    if a != b:
        raise WsisegError(f"baseline classes ({', '.join(b)}) differ from those of the model {model.path} "
                          f"({', '.join(a)})", other.path)


# ``cost``: fraction of level-0 pixels (as before the working fraction got its own column, ``cost_working``).
_SWEEP_COLUMNS = ("method", "out_height", "out_width", "map_height", "map_width", "cost", "cost_working", "miou_full",
                  "miou_deformed", "upsampling_miou", "epochs", "model", "label", "joint", "sec_per_iter", "steps",
                  "best_epoch")


def sweep_row(r: EvalResult, size: tuple[int, int], path: Path, epochs: int, training: Mapping[str, Any]) -> dict:
    """One sweep row; ``training`` is the model file's ``"training"`` metadata (timings, best epoch, config)."""
    orig, samp = r.class_frequency()
    config = training.get("config") or {}
    return {
        "method": r.name,
        "label": method_label(r.name),
        "out_height": size[0],
        "out_width": size[1],
        "map_height": r.map_size[0],
        "map_width": r.map_size[1],
        "cost": _nan_to_none(r.cost),
        "cost_working": _nan_to_none(r.cost_working),
        "samples_on_glass": {k: _nan_to_none(v) for k, v in r.samples_on_glass.items()},
        "miou_full": _nan_to_none(r.miou_full),
        "miou_deformed": _nan_to_none(r.miou_deformed),
        "upsampling_miou": _nan_to_none(r.upsampling_miou),
        "epochs": epochs,
        "model": os.fspath(path),
        # Whether the edge term was on (the trainer drops it for fixed samplers).
        "joint": (bool(config.get("joint")) and config.get("sampler") == "learned") if config else None,
        "sec_per_iter": training.get("seconds_per_iter"),
        "steps": training.get("steps"),
        "best_epoch": (training.get("best") or {}).get("epoch"),
        "iou_full": r._iou_dict(r.full.iou()),
        "iou_deformed": r._iou_dict(r.deformed.iou()),
        "trimap": dict(zip([f"{w:g}" for w in r.trimap_widths], [_nan_to_none(v) for v in r.trimap_accuracy()])),
        "class_frequency": {"classes": r.class_names, "original": [_nan_to_none(v) for v in orig],
                            "sampled": [_nan_to_none(v) for v in samp]},
    }


def _write_sweep_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    with atomic_output(path, overwrite=True) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(_SWEEP_COLUMNS)
        for row in rows:
            w.writerow(["" if row.get(c) is None else row.get(c) for c in _SWEEP_COLUMNS])
    return path
