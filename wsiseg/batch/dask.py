"""Batches on a dask.distributed cluster: one task per slide.

``wsiseg segment --scheduler tcp://HOST:8786`` uses an existing cluster,
``--workers N`` starts a :class:`distributed.LocalCluster` of ``N`` worker
processes (one thread each) for the run; without either, slides run in this
process (:func:`wsiseg.batch.runner.run_batch`).

The client plans (:func:`wsiseg.batch.runner.plan_slide`: skip slides already done)
and records (:class:`wsiseg.batch.runner.BatchRecorder`: ``status.csv`` and the
progress events, forwarded from the workers as dask events); each worker
runs :func:`wsiseg.batch.runner.execute_slide` (lock, process, done marker) on its
slide, writing straight into the output folder. So a distributed run writes
the same files, follows the same resume and lock rules and reports the same
progress and summary as a local one.

Assumptions and guarantees
--------------------------
* **Shared storage**: slides, the model file and the output folder have the
  same absolute paths on every worker (e.g. one NFS mount, or the ``/data``
  and ``/out`` volumes of ``docker/compose.yaml``).
* **Worker lost mid-slide**: every output is written under a temporary name
  and renamed when complete, so nothing partial appears under a final name;
  the scheduler reruns the task elsewhere, which takes over the slide's lock
  (same batch) and removes the dead worker's temporaries.
* **A slide that keeps killing its worker** (a segfault, the OOM killer) is
  given up after the scheduler's ``distributed.scheduler.allowed-failures``
  (``--workers`` clusters: :data:`DEFAULT_ALLOWED_FAILURES`) and marked
  ``failed`` with that reason; the batch goes on.
* Submission is throttled to the cluster's free capacity (worker threads,
  or GPUs), so a crashing slide does not take queued innocent slides down
  with it, and workers that join later are used.
* **GPUs**: when workers advertise a ``GPU`` resource (``dask worker
  --resources GPU=1``), each slide asks for one, so one slide runs per GPU.
* **Scheduler unreachable**: a :class:`~wsiseg.errors.WsisegError` naming the
  address, before any output is written.
* ``slide_timeout``: a slide past its time limit is killed on its worker
  (it runs in a process of its own there, :mod:`wsiseg.batch.isolated`) and
  ``failed`` with ``timed out after N s``, as in a local run; the worker is
  not lost and the batch goes on.
* Ctrl-C in the client marks the slides in flight ``interrupted`` (a
  ``--workers`` cluster is shut down; on a shared cluster a running slide may
  still finish and certify itself, and is then skipped on the next run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import IO, Any, Iterable, Literal

from wsiseg.batch.isolated import check_timeout
from wsiseg.batch.jobs import BatchResult, ProcessFn, SlideJob, SlideOutcome, describe_error
from wsiseg.batch.locks import DEFAULT_LOCK_TIMEOUT, release_lost_slide
from wsiseg.batch.markers import DONE_REASON
from wsiseg.batch.runner import BatchRecorder, check_batch, execute_slide, plan_slide
from wsiseg.errors import ConfigError, WsisegError, one_line

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_ALLOWED_FAILURES",
    "cluster_client",
    "run_batch_distributed",
]

#: Seconds to wait for a scheduler before giving up with a clear error.
CONNECT_TIMEOUT_S = 10.0
#: Worker losses a slide may cause before it is marked failed (``--workers`` clusters).
DEFAULT_ALLOWED_FAILURES = 2
_POLL_S = 2.0  # how often the client re-reads the cluster's capacity while waiting
_STAGE_INTERVAL_S = 1.0  # worker-side throttle of forwarded stage events


# ---------------------------------------------------------------------------
# connecting


@contextlib.contextmanager
def cluster_client(
    scheduler: str | None = None,
    workers: int | None = None,
    *,
    allowed_failures: int = DEFAULT_ALLOWED_FAILURES,
    connect_timeout: float | None = None,
):
    """A :class:`distributed.Client` for a scheduler address, or for a new local cluster.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler, e.g. ``tcp://host:8786``.
    workers : int, optional
        Start a ``LocalCluster`` of this many worker processes (one thread
        each), closed on exit.
    allowed_failures : int
        Worker losses a task may cause before it errs (local clusters only:
        an existing scheduler keeps its own setting).
    connect_timeout : float, optional
        Seconds to wait for the scheduler (default :data:`CONNECT_TIMEOUT_S`).

    Raises
    ------
    WsisegError
        The scheduler cannot be reached (the address is named).
    ConfigError
        Neither or both of ``scheduler`` and ``workers``; ``workers < 1``.
    """
    if (scheduler is None) == (workers is None):
        raise ConfigError("give either a scheduler address (--scheduler) or a number of workers (--workers), not both")
    import dask
    from distributed import Client, LocalCluster

    if scheduler is not None:
        connect_timeout = CONNECT_TIMEOUT_S if connect_timeout is None else connect_timeout
        try:
            # set_as_default=False: dask computations in this process (slide
            # reads while planning, reports) stay local.
            client = Client(scheduler, timeout=connect_timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError, TypeError) as exc:
            reason = one_line(exc)
            raise WsisegError(
                f"cannot reach the dask scheduler at {scheduler} within {connect_timeout:g} s ({reason}); "
                "is `dask scheduler` running there and the port open?"
            ) from exc
        try:
            yield client
        finally:
            client.close()
        return
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be a positive integer, got {workers!r}")
    # One slide per worker thread, none queued on a worker: when a crashing slide kills its worker, dask counts
    # the death against every task that worker held, so a slide queued behind it would fail with it.
    with dask.config.set(
        {
            "distributed.scheduler.allowed-failures": int(allowed_failures),
            "distributed.scheduler.worker-saturation": 1.0,
        }
    ):
        # Quiet: worker restarts are reported per slide in status.csv, not as log noise.
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
    try:
        client = Client(cluster, set_as_default=False)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def _workers(client) -> list[dict]:
    return list(client.scheduler_info(n_workers=-1).get("workers", {}).values())


def _has_gpu_workers(client) -> bool:
    return any((w.get("resources") or {}).get("GPU", 0) > 0 for w in _workers(client))


def _capacity(client, gpu: bool) -> int:
    """Slides the cluster can run at once: GPUs, or worker threads."""
    workers = _workers(client)
    if gpu:
        return int(sum((w.get("resources") or {}).get("GPU", 0) for w in workers))
    return sum(int(w.get("nthreads", 1)) for w in workers)


def _allowed_failures(dask_scheduler=None) -> int:
    return int(dask_scheduler.allowed_failures)


# ---------------------------------------------------------------------------
# on the worker


def _stage_reporter(topic: str, name: str):
    """Forward a slide's progress to the client as throttled dask events."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a worker (e.g. a synchronous test call)
        return None
    last: list[Any] = [None, 0.0]

    def report(stage: str, fraction: float) -> None:
        now = time.monotonic()
        if stage != last[0] or fraction >= 1.0 or now - last[1] >= _STAGE_INTERVAL_S:
            last[0], last[1] = stage, now
            worker.log_event(topic, {"name": name, "stage": stage, "fraction": float(fraction)})

    return report


_LOCAL_DASK_LOCK = threading.Lock()
_local_dask_users = 0
_local_dask_restore: Any = None


@contextlib.contextmanager
def _local_dask():
    """Compute the slide's lazy dask arrays with local threads inside a task.

    Inside a task dask would otherwise send every chunk read to the cluster
    (through the worker's client): a slide's chunks belong to the worker that
    reads it. ``dask.config`` is process-wide, so concurrent tasks of one
    worker share one setting, restored when the last of them ends.
    """
    import dask

    global _local_dask_users, _local_dask_restore
    with _LOCAL_DASK_LOCK:
        if _local_dask_users == 0:
            _local_dask_restore = dask.config.set(scheduler="threads")
        _local_dask_users += 1
    try:
        yield
    finally:
        with _LOCAL_DASK_LOCK:
            _local_dask_users -= 1
            if _local_dask_users == 0 and _local_dask_restore is not None:
                _local_dask_restore.__exit__(None, None, None)
                _local_dask_restore = None


def _slide_task(
    job: SlideJob,
    out_dir: str,
    process: ProcessFn,
    fingerprint: str,
    overwrite: bool,
    lock_timeout: float,
    run_id: str,
    topic: str,
    slide_timeout: float | None = None,
) -> SlideOutcome:
    """The dask task of one slide: the same lock/process/marker rules (and time limit) as a local run."""
    with _local_dask():
        return execute_slide(
            job,
            out_dir,
            process,
            fingerprint=fingerprint,
            overwrite=overwrite,
            lock_timeout=lock_timeout,
            progress=_stage_reporter(topic, job.name),
            run_id=run_id,
            timeout=slide_timeout,
        )


# ---------------------------------------------------------------------------
# the client


def _killed_message(exc: BaseException, allowed: int | None) -> str:
    n = getattr(exc, "allowed_failures", allowed)
    times = f"{n + 1} times" if isinstance(n, int) else "repeatedly"
    last = getattr(getattr(exc, "last_worker", None), "address", None)
    where = f", last on {last}" if last else ""
    return (
        f"its dask worker died {times} while processing it{where} (a crash, or killed e.g. for memory); "
        "gave up after the scheduler's allowed-failures limit"
    )


def _future_outcome(fut, allowed: int | None) -> SlideOutcome:
    """A finished future -> the slide's outcome; cluster-side failures become ``failed``."""
    from distributed import KilledWorker

    if fut.status == "finished":
        try:
            outcome = fut.result()
        except Exception as exc:  # noqa: BLE001 - e.g. the result cannot be unpickled here
            return SlideOutcome("failed", error=f"cannot fetch the result from the cluster: {describe_error(exc)}")
        if isinstance(outcome, SlideOutcome):
            return outcome
        return SlideOutcome("failed", error=f"the cluster returned {type(outcome).__name__}, not SlideOutcome")
    if fut.status == "error":
        try:
            exc = fut.exception()
        except Exception as err:  # noqa: BLE001
            exc = err
        if isinstance(exc, KilledWorker):
            return SlideOutcome("failed", error=_killed_message(exc, allowed))
        return SlideOutcome("failed", error=f"task failed on the cluster: {describe_error(exc)}")
    return SlideOutcome("failed", error=f"task {fut.status} on the cluster (scheduler restarted or connection lost?)")


def _check_picklable(process: ProcessFn) -> None:
    from distributed.protocol.pickle import dumps

    try:
        dumps(process)
    except Exception as exc:  # noqa: BLE001 - any pickling failure means the same thing
        raise ConfigError(
            f"the per-slide function cannot be sent to dask workers ({type(exc).__name__}: {exc}); "
            "use a top-level function or an instance of a top-level class"
        ) from exc


def run_batch_distributed(
    jobs: Iterable[SlideJob],
    out_dir: str | os.PathLike,
    process: ProcessFn,
    *,
    fingerprint: str,
    scheduler: str | None = None,
    workers: int | None = None,
    client=None,
    overwrite: bool = False,
    progress: Literal["auto", "tty", "jsonl", "none"] = "auto",
    stream: IO[str] | None = None,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    allowed_failures: int = DEFAULT_ALLOWED_FAILURES,
    retries: int = 1,
    connect_timeout: float | None = None,
    gpu: bool | None = None,
    slide_timeout: float | None = None,
) -> BatchResult:
    """:func:`wsiseg.batch.runner.run_batch` with one dask task per slide.

    Parameters
    ----------
    jobs, out_dir, fingerprint, overwrite, progress, stream, lock_timeout
        As for :func:`wsiseg.batch.runner.run_batch`. ``out_dir`` and the slides must
        be reachable at the same absolute paths on every worker.
    process : ProcessFn
        Picklable per-slide function (top-level function or instance of a
        top-level class, e.g. :class:`wsiseg.segment.SlideSegmenter`), run on the workers.
    scheduler, workers, client
        Exactly one: a scheduler address, a number of local worker processes,
        or a connected :class:`distributed.Client`.
    allowed_failures : int
        Worker losses per slide before it fails (``workers`` only).
    retries : int
        Dask retries of a task that raised outside the slide's own error
        handling (e.g. the task cannot be unpickled on a worker).
    connect_timeout : float, optional
        Seconds to wait for ``scheduler`` (default :data:`CONNECT_TIMEOUT_S`).
    gpu : bool, optional
        Ask for one ``GPU`` resource per slide; default: when any worker
        advertises one.
    slide_timeout : float, optional
        Seconds each slide may take, as for :func:`wsiseg.batch.runner.run_batch`:
        on its worker the slide runs in a process of its own, killed when
        the time is up (the slide fails with ``timed out after N s``; the
        worker and the batch go on).

    Returns
    -------
    BatchResult

    Raises
    ------
    WsisegError
        Scheduler unreachable, bad jobs, unwritable output folder, a
        ``process`` that cannot be pickled: before any slide is attempted.
    """
    stream = sys.stderr if stream is None else stream
    jobs = [dataclasses.replace(j, path=os.path.abspath(j.path)) if isinstance(j, SlideJob) else j for j in jobs]
    jobs = check_batch(jobs, fingerprint=fingerprint, lock_timeout=lock_timeout)
    slide_timeout = check_timeout(slide_timeout)
    _check_picklable(process)
    out = Path(os.path.abspath(out_dir))
    kwargs = dict(
        fingerprint=fingerprint,
        overwrite=overwrite,
        progress=progress,
        stream=stream,
        lock_timeout=lock_timeout,
        retries=retries,
        gpu=gpu,
        slide_timeout=slide_timeout,
    )
    if client is not None:
        if scheduler is not None or workers is not None:
            raise ConfigError("give a client, a scheduler address or a number of workers, not several")
        return _drive(client, jobs, out, process, **kwargs)
    with cluster_client(scheduler, workers, allowed_failures=allowed_failures, connect_timeout=connect_timeout) as c:
        return _drive(c, jobs, out, process, **kwargs)


def _drive(
    client,
    jobs,
    out: Path,
    process,
    *,
    fingerprint,
    overwrite,
    progress,
    stream,
    lock_timeout,
    retries,
    gpu,
    slide_timeout,
):
    from distributed import as_completed

    run_id = uuid.uuid4().hex
    topic = f"wsiseg-progress-{run_id}"
    use_gpu = _has_gpu_workers(client) if gpu is None else bool(gpu)
    try:
        allowed = client.run_on_scheduler(_allowed_failures)
    except Exception:  # noqa: BLE001 - only used in a message
        allowed = None
    rec = BatchRecorder(jobs, out, progress, stream)
    index = {job.name: i for i, job in enumerate(jobs)}

    def on_event(event) -> None:
        try:
            msg = event[1]
            i = index.get(msg.get("name"))
            if i is not None and rec.results[i] is None:
                rec.stage(i, str(msg.get("stage")), float(msg.get("fraction", 0.0)))
        except Exception:  # noqa: BLE001, S110 - progress must never break the batch
            pass

    client.subscribe_topic(topic, on_event)
    queue: deque[tuple[int, str]] = deque()
    in_flight: dict[Any, int] = {}
    completed = as_completed(loop=client.loop)
    try:
        for i, job in enumerate(jobs):
            action, reason = plan_slide(job, out, fingerprint, overwrite=overwrite)
            if action == "skip":
                rec.slide_start(i, action, reason)
                rec.slide_done(i, SlideOutcome("skipped", error=DONE_REASON))
            else:
                queue.append((i, reason))
        capacity, checked = 0, 0.0
        while queue or in_flight:
            if time.monotonic() - checked >= _POLL_S:
                capacity, checked = _capacity(client, use_gpu), time.monotonic()
            # Keep at least one slide queued so that a cluster still starting up gets work.
            while queue and (len(in_flight) < capacity or not in_flight):
                i, reason = queue.popleft()
                rec.slide_start(i, "process", reason)
                fut = client.submit(
                    _slide_task,
                    jobs[i],
                    str(out),
                    process,
                    fingerprint,
                    overwrite,
                    lock_timeout,
                    run_id,
                    topic,
                    slide_timeout,
                    key=f"wsiseg-slide-{run_id[:8]}-{i}",
                    pure=False,
                    retries=retries,
                    resources={"GPU": 1} if use_gpu else None,
                )
                in_flight[fut] = i
                completed.add(fut)
            # Wake up now and then even without results: workers that joined add capacity.
            deadline = time.monotonic() + _POLL_S
            while not completed.has_ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            done = completed.next_batch(block=False)
            if not done:
                continue
            for fut in done:
                i = in_flight.pop(fut)
                if fut.status != "finished":  # no attempt runs any more: free what a dead worker held
                    with contextlib.suppress(OSError):
                        release_lost_slide(jobs[i], out, run_id)
                rec.slide_done(i, _future_outcome(fut, allowed))
                fut.release()
            checked = 0.0  # a slot is free: re-read the capacity (workers may have come or gone)
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"aborted ({type(exc).__name__})"
        for fut, i in in_flight.items():
            with contextlib.suppress(Exception):
                fut.cancel()
            rec.slide_done(i, SlideOutcome("failed", error=reason), write=False)
        rec.abort()
        raise
    finally:
        with contextlib.suppress(Exception):
            client.unsubscribe_topic(topic)
    return rec.finish()
