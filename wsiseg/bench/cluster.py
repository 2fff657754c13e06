"""``wsiseg bench cluster``: slides per hour of ``wsiseg segment`` in-process and on local dask worker processes.

The batch is copies of the synthetic slide of :mod:`wsiseg.bench.common` (:func:`cached_synthetic_slide`); the
section is written by :func:`wsiseg.bench.common.write_section`. Moved out of :mod:`wsiseg.bench.common`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from wsiseg.bench.common import SlideSpec, cached_synthetic_slide, machine_info, machine_lines
from wsiseg.errors import ConfigError, WsisegError

__all__ = [
    "ClusterBench",
    "ClusterRun",
    "bench_cluster",
    "format_cluster_section",
]


@dataclass(frozen=True)
class ClusterRun:
    """One way of running the same batch: in-process or N local worker processes."""

    label: str
    workers: int | None
    wall_seconds: float  # the whole `wsiseg segment` call, cluster start-up included
    batch_seconds: float  # first slide planned to last slide recorded
    slide_seconds: tuple[float, ...]  # per slide, as status.csv records them
    ok: int

    @property
    def slides_per_hour(self) -> float:
        return 3600.0 * self.ok / self.wall_seconds

    @property
    def batch_slides_per_hour(self) -> float:
        return 3600.0 * self.ok / self.batch_seconds


@dataclass(frozen=True)
class ClusterBench:
    """Result of :func:`bench_cluster`."""

    spec: SlideSpec
    slides: int
    model: str
    runs: tuple[ClusterRun, ...]
    machine: dict = field(default_factory=dict)
    load_after: str = "n/a"  # load average when the runs ended: others' work competes for the cores


def _bench_model(workdir: Path) -> Path:
    """The shipped demo model if there is one, else an untrained net of the default training config."""
    from wsiseg.demo import MODEL

    if MODEL.is_file():
        return MODEL
    path = workdir / "untrained-default-3class.safetensors"
    if not path.is_file():
        import torch

        from wsiseg.models.io import save_deformseg
        from wsiseg.output.classes import default_classes
        from wsiseg.training.config import TrainConfig, build_net

        torch.manual_seed(0)
        save_deformseg(path, build_net(TrainConfig(), 3).eval(), default_classes(3))
    return path


def bench_cluster(
    spec: SlideSpec,
    workdir: str | os.PathLike,
    slides: int = 6,
    workers: tuple[int, ...] = (1, 2),
    *,
    in_process: bool = True,
    repeats: int = 1,
    model: str | os.PathLike | None = None,
    log=None,
) -> ClusterBench:
    """Slides per hour of ``wsiseg segment`` in-process and on local clusters of N worker processes.

    The batch is ``slides`` copies (hard links) of one synthetic slide,
    segmented with every output (mask, overlay, GeoJSON, QC, report) on the
    CPU, into a fresh folder per run. Worker processes get one thread each
    (dask sets ``OMP_NUM_THREADS=1`` in them); the in-process run uses
    torch's default threads.

    Parameters
    ----------
    spec : SlideSpec
        The synthetic slide (built in ``workdir`` unless already there).
    slides : int
        Slides per batch.
    workers : tuple of int
        Worker-process counts to measure.
    in_process : bool
        Also measure the plain in-process run.
    repeats : int
        Rounds over all modes (interleaved, so that load from other users
        of the machine spreads over every mode); every run is kept.
    model : path-like, optional
        Model file; default the shipped demo model, else an untrained net of
        the default training config (timing does not depend on the weights).
    """
    from wsiseg.segment import SegmentOptions, run_segment

    say = log or (lambda msg: None)
    if slides < 1:
        raise ConfigError(f"--slides must be positive, got {slides}")
    machine = machine_info()
    workdir = Path(workdir)
    path, write_s, reused = cached_synthetic_slide(spec, workdir)
    say(f"synthetic slide {'reused' if reused else f'written in {write_s:.1f} s'}: {path}")
    model_path = Path(model) if model else _bench_model(workdir)
    root = Path(tempfile.mkdtemp(prefix="cluster-", dir=workdir))
    try:
        copies = []
        for k in range(slides):  # distinct paths: a batch keeps the same real file once
            dst = root / "slides" / f"slide-{k:02d}.tiff"
            dst.parent.mkdir(exist_ok=True)
            try:
                os.link(path, dst)
            except OSError:
                shutil.copyfile(path, dst)
            copies.append(str(dst))
        modes: list[int | None] = ([None] if in_process else []) + list(workers)
        runs = []
        for rep, n in ((r, n) for r in range(max(1, repeats)) for n in modes):
            label = "in-process" if n is None else f"{n} worker process{'es' if n > 1 else ''}"
            out = root / f"out-{n or 0}-{rep}"
            t0 = time.perf_counter()
            result = run_segment(copies, model_path, out, SegmentOptions(device="cpu"), progress="none", workers=n)
            wall = time.perf_counter() - t0
            ok = result.counts["ok"]
            if ok != slides:
                errors = sorted({r.error for r in result.results if r.status != "ok"})
                raise WsisegError(f"benchmark run '{label}' finished {ok} of {slides} slides: {errors}")
            run = ClusterRun(label, n, wall, result.seconds, tuple(r.seconds for r in result.results), ok)
            say(
                f"  {label:20s} {wall:7.1f} s wall, {run.slides_per_hour:7.0f} slides/h "
                f"({run.batch_slides_per_hour:.0f} slides/h without start-up)"
            )
            runs.append(run)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    model_name = f"{model_path.parent.name}/{model_path.name}"
    return ClusterBench(spec, slides, model_name, tuple(runs), machine, machine_info()["load"])


def format_cluster_section(b: ClusterBench, command: str) -> str:
    """Markdown for the ``cluster`` section of docs/benchmarks.md."""
    s = b.spec
    labels = list(dict.fromkeys(r.label for r in b.runs))
    best = {lb: min((r for r in b.runs if r.label == lb), key=lambda r: r.wall_seconds) for lb in labels}
    base = best[labels[0]]
    lines = [
        "## Scale-out: slides per hour, in-process vs local dask worker processes",
        "",
        f"- Command: `{command}`",
        *machine_lines(b.machine),
        f"- Batch: {b.slides} copies of a synthetic {s.width} x {s.height} JPEG BigTIFF (tiles {s.tile}, "
        f"mirror-tiled from `{s.source.name}`), `wsiseg segment` with every output (mask, overlay, GeoJSON, QC, "
        f"report) on the CPU, model `{b.model}`; a fresh output folder per run.",
        "- Wall = the whole `run_segment` call, including starting the local cluster and each worker's first "
        "imports and model load; batch = from planning the first slide to recording the last (no cluster "
        "start-up). Worker processes run one slide at a time with one thread each (dask sets "
        "`OMP_NUM_THREADS=1`); in-process uses torch's default threads.",
        f"- {len(b.runs) // len(labels)} round(s) over the modes, interleaved; each row is the run with the "
        "shortest wall time (least disturbed by other users of the machine), all wall times in the last column. "
        f"Load average at the end: {b.load_after}. When other work already keeps the cores busy (load average "
        "near or above the CPU count), more worker processes than free cores only add contention.",
        "",
        "| run | wall s | slides/h (wall) | batch s | slides/h (batch) | median s per slide "
        "| speed-up vs first row (wall) "
        "| all runs: wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lb in labels:
        r = best[lb]
        every = ", ".join(f"{x.wall_seconds:.1f}" for x in b.runs if x.label == lb)
        lines.append(
            f"| {r.label} | {r.wall_seconds:.1f} | **{r.slides_per_hour:.0f}** | {r.batch_seconds:.1f} | "
            f"{r.batch_slides_per_hour:.0f} | {statistics.median(r.slide_seconds):.2f} | "
            f"{base.wall_seconds / r.wall_seconds:.2f}x | {every} |"
        )
    return "\n".join(lines)
