"""Fingerprints and done markers: when a slide of a batch counts as done.

``<name>.done.json`` in the output folder is a slide's completion certificate (see Output folder in
:mod:`wsiseg.batch.runner`); :func:`make_fingerprint` and :func:`slide_fingerprint` say what it certifies.

Resume
------
Without ``overwrite`` a slide is skipped when its done marker exists, records
the same fingerprint (:func:`make_fingerprint` of the model hash and the
resolved config, combined with the slide's manifest overrides), the same
source slide (file name and, for files, size: folders may move between
mounts), and every listed output file still exists. Otherwise it is redone:
its old marker is removed first and the process function is told to replace
existing outputs. ``overwrite`` redoes every slide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from wsiseg.atomic import atomic_output
from wsiseg.batch.jobs import SlideJob, now
from wsiseg.errors import ConfigError, WsisegError

__all__ = [
    "DONE_REASON",
    "done_state",
    "is_done",
    "make_fingerprint",
    "marker_path",
    "marker_run",
    "slide_fingerprint",
    "write_marker",
]

DONE_REASON = "done with the same model and config"

_DONE_SUFFIX = ".done.json"
_MARKER_FORMAT = "wsiseg-done"
_MARKER_VERSION = 1


def _canonical(obj: Any) -> Any:
    """A JSON-ready copy of ``obj`` whose serialisation does not depend on spelling.

    Dict keys become strings, tuples and sets lists, integral floats ints
    (``1`` and ``1.0`` in a YAML file mean the same config).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return int(obj) if math.isfinite(obj) and obj.is_integer() else obj
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [_canonical(v) for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return _canonical(obj.value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _canonical(dataclasses.asdict(obj))
    if hasattr(obj, "model_dump"):  # pydantic models
        return _canonical(obj.model_dump(mode="json"))
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return _canonical(obj.tolist())
    raise ConfigError(f"config value of type {type(obj).__name__} cannot be fingerprinted: {obj!r}")


def _digest(obj: Any) -> str:
    text = json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make_fingerprint(model_hash: str, config: dict) -> str:
    """SHA-256 (hex) of the model hash and resolved config as canonical JSON.

    Stable across dict key order, tuples vs lists and ``1`` vs ``1.0``.

    Parameters
    ----------
    model_hash : str
        E.g. :func:`wsiseg.hashing.file_hash` of the model file.
    config : dict
        The resolved configuration that affects outputs.

    Raises
    ------
    ConfigError
        A config value is not JSON-like.
    """
    return _digest({"model": str(model_hash), "config": config})


def slide_fingerprint(fingerprint: str, job: SlideJob) -> str:
    """The batch fingerprint combined with the slide's manifest overrides.

    Equal to ``fingerprint`` when the job has no overrides, so changing a
    slide's ``mpp`` in a manifest redoes that slide only.
    """
    if not job.overrides:
        return fingerprint
    return _digest({"batch": fingerprint, "overrides": job.overrides})


def marker_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}{_DONE_SUFFIX}"


def _source_size(path: str) -> int | None:
    with contextlib.suppress(OSError):
        if os.path.isfile(path):
            return os.path.getsize(path)
    return None


def done_state(job: SlideJob, out_dir: Path, fingerprint: str) -> tuple[bool, str]:
    """``(done, why)``: whether a slide can be skipped, and why it cannot."""
    marker = marker_path(out_dir, job.name)
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False, "not done yet"
    except (OSError, ValueError):
        return False, "done marker unreadable"
    if not isinstance(data, dict) or data.get("format") != _MARKER_FORMAT:
        return False, "done marker unreadable"
    if data.get("fingerprint") != slide_fingerprint(fingerprint, job):
        return False, "model or config changed"
    if data.get("slide_name") != Path(job.path).name or data.get("slide_size") != _source_size(job.path):
        return False, "source slide changed"
    outputs = data.get("outputs")
    if not isinstance(outputs, dict):
        return False, "done marker unreadable"
    for rel in outputs.values():
        if not (out_dir / str(rel)).exists():
            return False, f"output missing: {rel}"
    return True, DONE_REASON


def is_done(job: SlideJob, out_dir: str | os.PathLike, fingerprint: str) -> bool:
    """True when ``job`` was completed in ``out_dir`` with the same fingerprint.

    The done marker must exist and match the slide fingerprint (see
    :func:`slide_fingerprint`) and source slide, and every output it lists
    must still exist.
    """
    return done_state(job, Path(out_dir), fingerprint)[0]


def marker_run(out_dir: Path, name: str) -> tuple[str, dict[str, str]] | None:
    """``(run id, outputs)`` recorded in a done marker by a distributed batch, or None."""
    try:
        data = json.loads(marker_path(out_dir, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("run"), str) or not isinstance(data.get("outputs"), dict):
        return None
    return data["run"], {str(k): str(v) for k, v in data["outputs"].items()}


def write_marker(
    job: SlideJob, out_dir: Path, fingerprint: str, outputs: dict[str, str], run_id: str | None = None
) -> None:
    rel: dict[str, str] = {}
    for kind, value in outputs.items():
        p = Path(value)
        full = p if p.is_absolute() else out_dir / p
        if not full.exists():
            raise WsisegError(f"the process function reported output {kind!r} = {value}, which does not exist")
        try:
            rel[str(kind)] = full.resolve().relative_to(out_dir.resolve()).as_posix()
        except ValueError:  # outside the output folder: keep it absolute
            rel[str(kind)] = str(full.resolve())
    data = {
        "format": _MARKER_FORMAT,
        "version": _MARKER_VERSION,
        "fingerprint": fingerprint,
        "slide": job.path,
        "slide_name": Path(job.path).name,
        "slide_size": _source_size(job.path),
        "overrides": _canonical(job.overrides),
        "outputs": rel,
        "finished_at": now(),
    }
    if run_id is not None:
        data["run"] = run_id
    with atomic_output(marker_path(out_dir, job.name), overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
