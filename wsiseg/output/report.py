"""Per-slide report (JSON) and batch summary (CSV).

The report records what was run and what came out, so a result can be
audited and reproduced later: slide geometry and pixel size (with where the
pixel size came from), model identity, class areas, how much of the slide was
actually sampled, what was decoded, timings, package versions and the
resolved configuration.

Areas are in square micrometres and millimetres only when the slide's pixel
size is known; otherwise they are ``None`` (never guessed) and the pixel
counts are the only areas reported.

Tissue is defined once, as :data:`TISSUE_DEFINITION` says (the text goes
into every report): the segmented pixels of every class except background
(value 0). ``percent_of_tissue`` of a class is its share of those pixels, so
the tissue classes sum to 100 % and background has none; ``percent_of_slide``
is the share of all level-0 pixels and sums to 100 % over all classes. The
tissue detector's own estimate is kept apart as ``detected_tissue_pixels``.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import io
import json
import math
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsiseg.atomic import atomic_output
from wsiseg.errors import WsisegError
from wsiseg.mpp import IgnoredMpp, mpp_pair
from wsiseg.output.classes import ClassInfo

__all__ = [
    "REPORT_FORMAT",
    "BACKGROUND_VALUE",
    "TISSUE_DEFINITION",
    "class_areas",
    "tissue_area",
    "SlideReport",
    "versions",
    "to_jsonable",
    "write_report_json",
    "read_report_json",
    "write_batch_csv",
]

# Version 2: percent_of_tissue is a share of the non-background classes (sums to 100), a tissue
# block, tissue_pixels renamed detected_tissue_pixels, mpp_ignored.
#: Identifies report files and their layout version.
REPORT_FORMAT = {"format": "wsiseg-report", "format_version": 2}

#: The class value that is not tissue (glass); value 0 by the convention of :mod:`wsiseg.output.classes`.
BACKGROUND_VALUE = 0

#: What ``percent_of_tissue`` is a share of, written into every report as ``tissue["definition"]``.
TISSUE_DEFINITION = (
    "tissue = the segmented level-0 pixels of every class except background (value 0); a class's "
    "percent_of_tissue is its share of them (the tissue classes sum to 100, background has none)"
)

# Distribution names whose versions go into every report (import name in the key).
_DISTRIBUTIONS = {
    "wsiseg": "wsiseg",
    "torch": "torch",
    "numpy": "numpy",
    "tifffile": "tifffile",
    "openslide": "openslide-python",
    "openslide_bin": "openslide-bin",
    "zarr": "zarr",
    "dask": "dask",
    "segmentation_models_pytorch": "segmentation-models-pytorch",
    "pillow": "pillow",
    "scikit-image": "scikit-image",
}


def _pixel_area_um2(mpp) -> float | None:
    """Area of one level-0 pixel in square micrometres, or None when unknown."""
    if mpp is None or (not np.isscalar(mpp) and None in tuple(mpp)):
        return None
    mx, my = mpp_pair(mpp)
    return mx * my


def class_areas(
    counts: Mapping[int, int] | np.ndarray,
    classes: Iterable[ClassInfo],
    mpp: float | tuple[float, float] | None,
    slide_pixels: int | None = None,
) -> list[dict]:
    """Area of every class from level-0 pixel counts.

    Parameters
    ----------
    counts : mapping of int to int, or numpy.ndarray
        Level-0 pixels per class value: a ``{value: count}`` mapping or a
        histogram indexed by value (e.g. ``np.bincount(mask, minlength=256)``).
    classes : iterable of ClassInfo
        The class table. Every class gets a row (zero when absent); values
        counted but missing from the table get a row named ``"value N"``.
    mpp : float or (float, float) or None
        Level-0 micrometres per pixel ``(x, y)``; None when unknown.
    slide_pixels : int, optional
        Level-0 pixels of the slide, for ``percent_of_slide``; default the
        sum of ``counts`` (a histogram of the whole mask).

    Returns
    -------
    list of dict
        Sorted by value, each with ``value``, ``name``, ``pixels``,
        ``area_um2`` and ``area_mm2`` (None without ``mpp``),
        ``percent_of_tissue`` (share of the non-background pixels, see
        :data:`TISSUE_DEFINITION`; None for background and when no pixel is
        tissue) and ``percent_of_slide``.

    Raises
    ------
    ConfigError
        ``mpp`` is not positive and finite.
    """
    if isinstance(counts, Mapping):
        table = {int(k): int(v) for k, v in counts.items()}
    else:
        hist = np.asarray(counts)
        if hist.ndim != 1:
            raise ValueError(f"counts histogram must be 1-D, got shape {hist.shape}")
        table = {int(v): int(n) for v, n in enumerate(hist.tolist()) if n}
    if any(n < 0 for n in table.values()):
        raise ValueError("pixel counts must not be negative")
    px_um2 = _pixel_area_um2(mpp)
    total = sum(table.values()) if slide_pixels is None else int(slide_pixels)
    tissue = sum(n for v, n in table.items() if v != BACKGROUND_VALUE)
    names = {c.value: c.name for c in classes}
    values = sorted(set(names) | {v for v, n in table.items() if n})
    rows = []
    for v in values:
        n = table.get(v, 0)
        um2 = None if px_um2 is None else n * px_um2
        rows.append(
            {
                "value": v,
                "name": names.get(v, f"value {v}"),
                "pixels": n,
                "area_um2": um2,
                "area_mm2": None if um2 is None else um2 / 1e6,
                "percent_of_tissue": 100.0 * n / tissue if tissue and v != BACKGROUND_VALUE else None,
                "percent_of_slide": 100.0 * n / total if total else None,
            }
        )
    return rows


def tissue_area(rows: Iterable[Mapping]) -> dict:
    """The tissue that ``percent_of_tissue`` refers to, from :func:`class_areas` rows.

    Parameters
    ----------
    rows : iterable of mapping
        Rows of :func:`class_areas` (or read back from a report).

    Returns
    -------
    dict
        ``definition`` (:data:`TISSUE_DEFINITION`), ``pixels``, ``area_um2``
        and ``area_mm2`` (None without an MPP) and ``percent_of_slide``
        (None for an empty slide), summed over the non-background rows.
    """
    tissue = [r for r in rows if r["value"] != BACKGROUND_VALUE]

    def total(key):
        values = [r.get(key) for r in tissue]
        return None if any(v is None for v in values) else float(sum(values))

    return {
        "definition": TISSUE_DEFINITION,
        "pixels": sum(int(r["pixels"]) for r in tissue),
        "area_um2": total("area_um2"),
        "area_mm2": total("area_mm2"),
        "percent_of_slide": total("percent_of_slide"),
    }


def versions() -> dict[str, str | None]:
    """Versions of Python, the platform and the packages results depend on.

    Read from installed package metadata (nothing is imported), so a package
    that is not installed is reported as None rather than failing.
    """
    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for key, dist in _DISTRIBUTIONS.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    if out["wsiseg"] is None:  # running from a source tree that is not installed
        from wsiseg import __version__

        out["wsiseg"] = __version__
    return out


def _box(r) -> list:
    if hasattr(r, "width") and hasattr(r, "x"):  # wsiseg.slide.tissue.Region
        return [int(r.x), int(r.y), int(r.width), int(r.height)]
    return list(r)


@dataclass
class SlideReport:
    """Everything worth knowing about one slide's run.

    Attributes
    ----------
    slide : str
        Slide path as given.
    width, height : int or None
        Level-0 size in pixels.
    mpp : (float, float) or None
        Level-0 micrometres per pixel ``(x, y)``.
    mpp_source : str
        Where ``mpp`` came from: ``"override"`` (``--mpp`` or a manifest's
        ``mpp``), ``"openslide"``, ``"tiff-resolution"``, ``"ome"``,
        ``"ngff"``, ``"ignored-implausible"`` or ``"missing"`` (see
        :class:`~wsiseg.slide.multiscale.Multiscale`).
    mpp_ignored : IgnoredMpp or dict or None
        The slide file's implausible MPP that was ignored (value, source and
        the plausible range), else None.
    vendor : str
        Slide format or scanner vendor.
    model : str or None
        Model file path.
    model_hash : str or None
        Hash of the model file's bytes.
    device : str or None
        Compute device used (``"cuda:0"``, ``"cpu"``...).
    mode : str
        ``"deformed"`` (deformed sampling) or ``"sliding-window"`` (the
        segmentation net on every level-0 window).
    regions : list of (x, y, w, h)
        Processed level-0 regions (:class:`~wsiseg.slide.tissue.Region`
        objects are accepted and stored as boxes).
    class_areas : list of dict
        Rows of :func:`class_areas`; the report adds ``tissue``
        (:func:`tissue_area` of them, with its definition).
    fraction_sampled : float or None
        Sampled positions over level-0 pixels of the slide.
    samples_on_glass : dict or None
        ``{"model": f, "uniform": u}``: fraction of the sampling points on
        glass by the tissue detector's mask, and the same for uniform grids
        of the same sizes over the same regions (None for sliding windows).
    folded_cells : int or None
        Cells of the sampling grids that fold (turn the wrong way at a
        corner, so the grid crosses itself: :func:`wsiseg.sampling.reverse.folded_cells`),
        summed over the regions; the reverse sampler gives the pixels such
        a cell may cover a best-effort solution. None for sliding windows.
    scale : dict or None
        How the grids were sized: ``{"mode": "physical",
        "sample_spacing_um": s, "mpp": [x, y], "max_grid": [h, w],
        "grids": n}`` at the model's sample spacing (``n`` regions and
        sub-boxes segmented), or ``{"mode": "pixels", "reason": ...}`` by
        the pixel rule (e.g. ``"slide has no MPP; pass --mpp"``); None for
        sliding windows.
    detected_tissue_pixels : int or None
        Level-0 pixels that the low-resolution tissue detector marked as
        tissue: for comparison only, not the base of ``percent_of_tissue``
        (the segmentation covers whole region boxes, glass included).
    gather : dict
        Read statistics (chunks and pixels decoded per level...).
    timings : dict of str to float
        Seconds per stage; ``"total"`` when the caller measured it.
    versions : dict
        :func:`versions` at the time the report was made.
    config : dict
        The resolved configuration.
    outputs : dict of str to str
        Output kind -> file name relative to the report.
    status : str
        ``"ok"``, ``"failed"``, ``"skipped"``...
    error : str or None
        One-line error message when the run failed.
    """

    slide: str
    width: int | None = None
    height: int | None = None
    mpp: tuple[float, float] | None = None
    mpp_source: str = "missing"
    mpp_ignored: IgnoredMpp | dict | None = None
    vendor: str = "unknown"
    model: str | None = None
    model_hash: str | None = None
    device: str | None = None
    mode: str = "deformed"
    regions: list = field(default_factory=list)
    class_areas: list[dict] = field(default_factory=list)
    fraction_sampled: float | None = None
    samples_on_glass: dict[str, float] | None = None
    folded_cells: int | None = None
    scale: dict | None = None
    detected_tissue_pixels: int | None = None
    gather: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict = field(default_factory=versions)
    config: dict = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    status: str = "ok"
    error: str | None = None

    @property
    def tissue(self) -> dict | None:
        """:func:`tissue_area` of ``class_areas``; None when there are none."""
        return tissue_area(self.class_areas) if self.class_areas else None

    @property
    def seconds_total(self) -> float | None:
        """``timings["total"]`` when recorded, else the sum of the stages."""
        return _seconds_total(self.timings)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict, format tag first."""
        d = {}
        for f in dataclasses.fields(self):
            d[f.name] = getattr(self, f.name)
            if f.name == "class_areas":  # the base of percent_of_tissue, next to it
                d["tissue"] = self.tissue
        d["slide"] = os.fspath(self.slide)
        d["regions"] = [_box(r) for r in self.regions]
        d["seconds_total"] = self.seconds_total
        return to_jsonable({**REPORT_FORMAT, **d})


def _seconds_total(timings: Mapping | None) -> float | None:
    if not timings:
        return None
    if "total" in timings:
        return float(timings["total"])
    return float(sum(float(v) for v in timings.values()))


def to_jsonable(obj: Any) -> Any:
    """Convert to plain JSON types: numpy scalars and arrays, paths, tuples.

    Non-finite floats become None (strict JSON has no NaN). Anything else
    unknown becomes its ``str`` so that writing a report never fails at the
    end of a long run.
    """
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k.item() if isinstance(k, np.generic) else k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(obj, key=str)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return obj.to_dict()
        return to_jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if hasattr(obj, "tolist"):  # torch tensors and other array types
        return to_jsonable(obj.tolist())
    return str(obj)


def _report_dict(report: SlideReport | Mapping) -> dict:
    return report.to_dict() if isinstance(report, SlideReport) else to_jsonable(dict(report))


def write_report_json(path: str | os.PathLike, report: SlideReport | Mapping, *, overwrite: bool = False) -> Path:
    """Write a slide report as indented JSON, atomically.

    Parameters
    ----------
    path : path-like
        Output ``.json`` file.
    report : SlideReport or mapping
        The report; a mapping is written as given (after conversion to
        JSON types).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
    """
    text = json.dumps(_report_dict(report), indent=2, sort_keys=False, allow_nan=False, ensure_ascii=False)
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return Path(path)


def read_report_json(path: str | os.PathLike) -> dict:
    """Read a report written by :func:`write_report_json` as a dict."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WsisegError(f"cannot read report: {exc}", path) from exc
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT["format"]:
        raise WsisegError("not a wsiseg report", path)
    return data


_FIXED_COLUMNS = (
    "slide",
    "status",
    "width",
    "height",
    "mpp",
    "mpp_y",
    "seconds_total",
    "fraction_sampled",
    "area_unit",
)


def _mpp_pair(mpp) -> tuple[float | None, float | None]:
    if mpp is None:
        return None, None
    if np.isscalar(mpp):
        return float(mpp), float(mpp)
    mx, my = mpp
    return mx, my


def write_batch_csv(
    path: str | os.PathLike, reports: Sequence[SlideReport | Mapping], *, overwrite: bool = False
) -> Path:
    """One row per slide: identity, status, size, time, sampling and class areas.

    Columns are ``slide, status, width, height, mpp, mpp_y, seconds_total,
    fraction_sampled, area_unit`` and then ``area_<class name>`` for the union
    of class names over all reports (ordered by class value, then name).
    Areas are in mm² (``area_unit`` ``"mm2"``) when the slide's pixel size is
    known and in level-0 pixels (``"px"``) otherwise; ``mpp`` is the
    x pixel size. Missing values are empty cells.

    Parameters
    ----------
    path : path-like
        Output ``.csv`` file, written atomically.
    reports : sequence of SlideReport or mapping
        Reports, or dicts as returned by :func:`read_report_json`.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
    """
    dicts = [_report_dict(r) for r in reports]
    seen: dict[str, tuple] = {}
    for d in dicts:
        for row in d.get("class_areas") or ():
            seen.setdefault(row["name"], (row.get("value", 256), row["name"]))
    column = {name: f"area_{name}" for name in seen}
    for name, col in column.items():
        if col in _FIXED_COLUMNS:  # a class literally named "unit"
            column[name] = f"{col}_class"
    class_cols = [column[name] for name in sorted(seen, key=lambda n: seen[n])]
    rows = []
    for d in dicts:
        mx, my = _mpp_pair(d.get("mpp"))
        unit = "mm2" if mx is not None else "px"
        timings = d.get("timings")
        total = d.get("seconds_total")
        row = {
            "slide": d.get("slide"),
            "status": d.get("status"),
            "width": d.get("width"),
            "height": d.get("height"),
            "mpp": mx,
            "mpp_y": my,
            "seconds_total": total if total is not None else _seconds_total(timings),
            "fraction_sampled": d.get("fraction_sampled"),
            "area_unit": unit if d.get("class_areas") else None,
        }
        for c in d.get("class_areas") or ():
            area = c.get("area_mm2") if unit == "mm2" else c.get("pixels")
            row[column[c["name"]]] = area
        rows.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*_FIXED_COLUMNS, *class_cols], restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    with atomic_output(path, overwrite=overwrite) as tmp:
        # utf-8 without BOM; newline="" so csv's own line endings are kept
        tmp.write_text(buf.getvalue(), encoding="utf-8", newline="")
    return Path(path)
