"""Texture mosaics on real label geometry: labelled training images from an unpaired label map.

A real tissue-class label map (e.g. a BCSS ``mag-BASE`` PNG, whose RGB image
is not available) supplies realistic region *geometry*; real H&E image
regions without labels supply realistic *textures*. Each mosaic is a random
square crop of the label map, resampled (nearest, pixel centres) to
``size x size``, randomly flipped/rotated, whose class regions are filled
with one of that class's textures: zoomed out by a random factor, quilted
from randomly placed, turned and flipped patches (no seams, no visible
periodicity) and colour-jittered. The label image is the class map itself, so a model
trained on mosaics has to learn texture -> class, and the boundaries it sees
follow real tissue geometry. Mosaics are *texture-synthetic*: no real slide
with these labels exists.

Held-out splits
---------------
Every split (``train``, ``val``, ``test``) owns disjoint rectangles of the
label map (fractions of its width and height, :data:`DEFAULT_SPLITS`) and
draws its crops entirely inside them, so no label geometry of the test split
is ever seen in training. Textures are held out too: each split uses only its
own band of rows of every texture (:data:`DEFAULT_TEXTURE_BANDS`).

Determinism
-----------
Mosaic ``i`` of the split at position ``k`` of ``splits`` is drawn with
``numpy.random.default_rng([seed, k, i])`` only, so the files depend on
nothing but the inputs and the parameters (bitwise: Pillow's PNG writer adds
no timestamps), and changing the count of one split changes no other mosaic.

Output folder
-------------
``{train,val,test}/images/NAME.png`` and ``{...}/labels/NAME.png``
    RGB mosaics and their uint8 label images (values ``0 .. n - 1``), the
    split-folder layout that :func:`wsiseg.training.pairs.load_pairs` reads.
``pairs.csv``
    The same pairs as ``image,annotation,split`` (relative paths).
``classes.yaml``
    The class table for ``wsiseg train --classes``.
``mosaics.yaml``
    Parameters, input files with their SHA-256, per-split class fractions
    and, per mosaic, its crop box, transform and textures.

The whole folder is written under a temporary name and renamed when complete
(:func:`wsiseg.atomic.atomic_output`).

Command line::

    python -m wsiseg.training.mosaic SPEC.yaml --data ../shared/data --out DIR

where ``SPEC.yaml`` holds the parameters (see :func:`load_spec`).

It stays one module (some 680 lines): building a mosaic set is one sequence
of steps around :func:`build_mosaics` (checks, inputs, the splits, the
tables, the manifest), and the spec file and command line are thin wrappers
of it; drawing one mosaic is :mod:`wsiseg.training.mosaic_draw`.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.atomic import atomic_output
from wsiseg.errors import WsisegError, one_line
from wsiseg.training.mosaic_draw import draw_mosaic

__all__ = [
    "DEFAULT_SPLITS",
    "default_data_root",
    "DEFAULT_TEXTURE_BANDS",
    "MosaicSet",
    "build_mosaics",
    "build_mosaics_from_spec",
    "load_spec",
    "main",
]

#: Label-map rectangles ``(x0, y0, x1, y1)`` (fractions of width, height) per split.
#: Horizontal bands; on the BCSS map the val and test bands have balanced classes.
DEFAULT_SPLITS: dict[str, list[tuple[float, float, float, float]]] = {
    "train": [(0.0, 0.0, 1.0, 0.2), (0.0, 0.35, 1.0, 0.65), (0.0, 0.8, 1.0, 1.0)],
    "val": [(0.0, 0.2, 1.0, 0.35)],
    "test": [(0.0, 0.65, 1.0, 0.8)],
}
#: Rows ``(y0, y1)`` (fractions of the height) of every texture that each split may use.
DEFAULT_TEXTURE_BANDS: dict[str, tuple[float, float]] = {
    "train": (0.0, 0.7),
    "val": (0.7, 0.85),
    "test": (0.85, 1.0),
}

MANIFEST_NAME = "mosaics.yaml"
CLASSES_NAME = "classes.yaml"
PAIRS_NAME = "pairs.csv"


@dataclass(frozen=True)
class MosaicSet:
    """What :func:`build_mosaics` wrote.

    Attributes
    ----------
    out_dir : pathlib.Path
    classes_path, pairs_path, manifest_path : pathlib.Path
    class_names : list of str
        In label-value order.
    counts : dict of str -> int
        Mosaics per split.
    class_fractions : dict of str -> list of float
        Per split, the fraction of label pixels of each class.
    """

    out_dir: Path
    classes_path: Path
    pairs_path: Path
    manifest_path: Path
    class_names: list[str]
    counts: dict[str, int]
    class_fractions: dict[str, list[float]]


# ---------------------------------------------------------------------------
# inputs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_label_map(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I"):
                raise WsisegError(f"label map must be single-channel, got mode {im.mode}", path)
            arr = np.asarray(im)
    except FileNotFoundError as exc:
        raise WsisegError("label map not found", path) from exc
    except WsisegError:
        raise
    except Exception as exc:
        raise WsisegError(f"cannot read label map: {one_line(exc)}", path) from exc
    if arr.ndim != 2 or arr.size == 0 or arr.max() > 255 or arr.min() < 0:
        raise WsisegError("label map must be a non-empty 2-D image with values 0..255", path)
    return arr.astype(np.uint8)


def _read_texture(path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB; RGBA composited on white."""
    from PIL import Image

    from wsiseg.slide.common import pil_rgb_on_white

    try:
        with Image.open(path) as im:
            im.load()
            return pil_rgb_on_white(im)
    except FileNotFoundError as exc:
        raise WsisegError("texture not found", path) from exc
    except Exception as exc:
        raise WsisegError(f"cannot read texture: {one_line(exc)}", path) from exc


def _code_lut(
    class_of_code: Mapping[int | str, str],
    class_names: Sequence[str],
    codes_csv: Path | None,
    present: np.ndarray,
    where: Path,
) -> np.ndarray:
    """uint8 LUT label-map code -> class value (255 for codes that are absent and unmapped)."""
    names: dict[str, int] = {}
    if codes_csv is not None:
        from wsiseg.training.annotations import read_value_names

        names = {n.casefold(): v for v, n in read_value_names(codes_csv).items()}
    value_of = {n: i for i, n in enumerate(class_names)}
    lut = np.full(256, 255, dtype=np.uint8)
    for code, cls in class_of_code.items():
        if isinstance(code, str) and not code.strip().lstrip("-").isdigit():
            if code.casefold() not in names:
                raise WsisegError(f"unknown label-map code name {code!r} (not in the codes table)", codes_csv or where)
            c = names[code.casefold()]
        else:
            c = int(code)
        if not 0 <= c <= 255:
            raise WsisegError(f"label-map code {c} is not in 0..255", where)
        if cls not in value_of:
            raise WsisegError(
                f"code {code!r} maps to {cls!r}, which has no textures (classes: {list(class_names)})", where
            )
        if lut[c] != 255 and lut[c] != value_of[cls]:
            raise WsisegError(f"label-map code {c} is mapped to two classes", where)
        lut[c] = value_of[cls]
    missing = [int(c) for c in present if lut[c] == 255]
    if missing:
        raise WsisegError(f"label-map codes {missing} are not mapped to a class (add them to class_of_code)", where)
    return lut


def _check_fraction_box(box: Sequence[float], what: str) -> tuple[float, ...]:
    b = tuple(float(v) for v in box)
    if len(b) != 4 or not (0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1):
        raise WsisegError(
            f"{what}: a rectangle must be (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1, got {list(box)}"
        )
    return b


def _overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ---------------------------------------------------------------------------
# the data set


def build_mosaics(
    label_map_path: str | os.PathLike,
    codes_csv: str | os.PathLike | None,
    textures: Mapping[str, Sequence[str | os.PathLike]],
    out_dir: str | os.PathLike,
    n: int | Mapping[str, int],
    size: int = 256,
    seed: int = 0,
    class_of_code: Mapping[int | str, str] | None = None,
    *,
    colors: Mapping[str, Sequence[int]] | None = None,
    splits: Mapping[str, Sequence[Sequence[float]]] | None = None,
    texture_bands: Mapping[str, Sequence[float]] | None = None,
    crop: tuple[float, float] = (0.1, 0.15),
    zoom: tuple[float, float] = (8.0, 40.0),
    jitter: float = 0.05,
    edge_blur: float = 0.7,
    max_class_fraction: float = 0.9,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> MosaicSet:
    """Write labelled texture mosaics built on a real label map's geometry.

    Parameters
    ----------
    label_map_path : path-like
        Single-channel label map (e.g. BCSS ``*_mag-BASE.png``).
    codes_csv : path-like, optional
        Code -> name table of the map (BCSS ``GTcodes.csv``), so that
        ``class_of_code`` may name codes (``"mostly_tumor"``).
    textures : mapping of str -> list of path-like
        Class name -> RGB(A) texture images. The mapping's order gives the
        label values ``0 .. n - 1``; the first class is background.
    out_dir : path-like
        Output folder (see the module docstring); refused if it exists
        unless ``overwrite``.
    n : int or mapping of str -> int
        Mosaics per split (an int: that many in every split).
    size : int
        Mosaic edge in pixels.
    seed : int
    class_of_code : mapping of int or str -> str
        Label-map code (value, or its name in ``codes_csv``) -> class name.
        Every code present in the map must be mapped.
    colors : mapping of str -> (r, g, b), optional
        Class colours for ``classes.yaml`` (default: wsiseg's palette).
    splits : mapping of str -> list of (x0, y0, x1, y1), optional
        Disjoint label-map rectangles per split, as fractions
        (default :data:`DEFAULT_SPLITS`).
    texture_bands : mapping of str -> (y0, y1), optional
        Rows of every texture per split (default
        :data:`DEFAULT_TEXTURE_BANDS`); must not overlap.
    crop : (float, float)
        Crop side range as fractions of the label map's short side.
    zoom : (float, float)
        Texture pixels per mosaic pixel, drawn log-uniformly (textures are
        box-filtered down by this factor).
    jitter : float
        Per-layer colour gain range ``1 +- jitter`` (per channel and overall).
    edge_blur : float
        Gaussian sigma (pixels) of the class masks when compositing, so that
        boundaries are not stair-stepped; labels stay hard.
    max_class_fraction : float
        Crops where one class covers more than this are redrawn (up to 25
        times; then the most mixed candidate is kept).
    overwrite : bool
    extra : mapping, optional
        Stored under ``extra`` in the manifest (e.g. the spec file).

    Returns
    -------
    MosaicSet

    Raises
    ------
    WsisegError
        Unreadable inputs, unmapped codes, overlapping splits, bad parameters.
    """
    label_map_path = Path(label_map_path)
    codes_csv = Path(codes_csv) if codes_csv is not None else None
    out = Path(out_dir)
    class_names = _check_parameters(textures, size, crop, zoom, jitter)
    if class_of_code is None:
        raise WsisegError("class_of_code is required: map every label-map code to a class")
    split_rects, bands = _check_splits(splits, texture_bands)
    counts = _split_counts(n, list(split_rects))

    cmap = _class_map(label_map_path, codes_csv, class_of_code, class_names)
    short = min(cmap.shape)
    side_range = (max(1, round(crop[0] * short)), max(1, round(crop[1] * short)))
    tex_files, tex_arrays = _read_textures(textures, class_names)
    draw = functools.partial(
        draw_mosaic,
        cmap,
        size=int(size),
        side_range=side_range,
        max_class_fraction=max_class_fraction,
        class_names=class_names,
        tex_files=tex_files,
        tex_arrays=tex_arrays,
        bands=bands,
        zoom=zoom,
        jitter=jitter,
        edge_blur=edge_blur,
    )

    with atomic_output(out, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        items, pair_rows, fractions = _write_splits(tmp, split_rects, counts, seed, cmap.shape, len(class_names), draw)
        _write_classes(tmp / CLASSES_NAME, class_names, colors)
        _write_pairs(tmp / PAIRS_NAME, pair_rows)
        parameters = {
            "n": counts, "size": int(size), "seed": int(seed), "crop": list(crop), "crop_pixels": list(side_range),
            "zoom": list(zoom), "jitter": jitter, "edge_blur": edge_blur,
            "max_class_fraction": max_class_fraction,
            "splits": {k: [list(b) for b in v] for k, v in split_rects.items()},
            "texture_bands": {k: list(bands[k]) for k in split_rects},
        }  # fmt: skip
        _write_manifest(
            tmp / MANIFEST_NAME,
            label_map_path,
            codes_csv,
            cmap.shape,
            class_of_code,
            class_names,
            tex_files,
            tex_arrays,
            parameters,
            fractions,
            extra,
            items,
        )
    return MosaicSet(out, out / CLASSES_NAME, out / PAIRS_NAME, out / MANIFEST_NAME, class_names, counts, fractions)


# ---------------------------------------------------------------------------
# the steps of build_mosaics: parameters, inputs, the mosaics of each split, the tables


def _check_parameters(
    textures: Mapping[str, Sequence[str | os.PathLike]],
    size: int,
    crop: tuple[float, float],
    zoom: tuple[float, float],
    jitter: float,
) -> list[str]:
    """The class names (in label-value order) after checking :func:`build_mosaics`' scalar parameters."""
    class_names = [str(c) for c in textures]
    if not class_names:
        raise WsisegError("no classes: textures must map at least one class to texture files")
    if len(set(class_names)) != len(class_names):
        raise WsisegError(f"class names must be unique, got {class_names}")
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise WsisegError(f"size must be an integer >= 8, got {size!r}")
    if not (0 < crop[0] <= crop[1] <= 1):
        raise WsisegError(f"crop must be (lo, hi) with 0 < lo <= hi <= 1, got {crop}")
    if not (0 < zoom[0] <= zoom[1]):
        raise WsisegError(f"zoom must be (lo, hi) with 0 < lo <= hi, got {zoom}")
    if not 0 <= jitter < 1:
        raise WsisegError(f"jitter must be in [0, 1), got {jitter}")
    return class_names


def _check_splits(
    splits: Mapping[str, Sequence[Sequence[float]]] | None, texture_bands: Mapping[str, Sequence[float]] | None
) -> tuple[dict[str, list[tuple[float, ...]]], dict[str, tuple[float, ...]]]:
    """Label-map rectangles and texture bands per split (defaults filled in), refused where splits would leak."""
    split_rects = {
        str(k): [_check_fraction_box(b, f"split {k!r}") for b in v] for k, v in (splits or DEFAULT_SPLITS).items()
    }
    for k, v in split_rects.items():
        if not v:
            raise WsisegError(f"split {k!r} has no rectangles")
    names = list(split_rects)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if any(_overlap(ra, rb) for ra in split_rects[a] for rb in split_rects[b]):
                raise WsisegError(f"splits {a!r} and {b!r} overlap on the label map: held-out geometry would leak")
    bands = {str(k): tuple(float(x) for x in v) for k, v in (texture_bands or DEFAULT_TEXTURE_BANDS).items()}
    for k in names:
        if k not in bands:
            raise WsisegError(f"no texture band for split {k!r}")
        y0, y1 = bands[k]
        if not 0 <= y0 < y1 <= 1:
            raise WsisegError(f"texture band of {k!r} must be (y0, y1) with 0 <= y0 < y1 <= 1, got {bands[k]}")
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if bands[a][0] < bands[b][1] and bands[b][0] < bands[a][1]:
                raise WsisegError(f"texture bands of {a!r} and {b!r} overlap: held-out textures would leak")
    return split_rects, bands


def _split_counts(n: int | Mapping[str, int], names: list[str]) -> dict[str, int]:
    """Mosaics per split, every split named (0 where ``n`` gives none)."""
    counts = {k: int(n) for k in names} if isinstance(n, (int, np.integer)) else {str(k): int(v) for k, v in n.items()}
    unknown = sorted(set(counts) - set(names))
    if unknown:
        raise WsisegError(f"counts given for unknown splits {unknown} (splits: {names})")
    counts = {k: counts.get(k, 0) for k in names}
    if any(c < 0 for c in counts.values()) or sum(counts.values()) == 0:
        raise WsisegError(f"mosaic counts must be >= 0 and not all 0, got {counts}")
    return counts


def _class_map(
    label_map_path: Path, codes_csv: Path | None, class_of_code: Mapping[int | str, str], class_names: list[str]
) -> np.ndarray:
    """The label map with its codes turned into class values."""
    raw = _read_label_map(label_map_path)
    lut = _code_lut(class_of_code, class_names, codes_csv, np.unique(raw), label_map_path)
    return lut[raw]


def _read_textures(
    textures: Mapping[str, Sequence[str | os.PathLike]], class_names: list[str]
) -> tuple[dict[str, list[Path]], dict[Path, np.ndarray]]:
    """Texture files per class and the image of each file."""
    tex_files = {c: [Path(p) for p in textures[c]] for c in class_names}
    for c, files in tex_files.items():
        if not files:
            raise WsisegError(f"class {c!r} has no textures")
    tex_arrays = {p: _read_texture(p) for files in tex_files.values() for p in files}
    for p, a in tex_arrays.items():
        if min(a.shape[:2]) < 8:
            raise WsisegError(f"texture is too small ({a.shape[1]}x{a.shape[0]}); at least 8x8 pixels", p)
    return tex_files, tex_arrays


def _write_splits(
    tmp: Path,
    split_rects: Mapping[str, Sequence[Sequence[float]]],
    counts: Mapping[str, int],
    seed: int,
    shape: tuple[int, int],
    nk: int,
    draw: Callable[[list[tuple[int, int, int, int]], str, np.random.Generator], tuple[np.ndarray, np.ndarray, dict]],
) -> tuple[list[dict], list[tuple[str, str, str]], dict[str, list[float]]]:
    """Every split's mosaics, drawn by ``draw`` (:func:`wsiseg.training.mosaic_draw.draw_mosaic`) on a label
    map of ``shape`` into ``tmp/SPLIT/{images,labels}``: their manifest entries, ``pairs.csv`` rows and class
    fractions per split."""
    from PIL import Image

    H, W = shape
    manifest_items: list[dict] = []
    fractions: dict[str, list[float]] = {}
    pair_rows: list[tuple[str, str, str]] = []
    for k_split, split in enumerate(split_rects):
        rects = [(round(b[0] * W), round(b[1] * H), round(b[2] * W), round(b[3] * H)) for b in split_rects[split]]
        rects = [r for r in rects if r[2] > r[0] and r[3] > r[1]]
        (tmp / split / "images").mkdir(parents=True, exist_ok=True)
        (tmp / split / "labels").mkdir(parents=True, exist_ok=True)
        hist = np.zeros(nk, dtype=np.int64)
        for i in range(counts[split]):
            rng = np.random.default_rng([int(seed), k_split, i])
            image, lab, record = draw(rects, split, rng)
            name = f"{split}-{i:04d}"
            Image.fromarray(image).save(tmp / split / "images" / f"{name}.png")
            Image.fromarray(lab).save(tmp / split / "labels" / f"{name}.png")
            pair_rows.append((f"{split}/images/{name}.png", f"{split}/labels/{name}.png", split))
            hist += np.bincount(lab.ravel(), minlength=nk)[:nk]
            manifest_items.append({"name": name, "split": split, **record})
        fractions[split] = [round(float(x), 4) for x in hist / max(hist.sum(), 1)]
    return manifest_items, pair_rows, fractions


def _write_classes(path: Path, class_names: list[str], colors: Mapping[str, Sequence[int]] | None) -> None:
    """``classes.yaml``: the class table for ``wsiseg train --classes``."""
    import yaml

    classes_doc: dict[str, list] = {"classes": []}
    for v, c in enumerate(class_names):
        entry: dict[str, Any] = {"value": v, "name": c}
        if colors and c in colors:
            entry["color"] = [int(x) for x in colors[c]]
        classes_doc["classes"].append(entry)
    path.write_text(yaml.safe_dump(classes_doc, sort_keys=False, default_flow_style=None), encoding="utf-8")


def _write_pairs(path: Path, pair_rows: list[tuple[str, str, str]]) -> None:
    """``pairs.csv``: ``image,annotation,split`` rows."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "annotation", "split"])
        w.writerows(pair_rows)


def _write_manifest(
    path: Path,
    label_map_path: Path,
    codes_csv: Path | None,
    shape: tuple[int, int],
    class_of_code: Mapping[int | str, str],
    class_names: list[str],
    tex_files: Mapping[str, list[Path]],
    tex_arrays: Mapping[Path, np.ndarray],
    parameters: dict[str, Any],
    fractions: dict[str, list[float]],
    extra: Mapping[str, Any] | None,
    items: list[dict],
) -> None:
    """``mosaics.yaml``: inputs with their SHA-256, parameters, class fractions and every mosaic's entry."""
    import yaml

    H, W = shape
    manifest = {
        "what": "texture mosaics on real label-map geometry (wsiseg.mosaic); not real annotated slides",
        "label_map": {"file": label_map_path.name, "sha256": _sha256(label_map_path), "size": [W, H]},
        "codes": None if codes_csv is None else {"file": codes_csv.name, "sha256": _sha256(codes_csv)},
        "class_of_code": {str(k): v for k, v in class_of_code.items()},
        "classes": class_names,
        "textures": {c: [{"file": p.name, "sha256": _sha256(p), "size": list(tex_arrays[p].shape[1::-1])}
                         for p in files] for c, files in tex_files.items()},
        "parameters": parameters,
        "class_fractions": fractions,
        "extra": dict(extra) if extra else None,
        "mosaics": items,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")


# ---------------------------------------------------------------------------
# spec files and the command line

_SPEC_KEYS = {"label_map", "codes", "classes", "n", "size", "seed", "crop", "zoom", "jitter", "edge_blur",
              "max_class_fraction", "splits", "texture_bands"}  # fmt: skip


def load_spec(path: str | os.PathLike, data_root: str | os.PathLike) -> dict[str, Any]:
    """Read a mosaic spec YAML into keyword arguments of :func:`build_mosaics`.

    Format (file paths relative to ``data_root``)::

        label_map: annotations/TCGA-...mag-BASE.png
        codes: annotations/sample_GTcodes.csv
        classes:                      # order = label values; first = background
          - name: background
            color: [0, 0, 0]
            textures: [textures/no-tissue.png]
            codes: [0, exclude]       # label-map values or names from `codes`
          - name: cellular
            textures: [textures/high-nuclei-score-level0.png]
            codes: [mostly_tumor]
        n: {train: 600, val: 100, test: 100}
        size: 256
        seed: 0
        # optional: crop, zoom, jitter, edge_blur, max_class_fraction, splits, texture_bands
    """
    import yaml

    path, root = Path(path), Path(data_root)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise WsisegError(f"cannot read mosaic spec: {one_line(exc)}", path) from exc
    if not isinstance(doc, dict):
        raise WsisegError("mosaic spec must be a mapping", path)
    unknown = sorted(set(doc) - _SPEC_KEYS)
    if unknown:
        raise WsisegError(f"unknown keys {unknown} in mosaic spec (known: {sorted(_SPEC_KEYS)})", path)
    for key in ("label_map", "classes", "n"):
        if key not in doc:
            raise WsisegError(f"mosaic spec needs {key!r}", path)
    classes = doc["classes"]
    if not isinstance(classes, list) or not classes:
        raise WsisegError("'classes' must be a non-empty list", path)
    textures: dict[str, list[Path]] = {}
    colors: dict[str, list[int]] = {}
    class_of_code: dict[int | str, str] = {}
    for k, c in enumerate(classes):
        if (
            not isinstance(c, dict)
            or not {"name", "textures", "codes"} <= set(c)
            or set(c) - {"name", "textures", "codes", "color"}
        ):
            raise WsisegError(
                f"class entry {k + 1} needs name, textures, codes (and optionally color), got {c!r}", path
            )
        name = str(c["name"])
        textures[name] = [root / str(p) for p in c["textures"]]
        if c.get("color") is not None:
            colors[name] = [int(x) for x in c["color"]]
        for code in c["codes"]:
            class_of_code[code] = name
    kwargs: dict[str, Any] = {
        "label_map_path": root / str(doc["label_map"]),
        "codes_csv": root / str(doc["codes"]) if doc.get("codes") else None,
        "textures": textures,
        "class_of_code": class_of_code,
        "colors": colors or None,
        "n": doc["n"],
    }
    for key in ("size", "seed", "jitter", "edge_blur", "max_class_fraction", "splits", "texture_bands"):
        if key in doc:
            kwargs[key] = doc[key]
    for key in ("crop", "zoom"):
        if key in doc:
            kwargs[key] = tuple(float(x) for x in doc[key])
    return kwargs


def build_mosaics_from_spec(
    spec: str | os.PathLike, data_root: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> MosaicSet:
    """:func:`build_mosaics` with the parameters of a spec file (see :func:`load_spec`)."""
    kwargs = load_spec(spec, data_root)
    spec = Path(spec)
    extra = {"spec": spec.name, "spec_sha256": _sha256(spec)}
    return build_mosaics(out_dir=out_dir, overwrite=overwrite, extra=extra, **kwargs)


def default_data_root() -> Path:
    """The shared data folder: ``$WSISEG_SHARED_DATA``, else ``../shared/data`` (from the project root)."""
    env = os.environ.get("WSISEG_SHARED_DATA")
    return Path(env) if env else Path("..") / "shared" / "data"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wsiseg.training.mosaic SPEC --out DIR [--data ROOT] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        prog="python -m wsiseg.training.mosaic",
        description="Build labelled texture mosaics on real label-map geometry (train/val/test held out).",
    )
    parser.add_argument("spec", help="mosaic spec YAML (e.g. pipelines/demo-data.yaml)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--data",
        default=None,
        help="folder the spec's paths are relative to [default: $WSISEG_SHARED_DATA or ../shared/data]",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        result = build_mosaics_from_spec(
            args.spec, args.data or default_data_root(), args.out, overwrite=args.overwrite
        )
    except WsisegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, c in result.counts.items():
        fr = ", ".join(f"{n} {f:.3f}" for n, f in zip(result.class_names, result.class_fractions[split]))
        print(f"{split}: {c} mosaics ({fr})")
    print(
        f"wrote {result.out_dir} (classes: {result.classes_path.name}, pairs: {result.pairs_path.name}, "
        f"manifest: {result.manifest_path.name})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
