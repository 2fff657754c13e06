"""Output sizes and sampling cost.

Dynamic output size (paper A.6): for long, thin inputs (biopsies) a fixed
square output wastes samples. Two candidates keep the aspect ratio: scale
the short side to ``short``, or the long side to ``long``; the one with
fewer pixels wins. Sides are rounded *down* (exact rational arithmetic, no
float drift), never below 1, and the input is never up-sampled.

Worked example: 368 x 7986 with ``(short, long) = (80, 800)``: candidate 1
is 80 x 1736, candidate 2 is 368 * 800 / 7986 = 36.86 -> 36 x 800 (floor;
rounding to nearest would give 37); candidate 2 has fewer pixels.
"""

from __future__ import annotations

from fractions import Fraction
from math import floor

__all__ = ["dynamic_output_size", "sample_fraction"]


def dynamic_output_size(height: int, width: int, short: int = 80, long: int = 800) -> tuple[int, int]:
    """Output size for an input of ``height x width`` pixels.

    Parameters
    ----------
    height, width : int
        Input size (>= 1).
    short : int
        Target for the short side (candidate 1).
    long : int
        Target for the long side (candidate 2).

    Returns
    -------
    tuple of int
        ``(h, w)`` with ``1 <= h <= height`` and ``1 <= w <= width``: the
        candidate with fewer pixels (the smaller scale), sides floored. An
        input already smaller than both targets is returned unchanged.
    """
    if height < 1 or width < 1:
        raise ValueError(f"input size must be positive, got {height}x{width}")
    if short < 1 or long < 1:
        raise ValueError(f"targets must be positive, got short={short}, long={long}")
    lo, hi = min(height, width), max(height, width)
    # Both candidates share the aspect ratio, so fewer pixels = smaller scale.
    scale = min(Fraction(short, lo), Fraction(long, hi), Fraction(1))
    return max(1, floor(height * scale)), max(1, floor(width * scale))


def sample_fraction(h: int, w: int, height: int, width: int) -> float:
    """Fraction of the original pixels that ``h x w`` samples cost, capped at 1."""
    if height < 1 or width < 1:
        raise ValueError(f"input size must be positive, got {height}x{width}")
    return min(1.0, (h * w) / (height * width))
