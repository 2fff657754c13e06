"""Class maps: the classes YAML of a data set -> class names, label values and aliases (:class:`ClassMap`).

Value :data:`IGNORE_INDEX` (255) marks pixels the loss must not see.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wsiseg.errors import WsisegError, one_line
from wsiseg.output.classes import ClassInfo, default_palette

__all__ = [
    "IGNORE_INDEX",
    "UNMAPPED_HINT",
    "ClassMap",
    "load_class_map",
]

#: Label value of pixels that carry no supervision (the losses' ``ignore_index``).
IGNORE_INDEX = 255

UNMAPPED_HINT = "add them to the classes YAML or pass --ignore-unmapped"


# ---------------------------------------------------------------------------
# class map


def _norm(name: str) -> str:
    """Case- and whitespace-insensitive key for class names and aliases."""
    return " ".join(str(name).split()).casefold()


@dataclass(frozen=True)
class ClassMap:
    """Class names (and aliases) -> label values and colours.

    Attributes
    ----------
    classes : tuple of ClassInfo
        One class per model channel, sorted by value; values are
        ``0 .. n - 1`` so that channel ``i`` predicts value ``i``. Value 0 is
        background.
    aliases : Mapping[str, int]
        Normalised name (case-folded, whitespace collapsed) -> value, for
        every class name, every alias and every ignored name
        (-> :data:`IGNORE_INDEX`).
    source : str or None
        The YAML file it was read from, for messages.
    """

    classes: tuple[ClassInfo, ...]
    aliases: Mapping[str, int] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        classes = tuple(sorted(self.classes, key=lambda c: c.value))
        values = [c.value for c in classes]
        if values != list(range(len(classes))) or not classes:
            raise WsisegError(
                f"class values must be 0..n-1 without gaps (channel i predicts value i), got {values}", self.source
            )
        if len(classes) >= IGNORE_INDEX:
            raise WsisegError(f"at most {IGNORE_INDEX} classes (255 is the ignore value)", self.source)
        table = {_norm(c.name): c.value for c in classes}
        if len(table) != len(classes):
            raise WsisegError(f"class names must be unique, got {[c.name for c in classes]}", self.source)
        for key, value in dict(self.aliases).items():
            k = _norm(key)
            if table.get(k, value) != value:
                raise WsisegError(f"name {key!r} maps to both {table[k]} and {value}", self.source)
            if value != IGNORE_INDEX and not 0 <= value < len(classes):
                raise WsisegError(f"alias {key!r} maps to unknown value {value}", self.source)
            table[k] = int(value)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "aliases", table)

    @classmethod
    def from_names(cls, names: Sequence[str], *, ignore: Iterable[str] = ()) -> ClassMap:
        """Class map with values ``0 .. n - 1`` in the order of ``names`` (background first)."""
        colors = default_palette(len(names))
        classes = tuple(ClassInfo(i, n, c) for i, (n, c) in enumerate(zip(names, colors)))
        return cls(classes, {n: IGNORE_INDEX for n in ignore})

    @classmethod
    def from_classes(cls, classes: Iterable[ClassInfo], *, ignore: Iterable[str] = ()) -> ClassMap:
        """Class map from a class table (e.g. a model's classes)."""
        return cls(tuple(classes), {n: IGNORE_INDEX for n in ignore})

    @property
    def num_classes(self) -> int:
        """Number of classes (model output channels), background included."""
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        """Class names in channel order."""
        return [c.name for c in self.classes]

    def lookup(self, name: str) -> int | None:
        """Label value of a class name or alias; :data:`IGNORE_INDEX` for ignored names; None if unknown."""
        return self.aliases.get(_norm(name))

    def to_classes(self) -> list[ClassInfo]:
        """The class table in channel order (``classes[i].value == i``)."""
        return list(self.classes)


def load_class_map(path: str | os.PathLike) -> ClassMap:
    """Read a classes YAML file.

    Format: a list of classes, or a mapping with ``classes`` (that list) and
    ``ignore`` (names whose regions become :data:`IGNORE_INDEX`)::

        classes:
          - {value: 1, name: Tumor, color: [230, 25, 75], aliases: [tumour, "Tumor region"]}
          - {value: 2, name: Stroma}
        ignore: [Exclude, Artefact]

    A list item of the form ``{ignore: [...]}`` is accepted too. ``color``
    is optional (``[r, g, b]`` or ``"#rrggbb"``; default: a palette colour). Value 0 is background:
    added as ``background`` (black) unless the file defines value 0. Values
    must be ``0 .. n - 1`` without gaps. Names and aliases match
    case-insensitively, with runs of whitespace collapsed.

    Parameters
    ----------
    path : path-like

    Returns
    -------
    ClassMap

    Raises
    ------
    WsisegError
        Unreadable file, bad YAML, bad entries; the message names the file.
    """
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise WsisegError(f"cannot read classes YAML: {one_line(exc)}", path) from exc
    ignore: list[str] = []
    if isinstance(doc, dict):
        unknown = set(doc) - {"classes", "ignore"}
        if unknown:
            raise WsisegError(f"unknown keys {sorted(unknown)} (expected 'classes', 'ignore')", path)
        entries, ignore = doc.get("classes") or [], list(doc.get("ignore") or [])
    elif isinstance(doc, list):
        entries = doc
    else:
        raise WsisegError("classes YAML must be a list of classes or a mapping with 'classes'", path)
    if not isinstance(entries, list):
        raise WsisegError("'classes' must be a list", path)
    specs = []
    for k, e in enumerate(entries):
        if isinstance(e, dict) and set(e) == {"ignore"}:
            ignore.extend(e["ignore"] or [])
            continue
        if not isinstance(e, dict) or "value" not in e or "name" not in e:
            raise WsisegError(f"class entry {k + 1} needs 'value' and 'name', got {e!r}", path)
        unknown = set(e) - {"value", "name", "color", "aliases"}
        if unknown:
            raise WsisegError(f"class entry {k + 1}: unknown keys {sorted(unknown)}", path)
        v = e["value"]
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < IGNORE_INDEX:
            raise WsisegError(
                f"class {e['name']!r}: value must be an integer in 0..254 (use 'ignore:' for ignored names), got {v!r}",
                path,
            )
        aliases = e.get("aliases") or []
        if isinstance(aliases, str):
            aliases = [aliases]
        color = e.get("color")
        if isinstance(color, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", color.strip()):
            color = tuple(int(color.strip()[i : i + 2], 16) for i in (1, 3, 5))
        specs.append((v, str(e["name"]), color, [str(a) for a in aliases]))
    if not any(v == 0 for v, *_ in specs):
        specs.append((0, "background", (0, 0, 0), []))
    specs.sort(key=lambda s: s[0])
    palette = default_palette(max(len(specs), 1))
    try:
        classes = tuple(
            ClassInfo(v, name, tuple(color) if color is not None else palette[i])
            for i, (v, name, color, _) in enumerate(specs)
        )
    except (WsisegError, TypeError) as exc:
        raise WsisegError(f"bad class entry: {one_line(exc)}", path) from exc
    aliases = {a: v for v, _, _, al in specs for a in al}
    for name in ignore:
        aliases[str(name)] = IGNORE_INDEX
    return ClassMap(classes, aliases, source=str(path))
