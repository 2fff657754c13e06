"""Part 1 of ``wsiseg bench quality``: the grid capacity, how much the sampling grid *can* gain (no training).

The oracle edge density (from the true labels) of every image of a set prepared by
:func:`wsiseg.bench.quality.prepare_set` is turned into a grid with several density-map sizes and kernel
widths (:data:`CAPACITY_CONFIGS`), and the sampler's own loss mIoU(Y', Y) is compared with the uniform
grid's at each budget (:data:`BUDGETS`). Moved out of :mod:`wsiseg.bench.quality`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wsiseg.bench.quality import prepare_set
from wsiseg.training.regions import QualitySet

__all__ = [
    "BUDGETS",
    "CAPACITY_CONFIGS",
    "CapacityRow",
    "format_capacity",
    "grid_capacity",
]

#: Budgets: fractions of level-0 pixels sampled.
BUDGETS = (0.00025, 0.0005, 0.001, 0.004, 0.016)


def _load_labels(csv_path: Path, split: str | None = None):
    """Label arrays (int64 tensors) of a prepared set, optionally one split."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if split is None or row["split"] == split:
                with Image.open(row["annotation"]) as im:
                    out.append(torch.from_numpy(np.asarray(im).astype(np.int64)))
    return out


@dataclass(frozen=True)
class CapacityRow:
    """mIoU(Y', Y) of one grid construction on one set at one budget."""

    set: str
    budget: float
    label: str
    map_ratio: float
    sigma_rel: float
    radius_rel: float
    miou: float
    uniform: float
    cost: float
    iterations: int = 1
    #: Folded cells of its grids over the set (:func:`wsiseg.sampling.reverse.folded_cells`); None: not counted
    #: (results stored before the count existed).
    folded: int | None = None

    @property
    def gain(self) -> float:
        """Points of mIoU(Y', Y) over the uniform grid."""
        return 100.0 * (self.miou - self.uniform)


#: Grid constructions of the capacity study: (label, map side / grid side, sigma / map side, edge radius / map side,
#: attraction steps).
CAPACITY_CONFIGS = (
    ("before (map 0.5x, sigma 1/8)", 0.5, 1 / 8, 1 / 32, 1),
    ("map 1x, sigma 1/8", 1.0, 1 / 8, 1 / 32, 1),
    ("map 1x, sigma 1/32", 1.0, 1 / 32, 1 / 64, 1),
    ("map 2x, sigma 1/16", 2.0, 1 / 16, 1 / 128, 1),
    ("default (map 2x, sigma 1/32)", 2.0, 1 / 32, 1 / 128, 1),
    ("map 2x, sigma 1/48", 2.0, 1 / 48, 1 / 128, 1),
    ("map 4x, sigma 1/32", 4.0, 1 / 32, 1 / 128, 1),
    ("default, 4 steps", 2.0, 1 / 32, 1 / 128, 4),
    ("default, 8 steps", 2.0, 1 / 32, 1 / 128, 8),
    ("map 2x, sigma 1/48, 8 steps", 2.0, 1 / 48, 1 / 128, 8),
)


def _budget_grid(shape: tuple[int, int], budget: float, downsample: float) -> tuple[int, int]:
    """Grid ``(h, w)`` with about ``budget`` of the level-0 pixels, keeping the aspect ratio."""
    h, w = shape
    s = math.sqrt(budget) * downsample
    return max(2, round(h * s)), max(2, round(w * s))


def grid_capacity(
    data_root: str | os.PathLike,
    workdir: str | os.PathLike,
    sets: Sequence[QualitySet],
    budgets: Sequence[float] | None = None,
    configs: Sequence[tuple[str, float, float, float, int]] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[CapacityRow]:
    """Oracle edge grids vs the uniform grid: mIoU(Y', Y) over every image of each set.

    Labels are read at the working resolution of the set (as training
    reads them); the budget counts level-0 pixels. mIoU is accumulated over
    the set (one confusion matrix), not averaged per image.

    Parameters
    ----------
    data_root, workdir : path-like
    sets : sequence of QualitySet
    budgets : sequence of float, optional
        Fractions of level-0 pixels; default :data:`BUDGETS`.
    configs : sequence of (label, map ratio, sigma / map, edge radius / map, attraction steps), optional
        Default :data:`CAPACITY_CONFIGS`.
    log : callable, optional

    Returns
    -------
    list of CapacityRow
    """
    import numpy as np
    import torch.nn.functional as F

    from wsiseg.metrics import ConfusionMatrix
    from wsiseg.sampling.coords import uniform_grid
    from wsiseg.sampling.edges import edge_density
    from wsiseg.sampling.geometry import default_support
    from wsiseg.sampling.grid import density_to_grid
    from wsiseg.sampling.reverse import folded_cells, reverse_sample
    from wsiseg.sampling.sample import downsample_labels, sample_labels

    say = log or (lambda _m: None)
    budgets = BUDGETS if budgets is None else budgets
    configs = CAPACITY_CONFIGS if configs is None else configs
    rows: list[CapacityRow] = []
    for qs in sets:
        labels = []
        for y in _load_labels(prepare_set(data_root, workdir, qs)):
            t = max(y.shape) / qs.hr_size
            if t > 1:  # working resolution: nearest at pixel centres, as data.py reads labels
                size = (round(y.shape[0] / t), round(y.shape[1] / t))
                y = F.interpolate(y[None, None].float(), size=size, mode="nearest")[0, 0].long()
            labels.append((y, max(t, 1.0)))
        for budget in budgets:
            scores: dict[str, float] = {}
            folds: dict[str, int] = {}
            costs = []
            for label, ratio, sig, rad, steps in (("uniform", 0, 0, 0, 1), *configs):
                cm = ConfusionMatrix(2)
                folds[label] = 0
                for y, t in labels:
                    gh, gw = _budget_grid(tuple(y.shape), budget, t)
                    if label == "uniform":
                        g = uniform_grid(gh, gw)[None]
                        costs.append(gh * gw / (y.numel() * t * t))
                    else:
                        hd, wd = max(4, round(gh * ratio)), max(4, round(gw * ratio))
                        side = math.sqrt(hd * wd)
                        d = edge_density(downsample_labels(y[None], (hd, wd)), radius=rad * side)
                        sigma = sig * side
                        g = density_to_grid(d, sigma, default_support(sigma), out_size=(gh, gw), iterations=steps)
                        folds[label] += folded_cells(g)
                    y_up = reverse_sample(sample_labels(y[None], g), g, tuple(y.shape))
                    cm.update(y_up, y[None])
                scores[label] = float(cm.miou())
            cost = float(np.mean(costs))
            for label, ratio, sig, rad, steps in configs:
                rows.append(
                    CapacityRow(
                        qs.key,
                        budget,
                        label,
                        ratio,
                        sig,
                        rad,
                        scores[label],
                        scores["uniform"],
                        cost,
                        steps,
                        folds[label],
                    )
                )
            best = max(configs, key=lambda c: scores[c[0]])[0]
            say(
                f"capacity {qs.key} {100 * budget:g} %: uniform {scores['uniform']:.4f}, best {best} {scores[best]:.4f}"
            )
    return rows


def format_capacity(rows: Sequence[CapacityRow]) -> str:
    """Markdown table: one line per set and budget, one column per grid construction (gain in points).

    A last line says which grids folded (or that none did), where the rows counted folds.
    """
    labels = list(dict.fromkeys(r.label for r in rows))
    head = "| set | budget (% level-0 px) | uniform mIoU(Y', Y) | " + " | ".join(labels) + " |"
    lines = [head, "|" + "---|" * (3 + len(labels))]
    keys = list(dict.fromkeys((r.set, r.budget) for r in rows))
    for s, b in keys:
        sel = {r.label: r for r in rows if (r.set, r.budget) == (s, b)}
        first = next(iter(sel.values()))
        best = max(sel.values(), key=lambda r: r.miou).label
        cells = [f"{'**' if k == best else ''}{sel[k].gain:+.1f}{'**' if k == best else ''}" for k in labels]
        lines.append(f"| {s} | {100 * first.cost:.3g} | {first.uniform:.4f} | " + " | ".join(cells) + " |")
    counted = [r for r in rows if r.folded is not None]
    if counted:
        bad = [f"{r.label} on {r.set} at {100 * r.budget:g} % ({r.folded})" for r in counted if r.folded]
        lines += ["", f"Folded cells: {'; '.join(bad) if bad else 'none, in any construction, set or budget'}."]
    return "\n".join(lines)
