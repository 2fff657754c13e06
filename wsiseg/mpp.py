"""Micrometres per pixel (MPP): the one rule for a valid value and the plausible range of slides.

The slide reader (``--mpp`` and the file's metadata), the mask, OME and
GeoJSON writers and the report's areas validate an MPP with
:func:`mpp_pair`, so that one rule says what a valid MPP is. Values
read from a slide file are also checked against the plausible level-0 range
of brightfield whole-slide scanners (:func:`is_plausible_mpp`): TIFF writers
that know nothing about the scan leave the 72 or 96 dpi default in the
resolution tags, which reads as 352.8 or 264.6 µm/px and would turn areas
into square kilometres. Such values are treated as unknown (see
:func:`wsiseg.slide.open.open_slide`); a value given with ``--mpp`` is taken
as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wsiseg.errors import ConfigError
from wsiseg.limits import mpp_problem

__all__ = [
    "MIN_PLAUSIBLE_MPP",
    "MAX_PLAUSIBLE_MPP",
    "IgnoredMpp",
    "mpp_pair",
    "is_plausible_mpp",
    "format_mpp",
]

#: Smallest plausible level-0 µm/px read from a slide file. Brightfield
#: scanners reach about 0.1 µm/px at 80-100x; below half of that is not a
#: real optical resolution.
MIN_PLAUSIBLE_MPP = 0.05
#: Largest plausible level-0 µm/px read from a slide file. Scanners store
#: level 0 at 1.25x-2.5x (4-8 µm/px) at the coarsest; 72 and 96 dpi
#: defaults (352.8 and 264.6 µm/px) are far above.
MAX_PLAUSIBLE_MPP = 20.0


@dataclass(frozen=True)
class IgnoredMpp:
    """An implausible level-0 MPP found in a slide file and treated as unknown.

    Attributes
    ----------
    mpp : (float, float)
        The value read, micrometres per pixel ``(x, y)``.
    source : str
        Where it was read (``"openslide"``, ``"tiff-resolution"``,
        ``"ome"``, ``"ngff"``).
    """

    mpp: tuple[float, float]
    source: str

    def to_dict(self) -> dict:
        """``{"mpp": [x, y], "source": ..., "plausible_range": [min, max]}`` for JSON."""
        return {
            "mpp": [float(self.mpp[0]), float(self.mpp[1])],
            "source": self.source,
            "plausible_range": [MIN_PLAUSIBLE_MPP, MAX_PLAUSIBLE_MPP],
        }

    def describe(self) -> str:
        """One phrase: the value, its source and the range it is outside."""
        return (
            f"{format_mpp(self.mpp)} um/px from {self.source}, "
            f"outside {MIN_PLAUSIBLE_MPP:g}-{MAX_PLAUSIBLE_MPP:g} um/px"
        )


def mpp_pair(mpp, *, what: str = "mpp", bounded: bool = True) -> tuple[float, float] | None:
    """An MPP as a positive, finite ``(x, y)`` pair of floats.

    Parameters
    ----------
    mpp : float or (float, float) or None
        One value for both axes, or ``(x, y)``; numbers or numeric strings.
    what : str
        The name used in the error message (``"--mpp"``, ``"mpp"``).
    bounded : bool
        Also require :data:`wsiseg.limits.MPP_RANGE` (the bounds of any MPP
        wsiseg uses); False for a slide file's value, which is then judged
        by :func:`is_plausible_mpp` and ignored, not refused.

    Returns
    -------
    (float, float) or None
        None when ``mpp`` is None.

    Raises
    ------
    ConfigError
        Not a number or a pair of numbers, not positive and finite, or
        (``bounded``) outside ``MPP_RANGE``.
    """
    if mpp is None:
        return None
    try:  # no numpy here: the command line imports this for its help text
        values = (mpp, mpp) if isinstance(mpp, (str, bytes)) else tuple(mpp)
    except TypeError:  # a scalar (int, float, numpy number or 0-d array)
        values = (mpp, mpp)
    try:
        mx, my = (float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a positive number or an (x, y) pair, got {mpp!r}") from None
    if not (math.isfinite(mx) and math.isfinite(my) and mx > 0 and my > 0):
        raise ConfigError(f"{what} must be positive and finite, got {mpp!r}")
    problem = bounded and (mpp_problem(mx) or mpp_problem(my))
    if problem:
        raise ConfigError(what + problem.removeprefix("mpp"))
    return mx, my


def is_plausible_mpp(mpp: tuple[float, float]) -> bool:
    """True when both axes of a level-0 MPP lie in ``[MIN_PLAUSIBLE_MPP, MAX_PLAUSIBLE_MPP]``.

    Parameters
    ----------
    mpp : (float, float)
        A valid pair (see :func:`mpp_pair`).
    """
    return all(MIN_PLAUSIBLE_MPP <= float(v) <= MAX_PLAUSIBLE_MPP for v in mpp)


def format_mpp(mpp) -> str:
    """``"0.499"`` for a square pixel, ``"0.25 x 0.26"`` otherwise (6 significant digits, no unit).

    Parameters
    ----------
    mpp : (float, float)
        Micrometres per pixel ``(x, y)``.
    """
    mx, my = mpp
    return f"{mx:.6g}" if mx == my else f"{mx:.6g} x {my:.6g}"
