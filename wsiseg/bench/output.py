"""Benchmark of the pyramidal mask writer on a realistic synthetic mask.

The mask is a few large ellipses ("tissue" with "tumour" islands) evaluated
analytically per tile at each level's own pixel centres (the segmenter's
sources evaluate a reduced level at the level-0 pixels under those centres,
:func:`wsiseg.sampling.coords.reduce_nearest`, at the same cost per pixel):
tiles entirely inside or outside every ellipse are reported as
constant, boundary tiles are rendered pixel by pixel. Most tiles of a real
whole-slide mask are background or single-class, and the fraction of boundary
tiles falls as the slide grows (perimeter over area), as here.
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from wsiseg.output.mask import LevelGeometry, write_label_pyramid

__all__ = ["Ellipse", "EllipseLabels", "random_blobs", "MaskBenchResult", "bench_mask_write"]

# Keep clear of the inside/outside boundary when deciding a tile is constant
# from its corners, so rounding can never disagree with the per-pixel render.
_EPS = 1e-9


@dataclass(frozen=True)
class Ellipse:
    """Axis-aligned ellipse in level-0 pixel coordinates, painted with ``label``."""

    cx: float
    cy: float
    rx: float
    ry: float
    label: int


@dataclass(frozen=True)
class EllipseLabels:
    """Analytic label tile source: background plus ellipses painted in order.

    A pixel's label is that of the last ellipse containing its centre (mapped
    to level 0 as ``(j + 0.5) * downsample``, :mod:`wsiseg.sampling.coords`),
    else ``background``. Usable as a ``tile_source`` for
    :func:`wsiseg.output.mask.write_label_pyramid`.
    """

    ellipses: tuple[Ellipse, ...]
    background: int = 0

    def __post_init__(self) -> None:
        # parameters as arrays: one vectorised test per tile, however many ellipses
        p = np.array([(e.cx, e.cy, e.rx, e.ry) for e in self.ellipses], np.float64).reshape(-1, 4)
        object.__setattr__(self, "_p", p)

    def _touching(self, xa: float, xb: float, ya: float, yb: float) -> tuple[np.ndarray, np.ndarray]:
        """Indices of ellipses that may contain a centre of the box, and whether each contains all."""
        cx, cy, rx, ry = self._p.T
        near = ((np.clip(cx, xa, xb) - cx) / rx) ** 2 + ((np.clip(cy, ya, yb) - cy) / ry) ** 2
        far_x = np.maximum(np.abs(xa - cx), np.abs(xb - cx))
        far_y = np.maximum(np.abs(ya - cy), np.abs(yb - cy))
        far = (far_x / rx) ** 2 + (far_y / ry) ** 2
        idx = np.flatnonzero(near <= 1.0 + _EPS)
        return idx, far[idx] < 1.0 - _EPS

    def render(self, level: LevelGeometry, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Labels of a region, always as a ``(h, w)`` uint8 array."""
        sx, sy = level.downsample
        xs = (np.arange(x0, x0 + w, dtype=np.float64) + 0.5) * sx
        ys = (np.arange(y0, y0 + h, dtype=np.float64) + 0.5) * sy
        out = np.full((h, w), self.background, np.uint8)
        cols = np.arange(w, dtype=np.int32)
        idx, _ = self._touching(xs[0], xs[-1], ys[0], ys[-1])
        for i in idx:
            e = self.ellipses[i]
            # per row the ellipse is one run of columns: compare column indices
            # instead of evaluating the quadratic per pixel
            r0, r1 = np.searchsorted(ys, [e.cy - e.ry, e.cy + e.ry])
            if r0 >= r1:
                continue
            dy = ((ys[r0:r1] - e.cy) / e.ry) ** 2
            half = e.rx * np.sqrt(np.maximum(1.0 - dy, 0.0))
            lo = np.searchsorted(xs, e.cx - half, side="right").astype(np.int32)  # first centre > left end
            hi = np.searchsorted(xs, e.cx + half, side="left").astype(np.int32)  # first centre >= right end
            if not (hi > lo).any():
                continue
            if (lo == 0).all() and (hi == w).all():
                out[r0:r1] = e.label  # covers these rows entirely
                continue
            c0, c1 = int(lo.min()), int(hi.max())
            run = (cols[None, c0:c1] >= lo[:, None]) & (cols[None, c0:c1] < hi[:, None])
            np.copyto(out[r0:r1, c0:c1], np.uint8(e.label), where=run)
        return out

    def __call__(self, level: LevelGeometry, x0: int, y0: int, w: int, h: int) -> np.ndarray | int:
        """Tile source: an ``int`` when the tile is provably constant."""
        sx, sy = level.downsample
        # extreme pixel centres of the tile, level-0 coordinates
        idx, full = self._touching((x0 + 0.5) * sx, (x0 + w - 0.5) * sx, (y0 + 0.5) * sy, (y0 + h - 0.5) * sy)
        if idx.size == 0:
            return self.background
        if full[-1]:
            # the topmost touching ellipse covers the whole tile (convex: its
            # farthest corner is inside), so nothing below shows
            return self.ellipses[idx[-1]].label
        return self.render(level, x0, y0, w, h)


def random_blobs(
    width: int,
    height: int,
    *,
    n_tissue: int = 3,
    n_islands: int = 6,
    island_size: tuple[float, float] = (0.02, 0.08),
    seed: int = 0,
) -> EllipseLabels:
    """A plausible mask: large tissue ellipses (label 1) with tumour islands (label 2).

    Sizes are relative to the slide's shorter side, so the mask looks the same
    at any size. Many small islands (``n_islands=300, island_size=(0.005,
    0.02)``) make a busy mask with many boundary tiles.
    """
    rng = np.random.default_rng(seed)
    s = min(width, height)
    shapes = []
    for _ in range(n_tissue):
        shapes.append(
            Ellipse(
                rng.uniform(0.25, 0.75) * width,
                rng.uniform(0.25, 0.75) * height,
                rng.uniform(0.15, 0.3) * s,
                rng.uniform(0.15, 0.3) * s,
                1,
            )
        )
    for _ in range(n_islands):
        base = shapes[rng.integers(n_tissue)]
        shapes.append(
            Ellipse(
                base.cx + rng.uniform(-0.5, 0.5) * base.rx,
                base.cy + rng.uniform(-0.5, 0.5) * base.ry,
                rng.uniform(*island_size) * s,
                rng.uniform(*island_size) * s,
                2,
            )
        )
    return EllipseLabels(tuple(shapes))


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass(frozen=True)
class MaskBenchResult:
    """Figures of one mask-write benchmark run.

    Attributes
    ----------
    width, height : int
        Level-0 size.
    levels, tiles, constant_tiles : int
        Pyramid levels, tiles written, of which constant.
    seconds : float
        Wall time of the write, tile source included.
    cpu_seconds : float
        Process CPU time (user + system, all threads) during the write: less
        sensitive than wall time to other load on the machine.
    source_seconds : float
        Of which spent in the synthetic tile source.
    mp_per_s : float
        Level-0 megapixels written per second (the mask write rate).
    writer_mp_per_s : float
        The same without the tile source's time: the writer's own rate.
    peak_rss_mb : float
        Peak resident memory of the process (MiB), from ``getrusage``.
    peak_rss_before_mb : float
        The same just before the write, to separate the writer from imports.
    file_mb : float
        Size of the written file (MiB).
    workers : int
        Compression threads.
    """

    width: int
    height: int
    levels: int
    tiles: int
    constant_tiles: int
    seconds: float
    cpu_seconds: float
    source_seconds: float
    mp_per_s: float
    writer_mp_per_s: float
    peak_rss_mb: float
    peak_rss_before_mb: float
    file_mb: float
    workers: int

    def as_dict(self) -> dict:
        return asdict(self)


def bench_mask_write(
    width: int = 100_000,
    height: int = 100_000,
    *,
    tile: int = 512,
    out: str | os.PathLike | None = None,
    workers: int = 0,
    n_islands: int = 6,
    island_size: tuple[float, float] = (0.02, 0.08),
    seed: int = 0,
    progress: bool = False,
) -> MaskBenchResult:
    """Write a synthetic ``width x height`` mask and report speed and memory.

    Parameters
    ----------
    width, height : int
        Level-0 size.
    tile : int
        Tile edge.
    out : path-like, optional
        Where to write the mask (kept, overwritten); by default a temporary
        file that is removed afterwards.
    workers : int
        Encoding threads (see :func:`write_label_pyramid`).
    n_islands, island_size, seed
        Synthetic mask (see :func:`random_blobs`); more and smaller islands
        mean more boundary (non-constant) tiles.
    progress : bool
        Show a progress bar.

    Returns
    -------
    MaskBenchResult

    Notes
    -----
    Peak RSS is the process's lifetime peak; run each size in a fresh process
    to compare sizes (``peak_rss_before_mb`` shows what was there already).
    """
    labels = random_blobs(width, height, n_islands=n_islands, island_size=island_size, seed=seed)
    spent = [0.0]

    def source(level: LevelGeometry, x0: int, y0: int, w: int, h: int):
        t = time.perf_counter()
        try:
            return labels(level, x0, y0, w, h)
        finally:
            spent[0] += time.perf_counter() - t

    before = _peak_rss_bytes()
    cpu0 = _cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="wsiseg-bench-") as tmpdir:
        path = Path(out) if out is not None else Path(tmpdir) / "mask.tiff"
        stats = write_label_pyramid(
            path, width, height, source, tile=tile, mpp=0.25, overwrite=True, progress=progress, workers=workers
        )
    cpu = _cpu_seconds() - cpu0
    mp = width * height / 1e6
    return MaskBenchResult(
        width=width,
        height=height,
        levels=stats.levels,
        tiles=stats.tiles,
        constant_tiles=stats.constant_tiles,
        seconds=stats.seconds,
        cpu_seconds=cpu,
        source_seconds=spent[0],
        mp_per_s=mp / stats.seconds,
        writer_mp_per_s=mp / max(stats.seconds - spent[0], 1e-9),
        peak_rss_mb=_peak_rss_bytes() / 2**20,
        peak_rss_before_mb=before / 2**20,
        file_mb=stats.file_bytes / 2**20,
        workers=workers,
    )


if __name__ == "__main__":
    # python -m wsiseg.bench.output [WIDTH [HEIGHT [WORKERS [N_ISLANDS]]]]; one size per
    # process, so that peak RSS is comparable between sizes
    args = [int(a) for a in sys.argv[1:]]
    w = args[0] if args else 100_000
    h = args[1] if len(args) > 1 else w
    kw = {}
    if len(args) > 3:
        kw = {"n_islands": args[3], "island_size": (0.005, 0.02)}
    res = bench_mask_write(w, h, workers=args[2] if len(args) > 2 else 0, **kw)
    print(res.as_dict())
