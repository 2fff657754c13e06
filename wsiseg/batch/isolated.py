"""Run one slide's process function in a worker process of its own, under a time limit.

Used by :func:`wsiseg.batch.runner.execute_slide` when a batch has a per-slide time
limit (``wsiseg segment --slide-timeout``). A thread cannot be stopped while
it is stuck in a read, a C library or an endless loop, so the slide runs in a
child process that can be: when the limit passes, the child and anything it
started are killed, the temporaries it wrote are removed and the slide fails
with ``timed out after N s``; the batch goes on. A child that dies by itself
(a segfault, the out-of-memory killer) fails its slide the same way instead
of taking the batch down.

The child is a fresh interpreter (``python -c``), not a fork,
so a parent that already uses CUDA or threads is safe, and it works inside
daemonic dask worker processes, which may not use :mod:`multiprocessing`.
It receives the parent's ``sys.path`` and, pickled with cloudpickle, the
process function and the job; it sends back the progress reports and the
:class:`~wsiseg.batch.jobs.SlideOutcome`. The price is a new interpreter per slide
that imports its libraries and, for ``wsiseg segment``, loads the model again:
a few seconds per slide.

The child is started in a session of its own (Ctrl-C reaches the parent,
which kills the child and records the slide as interrupted) and, on Linux,
is killed when the thread that started it dies, so a parent killed outright
leaves no child running. Its pid is written into the slide's lock
(:func:`wsiseg.batch.runner.execute_slide`), so the next run also removes the
temporaries of such a child.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable

from wsiseg.batch.jobs import SlideOutcome, describe_error
from wsiseg.batch.locks import remove_temporaries
from wsiseg.errors import ConfigError, one_line

__all__ = ["check_runnable", "check_timeout", "run_isolated"]

_HEADER = struct.Struct("<Q")  # length of each pickled message
_EOF = object()
# The child's first act: take the parent's sys.path (the first message), so that it imports the same wsiseg
# and finds the modules of the process function, then serve the slide.
_BOOTSTRAP = (
    "import pickle, struct, sys; "
    "(n,) = struct.unpack('<Q', sys.stdin.buffer.read(8)); "
    "sys.path[:] = pickle.loads(sys.stdin.buffer.read(n)); "
    "from wsiseg.batch.isolated import _child_main; "
    "_child_main(int(sys.argv[1]), int(sys.argv[2]))"
)


def check_timeout(seconds: float | None) -> float | None:
    """A per-slide time limit as a float, or None for no limit.

    Raises
    ------
    ConfigError
        Not a positive finite number of seconds.
    """
    if seconds is None:
        return None
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"slide timeout must be a positive number of seconds, got {seconds!r}")
    return value


def check_runnable(process: Callable) -> None:
    """Refuse, before any slide, a process function that cannot be sent to a worker process.

    Raises
    ------
    ConfigError
        ``process`` cannot be pickled (cloudpickle pickles local functions
        by value, but not, e.g., open files or locks they hold).
    """
    import cloudpickle

    try:
        cloudpickle.dumps(process)
    except Exception as exc:  # noqa: BLE001 - any pickling failure means the same thing
        raise ConfigError(
            f"with a slide timeout each slide runs in a worker process, but the per-slide function cannot be sent "
            f"there ({type(exc).__name__}: {one_line(exc)})"
        ) from exc


def _frame(data: bytes) -> bytes:
    return _HEADER.pack(len(data)) + data


def _read_frame(stream: IO[bytes]) -> bytes | None:
    """One message, or None at the end of the stream (also a cut-off one)."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(head)
    data = stream.read(size)
    return data if len(data) == size else None


def _pump(stream: IO[bytes], messages: queue.Queue) -> None:
    """Reader thread: the child's messages into ``messages``, then ``_EOF``."""
    try:
        while (data := _read_frame(stream)) is not None:
            try:
                messages.put(pickle.loads(data))
            except Exception as exc:  # noqa: BLE001 - e.g. an outcome class this process cannot import
                messages.put(("error", f"internal error: cannot read the worker process's message ({exc!r})"))
    finally:
        messages.put(_EOF)


def _feed(stdin: IO[bytes], frames: list[bytes]) -> None:
    """Writer thread: the payload, so that a child that never reads cannot block the parent."""
    with contextlib.suppress(OSError):  # the child died first: its exit status says why
        for f in frames:
            stdin.write(f)
        stdin.close()


def _kill(child: subprocess.Popen) -> None:
    """Kill the child and whatever it started (its session), and reap it."""
    if child.returncode is None:  # not reaped yet, so its pid (the group's id) cannot have been reused
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def _death(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"its worker process was killed by {name}{why} before it finished"
    return f"its worker process exited with code {code} before it finished"


def run_isolated(
    process: Callable,
    job: Any,
    out_dir: str | os.PathLike,
    *,
    fingerprint: str,
    overwrite: bool,
    progress: Callable[[str, float], None],
    timeout: float,
    started: Callable[[int], None] | None = None,
):
    """Call ``process`` on one slide in a child process, killed after ``timeout`` seconds.

    Parameters
    ----------
    process : ProcessFn
        The per-slide function (:class:`wsiseg.batch.jobs.ProcessFn`); it must be
        picklable by cloudpickle (:func:`check_runnable`).
    job : SlideJob
    out_dir : path-like
    fingerprint : str
    overwrite : bool
        Passed to ``process``.
    progress : callable
        Receives the child's ``progress(stage, fraction)`` reports, in this
        process; it must not raise.
    timeout : float
        Seconds from the child's start until it is killed.
    started : callable, optional
        Called with the child's pid as soon as it runs (e.g. to record it in
        the slide's lock).

    Returns
    -------
    SlideOutcome
        What ``process`` returned; ``failed`` with ``timed out after N s``,
        with how the child died, or with the error ``process`` raised (as
        :func:`wsiseg.batch.runner.execute_slide` words it).

    Raises
    ------
    BaseException
        Only KeyboardInterrupt and the like, after the child was killed and
        its temporaries removed.
    """
    import cloudpickle

    out = Path(out_dir)
    frames = [
        _frame(pickle.dumps(list(sys.path))),
        _frame(cloudpickle.dumps((process, job, str(out), fingerprint, overwrite))),
    ]
    read_fd, write_fd = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, str(write_fd), str(os.getpid())],
            stdin=subprocess.PIPE,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    t0 = time.monotonic()
    messages: queue.Queue = queue.Queue()
    reader = os.fdopen(read_fd, "rb")
    pump = threading.Thread(target=_pump, args=(reader, messages), name="wsiseg-isolated-reader", daemon=True)
    pump.start()
    threading.Thread(target=_feed, args=(child.stdin, frames), name="wsiseg-isolated-writer", daemon=True).start()
    timed_out = SlideOutcome("failed", error=f"timed out after {timeout:g} s")
    answered = False
    try:
        if started is not None:
            started(child.pid)
        while True:
            remaining = timeout - (time.monotonic() - t0)
            if remaining <= 0:
                return timed_out
            try:
                msg = messages.get(timeout=remaining)
            except queue.Empty:
                continue
            if msg is _EOF:  # the child closed its end: it has exited, or is about to
                try:
                    left = timeout - (time.monotonic() - t0)
                    return SlideOutcome("failed", error=_death(child.wait(timeout=max(left, 0.1))))
                except subprocess.TimeoutExpired:
                    return timed_out
            if msg[0] == "stage":
                progress(msg[1], msg[2])
                continue
            answered = True
            return msg[1] if msg[0] == "done" else SlideOutcome("failed", error=msg[1])
    finally:
        # Whatever happened (an answer, the time limit, Ctrl-C): no child outlives its slide, nor do its
        # temporaries. A child that answered exits by itself; it is only killed if it does not.
        if answered:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        _kill(child)
        pump.join(timeout=5)
        reader.close()
        remove_temporaries(out, job.name, child.pid)


# ---------------------------------------------------------------------------
# the child


def _die_with_parent(parent: int) -> None:
    """Exit when the process that started this one is gone (Linux: as soon as it dies)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)

    def watch() -> None:  # elsewhere (and as a second guard): look now and then
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="wsiseg-parent-watch", daemon=True).start()


def _child_main(fd: int, parent: int) -> None:
    """The child's side: read the slide's call from stdin, run it, send progress and outcome to ``fd``."""
    _die_with_parent(parent)
    pipe = os.fdopen(fd, "wb")
    guard = threading.Lock()  # the process function may report progress from several threads

    def send(msg) -> None:
        data = _frame(pickle.dumps(msg))
        with guard:
            pipe.write(data)
            pipe.flush()

    def progress(stage: str, fraction: float) -> None:
        with contextlib.suppress(Exception):
            send(("stage", str(stage), float(fraction)))

    try:
        process, job, out_dir, fingerprint, overwrite = pickle.loads(_read_frame(sys.stdin.buffer) or b"")
    except Exception as exc:  # noqa: BLE001
        send(
            (
                "error",
                f"internal error: the worker process cannot load the per-slide function "
                f"({type(exc).__name__}: {one_line(exc)})",
            )
        )
        os._exit(0)
    try:
        msg = ("done", process(job, Path(out_dir), fingerprint=fingerprint, overwrite=overwrite, progress=progress))
    except Exception as exc:  # noqa: BLE001 - reported as execute_slide reports it in process
        msg = ("error", describe_error(exc))
    try:
        send(msg)
    except Exception as exc:  # noqa: BLE001 - e.g. an outcome that cannot be pickled
        send(("error", f"internal error: the slide's result cannot be sent back ({type(exc).__name__}: {exc})"))
    pipe.close()
    os._exit(0)  # skip interpreter teardown: worker threads of the libraries must not keep the child alive
