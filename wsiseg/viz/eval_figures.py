"""Evaluation figures (Pillow, with the chart helpers of :mod:`wsiseg.viz.charts`): the cost-performance
sweep and the class frequencies, in one colour per method.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wsiseg.atomic import atomic_output

__all__ = [
    "METHOD_LABELS",
    "chart_font",
    "draw_class_frequency",
    "draw_sweep",
    "method_label",
]

#: How tables, legends and reports name the methods.
METHOD_LABELS = {
    "learned": "learned (joint loss)",
    "single": "learned (single loss)",
    "uniform": "uniform",
    "edge": "edge (oracle)",
    "learned-steps": "learned (joint loss, iterated grid)",
    "edge-steps": "edge (oracle, iterated grid)",
}
#: Each method's colour in the figures; other methods take an extra colour by their place in the figure.
_COLORS = {
    "learned": (214, 39, 40),
    "single": (255, 127, 14),
    "uniform": (31, 119, 180),
    "edge": (44, 160, 44),
    "original": (150, 150, 150),
}
_EXTRA_COLORS = ((148, 103, 189), (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207))


# ---------------------------------------------------------------------------
# figures (Pillow, with the plotting helpers of wsiseg.viz.charts)
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

    from wsiseg.viz.charts import chart_panel

    methods = list(dict.fromkeys(r["method"] for r in rows))
    # One x position per cost (methods at one size share the cost: same grid, same regions).
    costs = sorted({round(100.0 * float(r["cost"]), 6) for r in rows if r.get("cost") is not None})

    def series(key: str):
        out = []
        for n, m in enumerate(methods):
            ys: list[float | None] = []
            for c in costs:
                hit = [
                    r
                    for r in rows
                    if r["method"] == m and r.get("cost") is not None and round(100.0 * float(r["cost"]), 6) == c
                ]
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

    from wsiseg.viz.charts import chart_ticks, tick_label

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
    draw.text(
        ((left + right) // 2, h - 4), "fraction of non-ignored pixels per class", fill=dark, font=font, anchor="mb"
    )
    with atomic_output(path, overwrite=True) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
