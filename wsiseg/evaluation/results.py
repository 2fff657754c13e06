"""Evaluation results: :class:`EvalResult` (the metrics of one model on one data set), its table, the method
names and file names of evaluations and sweeps, and the small formatting helpers their tables share.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.atomic import atomic_output
from wsiseg.metrics import ConfusionMatrix
from wsiseg.slide.tissue import GLASS_SCORE
from wsiseg.viz.eval_figures import METHOD_LABELS  # re-exported: how tables, legends and reports name methods

__all__ = [
    "BASELINES",
    "CLASS_FREQUENCY_PNG",
    "DEFAULT_TRIMAP_WIDTHS",
    "EVAL_NAME",
    "METHOD_LABELS",
    "SWEEP_CONFIG",
    "SWEEP_CSV",
    "SWEEP_JSON",
    "SWEEP_METHODS",
    "SWEEP_PNG",
    "EvalResult",
    "fmt",
    "format_table",
    "nan_to_none",
    "percent",
    "write_json",
    "wxh",
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


def nan_to_none(v: float) -> float | None:
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
    tta : bool
        Predictions averaged over the deformed image and its flips.
    glass_weight : float
        The glass prior's weight (1: none; ``--glass-weight``).
    grid_iterations : int or None
        Attraction steps used instead of the model's own (``--grid-iterations``).
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
    tta: bool = False
    glass_weight: float = 1.0
    grid_iterations: int | None = None
    regions_physical: int = 0
    region_shares: list[tuple[str, float]] = field(default_factory=list)
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
        return {
            k: v / n if n else float("nan") for k, v in (("model", self.glass_model), ("uniform", self.glass_uniform))
        }

    @property
    def class_share_error(self) -> float:
        """Mean over the regions of :func:`wsiseg.metrics.class_share_error` at full resolution
        (``nan`` without a region with labelled pixels)."""
        errs = [e for _, e in self.region_shares if math.isfinite(e)]
        return float(np.mean(errs)) if errs else float("nan")

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
        return {n: nan_to_none(v) for n, v in zip(self.class_names, iou)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary; every metric says at which resolution it was measured."""
        orig, samp = self.class_frequency()
        full_res = self.resolution
        grid = wxh(self.out_size)
        return {
            "name": self.name,
            "sampler": self.sampler,
            "model": self.model_path,
            "model_hash": self.model_hash,
            "out_size": list(self.out_size),
            "map_size": list(self.map_size),
            "regions": self.regions,
            "cost": {
                "fraction_level0": nan_to_none(self.cost),
                "fraction_working": nan_to_none(self.cost_working),
                "samples": int(self.samples),
                "pixels_level0": int(self.pixels_level0),
                "pixels_working": int(self.pixels),
                "what": "grid points / level-0 pixels of the region (fraction_level0, the primary cost) and / "
                "unpadded working-resolution pixels (fraction_working), mean over regions",
            },
            "scale": {
                "mode": "physical"
                if self.regions_physical == self.regions and self.regions
                else "pixels"
                if not self.regions_physical
                else "mixed",
                "sample_spacing_um": self.sample_spacing_um,
                "regions_physical": int(self.regions_physical),
                "grid_scale": self.grid_scale,
                "what": "grids at the model's sample spacing in um (regions with an MPP, model with a scale) or by "
                "the pixel rule; grid_scale: that many times as densely per axis (--grid-scale)",
            },
            "tta": self.tta,
            "glass_weight": self.glass_weight,
            "grid_iterations": self.grid_iterations,
            "samples_on_glass": {
                **{k: nan_to_none(v) for k, v in self.samples_on_glass.items()},
                "what": f"fraction of the grid points on glass (tissue score <= {GLASS_SCORE:g}) of each region's "
                "working image: the model's grids and uniform grids of the same size",
            },
            "deformed": {
                "resolution": "deformed",
                "what": f"prediction vs labels read (nearest) at the {grid} grid points",
                "miou": nan_to_none(self.miou_deformed),
                "pixel_accuracy": nan_to_none(self.deformed.pixel_accuracy()),
                "iou": self._iou_dict(self.deformed.iou()),
                "confusion": self.deformed.matrix.tolist(),
            },
            "full": {
                "resolution": full_res,
                "what": "prediction reverse-sampled (nearest) to the working raster vs labels",
                "downsample": [min(self.downsamples), max(self.downsamples)] if self.downsamples else None,
                "miou": nan_to_none(self.miou_full),
                "pixel_accuracy": nan_to_none(self.full.pixel_accuracy()),
                "iou": self._iou_dict(self.full.iou()),
                "confusion": self.full.matrix.tolist(),
            },
            "class_shares": {
                "resolution": full_res,
                "what": "per region, the share of its labelled pixels given to the wrong class on balance (half the "
                "L1 distance between the labels' and the prediction's class shares; with two classes, the "
                "predicted tumour share minus the true one, in absolute value): wrong areas, whatever the boundaries",
                "mean": nan_to_none(self.class_share_error),
                "max": nan_to_none(max((e for _, e in self.region_shares if math.isfinite(e)), default=math.nan)),
                "regions": [{"name": name, "error": nan_to_none(e)} for name, e in self.region_shares],
            },
            "upsampling": {
                "resolution": full_res,
                "what": "mIoU(Y', Y), Y' = reverse(sample(Y)) on the same grid: the sampler's loss, 1 = lossless",
                "miou": nan_to_none(self.upsampling_miou),
                "iou": self._iou_dict(self.upsampling_iou()),
            },
            "trimap": {
                "resolution": full_res,
                "widths_px": [float(w) for w in self.trimap_widths],
                "accuracy": [nan_to_none(v) for v in self.trimap_accuracy()],
                "pixels": self.trimap_total.tolist(),
            },
            "class_frequency": {
                "what": "fraction of non-ignored pixels per class in Y and among the sampled labels",
                "classes": list(self.class_names),
                "original": [nan_to_none(v) for v in orig],
                "sampled": [nan_to_none(v) for v in samp],
            },
            "seconds": round(self.seconds, 3),
        }

    def format_table(self) -> str:
        """Readable text table (see :func:`format_table`)."""
        return format_table([self])


def wxh(size: Sequence[int]) -> str:
    """``(h, w)`` -> ``"WxH"``: sizes are shown width first, as the command line takes them."""
    return f"{size[1]}x{size[0]}"


def fmt(v: float | None, digits: int = 4) -> str:
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
        rows.append((label, [fmt(v, digits) for v in values]))

    rows.append(("grid (out_size)", [wxh(r.out_size) for r in results]))
    if any(r.grid_scale != 1.0 for r in results):
        add("grid scale (x as dense)", [r.grid_scale for r in results], 3)
    if any(r.tta for r in results):
        rows.append(("test-time flips", ["yes" if r.tta else "no" for r in results]))
    if any(r.glass_weight != 1.0 for r in results):
        add("glass weight", [r.glass_weight for r in results], 3)
    if any(r.grid_iterations is not None for r in results):
        rows.append(("grid iterations", [str(r.grid_iterations or "model's") for r in results]))
    rows.append(("cost (% of level-0 px)", [percent(r.cost) for r in results]))
    if any(not math.isclose(r.cost, r.cost_working) for r in results):
        rows.append(("cost (% of working px)", [percent(r.cost_working) for r in results]))
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
    add("class-share error (mean)", [r.class_share_error for r in results])
    add("mIoU(Y', Y) upsampling", [r.upsampling_miou for r in results])
    for n, w in enumerate(first.trimap_widths):
        add(f"trimap accuracy {w:g} px", [r.trimap_accuracy()[n] for r in results])
    rows.append("-- class frequency (original -> sampled)")
    for k, n in enumerate(first.class_names):
        cells = []
        for r in results:
            o, s = r.class_frequency()
            cells.append(f"{fmt(o[k], 3)}->{fmt(s[k], 3)}")
        rows.append((f"  {n}", cells))

    names = [r.name for r in results]
    label_w = max([len(r[0]) for r in rows if isinstance(r, tuple)] + [6])
    col_w = [max(len(n), *(len(r[1][j]) for r in rows if isinstance(r, tuple))) for j, n in enumerate(names)]
    lines = [
        f"{first.regions} regions; deformed = on the {wxh(first.out_size)} grid, {first.resolution}",
        " " * label_w + "".join(f"  {n:>{w}}" for n, w in zip(names, col_w)),
    ]
    for r in rows:
        if isinstance(r, str):
            lines.append(r)
        else:
            lines.append(f"{r[0]:<{label_w}}" + "".join(f"  {c:>{w}}" for c, w in zip(r[1], col_w)))
    return "\n".join(lines)


def write_json(path: Path, doc: Any) -> Path:
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def percent(fraction: float | None) -> str:
    """A fraction in %: two decimals, or two significant digits below 0.1 % (level-0 costs are small)."""
    if fraction is None or not math.isfinite(fraction):
        return "n/a"
    v = 100.0 * fraction
    return f"{v:.2f}" if v >= 0.1 or v == 0 else f"{v:.2g}"
