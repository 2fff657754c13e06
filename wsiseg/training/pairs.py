"""Training pairs: images and their annotations, found in a folder or listed in a CSV (:func:`load_pairs`),
split into train/val/test (:func:`split_pairs`) and fingerprinted (:func:`dataset_hash`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiseg.batch.inputs import SLIDE_EXTENSIONS
from wsiseg.errors import WsisegError
from wsiseg.limits import mpp_problem
from wsiseg.training.annotations import MASK_SUFFIXES, VECTOR_SUFFIXES

__all__ = [
    "PLAIN_IMAGE_SUFFIXES",
    "TrainingPair",
    "dataset_hash",
    "load_pairs",
    "split_pairs",
    "suffix",
    "with_mpp",
]

logger = logging.getLogger(__name__)

#: Images read whole with Pillow, one region each.
PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_SPLITS = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}  # fmt: skip
_LABEL_DIRS = ("labels", "masks", "annotations", "label", "mask", "gt")
_MASK_STEM_SUFFIXES = ("_mask", "_masks", "_label", "_labels", "_annotation", "_annotations", "_gt",
                       "-mask", "-masks", "-label", "-labels", ".mask", ".labels", ".label")  # fmt: skip
_MIB = 1 << 20


# ---------------------------------------------------------------------------
# pairs


@dataclass(frozen=True)
class TrainingPair:
    """An image (slide or plain image) and its annotation.

    Attributes
    ----------
    image : str
        Slide or image path.
    annotation : str
        Annotation path (QuPath GeoJSON, ASAP XML or label mask).
    split : str or None
        ``"train"``, ``"val"`` or ``"test"``; None lets :func:`split_pairs` decide.
    mpp : float or None
        Micrometres per level-0 pixel, overriding the slide's own.
    downsample : float or None
        Label masks: level-0 pixels per mask pixel (default 1).
    """

    image: str
    annotation: str
    split: str | None = None
    mpp: float | None = None
    downsample: float | None = None

    @property
    def name(self) -> str:
        """The image's file name without its extension(s)."""
        return _stem(Path(self.image))


def _stem(p: Path) -> str:
    name = p.name
    for suffix in (".ome.tiff", ".ome.tif", ".geojson.gz", ".json.gz", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem


def suffix(p: Path) -> str:
    name = p.name.lower()
    return name[len(_stem(p)) :]


def _norm_split(value: str | None, where: str | os.PathLike) -> str | None:
    if value is None or not str(value).strip():
        return None
    s = _SPLITS.get(str(value).strip().lower())
    if s is None:
        raise WsisegError(f"split must be train, val or test, got {value!r}", where)
    return s


def load_pairs(source: str | os.PathLike) -> list[TrainingPair]:
    """Find image/annotation pairs in a folder or a CSV file.

    CSV
        Header ``image,annotation`` plus optional ``split``, ``mpp``,
        ``downsample`` columns; relative paths resolve against the CSV's
        folder; every listed file must exist.
    Folder with ``images/`` and ``labels/`` (or ``masks/``, ``annotations/``)
        NuCLS style: ``images/NAME.png`` pairs with ``labels/NAME.*``.
    Flat folder
        Files grouped by stem: ``X.svs`` + ``X.geojson`` / ``X.xml`` /
        ``X.png`` / ``X_mask.tif`` ... Vector files and names ending in
        ``_mask``, ``_labels`` (and similar) are annotations; otherwise, of
        two rasters with one stem, the less image-like one (slide formats,
        then TIFF and JPEG, then PNG) is the label mask (``X.svs`` + ``X.tif``,
        ``X.tif`` + ``X.png``); a tie is an error. Images without an
        annotation are skipped (logged).
    Folder of split folders
        ``train/``, ``val/`` (``validation/``), ``test/`` subfolders, each
        one of the above; their pairs get that ``split``.

    Parameters
    ----------
    source : path-like

    Returns
    -------
    list of TrainingPair
        Sorted by image path (folders) or in file order (CSV).

    Raises
    ------
    WsisegError
        Missing source, bad CSV rows, ambiguous pairs, or no pairs at all
        (naming ``source``).
    """
    src = Path(source)
    if not src.exists():
        raise WsisegError("dataset source not found", src)
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise WsisegError("dataset source must be a folder or a .csv file", src)
        pairs = _pairs_from_csv(src)
    else:
        pairs = _pairs_from_folder(src, split=None)
        if not pairs:
            for sub in sorted(p for p in src.iterdir() if p.is_dir() and p.name.lower() in _SPLITS):
                pairs.extend(_pairs_from_folder(sub, split=_SPLITS[sub.name.lower()]))
    if not pairs:
        raise WsisegError(
            "no image/annotation pairs found (expected X.svs + X.geojson/.xml/.png, images/ + labels/, "
            "or a CSV with image,annotation columns)",
            src,
        )
    return pairs


def _pairs_from_csv(path: Path) -> list[TrainingPair]:
    try:
        text = path.read_text(encoding="utf-8-sig")
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise WsisegError(f"cannot read pairs CSV: {exc}", path) from exc
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise WsisegError("pairs CSV is empty", path)
    header = [c.strip().lower() for c in rows[0]]
    if "image" not in header or "annotation" not in header:
        raise WsisegError(f"pairs CSV header needs 'image' and 'annotation' columns, got {rows[0]}", path)
    known = {"image", "annotation", "split", "mpp", "downsample"}
    unknown = [c for c in header if c not in known]
    if unknown:
        raise WsisegError(f"pairs CSV has unknown columns {unknown} (known: {sorted(known)})", path)
    out = []
    for line, row in enumerate(rows[1:], start=2):
        rec = dict(zip(header, (c.strip() for c in row)))

        def err(msg: str, line: int = line) -> WsisegError:
            return WsisegError(f"line {line}: {msg}", path)

        files = {}
        for col in ("image", "annotation"):
            if not rec.get(col):
                raise err(f"empty {col}")
            p = Path(rec[col]).expanduser()
            p = p if p.is_absolute() else path.parent / p
            if not p.exists():
                raise err(f"{col} not found: {p}")
            files[col] = str(p)
        nums = {}
        for col in ("mpp", "downsample"):
            v = rec.get(col) or ""
            if not v:
                nums[col] = None
                continue
            try:
                nums[col] = float(v)
            except ValueError:
                raise err(f"{col} must be a number, got {v!r}") from None
            if not (math.isfinite(nums[col]) and nums[col] > 0):
                raise err(f"{col} must be positive, got {v!r}")
            if col == "mpp" and mpp_problem(v):
                raise err(mpp_problem(v) or "")
        try:
            split = _norm_split(rec.get("split"), path)
        except WsisegError as exc:
            raise err(exc.message) from None
        out.append(TrainingPair(files["image"], files["annotation"], split, nums["mpp"], nums["downsample"]))
    return out


def with_mpp(pairs: Sequence[TrainingPair], mpp: float | None) -> list[TrainingPair]:
    """``pairs`` with ``mpp`` (``--mpp``) set on those that give none (a CSV's mpp column wins)."""
    if mpp is None:
        return list(pairs)
    return [p if p.mpp is not None else dataclasses.replace(p, mpp=float(mpp)) for p in pairs]


def _is_image(p: Path) -> bool:
    s = suffix(p)
    if p.is_dir():
        return s.endswith(".zarr")
    return s in SLIDE_EXTENSIONS or s in PLAIN_IMAGE_SUFFIXES or s in (".ome.tif", ".ome.tiff")


def _is_annotation(p: Path) -> bool:
    return p.is_file() and (suffix(p) in VECTOR_SUFFIXES or suffix(p) in MASK_SUFFIXES)


def _image_rank(p: Path) -> int:
    """Higher is more image-like: slide formats > TIFF, JPEG > PNG."""
    s = suffix(p)
    if s == ".png":
        return 0
    if s in (".tif", ".tiff", ".jpg", ".jpeg"):
        return 1
    return 2


def _pairs_from_folder(folder: Path, split: str | None) -> list[TrainingPair]:
    entries = {p.name.lower(): p for p in folder.iterdir() if not p.name.startswith(".")}
    img_dir = entries.get("images")
    lab_dir = next((entries[d] for d in _LABEL_DIRS if d in entries and entries[d].is_dir()), None)
    if img_dir is not None and img_dir.is_dir() and lab_dir is not None:
        return _pairs_from_subfolders(img_dir, lab_dir, split)
    groups: dict[str, dict[str, list[Path]]] = {}
    for p in sorted(entries.values()):
        stem = _stem(p)
        low = stem.lower()
        mask_suffix = next((s for s in _MASK_STEM_SUFFIXES if low.endswith(s) and len(low) > len(s)), None)
        if _is_annotation(p) and (suffix(p) in VECTOR_SUFFIXES or mask_suffix):
            key = stem[: -len(mask_suffix)] if mask_suffix else stem
            groups.setdefault(key, {"img": [], "ann": []})["ann"].append(p)
        elif _is_image(p):
            groups.setdefault(stem, {"img": [], "ann": []})["img"].append(p)
    pairs = []
    for key, g in sorted(groups.items()):
        imgs, anns = sorted(g["img"], key=_image_rank, reverse=True), g["ann"]
        if (
            not anns
            and len(imgs) == 2
            and _image_rank(imgs[0]) > _image_rank(imgs[1])
            and suffix(imgs[1]) in MASK_SUFFIXES
        ):
            imgs, anns = imgs[:1], imgs[1:]
        if len(imgs) == 1 and len(anns) == 1:
            pairs.append(TrainingPair(str(imgs[0]), str(anns[0]), split))
        elif len(imgs) > 1 or len(anns) > 1:
            names = ", ".join(p.name for p in imgs + anns)
            raise WsisegError(f"ambiguous pair for {key!r}: {names} (list the pairs in a CSV instead)", folder)
        elif imgs:
            logger.info("%s: no annotation for %s, skipped", folder, imgs[0].name)
    return pairs


def _pairs_from_subfolders(img_dir: Path, lab_dir: Path, split: str | None) -> list[TrainingPair]:
    labels: dict[str, list[Path]] = {}
    for p in lab_dir.iterdir():
        if _is_annotation(p) and not p.name.startswith("."):
            labels.setdefault(_stem(p), []).append(p)
    pairs = []
    for img in sorted(p for p in img_dir.iterdir() if _is_image(p) and not p.name.startswith(".")):
        found = labels.get(_stem(img), [])
        if len(found) > 1:
            raise WsisegError(f"several labels for {img.name}: {', '.join(sorted(p.name for p in found))}", lab_dir)
        if found:
            pairs.append(TrainingPair(str(img), str(found[0]), split))
        else:
            logger.info("%s: no label for %s, skipped", lab_dir, img.name)
    return pairs


# ---------------------------------------------------------------------------
# splits and hashes


def split_pairs(
    pairs: Sequence[TrainingPair], val_fraction: float, seed: int = 0
) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """Split pairs (whole slides, never regions: no leakage) into train and val.

    Pairs with an explicit ``split`` keep it (``"test"`` pairs go to neither
    list). The others are ordered by a hash of ``(seed, image file name)``,
    and the first ``round(val_fraction * n)`` go to val: the assignment does
    not depend on the order of ``pairs``, and adding a pair moves at most one
    other. With ``0 < val_fraction < 1`` and at least two undecided pairs,
    each side gets at least one.

    Returns
    -------
    (train, val) : lists of TrainingPair
        In the order of ``pairs``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise WsisegError(f"val_fraction must be in [0, 1), got {val_fraction}")
    free = [i for i, p in enumerate(pairs) if p.split is None]
    n_val = round(val_fraction * len(free))
    if val_fraction > 0 and len(free) >= 2:
        n_val = min(max(n_val, 1), len(free) - 1)

    def key(i: int) -> tuple[str, str]:
        p = pairs[i]
        return hashlib.sha256(f"{seed}\0{Path(p.image).name}\0{p.image}".encode()).hexdigest(), p.image

    val_idx = set(sorted(free, key=key)[:n_val])
    train = [p for i, p in enumerate(pairs) if p.split == "train" or (p.split is None and i not in val_idx)]
    val = [p for i, p in enumerate(pairs) if p.split == "val" or i in val_idx]
    return train, val


def _file_digest(path: Path, *, whole: bool) -> dict[str, Any]:
    """Name, size and a SHA-256 of the content (whole, or first and last MiB)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        listing = [(str(p.relative_to(path)), p.stat().st_size) for p in files]
        return {"name": path.name, "files": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if whole or size <= 2 * _MIB:
            for block in iter(lambda: fh.read(_MIB), b""):
                h.update(block)
        else:
            h.update(fh.read(_MIB))
            fh.seek(size - _MIB)
            h.update(fh.read(_MIB))
    return {"name": path.name, "size": size, "sha256": h.hexdigest()}


def dataset_hash(pairs: Sequence[TrainingPair]) -> str:
    """Fingerprint of a dataset's content, for provenance and caches.

    SHA-256 over, for every pair in a canonical order: the image's file name,
    size and a SHA-256 of its first and last MiB (whole-slide images are
    gigabytes; headers and the end of the tile data differ between slides);
    the annotation's file name and the SHA-256 of its whole content (small,
    and every edit matters); and ``split``, ``mpp``, ``downsample``. Folders
    (OME-Zarr, DICOM) contribute their file names and sizes. Paths and
    modification times are left out, so a copied dataset hashes the same.

    Returns
    -------
    str
        64 hex digits.
    """
    records = []
    for p in pairs:
        try:
            rec = {
                "image": _file_digest(Path(p.image), whole=False),
                "annotation": _file_digest(Path(p.annotation), whole=True),
                "split": p.split,
                "mpp": p.mpp,
                "downsample": p.downsample,
            }
        except OSError as exc:
            raise WsisegError(f"cannot hash dataset file: {exc.strerror or exc}", exc.filename or p.image) from exc
        records.append(json.dumps(rec, sort_keys=True))
    h = hashlib.sha256()
    for r in sorted(records):
        h.update(r.encode())
        h.update(b"\n")
    return h.hexdigest()
