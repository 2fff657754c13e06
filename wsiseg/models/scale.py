"""A model's physical scale: the micrometres per pixel and sample spacing it was trained at.

Training records, in the model file's metadata under ``"scale"``::

    {"mpp_working": 1.0, "sample_spacing_um": 8.0, "source": "slide",
     "regions": 120, "regions_without_mpp": 0}

``mpp_working``
    Micrometres per pixel of the working resolution the regions were read
    at (the image's MPP times the region's downsample), median over the
    training regions.
``sample_spacing_um``
    Mean distance between samples in micrometres: a region's physical
    extent over its grid nodes, per axis, averaged over the two axes; median
    over the training regions (grids by the training geometry,
    :meth:`wsiseg.models.net.DeformSegNet.geometry`).
``source``
    Where the MPP came from: ``"slide"`` (the images' own metadata),
    ``"mpp option"`` (``wsiseg train --mpp`` or the CSV ``mpp`` column),
    ``"items"`` (a data set's items said so), ``"mixed"``, or ``"unknown"``
    (no training region had an MPP: both values are ``null``).

``wsiseg segment`` and ``evaluate`` sample at ``sample_spacing_um`` when a
slide's MPP is known (:class:`wsiseg.sampling.geometry.PhysicalScale`);
models without the key (older files) sample by pixel size, as before.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

from wsiseg.limits import MAX_SAMPLE_SPACING_UM, MPP_RANGE
from wsiseg.sampling.geometry import SamplingGeometry

__all__ = ["SCALE_SOURCES", "ModelScale", "measure_scale"]

#: Values of ``ModelScale.source``.
SCALE_SOURCES = ("slide", "mpp option", "items", "mixed", "unknown")


@dataclass(frozen=True)
class ModelScale:
    """The physical scale a model was trained at (see the module docstring).

    Attributes
    ----------
    mpp_working : float or None
        Micrometres per working-resolution pixel (median over regions).
    sample_spacing_um : float or None
        Mean sample spacing in micrometres (median over regions).
    source : str
        One of :data:`SCALE_SOURCES`.
    regions : int
        Training regions with a known MPP (the ones measured).
    regions_without_mpp : int
        Training regions without one (left out).
    """

    mpp_working: float | None
    sample_spacing_um: float | None
    source: str = "unknown"
    regions: int = 0
    regions_without_mpp: int = 0

    @property
    def known(self) -> bool:
        """Whether the model has a sample spacing to sample at."""
        return self.sample_spacing_um is not None

    def to_dict(self) -> dict:
        """The metadata entry (JSON-able)."""
        return asdict(self)

    @classmethod
    def from_metadata(cls, meta: Mapping) -> ModelScale | None:
        """The ``"scale"`` entry of a model's metadata; None when the model has none (older files).

        Raises
        ------
        ValueError
            The entry is malformed (the caller names the file).
        """
        entry = meta.get("scale") if isinstance(meta, Mapping) else None
        if entry is None:
            return None
        if not isinstance(entry, Mapping):
            raise ValueError(f"scale metadata must be a mapping, got {type(entry).__name__}")

        def positive(key: str, hi: float) -> float | None:
            v = entry.get(key)
            if v is None:
                return None
            lo = MPP_RANGE[0]  # a spacing is at least one pixel of the finest MPP
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and lo <= v <= hi):
                raise ValueError(f"scale.{key} must be a number in [{lo:g}, {hi:g}] or null, got {v!r}")
            return float(v)

        source = entry.get("source", "unknown")
        if source not in SCALE_SOURCES:
            raise ValueError(f"scale.source must be one of {', '.join(SCALE_SOURCES)}, got {source!r}")
        counts = [entry.get(k, 0) for k in ("regions", "regions_without_mpp")]
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"scale region counts must be non-negative integers, got {counts}")
        return cls(
            positive("mpp_working", MPP_RANGE[1]), positive("sample_spacing_um", MAX_SAMPLE_SPACING_UM), source, *counts
        )


def measure_scale(
    regions: Iterable[tuple[tuple[int, int], float | None, str]],
    geometry: Callable[[int, int], SamplingGeometry],
    spacing_um: float | None = None,
) -> ModelScale:
    """The scale of a set of training regions.

    Parameters
    ----------
    regions : iterable of ((h, w), mpp, source)
        Per region: its working raster's shape, micrometres per working
        pixel (None when unknown) and where that came from.
    geometry : callable
        ``geometry(h, w)``: the training geometry of a region
        (:meth:`wsiseg.models.net.DeformSegNet.geometry`); unused with
        ``spacing_um``.
    spacing_um : float, optional
        The spacing of physical-mode training (``TrainConfig.sample_spacing_um``):
        recorded as it is, since every region was sampled at it (``segment``
        then gives a region the grid training gave it).

    Returns
    -------
    ModelScale
        Medians over the regions with an MPP; ``source="unknown"`` and
        ``None`` values when no region has one.
    """
    mpps: list[float] = []
    spacings: list[float] = []
    sources: set[str] = set()
    unknown = 0
    for (h, w), mpp, source in regions:
        if mpp is None:
            unknown += 1
            continue
        if spacing_um is None:
            gh, gw = geometry(int(h), int(w)).grid
            spacings.append((h * mpp / gh + w * mpp / gw) / 2.0)  # extent over nodes, mean of the two axes
        mpps.append(float(mpp))
        sources.add(source)
    if not mpps:
        return ModelScale(None, None, "unknown", 0, unknown)
    source = next(iter(sources)) if len(sources) == 1 else "mixed"
    spacing = float(spacing_um) if spacing_um is not None else statistics.median(spacings)
    return ModelScale(statistics.median(mpps), spacing, source, len(mpps), unknown)
