"""Quality-control figure: what the model found and where it looked.

One PNG per slide, four panels of the slide thumbnail:

1. the thumbnail with the processed regions (numbered boxes);
2. the predicted classes as a semi-transparent overlay with a legend
   (background, value 0, is left untinted so the tissue stays visible);
3. the sampling points as dots (a random subset when there are many, so dot
   density still follows sampling density);
4. the sampling density of each region as a heatmap over a grey thumbnail,
   with a colour bar.

Everything is drawn with numpy and Pillow. :func:`compose_qc` is a pure
function returning the RGB figure; :func:`render_qc` writes it atomically.

Coordinates follow :mod:`wsiseg.sampling.coords`: thumbnail pixel ``(i, j)``
covers ``[j, j + 1) x [i, i + 1)``; sample positions and region boxes are
continuous thumbnail coordinates ``(x, y)``. A panel shows the thumbnail at
scale ``(sx, sy)`` (panel pixels per thumbnail pixel), so a thumbnail point
``(x, y)`` lands on panel point ``(x * sx, y * sy)``.

It stays one module (some 700 lines): it draws one figure, and its pixel
helpers, text layout and panel composition serve nothing else.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wsiseg.atomic import atomic_output
from wsiseg.output.classes import ClassInfo

__all__ = [
    "OVERLAY_ALPHA",
    "HEAT_ALPHA",
    "MAX_DOTS",
    "PANELS",
    "colormap",
    "overlay_classes",
    "rasterise_density",
    "sample_dots",
    "compose_qc",
    "render_qc",
]

#: Opacity of the class colours over the thumbnail.
OVERLAY_ALPHA = 0.45
#: Opacity of the density colours over the grey thumbnail.
HEAT_ALPHA = 0.7
#: Most sampling points drawn; more are randomly subsampled.
MAX_DOTS = 20_000
#: Panel names, in drawing order (keys of the layout :func:`compose_qc` returns).
PANELS = ("regions", "classes", "samples", "density")

# Dark violet -> blue -> teal -> green -> yellow, lightness rising steadily so
# the map reads correctly in greyscale and for red-green colour blindness.
_ANCHORS = np.array(
    [
        (46, 16, 80),
        (68, 52, 130),
        (58, 92, 148),
        (40, 126, 146),
        (32, 158, 132),
        (78, 188, 100),
        (158, 212, 56),
        (248, 230, 36),
    ],
    dtype=np.float64,
)
_BOX_COLOR = (0, 95, 255)  # blue reads on both pink tissue and white glass
_DOT_COLOR = (200, 20, 40)
_UNKNOWN_COLOR = (128, 128, 128)  # label values missing from the class table
_BG = (255, 255, 255)
_INK = (20, 20, 20)
_MUTED = (90, 90, 90)
_MARGIN, _GAP, _PAD = 10, 14, 4
_SWATCH = 12


# ---------------------------------------------------------------------------
# pure image helpers


def colormap(t) -> np.ndarray:
    """Map values in ``[0, 1]`` to the perceptual heatmap colours.

    Parameters
    ----------
    t : array-like of float
        Values, clipped to ``[0, 1]``; NaN maps to the low end.

    Returns
    -------
    numpy.ndarray
        ``t.shape + (3,)`` uint8 RGB, piecewise linear between eight anchors.
    """
    t = np.nan_to_num(np.asarray(t, dtype=np.float64), nan=0.0)
    pos = np.clip(t, 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.minimum(np.floor(pos).astype(np.intp), len(_ANCHORS) - 2)
    f = (pos - lo)[..., None]
    rgb = _ANCHORS[lo] * (1.0 - f) + _ANCHORS[lo + 1] * f
    return np.rint(rgb).astype(np.uint8)


def _class_lut(classes: Iterable[ClassInfo], present: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """256-entry colour table and a mask of values that get tinted."""
    lut = np.zeros((256, 3), np.float64)
    tint = np.zeros(256, bool)
    for v in present:
        lut[v], tint[v] = _UNKNOWN_COLOR, True
    for c in classes:
        lut[c.value], tint[c.value] = c.color, True
    tint[0] = False  # background by convention: leave the tissue visible
    return lut, tint


def overlay_classes(
    rgb: np.ndarray, labels: np.ndarray, classes: Iterable[ClassInfo], alpha: float = OVERLAY_ALPHA
) -> np.ndarray:
    """Blend class colours over an image; value-0 pixels stay unchanged.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(h, w, 3)`` uint8 image.
    labels : numpy.ndarray
        ``(h, w)`` uint8 labels on the same grid.
    classes : iterable of ClassInfo
        Colours; values without a class are tinted grey.
    alpha : float
        Opacity of the class colour.

    Returns
    -------
    numpy.ndarray
        ``(h, w, 3)`` uint8.
    """
    rgb = np.asarray(rgb)
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match image {rgb.shape[:2]}")
    lut, tint = _class_lut(classes, np.unique(labels).tolist())
    out = rgb.copy()
    sel = tint[labels]
    blend = (1.0 - alpha) * rgb[sel].astype(np.float64) + alpha * lut[labels[sel]]
    out[sel] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out


def _centre_index(n_out: int, n_in: int) -> np.ndarray:
    # Nearest read of output pixel centres, per the coordinates convention.
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.intp), n_in - 1)


def _resize_nearest(a: np.ndarray, width: int, height: int) -> np.ndarray:
    if a.shape[:2] == (height, width):
        return a
    return a[_centre_index(height, a.shape[0])][:, _centre_index(width, a.shape[1])]


def _resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    if rgb.shape[:2] == (height, width):
        return rgb.copy()
    img = Image.fromarray(rgb)
    # Lanczos when shrinking avoids aliasing of fine tissue; bilinear when enlarging.
    method = Image.Resampling.LANCZOS if width < rgb.shape[1] else Image.Resampling.BILINEAR
    return np.asarray(img.resize((width, height), method))


def _grey(rgb: np.ndarray, lighten: float = 0.0) -> np.ndarray:
    """Luminance as grey RGB, optionally pulled towards white by ``lighten``."""
    y = rgb.astype(np.float64) @ np.array([0.2125, 0.7154, 0.0721])
    y = y * (1.0 - lighten) + 255.0 * lighten
    return np.repeat(np.rint(y).astype(np.uint8)[..., None], 3, axis=-1)


def _bilinear_axis(
    n: int, start: float, length: float, size_in: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Output pixels whose centres fall in ``[start, start + length)`` and their bilinear taps.

    Returns the output indices (clipped to ``[0, n)``), the two input indices
    and the weight of the second, with border replication.
    """
    first = max(0, math.ceil(start - 0.5))
    stop = min(n, math.ceil(start + length - 0.5))
    idx = np.arange(first, max(first, stop))
    u = (idx + 0.5 - start) / length * size_in - 0.5
    u = np.clip(u, 0.0, size_in - 1)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, size_in - 1)
    return idx, i0, i1, u - i0


def rasterise_density(
    shape: tuple[int, int],
    density: Sequence[tuple[np.ndarray, Sequence[float]]],
    scale: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """Resample each region's density into its box on an image grid.

    Parameters
    ----------
    shape : (int, int)
        Output ``(height, width)``.
    density : sequence of (numpy.ndarray, box)
        ``(hd, wd)`` density maps and their region boxes ``(x, y, w, h)`` in
        thumbnail coordinates; the map's pixels tile the box edge to edge.
    scale : (float, float)
        Output pixels per thumbnail pixel along ``(x, y)``.

    Returns
    -------
    numpy.ndarray
        ``shape`` float64, bilinearly interpolated density inside the boxes
        (the larger value where boxes overlap), NaN elsewhere.
    """
    h, w = shape
    out = np.full((h, w), np.nan)
    sx, sy = scale
    for d, box in density:
        d = np.asarray(d, dtype=np.float64)
        if d.ndim != 2 or d.size == 0:
            raise ValueError(f"density maps must be 2-D and non-empty, got shape {d.shape}")
        bx, by, bw, bh = (float(v) for v in box)
        if bw <= 0 or bh <= 0:
            continue
        cols, c0, c1, fc = _bilinear_axis(w, bx * sx, bw * sx, d.shape[1])
        rows, r0, r1, fr = _bilinear_axis(h, by * sy, bh * sy, d.shape[0])
        if not len(cols) or not len(rows):
            continue
        across = d[:, c0] * (1.0 - fc) + d[:, c1] * fc  # (hd, len(cols))
        val = across[r0] * (1.0 - fr)[:, None] + across[r1] * fr[:, None]
        block = out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = np.fmax(block, val)
    return out


def _as_points(samples) -> list[np.ndarray]:
    if samples is None:
        return []
    if isinstance(samples, np.ndarray) or hasattr(samples, "detach"):
        samples = [samples]
    out = []
    for s in samples:
        if hasattr(s, "detach"):  # a torch tensor straight from the sampler
            s = s.detach().cpu().numpy()
        a = np.asarray(s, dtype=np.float64)
        if a.size == 0:
            continue
        if a.shape[-1] != 2:
            raise ValueError(f"sample positions must have a last axis (x, y), got shape {a.shape}")
        out.append(a.reshape(-1, 2))
    return out


def sample_dots(
    shape: tuple[int, int],
    samples,
    scale: tuple[float, float] = (1.0, 1.0),
    *,
    max_dots: int = MAX_DOTS,
    seed: int = 0,
) -> tuple[np.ndarray, int, int]:
    """Pixels hit by (a random subset of) the sampling points.

    Parameters
    ----------
    shape : (int, int)
        Output ``(height, width)``.
    samples : sequence of array-like
        ``(n, 2)`` (or ``(..., 2)``) continuous ``(x, y)`` thumbnail
        positions, one array per region.
    scale : (float, float)
        Output pixels per thumbnail pixel along ``(x, y)``.
    max_dots : int
        Most points kept. A uniform random subset keeps dot density
        proportional to sampling density.
    seed : int
        Seed of the subset, so figures are reproducible.

    Returns
    -------
    hits : numpy.ndarray
        ``shape`` bool, True on the pixel containing a kept point.
    total : int
        Number of finite sample positions.
    shown : int
        Number of points kept (those inside the image among the subset).
    """
    h, w = shape
    pts = _as_points(samples)
    pts = np.concatenate(pts) if pts else np.zeros((0, 2))
    pts = pts[np.isfinite(pts).all(axis=1)]
    total = len(pts)
    if total > max_dots:
        pts = pts[np.random.default_rng(seed).choice(total, max_dots, replace=False)]
    col = np.floor(pts[:, 0] * scale[0])
    row = np.floor(pts[:, 1] * scale[1])
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    hits = np.zeros((h, w), bool)
    hits[row[inside].astype(np.intp), col[inside].astype(np.intp)] = True
    return hits, total, int(inside.sum())


def _dilate(mask: np.ndarray, size: int) -> np.ndarray:
    # A size x size square dot anchored at the hit pixel, by shifted ORs.
    out = mask.copy()
    for dy in range(size):
        for dx in range(size):
            if dx or dy:
                out[dy:, dx:] |= mask[: mask.shape[0] - dy, : mask.shape[1] - dx]
    return out


def _dot_size(shown: int, area: int) -> int:
    # Big dots while they stay sparse; single pixels once they would merge.
    if shown * 9 <= 0.1 * area:
        return 3
    if shown * 4 <= 0.2 * area:
        return 2
    return 1


# ---------------------------------------------------------------------------
# text and layout


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font only
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    _, _, x1, y1 = font.getbbox(text)
    return int(x1), int(y1)


def _fit(font, text: str, width: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``width`` pixels."""
    if _text_size(font, text)[0] <= width:
        return text
    while text and _text_size(font, text + "...")[0] > width:
        text = text[:-1]
    return text + "..."


def _boxes(regions) -> list[tuple[float, float, float, float]]:
    out = []
    for r in regions or ():
        if hasattr(r, "width") and hasattr(r, "x"):  # Region-like, already in thumbnail pixels
            out.append((float(r.x), float(r.y), float(r.width), float(r.height)))
        else:
            x, y, w, h = (float(v) for v in r)
            out.append((x, y, w, h))
    return out


def _draw_boxes(img: Image.Image, boxes, scale, font=None, width: int = 2) -> None:
    draw = ImageDraw.Draw(img)
    sx, sy = scale
    for k, (x, y, w, h) in enumerate(boxes, 1):
        x0, y0 = round(x * sx), round(y * sy)
        x1, y1 = round((x + w) * sx) - 1, round((y + h) * sy) - 1
        if x1 < x0 or y1 < y0:
            continue
        draw.rectangle((x0, y0, x1, y1), outline=_BOX_COLOR, width=width)
        if font is not None:
            label = str(k)
            tw, th = _text_size(font, label)
            tx, ty = x0 + width + 2, y0 + width + 1
            draw.rectangle((tx - 2, ty - 1, tx + tw + 2, ty + th + 1), fill=_BOX_COLOR)
            draw.text((tx, ty), label, fill=(255, 255, 255), font=font)


def _legend_items(classes: Sequence[ClassInfo], labels: np.ndarray) -> list[tuple[tuple[int, int, int], str]]:
    present = set(np.unique(labels).tolist())
    known = {c.value for c in classes}
    items = [(c.color, c.name) for c in sorted(classes, key=lambda c: c.value) if c.value != 0]
    if len(items) > 24:  # a long table: only what this slide shows
        ordered = sorted(classes, key=lambda c: c.value)
        items = [(c.color, c.name) for c in ordered if c.value != 0 and c.value in present]
    items += [(_UNKNOWN_COLOR, f"value {v}") for v in sorted(present - known - {0})]
    return items


def _flow(font, items: list[tuple[tuple[int, int, int], str]], width: int) -> list[tuple[int, int, tuple, str]]:
    """Place legend items in rows of ``width`` pixels: ``(x, row, color, text)``."""
    placed, x, row = [], 0, 0
    for color, text in items:
        text = _fit(font, text, width - _SWATCH - 6)
        item_w = _SWATCH + 4 + _text_size(font, text)[0]
        if x and x + item_w > width:
            x, row = 0, row + 1
        placed.append((x, row, color, text))
        x += item_w + 14
    return placed


def _fmt(v: float) -> str:
    return f"{v:.3g}"


# ---------------------------------------------------------------------------
# the figure


def _panel_scale(h: int, w: int, max_panel: int, min_panel: int) -> tuple[int, int]:
    long = max(h, w)
    target = min(max(long, min_panel), max_panel)
    s = target / long
    return max(1, round(w * s)), max(1, round(h * s))


def compose_qc(
    thumbnail: np.ndarray,
    labels_thumb: np.ndarray,
    classes: Sequence[ClassInfo],
    samples=(),
    density: Sequence[tuple[np.ndarray, Sequence[float]]] = (),
    regions=(),
    *,
    title: str = "",
    legend: bool = True,
    max_panel: int = 1024,
    min_panel: int = 320,
    layout: str = "auto",
    density_label: str = "sampling density",
    vmin: float | None = None,
    vmax: float | None = None,
    max_dots: int = MAX_DOTS,
    return_layout: bool = False,
):
    """Compose the four-panel QC figure.

    Parameters
    ----------
    thumbnail : numpy.ndarray
        ``(h, w, 3)`` uint8 RGB view of the whole slide (RGBA: alpha dropped).
    labels_thumb : numpy.ndarray
        ``(hl, wl)`` uint8 predicted labels covering the same slide extent,
        normally at thumbnail size; read nearest onto each panel.
    classes : sequence of ClassInfo
        Class names and colours; value 0 is background and never tinted.
    samples : sequence of array-like
        Sample positions ``(n, 2)`` of ``(x, y)`` in continuous thumbnail
        pixels, one array per region.
    density : sequence of (numpy.ndarray, box)
        Per region: the ``(hd, wd)`` float sampling density and the region
        box ``(x, y, w, h)`` in thumbnail pixels that it covers.
    regions : sequence of box
        Processed regions ``(x, y, w, h)`` in thumbnail pixels (or objects
        with ``x, y, width, height`` already scaled to the thumbnail).
    title : str
        Figure title (slide name, model...), shortened to fit.
    legend : bool
        Draw the class legend under the class panel. The density colour bar
        is always drawn when there is a density.
    max_panel, min_panel : int
        Bounds of a panel's long side in pixels; the thumbnail is shrunk or
        enlarged into them.
    layout : {"auto", "row", "grid"}
        Four panels in a row, 2 x 2, or whichever is closer to a 16:10 page.
    density_label : str
        Caption of the colour bar.
    vmin, vmax : float, optional
        Colour-bar range; default the range of all density maps.
    max_dots : int
        Most sampling points drawn (random subset beyond it).
    return_layout : bool
        Also return where each panel's image lies in the figure.

    Returns
    -------
    figure : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB.
    layout : dict of str to (int, int, int, int)
        Only with ``return_layout``: panel name (:data:`PANELS`) -> ``(x, y,
        w, h)`` of its image in the figure. Every panel shows the thumbnail
        at the same scale ``(w / thumb_w, h / thumb_h)``.
    """
    thumb = np.asarray(thumbnail)
    if thumb.ndim == 2:
        thumb = np.repeat(thumb[..., None], 3, axis=-1)
    if thumb.ndim != 3 or thumb.shape[2] not in (3, 4) or thumb.dtype != np.uint8:
        raise ValueError(f"thumbnail must be (h, w, 3) uint8, got {thumb.shape} {thumb.dtype}")
    thumb = np.ascontiguousarray(thumb[..., :3])
    labels = np.asarray(labels_thumb)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"labels_thumb must be (h, w) uint8, got {labels.shape} {labels.dtype}")
    if layout not in ("auto", "row", "grid"):
        raise ValueError(f"layout must be 'auto', 'row' or 'grid', got {layout!r}")
    classes = list(classes)
    th, tw = thumb.shape[:2]
    pw, ph = _panel_scale(th, tw, max_panel, min_panel)
    boxes = _boxes(regions)

    # Fonts grow a little with the panel so text stays legible on big figures.
    fsize = max(13, min(20, round(pw / 34)))
    fonts = (_font(fsize), _font(max(10, fsize - 2)), _font(fsize + 4))
    panels = _panel_images(thumb, labels, classes, samples, density, boxes, (pw, ph), vmin, vmax, max_dots, fonts[1])
    fig_arr, where = _figure(
        panels,
        classes,
        labels,
        len(boxes),
        (pw, ph),
        (tw, th),
        fonts,
        title=title,
        legend=legend,
        layout=layout,
        density_label=density_label,
    )
    return (fig_arr, where) if return_layout else fig_arr


def _figure(panels, classes, labels, n_reg, size, thumb_size, fonts, *, title, legend, layout, density_label):
    """The panels with captions, legend and colour bar, arranged in a row or a grid, and where each image lies."""
    pw, ph = size
    tw, th = thumb_size
    font, small, big = fonts
    line = _text_size(font, "Hg")[1] + 2
    small_line = _text_size(small, "Hg")[1] + 2
    n_total, n_shown, dens, lo, hi = panels.n_total, panels.n_shown, panels.has_density, panels.lo, panels.hi

    # -- panel captions and footers
    headers = [
        f"1  Thumbnail, {n_reg} region{'s' if n_reg != 1 else ''}",
        "2  Predicted classes",
        f"3  Sampling points: {n_total:,}" + (f" ({n_shown:,} shown)" if n_shown < n_total else "")
        if n_total
        else "3  Sampling points: none",
        "4  Sampling density" if dens else "4  Sampling density: none",
    ]
    legend_rows = _flow(small, _legend_items(classes, labels), pw) if legend else []
    legend_h = (max(r for _, r, _, _ in legend_rows) + 1) * (small_line + 4) if legend_rows else 0
    bar_h = 12 + small_line * 2 + 4 if dens else 0
    note_h = small_line + 2
    footer_h = max(legend_h, bar_h, note_h) + _PAD
    header_h = line + 2 * _PAD
    cell_h = header_h + ph + _PAD + footer_h

    # -- arrangement
    if layout == "auto":

        def page_aspect(cols: int, rows: int) -> float:
            width = cols * pw + (cols - 1) * _GAP
            height = rows * cell_h + (rows - 1) * _GAP
            return abs(math.log(width / height / 1.6))

        layout = "row" if page_aspect(4, 1) <= page_aspect(2, 2) else "grid"
    cols, rows = (4, 1) if layout == "row" else (2, 2)
    title_h = _text_size(big, "Hg")[1] + 2 * _PAD if title else 0
    width = 2 * _MARGIN + cols * pw + (cols - 1) * _GAP
    height = _MARGIN + title_h + rows * cell_h + (rows - 1) * _GAP + _MARGIN
    fig = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(fig)
    if title:
        draw.text((_MARGIN, _MARGIN), _fit(big, title, width - 2 * _MARGIN), fill=_INK, font=big)

    where: dict[str, tuple[int, int, int, int]] = {}
    for k, (name, img, header) in enumerate(zip(PANELS, panels.images, headers)):
        cx = _MARGIN + (k % cols) * (pw + _GAP)
        cy = _MARGIN + title_h + (k // cols) * (cell_h + _GAP)
        draw.text((cx, cy + _PAD), _fit(font, header, pw), fill=_INK, font=font)
        iy = cy + header_h
        fig.paste(img, (cx, iy))
        draw.rectangle((cx - 1, iy - 1, cx + pw, iy + ph), outline=(200, 200, 200))
        where[name] = (cx, iy, pw, ph)
        fy = iy + ph + _PAD + 2
        if name == "regions":
            note = f"thumbnail {tw} x {th} px; boxes: processed regions"
            draw.text((cx, fy), _fit(small, note, pw), fill=_MUTED, font=small)
        elif name == "classes" and legend_rows:
            for x, row, color, text in legend_rows:
                y = fy + row * (small_line + 4)
                draw.rectangle((cx + x, y + 1, cx + x + _SWATCH - 1, y + _SWATCH), fill=tuple(color), outline=_INK)
                draw.text((cx + x + _SWATCH + 4, y), text, fill=_INK, font=small)
        elif name == "samples" and n_total:
            per = n_total / max(n_shown, 1)
            note = "1 dot per sample" if n_shown == n_total else f"random subset: 1 dot per {per:,.0f} samples"
            draw.text((cx, fy), _fit(small, note, pw), fill=_MUTED, font=small)
        elif name == "density" and dens:
            _colour_bar(fig, draw, (cx, fy, pw, bar_h), lo, hi, density_label, small)

    return np.asarray(fig).copy(), where


@dataclass(frozen=True)
class _Panels:
    """The four panel images of :func:`compose_qc` and what their captions say."""

    images: tuple[Image.Image, Image.Image, Image.Image, Image.Image]
    n_total: int  # sampling points
    n_shown: int  # of them drawn
    has_density: bool
    lo: float  # colour-bar range
    hi: float


def _panel_images(thumb, labels, classes, samples, density, boxes, size, vmin, vmax, max_dots, small) -> _Panels:
    """Thumbnail with regions (box labels in font ``small``), class overlay, sampling points and density heat map,
    each ``size`` (w, h)."""
    pw, ph = size
    th, tw = thumb.shape[:2]
    scale = (pw / tw, ph / th)
    base = _resize_rgb(thumb, pw, ph)
    lab = _resize_nearest(labels, pw, ph)

    p_regions = Image.fromarray(base.copy())
    _draw_boxes(p_regions, boxes, scale, small)

    p_classes = Image.fromarray(overlay_classes(base, lab, classes))

    hits, n_total, n_shown = sample_dots((ph, pw), samples, scale, max_dots=max_dots)
    dots = _grey(base, lighten=0.5)
    dots[_dilate(hits, _dot_size(n_shown, pw * ph))] = _DOT_COLOR
    p_samples = Image.fromarray(dots)
    _draw_boxes(p_samples, boxes, scale, width=1)

    dens = [(np.asarray(d, dtype=np.float64), box) for d, box in density]
    finite = [d[np.isfinite(d)] for d, _ in dens]
    finite = np.concatenate(finite) if finite else np.zeros(0)
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    grey = _grey(base, lighten=0.15)
    heat = grey.copy()
    if dens:
        field = rasterise_density((ph, pw), dens, scale)
        inside = np.isfinite(field)
        t = (field[inside] - lo) / (hi - lo) if hi > lo else np.full(int(inside.sum()), 0.5)
        blend = (1.0 - HEAT_ALPHA) * grey[inside] + HEAT_ALPHA * colormap(t).astype(np.float64)
        heat[inside] = np.rint(blend).astype(np.uint8)
    p_density = Image.fromarray(heat)
    _draw_boxes(p_density, boxes, scale, width=1)
    return _Panels((p_regions, p_classes, p_samples, p_density), n_total, n_shown, bool(dens), lo, hi)


def _colour_bar(fig, draw, box, lo: float, hi: float, label: str, font) -> None:
    x, y, w, _ = box
    bar_w = max(16, min(w, 360))
    ramp = colormap(np.linspace(0.0, 1.0, bar_w))
    fig.paste(Image.fromarray(np.repeat(ramp[None], 12, axis=0)), (x, y))
    draw.rectangle((x - 1, y - 1, x + bar_w, y + 12), outline=_MUTED)
    ty = y + 14
    draw.text((x, ty), f"low {_fmt(lo)}", fill=_INK, font=font)
    hi_text = f"{_fmt(hi)} high"
    draw.text((x + bar_w - _text_size(font, hi_text)[0], ty), hi_text, fill=_INK, font=font)
    line = _text_size(font, "Hg")[1] + 2
    draw.text((x, ty + line), _fit(font, label, w), fill=_MUTED, font=font)


def render_qc(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    labels_thumb: np.ndarray,
    classes: Sequence[ClassInfo],
    samples=(),
    density: Sequence[tuple[np.ndarray, Sequence[float]]] = (),
    regions=(),
    *,
    title: str = "",
    legend: bool = True,
    overwrite: bool = False,
    **options,
) -> Path:
    """Write the QC figure of :func:`compose_qc` as a PNG, atomically.

    Parameters
    ----------
    path : path-like
        Output ``.png``.
    thumbnail, labels_thumb, classes, samples, density, regions, title, legend
        As for :func:`compose_qc`.
    overwrite : bool
        Replace an existing file.
    **options
        Further keywords of :func:`compose_qc` (``max_panel``, ``layout``...).

    Returns
    -------
    pathlib.Path
    """
    options.pop("return_layout", None)
    fig = compose_qc(thumbnail, labels_thumb, classes, samples, density, regions, title=title, legend=legend, **options)
    with atomic_output(path, overwrite=overwrite) as tmp:
        # The temporary name has no .png suffix: name the format.
        Image.fromarray(fig).save(tmp, format="PNG", compress_level=3)  # measured: half the time of 6, same size
    return Path(path)
