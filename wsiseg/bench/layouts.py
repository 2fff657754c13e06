"""Benchmark slides laid out like the slides labs scan: TMAs, resections, needle biopsies.

Each layout is a set of tissue shapes on glass, deterministic from a seed and
defined relative to the slide size (a 1/20-size build has the same shapes,
scaled), filled with real H&E texture:

* ``"tma"``: a tissue microarray, 11 x 8 round cores (two of them missing,
  as on real arrays) covering about 63 % of the slide;
* ``"resection"``: one irregular piece of tissue (a rounded outline with
  random bumps and a few holes) covering 70 % of the slide;
* ``"needle"``: 3-6 long thin cores (1.5k x 27-30k pixels on a 40k-wide
  slide), gently bent, about half of them tilted by 2-5 degrees;
* ``"fill"``: tissue everywhere (no glass), for timing per pixel.

The texture is a quilt of real H&E patches (:func:`quilt_texture`: random
crops, flips and quarter turns, feathered seams), mirror-tiled over the slide
by :func:`wsiseg.slide.synthetic.write_synthetic_slide`, which writes the
pyramid tile by tile and blends texture and glass through the layout's
:class:`Coverage`, a tissue-coverage map of at most 8 Mpx (1/16 or 1/32 of
level 0 on large slides: the only slide-sized array, 8 MB for 100k x 80k), so memory stays flat whatever
the slide size.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np

from wsiseg.errors import ConfigError

__all__ = [
    "GLASS_RGB",
    "LAYOUTS",
    "LAYOUT_SIZES",
    "LAYOUT_VERSION",
    "Coverage",
    "Layout",
    "layout_coverage",
    "make_layout",
    "quilt_texture",
    "texture_digest",
    "texture_files",
    "write_layout_slide",
]

#: Layout names (:func:`make_layout`).
LAYOUTS = ("tma", "resection", "needle", "fill")
#: Default level-0 ``(width, height)`` of each layout (issue 12).
LAYOUT_SIZES = {"tma": (40000, 30000), "resection": (100000, 80000), "needle": (40000, 30000), "fill": (40000, 30000)}
#: Colour of the glass around the tissue (that of ``textures/no-tissue.png`` of the shared data).
GLASS_RGB = (240, 239, 241)
#: Bumped whenever the geometry or the texture changes, so cached slides are rebuilt.
LAYOUT_VERSION = 1

_TMA_GRID = (11, 8)  # columns, rows
_TMA_MISSING = 2
_TMA_RADIUS = 0.46  # of the smaller cell side
_RESECTION_FRACTION = 0.70
_QUILT, _BLOCK, _OVERLAP = 2048, 512, 64
_COVERAGE_PIXELS = 8_000_000  # largest coverage map
_MAX_WHITE = 0.2  # textures with more near-white pixels than this are glass, not tissue

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (level-0 pixels)


# ---------------------------------------------------------------------------
# shapes: signed distances (level-0 pixels, positive inside), cheap to evaluate on a coarse grid


@dataclass(frozen=True)
class _Blob:
    """A polar outline around ``(cx, cy)``: radius ``r(t) = base(t) * (1 + sum a_i cos(i t + p_i))``.

    ``base`` is a superellipse of semi-axes ``(rx, ry)`` and exponent ``n``
    (2: an ellipse). The signed distance is ``r(t) - rho``, exact for a disc
    and close to the true distance for gentle outlines (only the edge ramp,
    a few pixels wide, depends on it).
    """

    cx: float
    cy: float
    rx: float
    ry: float
    n: float = 2.0
    harmonics: tuple[tuple[int, float, float], ...] = ()  # (i, a_i, p_i)
    hole: bool = False  # a hole cut out of the tissue, not tissue

    def radius(self, t: np.ndarray) -> np.ndarray:
        c, s = np.abs(np.cos(t)), np.abs(np.sin(t))
        r = ((c / self.rx) ** self.n + (s / self.ry) ** self.n) ** (-1.0 / self.n)
        mod = np.ones_like(t)
        for i, a, p in self.harmonics:
            mod += a * np.cos(i * t + p)
        return r * mod

    def bbox(self) -> Box:
        t = np.linspace(0, 2 * np.pi, 4096, endpoint=False)
        r = self.radius(t)
        return (
            self.cx + float((r * np.cos(t)).min()),
            self.cy + float((r * np.sin(t)).min()),
            self.cx + float((r * np.cos(t)).max()),
            self.cy + float((r * np.sin(t)).max()),
        )

    def area(self) -> float:
        t = np.linspace(0, 2 * np.pi, 8192, endpoint=False)
        return float(0.5 * np.mean(self.radius(t) ** 2) * 2 * np.pi)

    def sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx, dy = x - self.cx, y - self.cy
        return self.radius(np.arctan2(dy, dx)) - np.hypot(dx, dy)


@dataclass(frozen=True)
class _Needle:
    """A needle core: a capsule of length ``length`` from ``(x0, y0)`` at angle ``angle`` (radians).

    Its centre line bends by ``bend`` pixels (one half sine wave) and its
    half width varies by +-10 % along it; the ends are round.
    """

    x0: float
    y0: float
    length: float
    half_width: float
    angle: float
    bend: float
    phase: float
    hole: bool = False

    def _frame(self, x, y):
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - self.x0, y - self.y0
        return dx * c + dy * s, -dx * s + dy * c

    def _centre(self, u):
        return self.bend * np.sin(np.pi * np.clip(u, 0, self.length) / self.length)

    def _half(self, u):
        return self.half_width * (1 + 0.1 * np.sin(6 * np.pi * np.clip(u, 0, self.length) / self.length + self.phase))

    def bbox(self) -> Box:
        u = np.linspace(0, self.length, 257)
        reach = self.half_width * 1.1 + abs(self.bend)
        c, s = math.cos(self.angle), math.sin(self.angle)
        xs = self.x0 + np.concatenate([u * c - reach * s, u * c + reach * s])
        ys = self.y0 + np.concatenate([u * s + reach * c, u * s - reach * c])
        m = self.half_width * 1.1
        return float(xs.min() - m), float(ys.min() - m), float(xs.max() + m), float(ys.max() + m)

    def area(self) -> float:
        u = np.linspace(0, self.length, 4097)
        return float(np.mean(2 * self._half(u)) * self.length + math.pi * self.half_width**2)

    def sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u, v = self._frame(x, y)
        off = v - self._centre(u)
        # beyond an end: distance to that end's centre point (round ends)
        along = np.where(u < 0, u, np.where(u > self.length, u - self.length, 0.0))
        return self._half(u) - np.hypot(along, off)


_Shape = Union[_Blob, _Needle]


@dataclass(frozen=True)
class Layout:
    """Tissue shapes on a ``width x height`` slide.

    Attributes
    ----------
    name : str
        One of :data:`LAYOUTS`.
    width, height : int
        Level-0 size.
    seed : int
        Seed it was drawn from.
    shapes : tuple
        Tissue pieces (and holes cut into them), level-0 pixels.
    pieces : int
        Separate pieces of tissue (cores): what a tissue detector should find.
    """

    name: str
    width: int
    height: int
    seed: int
    shapes: tuple[_Shape, ...]
    pieces: int

    def nominal_fraction(self) -> float:
        """Tissue area of the shapes over the slide area (holes subtracted; no clipping by the slide edge)."""
        if self.name == "fill":
            return 1.0
        area = sum(-s.area() if s.hole else s.area() for s in self.shapes)
        return area / (self.width * self.height)


def make_layout(name: str, width: int, height: int, seed: int = 0) -> Layout:
    """Draw the shapes of layout ``name`` on a ``width x height`` slide, deterministically from ``seed``.

    Parameters
    ----------
    name : str
        ``"tma"``, ``"resection"``, ``"needle"`` or ``"fill"`` (see the module docstring).
    width, height : int
        Level-0 size in pixels; shapes scale with it.
    seed : int
        Random seed (numpy ``default_rng``).

    Returns
    -------
    Layout
    """
    if name not in LAYOUTS:
        raise ConfigError(f"unknown layout {name!r} (use one of {', '.join(LAYOUTS)})")
    if width < 64 or height < 64:
        raise ConfigError(f"layout slides must be at least 64 x 64 pixels, got {width}x{height}")
    rng = np.random.default_rng([seed, LAYOUTS.index(name)])
    shapes: list[_Shape] = []
    if name == "tma":
        cols, rows = _TMA_GRID
        cw, ch = width / cols, height / rows
        side = min(cw, ch)
        missing = set(rng.choice(cols * rows, _TMA_MISSING, replace=False).tolist())
        for k in range(cols * rows):
            r = side * _TMA_RADIUS * (1 + rng.uniform(-0.01, 0.01))
            jx, jy = rng.uniform(-0.012, 0.012, 2) * side
            ex = rng.uniform(-0.02, 0.02)  # slightly oval, like real punched cores
            wobble = ((3, float(rng.uniform(0, 0.01)), float(rng.uniform(0, 2 * np.pi))),)
            if k in missing:
                continue
            cx, cy = (k % cols + 0.5) * cw + jx, (k // cols + 0.5) * ch + jy
            shapes.append(_Blob(cx, cy, r * (1 + ex), r * (1 - ex), 2.0, wobble))
        pieces = len(shapes)
    elif name == "resection":
        amps = rng.uniform(0.5, 1.0, 7) / np.arange(2, 9) ** 0.8
        amps *= 0.10 / amps.sum()
        harm = [(i, float(a), float(rng.uniform(0, 2 * np.pi))) for i, a in zip(range(2, 9), amps)]
        harm += [(int(i), 0.004, float(rng.uniform(0, 2 * np.pi))) for i in rng.integers(12, 24, 3)]
        cx, cy = width * (0.5 + rng.uniform(-0.01, 0.01)), height * (0.5 + rng.uniform(-0.01, 0.01))
        holes = []
        for _ in range(4):
            hr = min(width, height) * rng.uniform(0.01, 0.025)
            hx, hy = cx + rng.uniform(-0.3, 0.3) * width, cy + rng.uniform(-0.3, 0.3) * height
            holes.append(_Blob(hx, hy, hr * 1.3, hr, 2.0, ((2, 0.1, float(rng.uniform(0, 6))),), hole=True))
        unit = _Blob(cx, cy, width / 2, height / 2, 3.0, tuple(harm))
        target = _RESECTION_FRACTION * width * height + sum(h.area() for h in holes)
        s = math.sqrt(target / unit.area())
        shapes = [_Blob(cx, cy, s * width / 2, s * height / 2, 3.0, tuple(harm)), *holes]
        pieces = 1
    elif name == "needle":
        n = int(rng.integers(3, 7))
        slot = height / n
        for k in range(n):
            length = 0.75 * width * rng.uniform(0.9, 1.0)
            half = 0.0375 * width / 2 * rng.uniform(0.9, 1.1)
            tilt = math.radians(rng.uniform(2, 5)) * rng.choice([-1, 1]) if k % 2 else 0.0
            x0 = (width - length * math.cos(tilt)) / 2 + rng.uniform(-0.05, 0.05) * width
            yc = (k + 0.5) * slot + rng.uniform(-0.05, 0.05) * slot
            y0 = yc - length * math.sin(tilt) / 2
            bend = rng.uniform(-0.3, 0.3) * half
            shapes.append(_Needle(x0, y0, length, half, tilt, bend, float(rng.uniform(0, 2 * np.pi))))
        pieces = n
    else:  # fill
        pieces = 1
    return Layout(name, int(width), int(height), int(seed), tuple(shapes), pieces)


# ---------------------------------------------------------------------------
# coverage map


@dataclass(frozen=True, eq=False)  # holds an array
class Coverage:
    """Tissue coverage of a slide at low resolution, for blending texture and glass tile by tile.

    Attributes
    ----------
    alpha : numpy.ndarray
        ``(ceil(H / d), ceil(W / d))`` uint8, 255 = tissue, 0 = glass, at
        the centres of ``d x d`` level-0 blocks (edges ramp over one block).
    downsample : int
        ``d``, a power of two.
    width, height : int
        Level-0 size.
    """

    alpha: np.ndarray
    downsample: int
    width: int
    height: int

    @property
    def fraction(self) -> float:
        """Tissue fraction of the slide (mean coverage)."""
        return float(self.alpha.mean(dtype=np.float64) / 255.0)

    def level(self, k: int) -> Callable[[int, int, int, int], "float | np.ndarray"]:
        """Coverage of level ``k`` (downsample ``2**k``): ``f(y0, x0, h, w)`` for one tile of that level.

        ``f`` returns ``0.0`` (all glass), ``1.0`` (all tissue) or an
        ``(h, w)`` float32 array in ``[0, 1]``; outside the slide is glass.
        """
        f, d = 2**k, self.downsample
        if f >= d:
            m = _box_mean(self.alpha.astype(np.float32) / 255.0, f // d)

            def coarse(y0: int, x0: int, h: int, w: int) -> float | np.ndarray:
                a = np.zeros((h, w), np.float32)
                sub = m[y0 : y0 + h, x0 : x0 + w]
                a[: sub.shape[0], : sub.shape[1]] = sub
                return _classify(a)

            return coarse
        s = d // f  # level-k pixels per coverage pixel
        m8 = self.alpha
        hc, wc = m8.shape

        def axis(start: int, n: int, size: int):
            c = np.clip((np.arange(start, start + n) + 0.5) / s - 0.5, 0, size - 1)
            i0 = np.floor(c).astype(np.intp)
            return i0, np.minimum(i0 + 1, size - 1), (c - i0).astype(np.float32)

        def fine(y0: int, x0: int, h: int, w: int) -> float | np.ndarray:
            i0, i1, fy = axis(y0, h, hc)
            j0, j1, fx = axis(x0, w, wc)
            sub = m8[i0[0] : i1[-1] + 1, j0[0] : j1[-1] + 1]
            if not sub.any():
                return 0.0
            if sub.min() == 255 and y0 + h <= math.ceil(self.height / f) and x0 + w <= math.ceil(self.width / f):
                return 1.0
            top = m8[i0][:, j0] * (1 - fx) + m8[i0][:, j1] * fx
            bot = m8[i1][:, j0] * (1 - fx) + m8[i1][:, j1] * fx
            a = (top * (1 - fy)[:, None] + bot * fy[:, None]) / np.float32(255)
            # beyond the slide's last pixel: glass
            a[max(0, math.ceil(self.height / f) - y0) :] = 0
            a[:, max(0, math.ceil(self.width / f) - x0) :] = 0
            return a.astype(np.float32)

        return fine


def _classify(a: np.ndarray) -> float | np.ndarray:
    if not a.any():
        return 0.0
    if a.min() >= 1.0:
        return 1.0
    return a


def _box_mean(a: np.ndarray, k: int) -> np.ndarray:
    """``k x k`` block means (``k`` >= 1), edge blocks averaged over the pixels they have."""
    if k == 1:
        return a
    h, w = a.shape
    hp, wp = -(-h // k) * k, -(-w // k) * k
    s = np.zeros((hp, wp), np.float32)
    n = np.zeros((hp, wp), np.float32)
    s[:h, :w], n[:h, :w] = a, 1
    s = s.reshape(hp // k, k, wp // k, k).sum(axis=(1, 3))
    n = n.reshape(hp // k, k, wp // k, k).sum(axis=(1, 3))
    return s / n


def layout_coverage(layout: Layout, downsample: int | None = None) -> Coverage:
    """Rasterise a layout's tissue coverage at ``1/downsample`` of level 0.

    Parameters
    ----------
    layout : Layout
    downsample : int, optional
        Power of two; default the smallest that keeps the map within 8 Mpx
        (16 for 40k x 30k, 32 for 100k x 80k, 1 for small test slides; the
        edge ramp is one coverage pixel wide).

    Returns
    -------
    Coverage
    """
    w, h = layout.width, layout.height
    d = downsample or 1
    while downsample is None and math.ceil(w / d) * math.ceil(h / d) > _COVERAGE_PIXELS:
        d *= 2
    hc, wc = math.ceil(h / d), math.ceil(w / d)
    if layout.name == "fill":
        return Coverage(np.full((hc, wc), 255, np.uint8), d, w, h)
    alpha = np.zeros((hc, wc), np.uint8)
    xs = (np.arange(wc) + 0.5) * d
    step = max(1, 1_000_000 // wc)  # rows per strip: bounded temporaries
    tissue = [s for s in layout.shapes if not s.hole]
    holes = [s for s in layout.shapes if s.hole]
    for r0 in range(0, hc, step):
        ys = (np.arange(r0, min(hc, r0 + step)) + 0.5) * d
        sdf = np.full((len(ys), wc), -np.inf, np.float64)
        for shape, sign in [(s, 1) for s in tissue] + [(s, -1) for s in holes]:
            x0, y0, x1, y1 = shape.bbox()
            j0, j1 = max(0, int(x0 // d) - 1), min(wc, int(x1 // d) + 2)
            i0, i1 = max(0, int(y0 // d) - 1 - r0), min(len(ys), int(y1 // d) + 2 - r0)
            if i0 >= i1 or j0 >= j1:
                continue
            gx, gy = np.meshgrid(xs[j0:j1], ys[i0:i1])
            v = shape.sdf(gx, gy)
            view = sdf[i0:i1, j0:j1]
            if sign > 0:
                np.maximum(view, v, out=view)
            else:  # a hole: the tissue ends where the hole starts
                np.minimum(view, -v, out=view)
        alpha[r0 : r0 + len(ys)] = np.rint(np.clip(sdf / d + 0.5, 0, 1) * 255).astype(np.uint8)
    return Coverage(alpha, d, w, h)


# ---------------------------------------------------------------------------
# texture


def texture_files(source: str | os.PathLike) -> list[Path]:
    """The real H&E images a layout's texture is quilted from.

    ``source`` is an image file (used alone) or a folder: its PNG, JPEG and
    TIFF images, sorted by name, that are at least 576 px a side and mostly
    tissue (at most 20 % near-white pixels: glass and background patches
    such as ``no-tissue.png`` are left out).
    """
    from wsiseg.slide.synthetic import load_source_region

    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"texture source {path} is neither an image nor a folder")
    chosen = []
    for f in sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff")):
        img = load_source_region(f)
        if min(img.shape[:2]) < _BLOCK + _OVERLAP:
            continue
        if (img.mean(axis=2) > 215).mean() <= _MAX_WHITE:
            chosen.append(f)
    if not chosen:
        raise ConfigError(f"no H&E texture images (>= {_BLOCK + _OVERLAP} px, mostly tissue) in {path}")
    return chosen


def texture_digest(source: str | os.PathLike) -> str:
    """Short hash of the texture files (names, sizes, modification times) and :data:`LAYOUT_VERSION`."""
    h = hashlib.sha1(f"v{LAYOUT_VERSION}".encode())
    for f in texture_files(source):
        st = f.stat()
        h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def quilt_texture(source: str | os.PathLike | list[Path], seed: int = 0, size: int = _QUILT) -> np.ndarray:
    """A ``size x size`` RGB quilt of real H&E patches.

    Blocks of 512 px, each a random crop of a random texture of
    :func:`texture_files` (of ``source``, or the given list of files), flipped and turned by a random element of the
    square's symmetry group, laid with 64-px overlaps blended linearly, so
    the seams are soft and no two neighbouring blocks are the same view.
    """
    from wsiseg.slide.synthetic import load_source_region

    rng = np.random.default_rng([seed, 7])
    files = source if isinstance(source, list) else texture_files(source)
    images = [load_source_region(f) for f in files]
    b, ov = _BLOCK, _OVERLAP
    n = math.ceil(size / b)
    acc = np.zeros((n * b + ov, n * b + ov, 3), np.float32)
    wsum = np.zeros((n * b + ov, n * b + ov, 1), np.float32)
    ramp = np.minimum(1.0, np.minimum(np.arange(b + ov) + 0.5, b + ov - np.arange(b + ov) - 0.5) / ov)
    weight = (ramp[:, None] * ramp[None, :])[..., None].astype(np.float32)
    for i in range(n):
        for j in range(n):
            img = images[int(rng.integers(len(images)))]
            y = int(rng.integers(0, img.shape[0] - (b + ov) + 1))
            x = int(rng.integers(0, img.shape[1] - (b + ov) + 1))
            patch = img[y : y + b + ov, x : x + b + ov]
            patch = np.rot90(patch, int(rng.integers(4)))
            if rng.integers(2):
                patch = patch[:, ::-1]
            acc[i * b : i * b + b + ov, j * b : j * b + b + ov] += patch * weight
            wsum[i * b : i * b + b + ov, j * b : j * b + b + ov] += weight
    keep = (slice(ov // 2, ov // 2 + size), slice(ov // 2, ov // 2 + size))
    out = acc[keep] / wsum[keep]
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------
# the slide


def write_layout_slide(
    path: str | os.PathLike,
    name: str,
    width: int,
    height: int,
    source: str | os.PathLike,
    *,
    seed: int = 0,
    tile: int = 256,
    quality: int = 90,
    mpp: float = 0.5,
    workers: int | None = None,
) -> dict:
    """Write a layout slide as a tiled JPEG pyramidal BigTIFF.

    Parameters
    ----------
    path : path-like
        Output ``.tiff`` (overwritten).
    name : str
        Layout (:data:`LAYOUTS`).
    width, height : int
        Level-0 size.
    source : path-like
        Folder of H&E texture images, or one image (:func:`texture_files`).
    seed : int
        Layout and quilt seed: the same seed gives the same file.
    tile, quality, mpp, workers
        As :func:`wsiseg.slide.synthetic.write_synthetic_slide`.

    Returns
    -------
    dict
        What was built: ``layout``, ``seed``, ``pieces`` (cores),
        ``tissue_fraction`` (mean of the coverage map),
        ``nominal_fraction`` (shape areas over slide area), ``textures``.
    """
    from wsiseg.slide.synthetic import write_synthetic_slide

    layout = make_layout(name, width, height, seed)
    coverage = layout_coverage(layout)
    files = texture_files(source)
    # the quilt repeats (mirrored) every 2 quilt sides: 2048 px, smaller for small test slides
    size = min(_QUILT, max(_BLOCK, 1 << (max(width, height) // 2 - 1).bit_length()))
    write_synthetic_slide(
        path,
        width,
        height,
        quilt_texture(files, seed, size),
        tile,
        quality,
        mpp,
        coverage=coverage,
        glass=GLASS_RGB,
        workers=workers,
        description=f"wsiseg {name} layout slide {width}x{height} seed {seed}",
    )
    return {
        "layout": name,
        "seed": seed,
        "pieces": layout.pieces,
        "tissue_fraction": coverage.fraction,
        "nominal_fraction": layout.nominal_fraction(),
        "textures": [f.name for f in files],
    }
