"""Batch semantics around a per-slide function: inputs, status, resume, locks, progress.

The per-slide work (open, sample, segment, write) is a *process* function
supplied by the caller (see :class:`~wsiseg.batch.jobs.ProcessFn`); this module decides which
slides to run, runs every one of them even after failures, and records the
truth about each in the output folder.

The parts: :mod:`wsiseg.batch.inputs` turns inputs into slide jobs (:func:`~wsiseg.batch.inputs.expand_inputs`),
:mod:`wsiseg.batch.markers` decides what is done (Resume), :mod:`wsiseg.batch.locks` keeps two runs off one slide
(Locking), :mod:`wsiseg.batch.progress` reports (Progress, ``status.csv``), and this module plans, runs and
certifies.

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
    Held while a slide is processed (see :mod:`wsiseg.batch.locks`).

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

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Literal

from wsiseg.batch.isolated import check_runnable, check_timeout, run_isolated
from wsiseg.batch.jobs import (
    RESERVED_NAMES,
    BatchResult,
    ProcessFn,
    ProgressFn,
    SlideJob,
    SlideOutcome,
    SlideResult,
    describe_oserror,
    now,
    describe_error,
)
from wsiseg.batch.locks import LOCK_SUFFIX, DEFAULT_LOCK_TIMEOUT, acquire_lock, HeldBy, remove_orphans
from wsiseg.batch.markers import DONE_REASON, done_state, marker_path, marker_run, write_marker, slide_fingerprint
from wsiseg.batch.progress import STATUS_FILE, checked_progress, make_reporter, StatusFile
from wsiseg.errors import ConfigError, WsisegError, one_line

__all__ = ["INTERRUPTED", "BatchRecorder", "check_batch", "execute_slide", "plan_slide", "run_batch"]

INTERRUPTED = "interrupted"


def _check_jobs(jobs: list[SlideJob]) -> None:
    seen: dict[str, str] = {}
    for job in jobs:
        if not isinstance(job, SlideJob):
            raise ConfigError(f"run_batch needs SlideJob items, got {type(job).__name__}")
        key = job.name.casefold()
        if key in seen:
            raise ConfigError(f"output name {job.name!r} is used by two slides: {seen[key]} and {job.path}")
        if key in RESERVED_NAMES:
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
        ``("skip", DONE_REASON)`` when the slide is done (see Resume in
        :mod:`wsiseg.batch.markers`), else ``("process", why)``.
    """
    if overwrite:
        return "process", "--overwrite"
    done, why = done_state(job, Path(out_dir), fingerprint)
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
        The batch fingerprint (:func:`~wsiseg.batch.markers.make_fingerprint`).
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
        lock = acquire_lock(out / f"{job.name}{LOCK_SUFFIX}", lock_timeout, run_id)
    except OSError as exc:
        return timed(SlideOutcome("failed", error=f"cannot create lock file: {describe_oserror(exc)}"))
    if isinstance(lock, HeldBy):
        return timed(SlideOutcome("skipped", error=lock.describe()))
    try:
        if lock.previous is not None:
            remove_orphans(out, job.name, lock.previous)
        # Another run may have finished the slide between the check and the lock.
        if not overwrite and done_state(job, out, fingerprint)[0]:
            mine = marker_run(out, job.name)
            if run_id is not None and mine is not None and mine[0] == run_id:
                # An earlier attempt of this task finished, then its worker died before reporting.
                return timed(SlideOutcome("ok", outputs=mine[1]))
            return timed(SlideOutcome("skipped", error=f"{DONE_REASON} (by another run)"))
        try:
            # A stale certificate must not survive a redo that dies half-way.
            marker_path(out, job.name).unlink(missing_ok=True)
            report = checked_progress(progress, lock)
            if timeout is None:
                outcome = process(job, out, fingerprint=sfp, overwrite=True, progress=report)
            else:
                outcome = run_isolated(
                    process,
                    job,
                    out,
                    fingerprint=sfp,
                    overwrite=True,
                    progress=report,
                    timeout=timeout,
                    started=lock.note_child,
                )
            if not isinstance(outcome, SlideOutcome):
                raise TypeError(f"the process function returned {type(outcome).__name__}, not SlideOutcome")
        except Exception as exc:  # noqa: BLE001 - any bug in one slide must not stop the batch
            return timed(SlideOutcome("failed", error=describe_error(exc)))
        if outcome.status == "failed":
            return timed(dataclasses.replace(outcome, error=one_line(outcome.error or "failed (no reason given)")))
        if outcome.status == "ok":
            try:
                write_marker(job, out, sfp, dict(outcome.outputs), run_id)
            except WsisegError as exc:  # e.g. a reported output that does not exist
                return timed(SlideOutcome("failed", error=describe_error(exc)))
            except OSError as exc:
                return timed(SlideOutcome("failed", error=f"cannot write done marker: {describe_oserror(exc)}"))
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
        self.reporter = make_reporter(progress, stream)
        self.out = Path(out_dir)
        _prepare_out_dir(self.out)
        self.jobs = jobs
        self.results: list[SlideResult | None] = [None] * len(jobs)
        self._status = StatusFile(self.out / STATUS_FILE, jobs, self.reporter)
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
            result = SlideResult(self.jobs[index], outcome, now())
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

    See the module docstrings for resume, locking and error handling. The
    work is :func:`plan_slide` (run or skip), :func:`execute_slide` (lock,
    process, certify) and :class:`BatchRecorder` (status and progress); the
    distributed driver (:mod:`wsiseg.batch.dask`) uses the same three.

    Parameters
    ----------
    jobs : iterable of SlideJob
        Typically from :func:`~wsiseg.batch.inputs.expand_inputs`; names must be unique.
    out_dir : path-like
        Output folder; created if missing.
    process : ProcessFn
        The per-slide function.
    fingerprint : str
        :func:`~wsiseg.batch.markers.make_fingerprint` of the model hash and resolved config.
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
                        job,
                        rec.out,
                        process,
                        fingerprint=fingerprint,
                        overwrite=overwrite,
                        lock_timeout=lock_timeout,
                        progress=lambda stage, f, i=i: rec.stage(i, stage, f),
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
