"""Slide locks: one run at a time processes a slide, even across hosts; stale locks are taken over.

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
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from wsiseg.batch.jobs import SlideJob, now

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "LOCK_SUFFIX",
    "HeldBy",
    "Lock",
    "acquire_lock",
    "release_lost_slide",
    "remove_orphans",
    "remove_temporaries",
]

#: Seconds after which a lock from another host (not checkable) is taken over.
DEFAULT_LOCK_TIMEOUT = 6 * 3600.0

LOCK_SUFFIX = ".lock"
_HEARTBEAT_S = 60.0
_UNREADABLE_LOCK_GRACE_S = 60.0  # an empty lock may be one being written right now

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
class Lock:
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
class HeldBy:
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


def acquire_lock(path: Path, timeout: float, run_id: str | None = None) -> Lock | HeldBy:
    """Create ``path`` exclusively, taking over a stale lock; or say who holds it.

    ``run_id`` identifies one distributed batch: a lock it wrote itself is
    stale (see :func:`wsiseg.batch.runner.execute_slide`).

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
        "time": now(),
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
                return HeldBy(last)
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
        return Lock(path, token, time.monotonic(), previous=broken, owner=owner)
    return HeldBy(last)  # lost every race: someone else is busy with it


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


def remove_orphans(out_dir: Path, name: str, owner: dict | None) -> None:
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
    path = out / f"{job.name}{LOCK_SUFFIX}"
    seen = _read_lock(path)
    if seen is None or seen[1] is None or seen[1].get("run") != run_id:
        return False
    _break_stale(path, seen[0])
    remove_orphans(out, job.name, seen[1])
    return not path.exists()
