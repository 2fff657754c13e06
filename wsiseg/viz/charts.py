"""Charts drawn with Pillow: the training curves (``curves.png``, from the rows of the training log) and the
chart helpers (axis ticks and labels, one line-chart panel) that the evaluation figures and the benchmarks draw with.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wsiseg.atomic import atomic_output

__all__ = [
    "chart_panel",
    "chart_ticks",
    "draw_curves",
    "tick_label",
]


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / max(target, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= m * mag:
            return m * mag
    return 10.0 * mag


def chart_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About ``target`` round tick values (1, 2, 5 x 10^k steps) covering ``[lo, hi]`` of a chart axis."""
    step = _nice_step(hi - lo, target)
    first = math.ceil(lo / step - 1e-9) * step
    out, v = [], first
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


def tick_label(v: float) -> str:
    """A short axis label for tick value ``v`` (``"0"``, ``"0.25"``, ``"1e-04"``)."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.0e}"
    return f"{v:.4g}"


def chart_panel(
    draw,
    font,
    box,
    title: str,
    xs: Sequence[float],
    series,
    *,
    y_range=None,
    log_y=False,
    x_label: str = "epoch",
    integer_x: bool = True,
) -> None:
    """One chart into a Pillow ``draw``: title and legend above, axes, ticks, grid, lines with markers.

    Parameters
    ----------
    draw, font
        ``PIL.ImageDraw.Draw`` and the font of every label.
    box : (int, int, int, int)
        ``(x0, y0, x1, y1)`` of the panel in the image.
    title : str
    xs : sequence of float
        X of every point (shared by the series).
    series : sequence of (str, (int, int, int), sequence of float or None)
        Name, colour and y values; ``None`` or non-finite values leave gaps.
    y_range : (float, float), optional
        Fixed y range; default: the data's, padded.
    log_y : bool
        Logarithmic y axis.
    x_label : str
        Label under the x axis.
    integer_x : bool
        Integer x ticks (epochs); otherwise round fractional ones (costs).
    """
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 52, x1 - 12, y0 + 44, y1 - 34
    black, grey, dark = (0, 0, 0), (225, 225, 225), (60, 60, 60)
    draw.text(((left + right) // 2, y0 + 6), title, fill=black, font=font, anchor="mt")
    shown = [(n, c) for n, c, ys in series if any(v is not None and math.isfinite(v) for v in ys)]
    lx = left
    for name, color in shown:  # legend in one row above the plot, never over the data
        draw.line([(lx, y0 + 30), (lx + 16, y0 + 30)], fill=color, width=3)
        draw.text((lx + 20, y0 + 30), name, fill=black, font=font, anchor="lm")
        lx += 20 + int(draw.textlength(name, font=font)) + 16

    vals = [v for _, _, ys in series for v in ys if v is not None and math.isfinite(v) and (v > 0 or not log_y)]
    if y_range is not None:
        ylo, yhi = y_range
    elif vals:
        ylo, yhi = min(vals), max(vals)
        if log_y:
            ylo, yhi = math.log10(ylo), math.log10(yhi)
        if yhi - ylo < 1e-12:
            ylo, yhi = ylo - 0.5, yhi + 0.5
        pad = 0.05 * (yhi - ylo)
        ylo, yhi = ylo - pad, yhi + pad
        if not log_y and min(vals) >= 0:
            ylo = max(ylo, 0.0)
    else:
        ylo, yhi = 0.0, 1.0
    xlo, xhi = (min(xs), max(xs)) if xs else (1, 1)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1

    def px(x: float) -> float:
        return left + (x - xlo) / (xhi - xlo) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - ylo) / (yhi - ylo) * (bottom - top)

    if log_y:
        # Decades, plus 2 and 5 times them when fewer than three decades show.
        decades = range(math.floor(ylo), math.ceil(yhi) + 1)
        mult = (1.0,) if math.floor(yhi) - math.ceil(ylo) >= 2 else (1.0, 2.0, 5.0)
        yt = [math.log10(m * 10.0**e) for e in decades for m in mult]
    else:
        yt = chart_ticks(ylo, yhi)
    for t in yt:
        if ylo - 1e-9 <= t <= yhi + 1e-9:
            y = py(t)
            draw.line([(left, y), (right, y)], fill=grey)
            draw.line([(left - 4, y), (left, y)], fill=dark)
            label = tick_label(float(f"{10.0**t:.3g}") if log_y else t)
            draw.text((left - 6, y), label, fill=dark, font=font, anchor="rm")
    if integer_x:
        xt = [t for t in chart_ticks(xlo, xhi, 6) if float(t).is_integer() and xlo <= t <= xhi] or [xlo]
    else:
        xt = [t for t in chart_ticks(xlo, xhi, 5) if xlo - 1e-9 <= t <= xhi + 1e-9]
    for t in xt:
        x = px(t)
        draw.line([(x, bottom), (x, bottom + 4)], fill=dark)
        draw.text((x, bottom + 6), str(int(t)) if integer_x else tick_label(t), fill=dark, font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=dark)
    draw.text(((left + right) // 2, y1 - 4), x_label, fill=dark, font=font, anchor="mb")
    if not shown:
        draw.text(((left + right) // 2, (top + bottom) // 2), "no data", fill=dark, font=font, anchor="mm")

    # Drawn in reverse so the first (main) series ends up on top.
    for _name, color, ys in reversed(series):
        pts: list[tuple[float, float]] = []
        for i, (x, v) in enumerate(zip(xs, ys)):
            ok = v is not None and math.isfinite(v) and (v > 0 or not log_y)
            if ok:
                pts.append((px(x), py(math.log10(v) if log_y else v)))
            if (not ok or i == len(xs) - 1) and pts:  # a gap or the end: flush the segment
                if len(pts) > 1:
                    draw.line(pts, fill=color, width=2)
                for p in pts:
                    draw.ellipse([p[0] - 2.5, p[1] - 2.5, p[0] + 2.5, p[1] + 2.5], fill=color)
                pts = []


def draw_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, gamma_edge: float = 1.0) -> Path:
    """Draw training curves (loss terms; validation mIoU; deformation-net gradients) to a PNG with Pillow.

    Parameters
    ----------
    history : sequence of dict
        Rows with the :data:`wsiseg.training.log.LOG_COLUMNS` keys.
    path : path-like
        Output PNG, written atomically.
    gamma_edge : float
        Weight shown with the edge term (``gamma * edge``), so the three
        loss curves add up.
    """
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        font = ImageFont.load_default()
    xs = [int(r["epoch"]) for r in history]

    def col(name: str, scale: float = 1.0) -> list[float | None]:
        out = []
        for r in history:
            v = r.get(name)
            out.append(None if v is None else float(v) * scale)
        return out

    # A third panel when the run has a deformation net: which loss term steers it.
    grads = [("segmentation", (31, 119, 180), col("grad_seg")), ("edge", (255, 127, 14), col("grad_edge"))]
    has_grads = any(v for _, _, ys in grads for v in ys if v)
    w, h = (1320 if has_grads else 880), 320
    pw = w // 3 if has_grads else w // 2
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)

    losses = [("total", (20, 20, 20), col("loss")), ("seg", (31, 119, 180), col("seg"))]
    if gamma_edge > 0 and any(v for v in col("edge") if v):
        losses.append((f"{gamma_edge:g}*edge", (255, 127, 14), col("edge", gamma_edge)))
    pos = [v for _, _, ys in losses for v in ys if v is not None and math.isfinite(v) and v > 0]
    log_y = bool(pos) and max(pos) / min(pos) > 30
    chart_panel(draw, font, (0, 0, pw, h), "training loss" + (" (log)" if log_y else ""), xs, losses, log_y=log_y)
    mious = [
        ("full res", (214, 39, 40), col("val_miou_full")),
        ("deformed", (44, 160, 44), col("val_miou_deformed")),
    ]
    chart_panel(draw, font, (pw, 0, 2 * pw, h), "validation mIoU", xs, mious, y_range=(0.0, 1.0))
    if has_grads:
        chart_panel(draw, font, (2 * pw, 0, w, h), "deformation-net gradient norm (log)", xs, grads, log_y=True)
    with atomic_output(path, overwrite=True) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
