"""Option types and help text shared by the commands: MPP bounds, ``WIDTHxHEIGHT`` sizes, mask formats,
the grid's attraction steps and the glass weight."""

from __future__ import annotations

import click

from wsiseg.limits import GRID_SCALES, MAX_GRID_ITERATIONS, MPP_RANGE
from wsiseg.mpp import MAX_PLAUSIBLE_MPP, MIN_PLAUSIBLE_MPP

__all__ = [
    "GLASS_WEIGHT",
    "GRID_ITERATIONS",
    "GRID_SCALE",
    "IMPLAUSIBLE_MPP_HELP",
    "MPP",
    "Formats",
    "Size",
    "hw",
]


# Micrometres per pixel on the command line: the bounds of every MPP read from a file.
MPP = click.FloatRange(*MPP_RANGE)

# Attraction steps of the sampling grid (train, evaluate, segment): the bound a model file may hold.
GRID_ITERATIONS = click.IntRange(1, MAX_GRID_ITERATIONS)
# Sampling density relative to the model's scale (evaluate, segment).
GRID_SCALE = click.FloatRange(*GRID_SCALES)
# A learned density's factor on glass (evaluate, segment): (0, 1], 1 is off.
GLASS_WEIGHT = click.FloatRange(0.0, 1.0, min_open=True)

# the --mpp options' shared sentence (wsiseg.mpp imports nothing heavy)
IMPLAUSIBLE_MPP_HELP = (
    f"Without it, a slide's own MPP outside {MIN_PLAUSIBLE_MPP:g}-{MAX_PLAUSIBLE_MPP:g} um/px (e.g. a TIFF's "
    "72 dpi default, 352.8 um/px) is ignored with a warning."
)


class Size(click.ParamType):
    """``WIDTHxHEIGHT`` (or ``N`` for ``NxN``) -> ``(width, height)``, both positive.

    Every size on the command line is written width first, as image sizes are.
    """

    name = "WIDTHxHEIGHT"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).lower().split("x")
        try:
            wh = tuple(int(v) for v in parts) * (2 if len(parts) == 1 else 1)
        except ValueError:
            wh = ()
        if len(wh) != 2 or min(wh) < 1:
            self.fail(f"expected WIDTHxHEIGHT of positive integers (e.g. 40000x30000), got {value!r}", param, ctx)
        return wh


class Formats(click.ParamType):
    """``FORMAT[,FORMAT...]`` -> a tuple of mask format names (validated by wsiseg.output.ome)."""

    name = "format"

    def get_metavar(self, param, ctx=None):
        from wsiseg.output.ome import FORMATS

        return f"[{'|'.join(FORMATS)}][,...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from wsiseg.errors import ConfigError
        from wsiseg.output.ome import parse_formats

        try:
            return parse_formats(value)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


def hw(size: tuple[int, int] | None) -> tuple[int, int] | None:
    """``(width, height)`` from the command line -> ``(height, width)`` as the library takes it."""
    return None if size is None else (size[1], size[0])
