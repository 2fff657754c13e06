"""A fork server: functions called in forked children under a time and a memory limit, for ``wsiseg bench fuzz``.

A Python process started once (:class:`ForkServer`, running :func:`serve`) imports wsiseg and its
libraries (with one BLAS thread, so that it has no thread when it forks) and then forks one child per
call. The child sets its limits (``RLIMIT_AS``: the address space it inherited plus the memory limit;
no core files), calls its target (``"module:function"``) with its output in files, and leaves by
``os._exit`` with the exit code; the server kills it (and anything it started: it leads a process
group of its own) at the time limit and reports its exit status, time and peak resident memory
(:class:`Run`). Moved out of :mod:`wsiseg.bench.fuzz`, which classifies what the runs did.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PRELOAD",
    "ForkServer",
    "Run",
    "serve",
]

#: Modules a :class:`ForkServer` imports before its first fork unless told otherwise: wsiseg's slide
#: readers and their libraries, so that each child starts with them loaded.
PRELOAD = (
    "wsiseg.slide.open",
    "wsiseg.slide.info",
    "wsiseg.slide.convert",
    "tifffile",
    "imagecodecs",
    "openslide",
    "zarr",
    "dask.array",
)
_SERVER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Run:
    """How one command ended.

    Attributes
    ----------
    returncode : int
        The exit code, or minus the signal that killed the process.
    seconds : float
        Wall time from fork to exit.
    max_rss_mib : float
        Peak resident memory (``ru_maxrss``; it counts the pages shared with
        the fork server too).
    timed_out : bool
        Killed at the time limit.
    stdout, stderr : str
    """

    returncode: int
    seconds: float
    max_rss_mib: float
    timed_out: bool
    stdout: str
    stderr: str


def _vm_size() -> int | None:
    """This process's address space in bytes (Linux ``VmSize``), or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux: only Python's own threads can be seen
        import threading

        return threading.active_count()


def _die_with_parent() -> None:
    """Linux: be killed when the process that started this one dies (no orphans of a killed run)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child(req: dict) -> None:
    """The forked child: redirect output, set limits, call the target, leave with its exit code."""
    code = 1
    try:
        os.setpgid(0, 0)
        _die_with_parent()
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(req["cwd"])
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if req.get("memory"):
            limit = (_vm_size() or 0) + int(req["memory"])
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        module, name = req["target"].split(":")
        func = getattr(importlib.import_module(module), name)
        try:
            func(*req.get("args", ()))
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:  # sys.exit("message"): printed, exit code 1, as the interpreter does
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - reported as the interpreter reports an uncaught exception
            traceback.print_exc()
    except BaseException:  # noqa: BLE001 - the set-up itself failed: say so on the captured stderr
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(code & 0xFF)


def _wait(pid: int, timeout: float) -> tuple[int, float, float, bool]:
    """Wait for child ``pid`` at most ``timeout`` s; kill its process group; ``(returncode, s, rss MiB, timed out)``."""
    t0 = time.monotonic()
    timed_out = False
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            timed_out = not select.select([pidfd], [], [], timeout)[0]
        finally:
            os.close(pidfd)
    else:  # no pidfd: look without reaping (so that the group id stays ours until the kill)
        delay = 0.001
        while not os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
            if time.monotonic() - t0 > timeout:
                timed_out = True
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
    # The child is not reaped yet, so its pid (its group's id) cannot have been reused: kill what it left running.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.monotonic() - t0
    return os.waitstatus_to_exitcode(status), seconds, usage.ru_maxrss / 1024, timed_out


def serve() -> None:
    """The fork server's main loop: one JSON request a line on stdin, one JSON reply a line on stdout.

    The first request is ``{"preload": [modules]}``, answered with
    ``{"threads": n}`` after the imports. Each later request names a
    ``target`` (``"module:function"``), its ``args``, a ``cwd``, files for
    ``stdout`` and ``stderr``, a ``timeout`` in seconds and a ``memory``
    limit in bytes (address space beyond the server's, or null); it is
    answered with the child's ``returncode``, ``seconds``, ``max_rss_mib``
    and ``timed_out``, or with ``{"error": ...}`` when the server cannot
    fork safely. The server ends at the end of its input.
    """
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # a stray print of a library must not corrupt the protocol
    os.close(null)
    _die_with_parent()

    def reply(msg: dict) -> None:
        proto_out.write(json.dumps(msg).encode() + b"\n")
        proto_out.flush()

    for line in proto_in:
        req = json.loads(line)
        if "preload" in req:
            for module in req["preload"]:
                importlib.import_module(module)
            reply({"threads": _threads()})
            continue
        threads = _threads()
        if threads != 1:  # a fork copies one thread: locks held by the others would stay locked in the child
            reply({"error": f"the fork server has {threads} threads; forking it is not safe"})
            continue
        pid = os.fork()
        if pid == 0:
            proto_in.close()
            proto_out.close()
            _child(req)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also here: the child may not have run yet when the server kills its group
        code, seconds, rss, timed_out = _wait(pid, float(req["timeout"]))
        reply({"returncode": code, "seconds": seconds, "max_rss_mib": rss, "timed_out": timed_out})


class ForkServer:
    """A fork server (:func:`serve`) started as a child of this process.

    Parameters
    ----------
    preload : sequence of str
        Modules the server imports before its first fork.
    """

    def __init__(self, preload: Sequence[str] = PRELOAD):
        env = dict(os.environ, **_SERVER_ENV)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the same wsiseg as this process
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from wsiseg.bench.forkserver import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.threads = self._ask({"preload": list(preload)})["threads"]

    def _ask(self, req: dict) -> dict:
        self._proc.stdin.write(json.dumps(req).encode() + b"\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise RuntimeError(f"the fork server ended (exit code {code})")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(msg["error"])
        return msg

    def run(
        self, target: str, args: Sequence, *, cwd: str | os.PathLike, timeout: float, memory: int | None = None
    ) -> Run:
        """Call ``target(*args)`` in a forked child; its output is captured in files under ``cwd``.

        Parameters
        ----------
        target : str
            ``"module:function"``, e.g. ``"wsiseg.cli.app:run_cli"``.
        args : sequence
            JSON-serialisable arguments.
        cwd : path-like
            The child's working directory (an existing folder).
        timeout : float
            Seconds until the child and its process group are killed.
        memory : int, optional
            Bytes of address space the child may add to what it inherits.

        Returns
        -------
        Run
        """
        cwd = Path(cwd)
        out, err = cwd / ".fuzz-stdout", cwd / ".fuzz-stderr"
        msg = self._ask(
            {
                "target": target,
                "args": list(args),
                "cwd": str(cwd),
                "timeout": timeout,
                "memory": memory,
                "stdout": str(out),
                "stderr": str(err),
            }
        )
        texts = []
        for path in (out, err):
            try:
                texts.append(path.read_text(encoding="utf-8", errors="replace"))
                path.unlink()
            except FileNotFoundError:
                texts.append("")
        return Run(msg["returncode"], msg["seconds"], msg["max_rss_mib"], msg["timed_out"], *texts)

    def close(self) -> None:
        """End the server (at the end of its input) and reap it."""
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
