"""Drawing one texture mosaic: a crop of a class map, turned and flipped, filled with class textures.

Each class region is filled with a layer of one of the class's textures: zoomed out by a random factor,
quilted from randomly placed, turned and flipped patches (no seams, no visible periodicity) and
colour-jittered; the layers are composited through slightly blurred class masks (:func:`draw_mosaic`).
Everything is drawn from the generator it is given, so a mosaic depends only on its inputs and seed.
Moved out of :mod:`wsiseg.training.mosaic`, which builds the data sets on disk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from wsiseg.errors import WsisegError

__all__ = [
    "draw_mosaic",
]

_MAX_TRIES = 25


def _dihedral(ly: np.ndarray, lx: np.ndarray, t: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Apply dihedral transform ``t`` (0..7: bit 0 transpose, bit 1 flip rows, bit 2 flip columns) to
    local coordinates of a ``p x p`` patch."""
    sw = (t & 1).astype(bool)
    ly, lx = np.where(sw, lx, ly), np.where(sw, ly, lx)
    ly = np.where(t & 2, p - 1 - ly, ly)
    lx = np.where(t & 4, p - 1 - lx, lx)
    return ly, lx


def _texture_layer(
    tex: np.ndarray, size: int, rng: np.random.Generator, zoom: tuple[float, float], jitter: float
) -> tuple[np.ndarray, dict]:
    """A ``(size, size, 3)`` float32 layer: the texture zoomed out, quilted, colour-jittered.

    The texture is box-filtered down by a random zoom factor, then the layer
    is quilted from square patches of it (side ``p``: the zoomed texture's
    short side, at most ``size``), each cut at a random place and randomly
    turned/flipped. Four patch grids offset by ``p / 2`` are blended with
    separable triangular weights (a partition of unity), so there are no
    seams and no visible periodicity.
    """
    from PIL import Image

    z = float(math.exp(rng.uniform(math.log(zoom[0]), math.log(zoom[1]))))
    h, w = tex.shape[:2]
    nh, nw = max(2, round(h / z)), max(2, round(w / z))
    small = np.asarray(
        Image.fromarray(np.ascontiguousarray(tex)).resize((nw, nh), Image.BOX if z >= 1 else Image.BILINEAR),
        dtype=np.float32,
    )
    p = int(min(nh, nw, size))
    half = p / 2.0
    r = np.arange(size, dtype=np.float64)
    layer = np.zeros((size, size, 3), dtype=np.float64)
    wsum = np.zeros((size, size), dtype=np.float64)
    for sy in (0.0, half):
        for sx in (0.0, half):
            # Cells of this grid: pixel r lies in cell floor((r + shift) / p), at local position l.
            cy, ly = np.divmod(np.floor(r + sy).astype(np.int64), p)
            cx, lx = np.divmod(np.floor(r + sx).astype(np.int64), p)
            ncy, ncx = int(cy.max()) + 1, int(cx.max()) + 1
            oy = rng.integers(0, nh - p + 1, size=(ncy, ncx))
            ox = rng.integers(0, nw - p + 1, size=(ncy, ncx))
            t = rng.integers(0, 8, size=(ncy, ncx))
            CY, CX = cy[:, None], cx[None, :]
            LY, LX = np.broadcast_to(ly[:, None], (size, size)), np.broadcast_to(lx[None, :], (size, size))
            TY, TX = _dihedral(LY, LX, t[CY, CX], p)
            patch = small[oy[CY, CX] + TY, ox[CY, CX] + TX]
            # Triangular weight of the local position (1 at the cell centre, 0 at its edges).
            wy = 1.0 - np.abs((ly + 0.5) - half) / half
            wx = 1.0 - np.abs((lx + 0.5) - half) / half
            wgt = np.clip(wy[:, None], 0, None) * np.clip(wx[None, :], 0, None)
            layer += wgt[..., None] * patch
            wsum += wgt
    layer = (layer / np.maximum(wsum, 1e-12)[..., None]).astype(np.float32)
    gain = (1.0 + rng.uniform(-jitter, jitter, size=3)) * (1.0 + rng.uniform(-jitter, jitter))
    layer = np.clip(layer * gain.astype(np.float32), 0, 255)
    return layer, {"zoom": round(z, 4), "patch": p, "gain": [round(float(g), 4) for g in gain]}


def _crop_labels(
    class_map: np.ndarray,
    rects: Sequence[tuple[int, int, int, int]],
    size: int,
    side_range: tuple[int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A random square crop (entirely inside one of ``rects``) resampled to ``size`` by nearest."""
    areas = np.array([(r[2] - r[0]) * (r[3] - r[1]) for r in rects], dtype=np.float64)
    r = rects[int(rng.choice(len(rects), p=areas / areas.sum()))]
    rw, rh = r[2] - r[0], r[3] - r[1]
    side = int(rng.integers(side_range[0], side_range[1] + 1))
    side = max(1, min(side, rw, rh))
    x = r[0] + int(rng.integers(rw - side + 1))
    y = r[1] + int(rng.integers(rh - side + 1))
    # Nearest at pixel centres: output pixel j covers [j, j + 1) * side / size.
    idx = np.minimum(((np.arange(size) + 0.5) * side / size).astype(np.int64), side - 1)
    crop = class_map[y + idx[:, None], x + idx[None, :]]
    return crop, (x, y, side)


def _render(labels: np.ndarray, layers: Mapping[int, np.ndarray], edge_blur: float) -> np.ndarray:
    """Composite the class layers through (slightly blurred) class masks; uint8 RGB."""
    from scipy.ndimage import gaussian_filter

    values = sorted(layers)
    if len(values) == 1:
        return np.round(layers[values[0]]).astype(np.uint8)
    alphas = []
    for v in values:
        m = (labels == v).astype(np.float32)
        alphas.append(gaussian_filter(m, edge_blur, mode="nearest", truncate=3.0) if edge_blur > 0 else m)
    a = np.stack(alphas)
    a /= np.maximum(a.sum(0, keepdims=True), 1e-12)
    out = sum(a[i][..., None] * layers[v] for i, v in enumerate(values))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _texture_band(a: np.ndarray, band: tuple[float, ...], split: str, p: Path) -> np.ndarray:
    """The rows of texture ``a`` (file ``p``) that ``split`` may use."""
    y0, y1 = band
    r0, r1 = round(y0 * a.shape[0]), round(y1 * a.shape[0])
    if r1 - r0 < 4:
        raise WsisegError(f"texture band {band} of split {split!r} is under 4 rows", p)
    return a[r0:r1]


def _pick_crop(
    cmap: np.ndarray,
    rects: Sequence[tuple[int, int, int, int]],
    size: int,
    side_range: tuple[int, int],
    nk: int,
    max_class_fraction: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, tuple[int, int, int], np.ndarray]:
    """The first crop where no class covers more than ``max_class_fraction``, else the most mixed of
    :data:`_MAX_TRIES`: labels, box and class fractions."""
    best: tuple[np.ndarray, tuple[int, int, int], np.ndarray] | None = None
    for _ in range(_MAX_TRIES):
        lab, box = _crop_labels(cmap, rects, size, side_range, rng)
        frac = np.bincount(lab.ravel(), minlength=nk)[:nk] / lab.size
        if best is None or frac.max() < best[2].max():
            best = (lab, box, frac)
        if frac.max() <= max_class_fraction:
            break
    assert best is not None  # _MAX_TRIES > 0
    return best


def draw_mosaic(
    cmap: np.ndarray,
    rects: Sequence[tuple[int, int, int, int]],
    split: str,
    rng: np.random.Generator,
    *,
    size: int,
    side_range: tuple[int, int],
    max_class_fraction: float,
    class_names: list[str],
    tex_files: Mapping[str, list[Path]],
    tex_arrays: Mapping[Path, np.ndarray],
    bands: Mapping[str, tuple[float, ...]],
    zoom: tuple[float, float],
    jitter: float,
    edge_blur: float,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One mosaic of ``split``: its RGB image, its labels and its manifest entry (crop, transform, textures).

    Draws (from ``rng`` only, in this order) a crop of the class map inside ``rects``, redrawn while one
    class covers more than ``max_class_fraction`` (up to 25 tries, then the most mixed is kept); a turn and a
    flip; per class present, one of its textures, whose rows of the split's band are zoomed out, quilted and
    colour-jittered into a layer; the layers are composited through the class masks.

    Parameters
    ----------
    cmap : numpy.ndarray
        The label map as class values (``0 .. n - 1``).
    rects : sequence of (x0, y0, x1, y1)
        The split's rectangles of the map, in pixels.
    split : str
        Picks the texture band in ``bands``.
    rng : numpy.random.Generator
    size, side_range, max_class_fraction, zoom, jitter, edge_blur
        As for :func:`wsiseg.training.mosaic.build_mosaics` (``side_range``: the crop side range in pixels).
    class_names : list of str
        In label-value order.
    tex_files : mapping of str -> list of Path
        Texture files per class.
    tex_arrays : mapping of Path -> numpy.ndarray
        The RGB image of each texture file.
    bands : mapping of str -> (y0, y1)
        Rows of every texture per split (fractions of the height).

    Returns
    -------
    image : numpy.ndarray
        ``(size, size, 3)`` uint8 RGB.
    labels : numpy.ndarray
        ``(size, size)`` uint8 class values.
    record : dict
        ``crop``, ``rot90``, ``flip``, ``class_fractions`` and ``layers`` (texture and drawing per class).
    """
    nk = len(class_names)
    lab, box, frac = _pick_crop(cmap, rects, size, side_range, nk, max_class_fraction, rng)
    rot, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
    lab = np.rot90(lab, rot)
    if flip:
        lab = lab[:, ::-1]
    lab = np.ascontiguousarray(lab)
    layers, used = {}, {}
    for v in sorted(int(x) for x in np.unique(lab)):
        cls = class_names[v]
        p = tex_files[cls][int(rng.integers(len(tex_files[cls])))]
        band = _texture_band(tex_arrays[p], bands[split], split, p)
        layers[v], info = _texture_layer(band, size, rng, zoom, jitter)
        used[cls] = {"texture": p.name, **info}
    image = _render(lab, layers, edge_blur)
    record = {
        "crop": {"x": box[0], "y": box[1], "side": box[2]},
        "rot90": rot, "flip": flip, "class_fractions": [round(float(f), 4) for f in frac],
        "layers": used,
    }  # fmt: skip
    return image, lab, record
