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
  ``2 * ceil(2 * sigma) + 1`` (+-2 sigma) unless the model fixed one.

There is no padding: a region is sampled on its own extent. (Training used
to pad regions to a square, which put padding into the grid; batches now
group regions of equal shape instead.)

:func:`region_geometry` is the only place that computes this;
:meth:`wsiseg.models.net.DeformSegNet.geometry` applies it with a model's
settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wsiseg.sampling.sizes import dynamic_output_size

__all__ = ["GeometryRule", "SamplingGeometry", "default_support", "region_geometry"]


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
    """

    out_size: tuple[int, int]
    map_size: tuple[int, int]
    sigma: float
    support: int | None = None
    long_factor: float = 4.0
    min_map: int = 4

    @property
    def sigma_rel(self) -> float:
        """Sigma over the geometric mean of the reference map's sides."""
        return self.sigma / math.sqrt(self.map_size[0] * self.map_size[1])


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
    """

    grid: tuple[int, int]
    map: tuple[int, int]
    sigma: float
    support: int

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
) -> SamplingGeometry:
    """The sampling geometry of a region of ``height x width`` pixels.

    Parameters
    ----------
    height, width : int
        Region size in pixels (any resolution: the rule depends on the
        aspect ratio, and on the size only to never up-sample).
    rule : GeometryRule
        The model's settings.
    grid : (int, int), optional
        A fixed grid size instead of the dynamic rule (``--size``).
    long_side : int, optional
        Long-side target of the dynamic rule instead of
        ``long_factor * max(out_size)``.

    Returns
    -------
    SamplingGeometry

    Examples
    --------
    >>> rule = GeometryRule((64, 64), (32, 32), 4.0)
    >>> region_geometry(512, 512, rule)
    SamplingGeometry(grid=(64, 64), map=(32, 32), sigma=4.0, support=17)
    """
    if height < 1 or width < 1:
        raise ValueError(f"region size must be positive, got {height}x{width}")
    oh, ow = rule.out_size
    if grid is not None:
        h, w = int(grid[0]), int(grid[1])
        if h < 1 or w < 1:
            raise ValueError(f"grid size must be positive, got {grid}")
    else:
        short, long_ = min(oh, ow), max(oh, ow)
        cap = int(long_side) if long_side is not None else int(round(rule.long_factor * long_))
        h, w = dynamic_output_size(height, width, short=short, long=max(cap, short))
    rh, rw = rule.map_size[0] / oh, rule.map_size[1] / ow
    hd = max(rule.min_map, min(h, round(h * rh)))
    wd = max(rule.min_map, min(w, round(w * rw)))
    if (hd, wd) == tuple(rule.map_size):
        sigma = float(rule.sigma)  # bit-identical to the model's own sigma at its reference shape
    else:
        sigma = rule.sigma_rel * math.sqrt(hd * wd)
    support = int(rule.support) if rule.support is not None else default_support(sigma)
    return SamplingGeometry(grid=(h, w), map=(hd, wd), sigma=sigma, support=support)
