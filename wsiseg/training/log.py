"""The training log: ``log.csv``, one row per epoch (:data:`LOG_COLUMNS`), rewritten atomically after each epoch;
:mod:`wsiseg.viz.charts` draws its curves.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wsiseg.atomic import atomic_output

__all__ = [
    "LOG_COLUMNS",
    "fmt",
    "write_log",
]

#: Columns of ``log.csv``, one row per epoch.
LOG_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "loss",
    "seg",
    "edge",
    "grad_seg",
    "grad_edge",
    "val_miou_deformed",
    "val_miou_full",
    "sec_per_iter",
)


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_log(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    with atomic_output(path, overwrite=True) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(LOG_COLUMNS)
        for row in history:
            w.writerow([fmt(row.get(c)) for c in LOG_COLUMNS])
