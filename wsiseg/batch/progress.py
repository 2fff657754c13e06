"""Reporting a batch: progress events (tqdm bars or JSON lines) and ``status.csv``.

Progress
--------
``"tty"``: tqdm bars on ``stream``, one for slides (with ETA) and one for the
current slide's stage. ``"jsonl"``: one JSON object per line with ``event``
(``batch_start``, ``slide_start``, ``stage``, ``slide_done``, ``warning``,
``batch_done``), ``time`` (ISO 8601) and the event's fields. ``"auto"`` picks
``tty`` when ``stream`` is a terminal, else ``jsonl``. ``"none"`` is silent.

``status.csv`` (see Output folder in :mod:`wsiseg.batch.runner`) is written by :class:`StatusFile`, which merges
the rows of runs sharing a folder.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from wsiseg.atomic import atomic_output
from wsiseg.batch.jobs import BatchResult, ProgressFn, SlideJob, SlideResult, now, describe_error
from wsiseg.batch.locks import Lock
from wsiseg.errors import ConfigError, WsisegError, one_line

__all__ = ["STATUS_COLUMNS", "STATUS_FILE", "StatusFile", "checked_progress", "make_reporter"]

STATUS_FILE = "status.csv"
STATUS_COLUMNS = ("slide", "name", "status", "seconds", "error", "finished_at")

_JSON_STAGE_INTERVAL_S = 1.0


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
            self.stream.write(json.dumps({"event": event, "time": now(), **fields}) + "\n")
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


def make_reporter(progress: str, stream: IO[str]) -> _Reporter:
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


def checked_progress(progress: ProgressFn | None, lock: Lock) -> ProgressFn:
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


class StatusFile:
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
