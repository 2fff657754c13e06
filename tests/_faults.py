"""Per-slide functions with injected faults, for tests on a real dask cluster.

Kept apart from the test modules (and free of torch) so that dask workers
import it quickly: spawned workers inherit the test process's ``sys.path``,
which holds ``tests/``, and unpickle these classes by reference.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiseg.atomic import atomic_output
from wsiseg.batch.jobs import SlideOutcome


@dataclass(frozen=True)
class Stamp:
    """A light per-slide function: writes ``NAME.txt`` holding the slide's path."""

    def __call__(self, job, out_dir, *, fingerprint, overwrite, progress):
        progress("stamp", 0.5)
        target = Path(out_dir) / f"{job.name}.txt"
        with atomic_output(target, overwrite=overwrite) as tmp:
            tmp.write_text(job.path)
        return SlideOutcome("ok", outputs={"text": target.name})


@dataclass(frozen=True)
class Faulty:
    """Wraps a per-slide function with faults and a side channel of completions.

    Attributes
    ----------
    inner : ProcessFn
        The real per-slide function.
    log_dir : str
        ``completed.log`` gets one line per slide finished (counts real
        completions, whatever status.csv says).
    slow : str
        On its first attempt this slide starts writing its mask, writes its
        worker's pid to ``slow.pid`` and sleeps, waiting to be killed.
    crash : str
        This slide kills its worker process every time.
    """

    inner: Any
    log_dir: str
    slow: str = ""
    crash: str = ""

    def __call__(self, job, out_dir, *, fingerprint, overwrite, progress):
        log = Path(self.log_dir)
        if job.name == self.crash:
            os._exit(3)
        if job.name == self.slow and not (log / "slow.pid").exists():
            with atomic_output(Path(out_dir) / f"{job.name}.mask.tif", overwrite=True) as tmp:
                tmp.write_bytes(b"II*\x00 half a mask")
                (log / "slow.pid").write_text(str(os.getpid()))
                time.sleep(120)
        outcome = self.inner(job, out_dir, fingerprint=fingerprint, overwrite=overwrite, progress=progress)
        with open(log / "completed.log", "a", encoding="utf-8") as fh:
            fh.write(job.name + "\n")
        return outcome
