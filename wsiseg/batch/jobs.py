"""What a batch handles: slide jobs, what the per-slide function reports, and the results.

:class:`SlideJob` (one slide and its output name), :class:`SlideOutcome` (what the process function reports),
:class:`SlideResult` (one row of ``status.csv``) and :class:`BatchResult`; the :class:`ProcessFn` and
:class:`ProgressFn` protocols; :func:`describe_error`, the one line a failed slide records.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from wsiseg.errors import ConfigError, WsisegError, one_line

__all__ = [
    "RESERVED_NAMES",
    "BatchResult",
    "ProcessFn",
    "ProgressFn",
    "SlideJob",
    "SlideOutcome",
    "SlideResult",
    "describe_error",
    "describe_oserror",
    "name_problem",
    "now",
]

RESERVED_NAMES = frozenset({"status"})  # would collide with status.csv's stem

Status = Literal["ok", "failed", "skipped"]
_STATUSES = ("ok", "failed", "skipped")


def name_problem(name: object) -> str | None:
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
        problem = name_problem(self.name)
        if problem:
            raise ConfigError(problem, self.path)


@dataclass(frozen=True)
class SlideOutcome:
    """What the process function reports for one slide.

    Attributes
    ----------
    status : {"ok", "failed", "skipped"}
    seconds : float
        Wall time; :func:`~wsiseg.batch.runner.run_batch` replaces it with its own measurement.
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
    """The per-slide function :func:`~wsiseg.batch.runner.run_batch` calls (written by the segmenter).

    Parameters
    ----------
    job : SlideJob
    out_dir : pathlib.Path
        The batch output folder (exists, writable). Outputs are named from
        ``job.name``; write each through :func:`wsiseg.atomic.atomic_output`.
    fingerprint : str
        The slide's fingerprint (:func:`~wsiseg.batch.markers.slide_fingerprint`), for reports.
    overwrite : bool
        True: replace existing outputs of this slide. :func:`~wsiseg.batch.runner.run_batch` calls
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


def now() -> str:
    """The local time with its UTC offset, to the second (ISO 8601): the times of status rows, markers, locks."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def describe_oserror(exc: OSError) -> str:
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
        return describe_oserror(exc)
    if isinstance(exc, MemoryError):
        return "out of memory (MemoryError)"
    return f"internal error: {type(exc).__name__}: {one_line(exc)}"
