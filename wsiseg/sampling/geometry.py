"""One sampling geometry for every path: training, validation, evaluation, segmentation.

A model is trained with a grid of ``out_size`` nodes on regions of some
shape, a density map of ``map_size`` nodes and an attraction kernel of
``sigma`` map nodes. When it meets a region of another shape (a long needle
biopsy, a whole slide), the same *rule* decides the region's geometry:

* **grid** ``(h, w)``: the paper's dynamic size rule (A.6,
  :func:`~wsiseg.sampling.sizes.dynamic_output_size`): the short side to the
  model's short side, or the long side to ``long_factor`` times the model's
  long side, whichever gives fewer samples; the region's aspect ratio is
  kept and a region is never sampled more densely than its pixels;
* **density map** ``(hd, wd)``: the model's map/grid ratio per axis, at
  least ``min_map`` nodes and at most the grid's size;
* **kernel**: ``sigma`` *relative to the map*: ``sigma_rel`` times the
  geometric mean of the map's sides (``sqrt(hd * wd)``), so a square region
  of the training shape gets exactly the model's sigma, and a long, thin map
  gets a kernel that fits it instead of one wider than the map; support
  ``2 * ceil(2 * sigma) + 1`` (+-2 sigma) unless the model fixed one;
* **iterations**: the model's number of attraction steps, whatever the region.

Physical mode
-------------
A model trained on slides whose pixel size is known records its mean sample
spacing in micrometres (:mod:`wsiseg.models.scale`). Given a
:class:`PhysicalScale` (the micrometres per pixel of the region's sizes and
that spacing), the grid is instead ``round(extent_um / spacing_um)`` per axis
(at least 1, at most the region's pixels): a region is sampled as densely as
the model was trained, whatever its size or the slide's resolution. The map
follows from the grid as above; the kernel keeps the model's sigma in map
nodes, since the nodes keep the training spacing (a sigma relative to a large
region's map would pull samples across millimetres, and its convolution
would cost seconds per region). Such grids grow with the region, so
:func:`split_region` cuts a region whose grid would exceed a memory cap into
the fewest equal sub-boxes whose grids fit.

There is no padding: a region is sampled on its own extent. (Training used
to pad regions to a square, which put padding into the grid; batches now
group regions of equal shape instead.)

:func:`region_geometry` is the only place that computes this;
:meth:`wsiseg.models.net.DeformSegNet.geometry` applies it with a model's
settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from wsiseg.sampling.sizes import dynamic_output_size

__all__ = [
    "GeometryRule",
    "PhysicalScale",
    "SamplingGeometry",
    "default_support",
    "physical_grid",
    "region_geometry",
    "split_region",
]


def default_support(sigma: float) -> int:
    """Odd kernel side covering +-2 sigma: ``2 * ceil(2 * sigma) + 1``."""
    return 2 * math.ceil(2.0 * sigma) + 1


@dataclass(frozen=True)
class GeometryRule:
    """A model's sampling geometry, as a rule that applies to any region shape.

    Attributes
    ----------
    out_size : (int, int)
        ``(h, w)`` grid of the model's reference (training) shape.
    map_size : (int, int)
        ``(hd, wd)`` density map at that grid.
    sigma : float
        Kernel standard deviation in map nodes at ``map_size``.
    support : int or None
        Fixed odd kernel side; ``None``: :func:`default_support` of each
        region's sigma.
    long_factor : float
        The long-side target of the dynamic size rule, as a multiple of the
        model's long side.
    min_map : int
        Smallest side of a density map.
    iterations : int
        Attraction steps of the grid (:func:`wsiseg.sampling.grid.density_to_grid`).
    """

    out_size: tuple[int, int]
    map_size: tuple[int, int]
    sigma: float
    support: int | None = None
    long_factor: float = 4.0
    min_map: int = 4
    iterations: int = 1

    @property
    def sigma_rel(self) -> float:
        """Sigma over the geometric mean of the reference map's sides."""
        return self.sigma / math.sqrt(self.map_size[0] * self.map_size[1])


@dataclass(frozen=True)
class PhysicalScale:
    """Sample a region at a model's physical scale.

    Attributes
    ----------
    mpp : (float, float)
        Micrometres per pixel ``(x, y)`` of the region sizes given to
        :func:`region_geometry` (level-0 pixels for a slide box, working
        pixels for a training raster); a single number is both.
    spacing_um : float
        The model's sample spacing in micrometres.
    """

    mpp: tuple[float, float]
    spacing_um: float

    def __post_init__(self):
        try:
            mpp = tuple(float(v) for v in self.mpp) if isinstance(self.mpp, Sequence) else (float(self.mpp),) * 2
        except (TypeError, ValueError):
            mpp = ()
        if len(mpp) != 2 or not all(math.isfinite(v) and v > 0 for v in mpp):
            raise ValueError(f"mpp must be a positive number or (x, y) pair, got {self.mpp!r}")
        if not (math.isfinite(self.spacing_um) and self.spacing_um > 0):
            raise ValueError(f"sample spacing must be positive, got {self.spacing_um!r}")
        object.__setattr__(self, "mpp", mpp)  # frozen: normalise in place
        object.__setattr__(self, "spacing_um", float(self.spacing_um))


def _axis_samples(pixels: int, mpp: float, spacing_um: float) -> int:
    # floor(x + 0.5): halves round up, the same on every platform
    return min(pixels, max(1, math.floor(pixels * mpp / spacing_um + 0.5)))


def physical_grid(height: int, width: int, scale: PhysicalScale) -> tuple[int, int]:
    """``(h, w)`` grid of a ``height x width`` pixel region at ``scale``.

    ``round(extent_um / spacing_um)`` per axis, at least 1 and never more
    samples than the region has pixels.
    """
    return (_axis_samples(height, scale.mpp[1], scale.spacing_um), _axis_samples(width, scale.mpp[0], scale.spacing_um))


@dataclass(frozen=True)
class SamplingGeometry:
    """The sampling geometry of one region.

    Attributes
    ----------
    grid : (int, int)
        ``(h, w)`` sampling grid (deformed image, logits).
    map : (int, int)
        ``(hd, wd)`` low-resolution view and density map.
    sigma : float
        Attraction kernel standard deviation in map nodes.
    support : int
        Odd kernel side.
    iterations : int
        Attraction steps (the model's; 1 is the paper's single attraction).
    """

    grid: tuple[int, int]
    map: tuple[int, int]
    sigma: float
    support: int
    iterations: int = 1

    @property
    def samples(self) -> int:
        """Number of grid nodes."""
        return self.grid[0] * self.grid[1]


def region_geometry(
    height: int,
    width: int,
    rule: GeometryRule,
    *,
    grid: tuple[int, int] | None = None,
    long_side: int | None = None,
    physical: PhysicalScale | None = None,
    scale: float = 1.0,
) -> SamplingGeometry:
    """The sampling geometry of a region of ``height x width`` pixels.

    Parameters
    ----------
    height, width : int
        Region size in pixels (any resolution: the pixel rule depends on
        the aspect ratio, and on the size only to never up-sample).
    rule : GeometryRule
        The model's settings.
    grid : (int, int), optional
        A fixed grid size (``--size``); wins over everything else.
    long_side : int, optional
        Long-side target of the dynamic rule instead of
        ``long_factor * max(out_size)``.
    physical : PhysicalScale, optional
        Physical mode: the grid is :func:`physical_grid` (the region's
        extent over the model's sample spacing) instead of the dynamic
        rule; ``long_side`` is then unused.
    scale : float
        Sample ``scale`` times as densely per axis (scale augmentation in
        training, robustness checks in ``evaluate``): physical mode at
        ``spacing_um / scale``; the pixel rule with its grid's sides times
        ``scale`` (rounded, at least 1, at most the region's pixels), the
        map and kernel following as for a fixed ``grid``. Unused with
        ``grid``.

    Returns
    -------
    SamplingGeometry

    Examples
    --------
    >>> rule = GeometryRule((64, 64), (32, 32), 4.0)
    >>> region_geometry(512, 512, rule)
    SamplingGeometry(grid=(64, 64), map=(32, 32), sigma=4.0, support=17, iterations=1)
    >>> region_geometry(30000, 40000, rule, physical=PhysicalScale(0.5, 8.0)).grid
    (1875, 2500)
    """
    if height < 1 or width < 1:
        raise ValueError(f"region size must be positive, got {height}x{width}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be positive, got {scale}")
    if scale != 1.0 and grid is None:
        if physical is not None:
            physical = PhysicalScale(physical.mpp, physical.spacing_um / scale)
        else:
            h, w = region_geometry(height, width, rule, long_side=long_side).grid
            grid = (min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale))))
    oh, ow = rule.out_size
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        if h < 1 or w < 1:
            raise ValueError(f"grid size must be positive, got {grid}")
    elif physical is not None:
        h, w = physical_grid(height, width, physical)
    else:
        short, long_ = min(oh, ow), max(oh, ow)
        cap = int(long_side) if long_side is not None else int(round(rule.long_factor * long_))
        h, w = dynamic_output_size(height, width, short=short, long=max(cap, short))
    rh, rw = rule.map_size[0] / oh, rule.map_size[1] / ow
    hd = max(rule.min_map, min(h, round(h * rh)))
    wd = max(rule.min_map, min(w, round(w * rw)))
    if (hd, wd) == tuple(rule.map_size) or (physical is not None and grid is None):
        # The model's own sigma: at its reference shape (bit-identical), and in physical mode, where map
        # nodes have the training spacing, so the same number of nodes is the same physical kernel.
        sigma = float(rule.sigma)
    else:
        sigma = rule.sigma_rel * math.sqrt(hd * wd)
    support = int(rule.support) if rule.support is not None else default_support(sigma)
    return SamplingGeometry(grid=(h, w), map=(hd, wd), sigma=sigma, support=support, iterations=rule.iterations)


def _axis_split(pixels: int, mpp: float, spacing_um: float, cap: int) -> list[tuple[int, int]]:
    """Fewest equal pieces ``[(start, stop), ...]`` of ``pixels`` whose grids are at most ``cap``."""
    if cap < 1:
        raise ValueError(f"grid cap must be positive, got {cap}")
    # A piece's grid never shrinks as the piece grows, so k equal pieces fit exactly when the
    # largest, ceil(pixels / k), does: find the largest piece that fits, then the fewest pieces.
    lo, hi = 1, pixels  # one pixel always fits (one sample)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _axis_samples(mid, mpp, spacing_um) <= cap:
            lo = mid
        else:
            hi = mid - 1
    k = -(-pixels // lo)
    edges = [i * pixels // k for i in range(k + 1)]  # sides equal up to one pixel, an exact cover
    return list(zip(edges[:-1], edges[1:]))


def split_region(
    box: tuple[int, int, int, int], scale: PhysicalScale, max_grid: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """Cut a box into the fewest equal sub-boxes whose physical grids fit ``max_grid``.

    A ``k x l`` tiling (``k`` rows, ``l`` columns, sides equal up to one
    pixel) that covers the box exactly, without gaps or overlaps. A grid's
    height depends only on its box's height (and its width on the width),
    so the fewest rows and the fewest columns are found separately, and
    together they are the fewest boxes. A grid never shrinks as its box
    grows, so ``k`` equal pieces fit when the largest does: the fewest is
    ``ceil(side / largest side that fits)``.

    Parameters
    ----------
    box : (x, y, width, height)
        Level-0 box (any pixel grid that ``scale.mpp`` describes).
    scale : PhysicalScale
    max_grid : (int, int)
        Largest ``(h, w)`` grid of one sub-box (memory cap).

    Returns
    -------
    list of (x, y, width, height)
        Row by row; ``[box]`` itself when its grid fits.

    Examples
    --------
    >>> len(split_region((0, 0, 40000, 30000), PhysicalScale(0.5, 8.0), (512, 512)))
    20
    """
    x, y, bw, bh = (int(v) for v in box)
    if bw < 1 or bh < 1:
        raise ValueError(f"region size must be positive, got {bw}x{bh}")
    rows = _axis_split(bh, scale.mpp[1], scale.spacing_um, int(max_grid[0]))
    cols = _axis_split(bw, scale.mpp[0], scale.spacing_um, int(max_grid[1]))
    return [(x + c0, y + r0, c1 - c0, r1 - r0) for r0, r1 in rows for c0, c1 in cols]
