"""Batch semantics around a per-slide function: inputs, status, resume, locks, progress.

The per-slide work (open, sample, segment, write) is a *process* function
supplied by the caller (see :class:`ProcessFn`); this module decides which
slides to run, runs every one of them even after failures, and records the
truth about each in the output folder.

Inputs (:func:`expand_inputs`)
------------------------------
Each input is, in this order of precedence:

* a ``.csv`` file: a **manifest**. Its header must have a ``path`` column;
  ``mpp`` (micrometres per level-0 pixel) and ``name`` (output stem) are
  optional; any other column is kept, as text, in :attr:`SlideJob.overrides`.
  Relative paths resolve against the manifest's folder. Every row is one
  slide and must exist; a bad row stops everything with an error naming the
  manifest and line (better than failing hours into a batch).
* an existing **file**: one slide, whatever its extension.
* an existing **directory** that is itself a slide: an OME-Zarr store (name
  ending ``.zarr`` or NGFF metadata inside) or a DICOM series folder (it holds
  ``.dcm`` files or files with the DICOM ``DICM`` magic, and no files with a
  slide extension).
* any other existing **directory**: scanned *one level deep* (not recursed,
  so an output folder or an MRXS data folder inside is never mistaken for
  slides) for files with a slide extension (:data:`SLIDE_EXTENSIONS`) and for
  slide directories (OME-Zarr, DICOM series). Loose ``.dcm`` files beside
  other slides count as one more slide, the directory itself. Hidden entries
  are ignored. For deeper trees use a glob such as ``'data/**/*.svs'``.
* a **glob** pattern (``*``, ``?``, ``[...]``; ``**`` recurses): every match
  is treated exactly as if it had been typed as an input, as a shell would
  expand it. ``**`` follows symlinked folders but enters each real folder
  once, so symlink loops (``a/up -> ..``) cannot make the expansion endless;
  symlinked slide files match like any file.

A DICOM instance file (``.dcm``) stands for its series folder, so the
several files of one slide become one job. Anything under ``exclude`` (the
output folder) is never taken from a directory scan or glob. Inputs that
match nothing are an error naming them; the same slide reached twice (same
real path) is kept once. Output names (:attr:`SlideJob.name`) are the file
stem (``.ome.tiff`` and ``.zarr`` stripped); stems that collide (two
``slide.svs`` in different folders, compared case-insensitively) get the
shortest run of parent folder names that tells them apart
(``site-a_slide``), then the extension (``slide_svs`` beside
``slide_tiff``), deterministically. Names therefore depend on which slides
are in the batch; give a ``name`` column in a manifest to pin them.

Output folder
-------------
``status.csv``
    One row per slide: ``slide, name, status, seconds, error, finished_at``.
    ``status`` is ``ok``, ``failed`` or ``skipped`` (``error`` then holds the
    error or the reason for the skip), or ``pending`` for slides not reached
    yet. Rewritten atomically after every slide, so a crash leaves a truthful
    file. Runs sharing a folder merge their rows under an flock on the folder:
    each slide keeps its most recent outcome, a run's slides not reached yet
    show ``pending`` unless another run finished them meanwhile, and rows of
    earlier runs stay unless pending.
``<name>.done.json``
    The completion certificate, written last and atomically after the process
    function returned ``ok`` and all its outputs exist: slide fingerprint,
    source file name and size, output files, time. Outputs without it are
    never treated as complete (Ctrl-C, a crash or a full disk leave none).
``<name>.lock``
    Held while a slide is processed (see Locking).

Resume
------
Without ``overwrite`` a slide is skipped when its done marker exists, records
the same fingerprint (:func:`make_fingerprint` of the model hash and the
resolved config, combined with the slide's manifest overrides), the same
source slide (file name and, for files, size: folders may move between
mounts), and every listed output file still exists. Otherwise it is redone:
its old marker is removed first and the process function is told to replace
existing outputs. ``overwrite`` redoes every slide.

Locking
-------
Two runs may share an output folder. A slide is processed only under
``<name>.lock``, created with ``O_CREAT | O_EXCL`` and holding the owner's
pid, host name, boot id and process start time; it is removed afterwards. A
run that finds a lock whose owner is alive skips the slide ("being processed
by another run"). A lock from this host whose process is gone (or was
rebooted away, or whose pid now belongs to another process) is stale and
taken over. A lock from **another host** (shared storage; containers count as
hosts) cannot be checked, so it is respected until it is older than
``lock_timeout`` (default 6 h). Its age counts from the last heartbeat: the
owner touches the lock whenever it reports progress, at most once a minute.
If you know such a run is dead, delete its ``.lock`` file. ``O_EXCL`` is
atomic on local disks and NFSv3+; taking over a stale lock renames it aside
and checks that what was moved is what was judged stale.

Interruption, errors, full disks
--------------------------------
A :class:`~wsiseg.errors.WsisegError` fails the slide with its one-line
message; an ``OSError`` with its reason (``disk full: No space left on
device ...``); anything else with ``internal error: Type: message``. The
batch goes on. ``KeyboardInterrupt`` marks the current slide ``failed`` with
``interrupted``, writes the status, releases the lock and propagates (the CLI
exits 130). Writes go through :func:`wsiseg.atomic.atomic_output`, so no
partial file is ever left under a final name; if even ``status.csv`` cannot be
written, a warning is reported and the batch goes on. A run killed outright
(``kill -9``) leaves its lock and temporaries (``.NAME.*.tmp-PID``,
``.NAME.*.old-PID``); the next run that takes over the stale lock removes
them.

Time limit
----------
Without a limit (the default) every slide runs in the batch's own process,
and a slide that never finishes (a read that blocks, a library stuck in a
loop) stalls the batch. With ``slide_timeout`` each slide runs in a worker
process of its own (:mod:`wsiseg.batch.isolated`), which is killed when the time
is up: the slide is ``failed`` with ``timed out after N s``, its temporaries
are removed and the batch goes on. A worker process that dies (a segfault,
the out-of-memory killer) fails only its slide too. The worker's pid is
recorded in the slide's lock. Each slide then pays for a new interpreter
(and, for ``wsiseg segment``, for loading the model again). Distributed
batches apply the same limit on their workers.

Progress
--------
``"tty"``: tqdm bars on ``stream``, one for slides (with ETA) and one for the
current slide's stage. ``"jsonl"``: one JSON object per line with ``event``
(``batch_start``, ``slide_start``, ``stage``, ``slide_done``, ``warning``,
``batch_done``), ``time`` (ISO 8601) and the event's fields. ``"auto"`` picks
``tty`` when ``stream`` is a terminal, else ``jsonl``. ``"none"`` is silent.

Where slides run
----------------
A batch is three parts: :func:`plan_slide` decides run or skip (the resume
rules), :func:`execute_slide` locks, processes and certifies one slide, and
:class:`BatchRecorder` writes ``status.csv`` and the progress events.
:func:`run_batch` runs them in this process; :mod:`wsiseg.batch.dask` plans
and records in the client and runs :func:`execute_slide` on dask workers
that share the output folder, so both follow the same rules. A dask
scheduler reruns a task only after losing the worker that ran it, so a lock
written by the same distributed batch (its ``run`` id) is taken over even
from another host; temporaries left by a killed lock owner are removed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import enum
import errno
import fnmatch
import glob
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from wsiseg.atomic import atomic_output
from wsiseg.errors import ConfigError, WsisegError, one_line
from wsiseg.limits import mpp_problem
from wsiseg.slide.open import has_dicom_magic

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "DONE_REASON",
    "SLIDE_EXTENSIONS",
    "STATUS_FILE",
    "BatchRecorder",
    "BatchResult",
    "ProcessFn",
    "ProgressFn",
    "SlideJob",
    "SlideOutcome",
    "SlideResult",
    "check_batch",
    "execute_slide",
    "expand_inputs",
    "is_done",
    "make_fingerprint",
    "plan_slide",
    "release_lost_slide",
    "run_batch",
    "slide_fingerprint",
    "describe_error",
    "remove_temporaries",
]

#: File extensions taken as slides when a directory is scanned (lower case).
SLIDE_EXTENSIONS = frozenset(
    {".svs", ".tif", ".tiff", ".btf", ".tf8", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide"}
)
#: Seconds after which a lock from another host (not checkable) is taken over.
DEFAULT_LOCK_TIMEOUT = 6 * 3600.0
STATUS_FILE = "status.csv"
STATUS_COLUMNS = ("slide", "name", "status", "seconds", "error", "finished_at")
DONE_REASON = "done with the same model and config"
INTERRUPTED = "interrupted"

_DONE_SUFFIX = ".done.json"
_LOCK_SUFFIX = ".lock"
_MARKER_FORMAT = "wsiseg-done"
_MARKER_VERSION = 1
_ZARR_META = (".zattrs", ".zgroup", "zarr.json")
_DICOM_MAGIC_PROBE = 20  # files checked for the DICM magic when none ends in .dcm
_RESERVED_NAMES = frozenset({"status"})  # would collide with status.csv's stem
_HEARTBEAT_S = 60.0
_UNREADABLE_LOCK_GRACE_S = 60.0  # an empty lock may be one being written right now
_JSON_STAGE_INTERVAL_S = 1.0

Status = Literal["ok", "failed", "skipped"]
_STATUSES = ("ok", "failed", "skipped")


# ---------------------------------------------------------------------------
# data types


def _name_problem(name: object) -> str | None:
    """Why ``name`` cannot be an output stem, or None when it can."""
    if not isinstance(name, str) or not name.strip():
        return "output name is empty"
    if name != name.strip():
        return f"output name {name!r} has leading or trailing spaces"
    if "/" in name or "\\" in name or "\x00" in name:
        return f"output name {name!r} contains a path separator"
    if name.startswith("."):
        return f"output name {name!r} starts with '.' (hidden or relative)"
    if any(ord(c) < 32 for c in name):
        return f"output name {name!r} contains control characters"
    return None


@dataclass(frozen=True)
class SlideJob:
    """One slide to process.

    Attributes
    ----------
    path : str
        Absolute path of the slide file or slide directory (OME-Zarr, DICOM
        series folder).
    name : str
        Output stem, unique (case-insensitively) within a batch; every output
        of the slide is named from it.
    overrides : dict
        Per-slide settings from a manifest: ``mpp`` as a float, other columns
        as text. Part of the slide's fingerprint.
    """

    path: str
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = _name_problem(self.name)
        if problem:
            raise ConfigError(problem, self.path)


@dataclass(frozen=True)
class SlideOutcome:
    """What the process function reports for one slide.

    Attributes
    ----------
    status : {"ok", "failed", "skipped"}
    seconds : float
        Wall time; :func:`run_batch` replaces it with its own measurement.
    error : str or None
        One-line error for ``failed``, reason for ``skipped``.
    outputs : dict of str -> str
        Kind (e.g. ``"mask"``) -> file written, absolute or relative to the
        output folder. Recorded in the done marker and checked on resume.
    """

    status: Status
    seconds: float = 0.0
    error: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"SlideOutcome.status must be one of {_STATUSES}, got {self.status!r}")


@dataclass(frozen=True)
class SlideResult:
    """One row of ``status.csv``: a job, its outcome and when it finished."""

    job: SlideJob
    outcome: SlideOutcome
    finished_at: str

    @property
    def status(self) -> str:
        return self.outcome.status

    @property
    def error(self) -> str | None:
        return self.outcome.error

    @property
    def seconds(self) -> float:
        return self.outcome.seconds


@dataclass(frozen=True)
class BatchResult:
    """Everything a batch did.

    Attributes
    ----------
    results : list of SlideResult
        One per job, in job order.
    status_path : pathlib.Path
        The ``status.csv`` written.
    seconds : float
        Wall time of the batch.
    """

    results: list[SlideResult]
    status_path: Path
    seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        """Number of slides per status (``ok``, ``failed``, ``skipped``)."""
        out = dict.fromkeys(_STATUSES, 0)
        for r in self.results:
            out[r.status] += 1
        return out

    @property
    def exit_code(self) -> int:
        """0 when every slide is ``ok`` or ``skipped``, else 1."""
        return 0 if all(r.status != "failed" for r in self.results) else 1


class ProgressFn(Protocol):
    """Progress reporter handed to the process function.

    ``stage`` names the current step (``"read"``, ``"segment"``, ...);
    ``fraction`` is its completion in [0, 1]. Calls are cheap and never raise.
    """

    def __call__(self, stage: str, fraction: float) -> None: ...


class ProcessFn(Protocol):
    """The per-slide function :func:`run_batch` calls (written by the segmenter).

    Parameters
    ----------
    job : SlideJob
    out_dir : pathlib.Path
        The batch output folder (exists, writable). Outputs are named from
        ``job.name``; write each through :func:`wsiseg.atomic.atomic_output`.
    fingerprint : str
        The slide's fingerprint (:func:`slide_fingerprint`), for reports.
    overwrite : bool
        True: replace existing outputs of this slide. :func:`run_batch` calls
        the function only for slides it has decided to (re)do, and under the
        slide's lock, so it always passes True.
    progress : ProgressFn
        Report ``progress(stage, fraction)``.

    Returns
    -------
    SlideOutcome
        Raising is fine too: :class:`~wsiseg.errors.WsisegError` and other
        exceptions fail the slide with their message.
    """

    def __call__(
        self, job: SlideJob, out_dir: Path, *, fingerprint: str, overwrite: bool, progress: ProgressFn
    ) -> SlideOutcome: ...


# ---------------------------------------------------------------------------
# input expansion


def _is_zarr_dir(p: Path) -> bool:
    return p.suffix.lower() == ".zarr" or any((p / m).exists() for m in _ZARR_META)


def _dicom_files(p: Path) -> bool:
    """True when a folder holds DICOM instances (``*.dcm`` or the ``DICM`` magic)."""
    try:
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    except OSError:
        return False
    if any(f.suffix.lower() == ".dcm" for f in files):
        return True
    # DICOM files often have no extension
    return any(has_dicom_magic(f) for f in files[:_DICOM_MAGIC_PROBE])


def _has_slide_files(p: Path) -> bool:
    try:
        return any(f.suffix.lower() in SLIDE_EXTENSIONS for f in p.iterdir())
    except OSError:
        return False


def _is_dicom_dir(p: Path) -> bool:
    """A DICOM series folder: DICOM files and no other slide files (those win)."""
    return _dicom_files(p) and not _has_slide_files(p)


def _is_slide_dir(p: Path) -> bool:
    return _is_zarr_dir(p) or _is_dicom_dir(p)


def _slide_path(p: Path) -> Path:
    """The slide a path stands for: a DICOM instance stands for its series folder."""
    if p.is_file() and p.suffix.lower() == ".dcm":
        return p.parent
    return p


def _scan_dir(d: Path) -> list[Path]:
    """Slide-like entries of a plain directory, one level deep, sorted.

    Loose DICOM files beside other slides form one more slide: the folder.
    """
    try:
        entries = sorted(d.iterdir())
    except OSError as exc:
        raise WsisegError(f"cannot list directory: {exc.strerror or exc}", d) from exc
    found: list[Path] = []
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.is_dir():
            if _is_slide_dir(e):
                found.append(e)
        elif e.suffix.lower() in SLIDE_EXTENSIONS:
            found.append(e)
    if found and any(e.suffix.lower() == ".dcm" and e.is_file() for e in entries):
        found.append(d)
    return found


def _walk_once(top: str) -> Iterator[tuple[str, list[str]]]:
    """``top`` and every folder below it, each *real* folder once, with its other entries.

    Hidden entries are skipped, as ``**`` skips them. Symlinked folders are
    entered (data is often linked in from other disks) but a folder already
    visited under another path is not: a symlink loop (``a/up -> ..``)
    would otherwise be followed until paths grow too long, and two such
    links make ``glob.glob`` take forever.

    Yields
    ------
    (folder, entries)
        Sorted paths of the folder's non-folder entries (files, symlinks to
        files, broken symlinks).
    """
    seen: set[str] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder or ".")
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder or "."), key=lambda e: e.name)
        except OSError:
            continue  # unreadable folders are skipped, as glob.glob skips them
        folders, others = [], []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:  # e.g. a symlink to itself (ELOOP)
                is_dir = False
            (folders if is_dir else others).append(os.path.join(folder, e.name))
        yield folder, others
        stack.extend(reversed(folders))


def _glob_parts(base: str, parts: list[str]) -> Iterator[str]:
    """Paths under ``base`` matching the pattern components ``parts`` (see :func:`_glob`)."""
    if not parts:
        yield base
        return
    part, rest = parts[0], parts[1:]
    if part == "**":
        for folder, others in _walk_once(base):
            if rest:
                yield from _glob_parts(folder, rest)
            else:  # a trailing ** matches every folder and file below
                yield folder
                yield from others
    elif part == "":  # 'a//b' or a trailing '/': folders only
        if os.path.isdir(base or "."):
            yield from _glob_parts(base, rest)
    elif glob.has_magic(part):
        try:
            names = os.listdir(base or ".")
        except OSError:
            return
        if not part.startswith("."):
            names = [n for n in names if not n.startswith(".")]
        for name in sorted(fnmatch.filter(names, part)):
            path = os.path.join(base, name)
            if not rest:
                yield path
            elif os.path.isdir(path):
                yield from _glob_parts(path, rest)
    else:
        path = os.path.join(base, part)
        if not rest:
            if os.path.lexists(path):
                yield path
        elif os.path.isdir(path):
            yield from _glob_parts(path, rest)


def _glob(pattern: str) -> list[str]:
    """Sorted matches of a glob pattern, like ``glob.glob(pattern, recursive=True)``.

    The difference: ``**`` enters each real folder once (:func:`_walk_once`),
    so symlink loops cannot make the expansion endless. Symlinked slide files
    and symlinked folders outside the loop are matched as before.
    """
    parts = pattern.split("/")
    base = "/" if parts[0] == "" and len(parts) > 1 else ""
    if base:
        parts = parts[1:]
    return sorted(dict.fromkeys(_glob_parts(base, parts)))


def _under(p: Path, roots: Sequence[Path]) -> bool:
    rp = Path(os.path.realpath(p))
    return any(rp == r or r in rp.parents for r in roots)


def _expand_path(p: Path, roots: Sequence[Path], *, explicit: bool) -> list[Path]:
    """Slides an existing path stands for (explicit: typed by the user, not a glob match)."""
    if not explicit and _under(p, roots):
        return []
    if p.is_dir():
        if _is_slide_dir(p):
            return [p]
        return [s for s in _scan_dir(p) if not _under(s, roots)]
    if not explicit and p.name.startswith("."):
        return []
    return [_slide_path(p)]


def _strip_ext(name: str, is_dir: bool) -> str:
    base, ext = os.path.splitext(name)
    if ext.lower() in SLIDE_EXTENSIONS or ext.lower() in (".zarr", ".dcm") or (not is_dir and ext):
        name = base
        if name.lower().endswith(".ome"):
            name = name[:-4]
    return name


def _sanitise(text: str) -> str:
    # Keep names portable: characters that are awkward in file names become '_'.
    return re.sub(r"[^\w.+-]", "_", text).lstrip(".")


def _auto_stem(path: str, *, with_ext: bool = False) -> str:
    p = Path(path)
    stem = _strip_ext(p.name, p.is_dir())
    if with_ext and stem != p.name:  # 'slide.svs' -> 'slide_svs', for slide.svs beside slide.tiff
        stem = f"{stem}_{p.name[len(stem) :].lstrip('.').replace('.', '_')}"
    return _sanitise(stem) or "slide"


def _parent_names(path: str) -> list[str]:
    """Parent folder names, nearest first, sanitised like stems."""
    return [_sanitise(part) or "_" for part in reversed(Path(path).parent.parts[1:])]


def _candidate(path: str, depth: int, with_ext: bool) -> str:
    parents = list(reversed(_parent_names(path)[:depth]))
    return "_".join([*parents, _auto_stem(path, with_ext=with_ext)])


def _assign_names(paths: list[str], explicit: list[str | None]) -> list[str]:
    """Unique output stems: explicit names kept, colliding stems prefixed by parent folders.

    Colliding stems try, in order: 1, 2, ... nearest parent folders; then the
    extension kept (``slide_svs``) with 0, 1, ... parents; then a short hash
    of the path. The first rule that makes the whole group unique wins, so the
    result depends only on the set of paths.
    """
    names: list[str | None] = list(explicit)
    taken = {n.casefold() for n in explicit if n} | set(_RESERVED_NAMES)
    groups: dict[str, list[int]] = {}
    for i, (p, n) in enumerate(zip(paths, explicit)):
        if n is None:
            groups.setdefault(_auto_stem(p).casefold(), []).append(i)
    # Unique stems first, so that a plain stem is never displaced by a
    # disambiguated one from another group.
    for key, idx in sorted(groups.items()):
        if len(idx) == 1 and key not in taken:
            names[idx[0]] = _auto_stem(paths[idx[0]])
            taken.add(key)
    for _key, idx in sorted(groups.items()):
        if names[idx[0]] is not None:
            continue
        idx = sorted(idx, key=lambda i: paths[i])
        depth = max(len(_parent_names(paths[i])) for i in idx)
        rules = [(k, False) for k in range(1, depth + 1)] + [(k, True) for k in range(depth + 1)]
        chosen = None
        for k, with_ext in rules:
            cand = [_candidate(paths[i], k, with_ext) for i in idx]
            folded = {c.casefold() for c in cand}
            if len(folded) == len(cand) and not (folded & taken):
                chosen = cand
                break
        if chosen is None:  # e.g. 'a.b.svs' vs 'a_b.svs' in one folder
            chosen = [f"{_auto_stem(paths[i])}-{hashlib.sha256(paths[i].encode()).hexdigest()[:8]}" for i in idx]
        for i, c in zip(idx, chosen):
            names[i] = c
            taken.add(c.casefold())
    return [n for n in names if n is not None]


def _read_manifest(csv_path: Path) -> list[tuple[str, str | None, dict[str, Any]]]:
    """Rows of a manifest as ``(absolute path, name or None, overrides)``."""

    def bad(line: int | None, msg: str) -> WsisegError:
        return WsisegError(f"line {line}: {msg}" if line else msg, csv_path)

    try:
        # utf-8-sig: Excel writes a byte-order mark. newline="": quoted cells may hold newlines.
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise bad(None, f"cannot read manifest: {getattr(exc, 'strerror', None) or exc}") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[tuple[str, str | None, dict[str, Any]]] = []
    try:
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
                continue  # blank lines and comments
            if header is None:
                header = [c.strip().lower() for c in cells]
                if "path" not in header:
                    raise bad(line, f"manifest header has no 'path' column (found: {', '.join(header) or 'nothing'})")
                dup = sorted({h for h in header if header.count(h) > 1 and h})
                if dup:
                    raise bad(line, f"manifest header repeats column(s) {', '.join(dup)}")
                continue
            if len(cells) > len(header):
                raise bad(line, f"{len(cells)} cells but the header has {len(header)} columns")
            row = {h: c.strip() for h, c in zip(header, cells) if h}
            raw = row.pop("path", "")
            if not raw:
                raise bad(line, "empty 'path'")
            p = Path(os.path.expanduser(raw))
            if not p.is_absolute():
                p = csv_path.parent / p
            if not p.exists():
                raise bad(line, f"slide not found: {p}")
            name = row.pop("name", "") or None
            if name is not None and _name_problem(name):
                raise bad(line, _name_problem(name) or "")
            overrides: dict[str, Any] = {}
            mpp = row.pop("mpp", "")
            if mpp:
                problem = mpp_problem(mpp)
                if problem:
                    raise bad(line, problem)
                overrides["mpp"] = float(mpp)
            overrides.update({k: v for k, v in row.items() if v})
            rows.append((os.path.abspath(_slide_path(p)), name, overrides))
    except csv.Error as exc:
        raise bad(reader.line_num, f"malformed CSV ({exc})") from exc
    if header is None:
        raise bad(None, "manifest is empty (a header with a 'path' column is required)")
    if not rows:
        raise bad(None, "manifest lists no slides")
    return rows


def expand_inputs(inputs: Sequence[str | os.PathLike], *, exclude: Sequence[str | os.PathLike] = ()) -> list[SlideJob]:
    """Turn files, directories, globs and CSV manifests into slide jobs.

    See the module docstring for the rules.

    Parameters
    ----------
    inputs : sequence of str or path-like
        As typed on the command line.
    exclude : sequence of path-like
        Folders (typically the output folder) whose contents are never taken
        from a directory scan or glob.

    Returns
    -------
    list of SlideJob
        In input order (sorted within a directory or glob), duplicates removed,
        with unique output names.

    Raises
    ------
    WsisegError
        No inputs; an input that does not exist, a glob or directory that
        matches no slide; a bad manifest (file and line named); the same slide
        given twice with different overrides; a manifest name used twice.
    """
    if not inputs:
        raise WsisegError("no slides given")
    roots = [Path(os.path.realpath(os.path.expanduser(os.fspath(e)))) for e in exclude]
    entries: list[tuple[str, str | None, dict[str, Any], str]] = []  # path, name, overrides, origin
    for item in inputs:
        text = os.path.expanduser(os.fspath(item))
        p = Path(text)
        if p.suffix.lower() == ".csv" and p.is_file():
            entries.extend((path, name, ov, f"{p}") for path, name, ov in _read_manifest(p))
            continue
        if p.exists():
            found = _expand_path(p, roots, explicit=True)
            if not found:
                raise WsisegError(
                    "no slides found in directory (looked for slide files "
                    f"{', '.join(sorted(SLIDE_EXTENSIONS))}, OME-Zarr and DICOM folders, one level deep)",
                    p,
                )
        elif glob.has_magic(text):
            matches = _glob(text)
            found = []
            for m in matches:
                found.extend(_expand_path(Path(m), roots, explicit=False))
            if not found:
                raise WsisegError("pattern matches no slide" if matches else "pattern matches nothing", text)
        else:
            raise WsisegError("no such file or directory", text)
        entries.extend((os.path.abspath(f), None, {}, text) for f in found)

    # The same slide twice: one without settings (a directory scan) defers
    # to one with settings (a manifest row), in either order; two different
    # settings are ambiguous.
    seen: dict[str, int] = {}
    unique: list[tuple[str, str | None, dict[str, Any], str]] = []
    for entry in entries:
        path, name, ov, origin = entry
        key = os.path.realpath(path)
        if key not in seen:
            seen[key] = len(unique)
            unique.append(entry)
            continue
        kept = unique[seen[key]]
        if (kept[1], kept[2]) == (name, ov) or not (name or ov):
            continue
        if not (kept[1] or kept[2]):
            unique[seen[key]] = (kept[0], name, ov, origin)
            continue
        raise WsisegError(f"slide given twice with different settings (from {kept[3]} and from {origin})", path)

    explicit = [u[1] for u in unique]
    folded = [n.casefold() for n in explicit if n]
    dup = sorted({n for n in folded if folded.count(n) > 1})
    if dup:
        raise WsisegError(f"output name(s) used for more than one slide: {', '.join(dup)}")
    if set(folded) & _RESERVED_NAMES:
        raise WsisegError(f"output name(s) reserved for wsiseg's own files: {', '.join(sorted(_RESERVED_NAMES))}")
    names = _assign_names([u[0] for u in unique], explicit)
    return [SlideJob(path=u[0], name=n, overrides=dict(u[2])) for u, n in zip(unique, names)]


# ---------------------------------------------------------------------------
# fingerprints and done markers


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
        E.g. :func:`wsiseg.models.io.file_hash` of the model file.
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


def _marker_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}{_DONE_SUFFIX}"


def _source_size(path: str) -> int | None:
    with contextlib.suppress(OSError):
        if os.path.isfile(path):
            return os.path.getsize(path)
    return None


def _done_state(job: SlideJob, out_dir: Path, fingerprint: str) -> tuple[bool, str]:
    """``(done, why)``: whether a slide can be skipped, and why it cannot."""
    marker = _marker_path(out_dir, job.name)
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
    return _done_state(job, Path(out_dir), fingerprint)[0]


def _marker_run(out_dir: Path, name: str) -> tuple[str, dict[str, str]] | None:
    """``(run id, outputs)`` recorded in a done marker by a distributed batch, or None."""
    try:
        data = json.loads(_marker_path(out_dir, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("run"), str) or not isinstance(data.get("outputs"), dict):
        return None
    return data["run"], {str(k): str(v) for k, v in data["outputs"].items()}


def _write_marker(
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
        "finished_at": _now(),
    }
    if run_id is not None:
        data["run"] = run_id
    with atomic_output(_marker_path(out_dir, job.name), overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# locks

_HOST = socket.gethostname()
_HELD: set[str] = set()  # lock files this process holds


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time in clock ticks)`` of a Linux process, or None if unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the command name may contain spaces
    if len(fields) < 20:
        return None
    return fields[0], fields[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    """Whether ``pid`` on this host is still the process that wrote a lock."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill would terminate it on Windows: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    stat = _proc_stat(pid)
    if stat is not None:
        state, now_start = stat
        if state in ("Z", "X"):  # exited, not yet reaped
            return False
        if start is not None and now_start != start:  # pid reused by another process
            return False
    return True


@dataclass
class _Lock:
    path: Path
    token: str
    last_touch: float = 0.0
    previous: dict | None = None  # owner of the stale lock this one replaced
    owner: dict = field(default_factory=dict)  # what the lock file says

    def touch(self) -> None:
        now = time.monotonic()
        if now - self.last_touch >= _HEARTBEAT_S:
            self.last_touch = now
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def note_child(self, pid: int) -> None:
        """Record the worker process the slide runs in (slide timeout) in the lock file.

        A later run then waits for that process too, and removes its
        temporaries when it takes the lock over. Replaced atomically, so
        readers see the old or the new owner; best effort, like the heartbeat.
        """
        stat = _proc_stat(pid)
        self.owner = {**self.owner, "child": pid, "child_start": stat[1] if stat else None}
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps(self.owner) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def release(self) -> None:
        _HELD.discard(str(self.path))
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text(encoding="utf-8")).get("token") == self.token:
                self.path.unlink()  # only our own: a timed-out lock may have been taken over


@dataclass(frozen=True)
class _HeldBy:
    owner: dict

    def describe(self) -> str:
        pid, host = self.owner.get("pid", "?"), self.owner.get("host")
        where = "" if host in (None, _HOST) else f" on {host}"
        return f"being processed by another run (pid {pid}{where})"


def _lock_live(owner: dict | None, age: float, timeout: float, path: Path, run_id: str | None = None) -> bool:
    if owner is None:  # empty/garbled: maybe being written right now
        return age < min(_UNREADABLE_LOCK_GRACE_S, timeout)
    if run_id is not None and owner.get("run") == run_id:
        # An earlier attempt of this very task: a dask scheduler only reruns a
        # task after losing the worker that ran it, which may be on another host.
        return False
    if owner.get("host") != _HOST:
        return age < timeout
    boot = owner.get("boot_id")
    if boot is not None and _boot_id() is not None and boot != _boot_id():
        return False  # written before a reboot
    try:
        pid = int(owner.get("pid", -1))
    except (TypeError, ValueError):
        return age < timeout
    if pid == os.getpid():
        return str(path) in _HELD
    start = owner.get("start")
    if _pid_alive(pid, None if start is None else str(start)):
        return True
    # The slide's worker process (slide timeout) dies with its owner; until it has, the slide is busy.
    child, child_start = owner.get("child"), owner.get("child_start")
    return isinstance(child, int) and _pid_alive(child, None if child_start is None else str(child_start))


def _read_lock(path: Path) -> tuple[bytes, dict | None, float] | None:
    """``(raw bytes, parsed owner or None, age in seconds)``; None when the lock is gone."""
    try:
        raw = path.read_bytes()
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(raw.decode("utf-8"))
        if not isinstance(owner, dict):
            owner = None
    except (UnicodeDecodeError, ValueError):
        owner = None
    return raw, owner, age


def _break_stale(path: Path, seen: bytes) -> None:
    """Remove a stale lock, unless it changed since it was judged stale."""
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another run took it over first
    try:
        if aside.read_bytes() != seen:
            # We moved a lock another run had just created: put it back.
            with contextlib.suppress(OSError):
                os.link(aside, path)
    finally:
        with contextlib.suppress(OSError):
            aside.unlink()


def _acquire_lock(path: Path, timeout: float, run_id: str | None = None) -> _Lock | _HeldBy:
    """Create ``path`` exclusively, taking over a stale lock; or say who holds it.

    ``run_id`` identifies one distributed batch: a lock it wrote itself is
    stale (see :func:`execute_slide`).

    Raises
    ------
    OSError
        The lock file cannot be created or written (e.g. disk full).
    """
    token = uuid.uuid4().hex
    stat = _proc_stat(os.getpid())
    owner = {
        "pid": os.getpid(),
        "host": _HOST,
        "boot_id": _boot_id(),
        "start": stat[1] if stat else None,
        "time": _now(),
        "token": token,
    }
    if run_id is not None:
        owner["run"] = run_id
    last: dict = {}
    broken: dict | None = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            seen = _read_lock(path)
            if seen is None:
                continue  # released meanwhile
            raw, holder, age = seen
            last = holder or {}
            if _lock_live(holder, age, timeout, path, run_id):
                return _HeldBy(last)
            _break_stale(path, raw)
            broken = holder
            continue
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(owner) + "\n")
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        _HELD.add(str(path))
        return _Lock(path, token, time.monotonic(), previous=broken, owner=owner)
    return _HeldBy(last)  # lost every race: someone else is busy with it


#: Temporaries of a slide, by the pid that wrote them: :func:`wsiseg.atomic.atomic_output`'s
#: ``.FILE.tmp-PID`` and ``.FILE.old-PID`` (the previous output, moved aside for a moment) and
#: the sliding-window label store ``.NAME.sliding-window.tmp-PID``.
_ORPHAN_PATTERNS = (".{name}.*.tmp-{pid}", ".{name}.*.old-{pid}")


def remove_temporaries(out_dir: Path, name: str, pid: int) -> None:
    """Remove the temporaries of slide ``name`` written by process ``pid`` (:data:`_ORPHAN_PATTERNS`)."""
    for pattern in _ORPHAN_PATTERNS:
        for p in out_dir.glob(pattern.format(name=glob.escape(name), pid=pid)):
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()


def _remove_orphans(out_dir: Path, name: str, owner: dict | None) -> None:
    """Remove the temporaries of slide ``name`` left by the dead owner of a stale lock.

    A process killed mid-write (SIGKILL, a lost dask worker) cannot remove
    its own. Only the dead owner's pid, and that of the worker process it
    ran the slide in (``child``, with a slide timeout), are matched, so
    other runs' files are safe.
    """
    for key in ("pid", "child"):
        pid = (owner or {}).get(key)
        if isinstance(pid, int) and pid > 0:
            remove_temporaries(out_dir, name, pid)


def release_lost_slide(job: SlideJob, out_dir: str | os.PathLike, run_id: str) -> bool:
    """Remove the lock and temporaries of a slide whose last worker died holding them.

    For a distributed batch after the scheduler gave up on the slide: no
    attempt of it can still be running, but a dead worker on another host
    would otherwise leave a lock that other runs respect for hours. Only a
    lock written under ``run_id`` is removed.

    Returns
    -------
    bool
        Whether a lock was removed.
    """
    out = Path(out_dir)
    path = out / f"{job.name}{_LOCK_SUFFIX}"
    seen = _read_lock(path)
    if seen is None or seen[1] is None or seen[1].get("run") != run_id:
        return False
    _break_stale(path, seen[0])
    _remove_orphans(out, job.name, seen[1])
    return not path.exists()


# ---------------------------------------------------------------------------
# progress reporters


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")



class _Reporter:
    """Silent reporter; the base of the others. Methods never raise."""

    def batch_start(self, total: int, out_dir: Path) -> None: ...
    def slide_start(self, index: int, total: int, job: SlideJob, action: str, reason: str) -> None: ...
    def stage(self, job: SlideJob, stage: str, fraction: float) -> None: ...
    def slide_done(self, index: int, total: int, result: SlideResult) -> None: ...
    def warning(self, message: str) -> None: ...
    def batch_done(self, result: BatchResult) -> None: ...
    def close(self) -> None: ...


class _JsonReporter(_Reporter):
    """JSON-lines events, one object per line, for logs and machines."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self._last_stage: tuple[str, str, float] | None = None  # (slide, stage, monotonic time)

    def _emit(self, event: str, **fields: Any) -> None:
        try:
            self.stream.write(json.dumps({"event": event, "time": _now(), **fields}) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed log must not stop the batch

    def batch_start(self, total, out_dir):
        self._emit("batch_start", total=total, out_dir=str(out_dir))

    def slide_start(self, index, total, job, action, reason):
        self._emit("slide_start", slide=job.path, name=job.name, index=index, total=total, action=action, reason=reason)

    def stage(self, job, stage, fraction):
        now = time.monotonic()
        last = self._last_stage
        # Throttled: a new stage, a finished one, or once a second.
        if last is None or last[:2] != (job.path, stage) or fraction >= 1.0 or now - last[2] >= _JSON_STAGE_INTERVAL_S:
            self._last_stage = (job.path, stage, now)
            self._emit("stage", slide=job.path, name=job.name, stage=stage, fraction=round(fraction, 4))

    def slide_done(self, index, total, result):
        self._emit(
            "slide_done",
            slide=result.job.path,
            name=result.job.name,
            index=index,
            total=total,
            status=result.status,
            seconds=round(result.seconds, 3),
            error=result.error,
        )

    def warning(self, message):
        self._emit("warning", message=message)

    def batch_done(self, result):
        self._emit(
            "batch_done",
            **result.counts,
            exit_code=result.exit_code,
            seconds=round(result.seconds, 3),
            status_csv=str(result.status_path),
        )


class _TqdmReporter(_Reporter):
    """Two tqdm bars: slides (with ETA) and the current slide's stage."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.overall: Any = None
        self.stage_bar: Any = None
        self._stage: str | None = None

    def _safe(self, fn, *args, **kwargs) -> None:
        with contextlib.suppress(Exception):
            fn(*args, **kwargs)

    def batch_start(self, total, out_dir):
        from tqdm import tqdm

        self.overall = tqdm(total=total, unit="slide", desc="slides", file=self.stream, position=0, dynamic_ncols=True)
        self.stage_bar = tqdm(
            total=100,
            desc="",
            file=self.stream,
            position=1,
            leave=False,
            dynamic_ncols=True,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
        )

    def slide_start(self, index, total, job, action, reason):
        if self.overall is not None:
            self._safe(self.overall.set_postfix_str, job.name)

    def stage(self, job, stage, fraction):
        bar = self.stage_bar
        if bar is None:
            return
        if stage != self._stage:
            self._stage = stage
            self._safe(bar.reset, total=100)
            self._safe(bar.set_description_str, f"{job.name}: {stage}")
        self._safe(setattr, bar, "n", round(100 * fraction))
        self._safe(bar.refresh)

    def slide_done(self, index, total, result):
        if result.status == "failed" and self.overall is not None:
            self._safe(self.overall.write, f"{result.job.name}: failed: {result.error}", file=self.stream)
        if self.overall is not None:
            self._safe(self.overall.update, 1)
        self._stage = None

    def warning(self, message):
        if self.overall is not None:
            self._safe(self.overall.write, f"warning: {message}", file=self.stream)

    def batch_done(self, result):
        c = result.counts
        self.close()
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(
                f"{c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped; status: {result.status_path}\n"
            )

    def close(self):
        for bar in (self.stage_bar, self.overall):
            if bar is not None:
                self._safe(bar.close)
        self.stage_bar = self.overall = None


def _make_reporter(progress: str, stream: IO[str]) -> _Reporter:
    if progress == "auto":
        try:
            progress = "tty" if stream.isatty() else "jsonl"
        except (AttributeError, ValueError):
            progress = "jsonl"
    if progress == "tty":
        return _TqdmReporter(stream)
    if progress == "jsonl":
        return _JsonReporter(stream)
    if progress == "none":
        return _Reporter()
    raise ConfigError(f"progress must be 'auto', 'tty', 'jsonl' or 'none', got {progress!r}")


def _checked_progress(progress: ProgressFn | None, lock: _Lock) -> ProgressFn:
    """The progress function handed to a process function: heartbeat + report, never raising."""
    guard = threading.Lock()  # the process function may report from worker threads

    def report(stage: str, fraction: float) -> None:
        try:
            f = float(fraction)
            f = 0.0 if not math.isfinite(f) else min(max(f, 0.0), 1.0)
            with guard:
                lock.touch()
                if progress is not None:
                    progress(str(stage), f)
        except Exception:  # noqa: BLE001, S110 - reporting must never break the work
            pass

    return report


# ---------------------------------------------------------------------------
# the batch


class _StatusFile:
    """``status.csv``: this run's rows merged with the file's, under a lock, rewritten atomically.

    Two runs may share a folder, each with its own slides: every write reads
    the file under an flock on its folder and keeps each slide's most recent
    outcome (:func:`_merge_status`), so the file shows both runs. Failures
    to write become one warning.
    """

    def __init__(self, path: Path, jobs: list[SlideJob], reporter: _Reporter):
        self.path = path
        self.jobs = jobs
        self.reporter = reporter
        self.started = datetime.now().astimezone()
        self._warned = False

    def write(self, results: Sequence[SlideResult | None]) -> None:
        rows = []
        for job, r in zip(self.jobs, results):
            if r is None:
                rows.append((job.path, job.name, "pending", "", "", ""))
            else:
                rows.append((job.path, job.name, r.status, f"{r.seconds:.3f}", one_line(r.error or ""), r.finished_at))
        try:
            with _dir_lock(self.path.parent):
                rows = _merge_status(_read_status_rows(self.path), rows, self.started)
                with (
                    atomic_output(self.path, overwrite=True) as tmp,
                    open(tmp, "w", newline="", encoding="utf-8") as fh,
                ):
                    w = csv.writer(fh)
                    w.writerow(STATUS_COLUMNS)
                    w.writerows(rows)
        except (OSError, WsisegError) as exc:
            # A full disk must not stop the batch: say so (once) and go on.
            if not self._warned:
                self._warned = True
                self.reporter.warning(f"cannot write {self.path}: {describe_error(exc)}")


@contextlib.contextmanager
def _dir_lock(path: Path):
    """Hold an exclusive ``flock`` on the folder ``path`` itself (no lock file to leave behind or unlink)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rows may race, as before the lock existed
        yield
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_status_rows(path: Path) -> list[tuple[str, ...]]:
    """The rows of an existing ``status.csv`` (none when missing or not ours)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            table = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    if not table or tuple(table[0]) != STATUS_COLUMNS:
        return []
    return [tuple(r) for r in table[1:] if len(r) == len(STATUS_COLUMNS)]


# On equal times (status.csv keeps seconds) an outcome beats a skip, and a skip beats nothing.
_STATUS_RANK = {"pending": 0, "skipped": 1, "ok": 2, "failed": 2}


def _merge_status(disk: Sequence[tuple[str, ...]], ours: Sequence[tuple[str, ...]], started: datetime) -> list:
    """This run's rows merged with those another run wrote: each slide's most recent row.

    Parameters
    ----------
    disk : sequence of rows
        ``status.csv`` as found (``STATUS_COLUMNS`` order).
    ours : sequence of rows
        This run's view, one row per job.
    started : datetime
        When this run started: a finished row on disk older than that is a
        previous run's and never hides this run's ``pending``.

    Returns
    -------
    list of rows
        This run's slides in job order, then the other slides the file
        holds that are not pending (pending rows of a run that died would
        stay forever; a live run writes its own back).
    """

    def when(row) -> datetime | None:
        try:
            t = datetime.fromisoformat(row[5]) if row[5] else None
        except (ValueError, TypeError):
            return None
        return t.astimezone() if t is not None else None  # a time without offset is local

    def newer(theirs, mine) -> bool:
        t, m = when(theirs), when(mine)
        if t is None:
            return False
        if m is None:
            return t >= started  # another run finished it while this one had not
        if t != m:
            return t > m
        return _STATUS_RANK.get(theirs[2], 0) > _STATUS_RANK.get(mine[2], 0)

    found = {row[1].casefold(): row for row in disk}
    mine = {row[1].casefold() for row in ours}
    merged = [found[row[1].casefold()] if newer(found.get(row[1].casefold(), ("",) * 6), row) else row for row in ours]
    merged += [row for key, row in found.items() if key not in mine and row[2] != "pending"]
    return merged


def _describe_oserror(exc: OSError) -> str:
    reason = exc.strerror or one_line(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        reason = f"disk full: {reason}"
    if exc.filename:
        reason += f" ({os.fspath(exc.filename)})"
    return reason


def describe_error(exc: BaseException) -> str:
    """One line for a status row: user errors as they are, bugs as bugs."""
    if isinstance(exc, WsisegError):
        return one_line(exc)
    if isinstance(exc, OSError):
        return _describe_oserror(exc)
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError)"
    return f"internal error: {type(exc).__name__}: {one_line(exc)}"


def _check_jobs(jobs: list[SlideJob]) -> None:
    seen: dict[str, str] = {}
    for job in jobs:
        if not isinstance(job, SlideJob):
            raise ConfigError(f"run_batch needs SlideJob items, got {type(job).__name__}")
        key = job.name.casefold()
        if key in seen:
            raise ConfigError(f"output name {job.name!r} is used by two slides: {seen[key]} and {job.path}")
        if key in _RESERVED_NAMES:
            raise ConfigError(f"output name {job.name!r} is reserved for wsiseg's own files", job.path)
        seen[key] = job.path


def _prepare_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WsisegError(f"cannot create output folder: {exc.strerror or exc}", out) from exc
    if not out.is_dir():
        raise WsisegError("output path exists and is not a folder", out)
    if not os.access(out, os.W_OK):
        raise WsisegError("output folder is not writable", out)


def plan_slide(
    job: SlideJob, out_dir: str | os.PathLike, fingerprint: str, *, overwrite: bool = False
) -> tuple[str, str]:
    """Whether a batch should process or skip ``job``: the planner of :func:`run_batch`.

    Returns
    -------
    (action, reason)
        ``("skip", DONE_REASON)`` when the slide is done (see Resume in the
        module docstring), else ``("process", why)``.
    """
    if overwrite:
        return "process", "--overwrite"
    done, why = _done_state(job, Path(out_dir), fingerprint)
    return ("skip", why) if done else ("process", why)


def execute_slide(
    job: SlideJob,
    out_dir: str | os.PathLike,
    process: ProcessFn,
    *,
    fingerprint: str,
    overwrite: bool = False,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    progress: ProgressFn | None = None,
    run_id: str | None = None,
    timeout: float | None = None,
) -> SlideOutcome:
    """Lock, process and certify one slide that :func:`plan_slide` chose to process.

    The per-slide half of :func:`run_batch`, usable wherever the slide runs
    (this process or a dask worker sharing the output folder). Under
    ``<name>.lock`` it checks again that no other run finished the slide,
    removes the old done marker, calls ``process`` and writes the new marker
    when the outcome is ``ok`` and every output exists.

    Parameters
    ----------
    job : SlideJob
    out_dir : path-like
        The batch output folder (must exist).
    process : ProcessFn
    fingerprint : str
        The batch fingerprint (:func:`make_fingerprint`).
    overwrite : bool
        Redo even if another run finished the slide meanwhile.
    lock_timeout : float
        Seconds after which a lock from another host is stale.
    progress : ProgressFn, optional
        Receives the process function's progress (clamped, never raising);
        each report also refreshes the lock's heartbeat.
    run_id : str, optional
        Identifies one distributed batch. A lock written under the same id is
        an earlier attempt of this task whose worker was lost, and is taken
        over even when it comes from another host.
    timeout : float, optional
        Seconds the slide may take. Given, ``process`` runs in a worker
        process of its own (:mod:`wsiseg.batch.isolated`; it must be picklable),
        which is killed when the time is up: the slide then fails with
        ``timed out after N s``, and one whose worker process dies fails
        too. None: ``process`` runs in this thread, without a limit.

    Returns
    -------
    SlideOutcome
        ``seconds`` is the wall time spent here. Only BaseExceptions
        (KeyboardInterrupt, SystemExit) escape; the lock is released then too.
    """
    t0 = time.monotonic()
    out = Path(out_dir)

    def timed(outcome: SlideOutcome) -> SlideOutcome:
        return dataclasses.replace(outcome, seconds=time.monotonic() - t0)

    sfp = slide_fingerprint(fingerprint, job)
    try:
        lock = _acquire_lock(out / f"{job.name}{_LOCK_SUFFIX}", lock_timeout, run_id)
    except OSError as exc:
        return timed(SlideOutcome("failed", error=f"cannot create lock file: {_describe_oserror(exc)}"))
    if isinstance(lock, _HeldBy):
        return timed(SlideOutcome("skipped", error=lock.describe()))
    try:
        if lock.previous is not None:
            _remove_orphans(out, job.name, lock.previous)
        # Another run may have finished the slide between the check and the lock.
        if not overwrite and _done_state(job, out, fingerprint)[0]:
            mine = _marker_run(out, job.name)
            if run_id is not None and mine is not None and mine[0] == run_id:
                # An earlier attempt of this task finished, then its worker died before reporting.
                return timed(SlideOutcome("ok", outputs=mine[1]))
            return timed(SlideOutcome("skipped", error=f"{DONE_REASON} (by another run)"))
        try:
            # A stale certificate must not survive a redo that dies half-way.
            _marker_path(out, job.name).unlink(missing_ok=True)
            report = _checked_progress(progress, lock)
            if timeout is None:
                outcome = process(job, out, fingerprint=sfp, overwrite=True, progress=report)
            else:
                from wsiseg.batch.isolated import run_isolated

                outcome = run_isolated(process, job, out, fingerprint=sfp, overwrite=True, progress=report,
                                       timeout=timeout, started=lock.note_child)
            if not isinstance(outcome, SlideOutcome):
                raise TypeError(f"the process function returned {type(outcome).__name__}, not SlideOutcome")
        except Exception as exc:  # noqa: BLE001 - any bug in one slide must not stop the batch
            return timed(SlideOutcome("failed", error=describe_error(exc)))
        if outcome.status == "failed":
            return timed(dataclasses.replace(outcome, error=one_line(outcome.error or "failed (no reason given)")))
        if outcome.status == "ok":
            try:
                _write_marker(job, out, sfp, dict(outcome.outputs), run_id)
            except WsisegError as exc:  # e.g. a reported output that does not exist
                return timed(SlideOutcome("failed", error=describe_error(exc)))
            except OSError as exc:
                return timed(SlideOutcome("failed", error=f"cannot write done marker: {_describe_oserror(exc)}"))
        return timed(outcome)
    finally:
        lock.release()


def check_batch(
    jobs: Iterable[SlideJob], *, fingerprint: str, lock_timeout: float = DEFAULT_LOCK_TIMEOUT
) -> list[SlideJob]:
    """Validate a batch's arguments before any work; returns the jobs as a list.

    Raises
    ------
    ConfigError
        Empty fingerprint, non-positive lock timeout, non-SlideJob items,
        duplicate or reserved output names.
    """
    jobs = list(jobs)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ConfigError("fingerprint must be a non-empty string")
    if not (lock_timeout > 0):
        raise ConfigError(f"lock timeout must be positive, got {lock_timeout!r}")
    _check_jobs(jobs)
    return jobs


class BatchRecorder:
    """The truth about a batch: ``status.csv`` and progress events.

    Shared by :func:`run_batch` and :func:`wsiseg.batch.dask.run_batch_distributed`
    so that local and cluster runs report alike. Thread-safe: distributed
    progress arrives on another thread.

    Parameters
    ----------
    jobs : list of SlideJob
        Already checked (:func:`check_batch`).
    out_dir : path-like
        Created if missing.
    progress : {"auto", "tty", "jsonl", "none"}
    stream : text stream
        Where progress goes.

    Raises
    ------
    WsisegError
        The output folder cannot be created or written.
    """

    def __init__(self, jobs: list[SlideJob], out_dir: str | os.PathLike, progress: str, stream: IO[str]):
        self.reporter = _make_reporter(progress, stream)
        self.out = Path(out_dir)
        _prepare_out_dir(self.out)
        self.jobs = jobs
        self.results: list[SlideResult | None] = [None] * len(jobs)
        self._status = _StatusFile(self.out / STATUS_FILE, jobs, self.reporter)
        self._guard = threading.RLock()
        self._t0 = time.monotonic()
        self.reporter.batch_start(len(jobs), self.out)
        self._status.write(self.results)

    def slide_start(self, index: int, action: str, reason: str) -> None:
        """A slide is about to be processed (``action="process"``) or skipped."""
        with self._guard:
            self.reporter.slide_start(index, len(self.jobs), self.jobs[index], action, reason)

    def stage(self, index: int, stage: str, fraction: float) -> None:
        """Progress within a slide."""
        with self._guard:
            self.reporter.stage(self.jobs[index], stage, fraction)

    def warning(self, message: str) -> None:
        with self._guard:
            self.reporter.warning(message)

    def slide_done(self, index: int, outcome: SlideOutcome, *, write: bool = True) -> SlideResult:
        """Record a slide's outcome, report it and rewrite ``status.csv`` (unless ``write`` is false)."""
        with self._guard:
            result = SlideResult(self.jobs[index], outcome, _now())
            self.results[index] = result
            self.reporter.slide_done(index, len(self.jobs), result)
            if write:
                self._status.write(self.results)
            return result

    def abort(self) -> None:
        """Write the status as it is (unreached slides stay ``pending``) and close the progress display."""
        with self._guard:
            self._status.write(self.results)
            self.reporter.close()

    def finish(self) -> BatchResult:
        """The batch result, after every slide was recorded; reports ``batch_done``."""
        with self._guard:
            done = BatchResult(
                [r for r in self.results if r is not None], self.out / STATUS_FILE, time.monotonic() - self._t0
            )
            self.reporter.batch_done(done)
            self.reporter.close()
            return done


def run_batch(
    jobs: Iterable[SlideJob],
    out_dir: str | os.PathLike,
    process: ProcessFn,
    *,
    fingerprint: str,
    overwrite: bool = False,
    progress: Literal["auto", "tty", "jsonl", "none"] = "auto",
    stream: IO[str] | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    slide_timeout: float | None = None,
) -> BatchResult:
    """Run ``process`` on every slide, recording status and certifying results.

    See the module docstring for resume, locking and error handling. The
    work is :func:`plan_slide` (run or skip), :func:`execute_slide` (lock,
    process, certify) and :class:`BatchRecorder` (status and progress); the
    distributed driver (:mod:`wsiseg.batch.dask`) uses the same three.

    Parameters
    ----------
    jobs : iterable of SlideJob
        Typically from :func:`expand_inputs`; names must be unique.
    out_dir : path-like
        Output folder; created if missing.
    process : ProcessFn
        The per-slide function.
    fingerprint : str
        :func:`make_fingerprint` of the model hash and resolved config.
    overwrite : bool
        Redo slides that are already done.
    progress : {"auto", "tty", "jsonl", "none"}
        Progress display on ``stream``.
    stream : text stream, optional
        Where progress goes; ``sys.stderr`` (at call time) by default.
    lock_timeout : float
        Seconds after which a lock from another host is considered stale.
    slide_timeout : float, optional
        Seconds each slide may take (see Time limit in the module
        docstring); ``process`` then runs in a worker process per slide and
        must be picklable. None (the default): no limit, slides run in this
        process.

    Returns
    -------
    BatchResult
        ``exit_code`` is 0 when no slide failed.

    Raises
    ------
    WsisegError
        The output folder cannot be created or written, the jobs are invalid
        (duplicate names), the slide timeout is not a positive number, or
        ``process`` cannot be sent to a worker process: before any slide is
        attempted.
    KeyboardInterrupt
        After recording the current slide as interrupted.
    """
    from wsiseg.batch.isolated import check_runnable, check_timeout

    stream = sys.stderr if stream is None else stream
    jobs = check_batch(jobs, fingerprint=fingerprint, lock_timeout=lock_timeout)
    slide_timeout = check_timeout(slide_timeout)
    if slide_timeout is not None:
        check_runnable(process)
    rec = BatchRecorder(jobs, out_dir, progress, stream)
    try:
        for i, job in enumerate(jobs):
            t0 = time.monotonic()
            try:
                action, reason = plan_slide(job, rec.out, fingerprint, overwrite=overwrite)
                rec.slide_start(i, action, reason)
                if action == "skip":
                    outcome = SlideOutcome("skipped", error=DONE_REASON)
                else:
                    outcome = execute_slide(
                        job, rec.out, process, fingerprint=fingerprint, overwrite=overwrite,
                        lock_timeout=lock_timeout, progress=lambda stage, f, i=i: rec.stage(i, stage, f),
                        timeout=slide_timeout,
                    )
            except BaseException as exc:  # Ctrl-C, SystemExit: record the truth, then let it go
                reason = INTERRUPTED if isinstance(exc, KeyboardInterrupt) else f"aborted ({type(exc).__name__})"
                rec.slide_done(i, SlideOutcome("failed", time.monotonic() - t0, reason), write=False)
                raise
            rec.slide_done(i, dataclasses.replace(outcome, seconds=time.monotonic() - t0))
    except BaseException:
        rec.abort()  # slides not reached stay "pending"
        raise
    return rec.finish()
