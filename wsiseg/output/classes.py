"""Class table of a label mask: value -> name and display colour.

The table travels next to every mask as a small JSON sidecar::

    {"0": {"name": "background", "color": [0, 0, 0]},
     "1": {"name": "tumour", "color": [230, 25, 75]}}

Keys are the uint8 label values as strings (JSON keys must be strings),
colours are 8-bit RGB. Value 0 is background by convention.
"""

from __future__ import annotations

import colorsys
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from wsiseg.atomic import atomic_output
from wsiseg.errors import WsisegError

__all__ = [
    "ClassInfo",
    "default_palette",
    "default_classes",
    "validate_classes",
    "class_colormap",
    "write_classes_json",
    "read_classes_json",
]

# Hand-picked, mutually distinct on a dark background and under the common
# colour-vision deficiencies well enough for a handful of tissue classes.
_BASE_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
)


@dataclass(frozen=True)
class ClassInfo:
    """One label class.

    Attributes
    ----------
    value : int
        Label value stored in the mask, 0-255.
    name : str
        Human-readable class name (non-empty).
    color : (int, int, int)
        Display colour, 8-bit RGB.
    """

    value: int
    name: str
    color: tuple[int, int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.value, (int, np.integer)) or not 0 <= int(self.value) <= 255:
            raise WsisegError(f"class value must be an integer in 0..255, got {self.value!r}")
        if not isinstance(self.name, str) or not self.name:
            raise WsisegError(f"class {self.value}: name must be a non-empty string")
        color = tuple(self.color)
        if len(color) != 3 or not all(isinstance(c, (int, np.integer)) and 0 <= int(c) <= 255 for c in color):
            raise WsisegError(f"class {self.value}: color must be three integers in 0..255, got {self.color!r}")
        # frozen: normalise through object.__setattr__ so equality and JSON are plain ints
        object.__setattr__(self, "value", int(self.value))
        object.__setattr__(self, "color", tuple(int(c) for c in color))


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """Colours for ``n`` classes, background (index 0) black.

    Parameters
    ----------
    n : int
        Number of classes including background, 1-256.

    Returns
    -------
    list of (int, int, int)
        ``n`` distinct RGB colours; the first is ``(0, 0, 0)``.
    """
    if not 1 <= n <= 256:
        raise WsisegError(f"number of classes must be in 1..256, got {n}")
    colors: list[tuple[int, int, int]] = [(0, 0, 0)]
    colors.extend(_BASE_COLORS[: n - 1])
    # Beyond the hand-picked set: golden-ratio hue steps spread any count evenly.
    hue = 0.0
    seen = set(colors)
    while len(colors) < n:
        hue = (hue + 0.618033988749895) % 1.0
        light = 0.45 + 0.2 * (len(colors) % 3) / 2
        r, g, b = colorsys.hls_to_rgb(hue, light, 0.85)
        c = (round(r * 255), round(g * 255), round(b * 255))
        if c not in seen:
            seen.add(c)
            colors.append(c)
    return colors


def default_classes(names: Sequence[str] | int) -> list[ClassInfo]:
    """Class table with values ``0..n-1`` and :func:`default_palette` colours.

    Parameters
    ----------
    names : sequence of str or int
        Class names, background first; or a count, giving names
        ``"background", "class_1", ...``.
    """
    if isinstance(names, int):
        names = ["background"] + [f"class_{i}" for i in range(1, names)]
    names = list(names)
    return [ClassInfo(i, name, color) for i, (name, color) in enumerate(zip(names, default_palette(len(names))))]


def validate_classes(classes: Iterable[ClassInfo]) -> list[ClassInfo]:
    """Check a class table (unique values and names) and sort it by value."""
    out = sorted(classes, key=lambda c: c.value)
    if not out:
        raise WsisegError("class table is empty")
    values = [c.value for c in out]
    if len(set(values)) != len(values):
        raise WsisegError(f"class values must be unique, got {values}")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise WsisegError(f"class names must be unique, got {names}")
    return out


def class_colormap(classes: Iterable[ClassInfo]) -> np.ndarray:
    """TIFF ColorMap for a palette image of the classes.

    Returns
    -------
    numpy.ndarray
        ``(3, 256)`` uint16; 8-bit colours scaled by 257 so that ``255 ->
        65535`` (readers such as libtiff take the top byte). Values without a
        class are black.
    """
    cmap = np.zeros((3, 256), np.uint16)
    for c in validate_classes(classes):
        cmap[:, c.value] = np.asarray(c.color, np.uint16) * 257
    return cmap


def write_classes_json(path: str | os.PathLike, classes: Iterable[ClassInfo], *, overwrite: bool = False) -> Path:
    """Write the class table sidecar (value -> {name, color}).

    Parameters
    ----------
    path : path-like
        Output ``.json`` file, written atomically.
    classes : iterable of ClassInfo
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
    """
    table = {str(c.value): {"name": c.name, "color": list(c.color)} for c in validate_classes(classes)}
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def read_classes_json(path: str | os.PathLike) -> list[ClassInfo]:
    """Read a sidecar written by :func:`write_classes_json`."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
        classes = [ClassInfo(int(k), v["name"], tuple(v["color"])) for k, v in table.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WsisegError(f"not a class table: {exc}", path) from exc
    return validate_classes(classes)
