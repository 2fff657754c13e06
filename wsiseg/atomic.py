"""Atomic outputs: write under a temporary sibling name, rename when complete.

Nothing half-written is ever presented under a final name: a crash, Ctrl-C or
full disk leaves at most a ``.NAME.tmp-PID`` sibling, which is removed on the
way out when possible.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from wsiseg.errors import WsisegError

__all__ = [
    "atomic_output",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` on success.

    Parameters
    ----------
    path : path-like
        Final file or directory name.
    overwrite : bool
        Replace an existing ``path``. Without it an existing output is refused
        before any work starts.

    Raises
    ------
    WsisegError
        If ``path`` exists and ``overwrite`` is false, or its folder is not
        writable.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise WsisegError("output exists (use --overwrite to replace it)", final)
    parent = final.parent if str(final.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WsisegError(f"cannot create output folder: {exc.strerror or exc}", parent) from exc
    if not os.access(parent, os.W_OK):
        raise WsisegError("output folder is not writable", parent)
    tmp = parent / f".{final.name}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            # Some writers (safetensors) create 0600 files; outputs on shared lab storage
            # should get the usual permissions of the user's umask.
            os.chmod(tmp, 0o666 & ~_umask())
        if final.exists():
            if not overwrite:  # appeared while we were writing
                raise WsisegError("output exists (use --overwrite to replace it)", final)
            # Directories cannot be replaced by rename; move the old one aside first
            # so the final name is never missing for long and never half-written.
            old = parent / f".{final.name}.old-{os.getpid()}"
            _remove(old)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # put the previous output back
                raise
            _remove(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
