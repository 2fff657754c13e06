"""``wsiseg bench gpu``: slides per hour on the layout slides on a CUDA device, labels checked against the CPU's.

Prepared for a machine with a GPU (none is lent here); ``--device cpu`` runs the same measurement on the
CPU, which is how the test suite checks it. Moved out of :mod:`wsiseg.bench.segment`, whose runs it reuses.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsiseg.bench.common import SlideSpec, cached_synthetic_slide, machine_info, machine_lines
from wsiseg.bench.segment import mark
from wsiseg.errors import ConfigError

__all__ = ["GPU_AGREEMENT", "GpuBench", "GpuRun", "bench_gpu", "format_gpu_section"]


#: Agreement the GPU's labels must reach with the CPU's on the same slide (issue 12).
GPU_AGREEMENT = 0.999


@dataclass(frozen=True)
class GpuRun:
    """One layout slide on the measured device, and its labels against a CPU run.

    Attributes
    ----------
    spec : SlideSpec
    seconds : tuple of float
        ``segment_slide`` end to end (every output), per timed run; the model
        is loaded and the device warmed up before.
    timings : dict
        The report's seconds per stage of the fastest run.
    regions : int
        Regions segmented.
    reference_seconds : float
        The CPU reference run of the same slide.
    agreement : float
        Fraction of equal label pixels between the device's and the CPU's
        mask, compared at ``compare_level`` (level 0 when it is small enough).
    compare_level : (int, int)
        Size ``(width, height)`` of the mask level compared.
    """

    spec: SlideSpec
    seconds: tuple[float, ...]
    timings: dict
    regions: int
    reference_seconds: float
    agreement: float
    compare_level: tuple[int, int]

    @property
    def slides_per_hour(self) -> float:
        """Slides per hour at the fastest run's pace (one slide after another, model loaded once)."""
        return 3600.0 / min(self.seconds)


@dataclass(frozen=True)
class GpuBench:
    """Result of :func:`bench_gpu`."""

    device: str
    device_name: str
    amp: bool
    model: str
    runs: tuple[GpuRun, ...]
    features: tuple[str, ...]
    machine: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every layout's labels agree with the CPU's on at least :data:`GPU_AGREEMENT` of the pixels."""
        return all(r.agreement >= GPU_AGREEMENT for r in self.runs)


def _segment_once(slide: Path, model, out: Path, device: str) -> tuple[float, dict, Path]:
    """``segment_slide`` with every output on ``device``: seconds, the report, the mask."""
    from wsiseg.segment import SegmentOptions, segment_slide

    t0 = time.perf_counter()
    outputs = segment_slide(str(slide), model, out, "bench", SegmentOptions(device=device))
    seconds = time.perf_counter() - t0
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    report = json.loads((out / outputs["report"]).read_text())
    return seconds, report, out / outputs["mask"]


def _agreement(mask: Path, reference: Path, max_size: int) -> tuple[float, tuple[int, int]]:
    """Fraction of equal labels of two masks at their largest level with a long side <= ``max_size``."""
    from wsiseg.segment import reduced_mask_level

    a, _ = reduced_mask_level(mask, max_size)
    b, _ = reduced_mask_level(reference, max_size)
    if a.shape != b.shape:
        return 0.0, (a.shape[1], a.shape[0])
    return float(np.mean(a == b)), (a.shape[1], a.shape[0])


def bench_gpu(
    specs: list[SlideSpec],
    workdir: str | os.PathLike,
    *,
    device: str = "cuda",
    model: str | os.PathLike | None = None,
    repeats: int = 2,
    compare_size: int = 16384,
    log=None,
) -> GpuBench:
    """Slides per hour of ``wsiseg segment`` on a GPU, and its labels against the CPU's.

    For each slide of ``specs`` (layout slides, built in ``workdir`` unless
    cached there): ``repeats`` timed runs of ``segment_slide`` with every
    output on ``device`` (the model loaded once, AMP on for CUDA, after one
    untimed warm-up run that pays CUDA's start-up; none on the CPU), then
    one run on the CPU;
    the two label masks are compared at their largest level with a long side
    of at most ``compare_size`` pixels.

    Parameters
    ----------
    specs : list of SlideSpec
    workdir : path-like
        Slide cache; outputs go to temporary folders there and are removed.
    device : str
        ``"cuda"``, ``"cuda:N"`` or ``"cpu"`` (the same measurement on the
        CPU, for testing the script where there is no GPU).
    model : path-like, optional
        Model file; default the shipped demo model.
    repeats : int
        Timed runs per slide (the fastest counts).
    compare_size : int
        Long-side bound of the mask level compared.
    log : callable, optional
        Called with progress lines.

    Raises
    ------
    ConfigError
        ``device`` is a CUDA device and this machine has none.
    """
    import torch

    from wsiseg.demo import MODEL as DEMO_MODEL
    from wsiseg.device import resolve_device
    from wsiseg.models.io import load_deformseg

    say = log or (lambda msg: None)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "no CUDA device on this machine: `wsiseg bench gpu` measures GPU throughput "
            "(`--device cpu` runs the same measurement on the CPU, on a small layout)"
        )
    dev = resolve_device(device)
    if repeats < 1:
        raise ConfigError(f"--repeats must be positive, got {repeats}")
    machine = machine_info()
    workdir = Path(workdir)
    model_path = Path(model) if model else DEMO_MODEL
    loaded = load_deformseg(model_path, device=str(dev))
    reference = load_deformseg(model_path, device="cpu") if dev.type != "cpu" else loaded
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} logical CPUs)"
    features = (
        f"AMP (float16 autocast): {'on' if dev.type == 'cuda' else 'off (CPU)'}",
        "regions batched: yes, regions of one sampling geometry through both nets together "
        "(wsiseg.segment.regions.BATCH_SAMPLES samples a batch)",
        "pinned host memory, gather overlapped with compute: no (not in this version); decode, inverse map, mask "
        "writer, GeoJSON and QC run on the CPU",
    )
    runs = []
    for k, spec in enumerate(specs):
        path, write_s, reused = cached_synthetic_slide(spec, workdir)
        say(f"{spec.layout} slide {spec.width}x{spec.height}: {'reused' if reused else f'written in {write_s:.1f} s'}")
        root = Path(tempfile.mkdtemp(prefix="gpu-", dir=workdir))
        try:
            if k == 0 and dev.type == "cuda":  # CUDA context, cuDNN plans, allocator: paid once, not timed
                _segment_once(path, loaded, root / "warm-up", str(dev))
            times, best = [], None
            for i in range(repeats):
                seconds, report, mask = _segment_once(path, loaded, root / f"run-{i}", str(dev))
                times.append(seconds)
                if best is None or seconds < min(times[:-1]):
                    best = (report, mask)
            assert best is not None
            ref_seconds, _, ref_mask = _segment_once(path, reference, root / "cpu", "cpu")
            agreement, level = _agreement(best[1], ref_mask, compare_size)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        run = GpuRun(spec, tuple(times), best[0]["timings"], len(best[0]["regions"]), ref_seconds, agreement, level)
        say(
            f"  {spec.layout}: {', '.join(f'{t:.2f}' for t in times)} s -> {run.slides_per_hour:.0f} slides/h; "
            f"CPU reference {ref_seconds:.2f} s; labels equal on {100 * agreement:.3f} % of {level[0]}x{level[1]}"
        )
        runs.append(run)
    amp = dev.type == "cuda"
    return GpuBench(str(dev), name, amp, model_path.name, tuple(runs), features, machine)


def format_gpu_section(b: GpuBench, command: str) -> str:
    """Markdown for the ``gpu`` section of docs/benchmarks.md."""
    stages = [k for k in b.runs[0].timings if k != "total"] if b.runs else []
    lines = [
        "## GPU throughput: slides per hour, labels against the CPU",
        "",
        f"- Command: `{command}`",
        *machine_lines(b.machine),
        f"- Device: {b.device} ({b.device_name}); model `{b.model}`; " + "; ".join(b.features) + ".",
        "- Each slide: one `segment_slide` per run with every output (mask, overlay, GeoJSON, QC, report), the "
        "model loaded once and (CUDA) the device warmed up by an untimed run first; slides/h = 3600 / the fastest "
        "run. "
        "Then one run on the CPU; *equal labels* = fraction of equal pixels of the two masks at the level "
        f"compared (goal >= {100 * GPU_AGREEMENT:.1f} %).",
        "",
        "| layout | size | regions | " + " | ".join(stages) + " | total s (runs) | slides/h | CPU reference s | "
        "level compared | equal labels |",
        "|---|---|---|" + "---|" * len(stages) + "---|---|---|---|---|",
    ]
    for r in b.runs:
        s = r.spec
        lines.append(
            f"| {s.layout} | {s.width} x {s.height} | {r.regions} | "
            + " | ".join(f"{r.timings.get(k, 0.0):.2f}" for k in stages)
            + f" | {min(r.seconds):.2f} ({', '.join(f'{t:.2f}' for t in r.seconds)}) | **{r.slides_per_hour:.0f}** | "
            f"{r.reference_seconds:.2f} | {r.compare_level[0]} x {r.compare_level[1]} | "
            f"{100 * r.agreement:.3f} % ({mark(r.agreement >= GPU_AGREEMENT)}) |"
        )
    return "\n".join(lines)
