"""Benchmarks of ``wsiseg segment`` end to end: stage times, peak memory, sliding-window baseline.

``wsiseg bench segment`` runs :func:`wsiseg.segment.segment_slide` on a large
synthetic JPEG pyramid (the slide of ``wsiseg bench gather``) and records the
report's time per stage, peak resident memory, the mask write rate, the
fraction of pixels sampled and the chunks decoded; then it times
``mode="sliding-window"`` on a window-sized synthetic slide and extrapolates
it linearly to the tissue area of the large slide. With ``--layout``
(``tma``, ``resection``, ``needle``) the large slide is instead laid out like
the slides labs scan (:mod:`wsiseg.bench.layouts`) and the sliding window is
timed on a slide of the same texture, all tissue. ``wsiseg bench memory``
(:mod:`wsiseg.bench.memory`) records the peak memory of the same run on slides of growing area.
``wsiseg bench gpu`` (:func:`wsiseg.bench.gpu.bench_gpu`) measures slides per hour on a CUDA
device on the layouts and checks its labels against the CPU's.

Every measurement runs in a fresh Python process (``python -m
wsiseg.bench.segment``), so the peak resident memory of one run (``VmHWM``
on Linux) never includes another's, and each run pays its own imports and
model load (reported apart from the segmentation).
Sections of ``docs/benchmarks.md`` are written by
:func:`wsiseg.bench.common.write_section`.

It stays one module (some 630 lines): the segment benchmark is built on the
child-process measurement, which runs this module itself (``python -m
wsiseg.bench.segment``, the command its sections quote); the memory and GPU
benchmarks that reuse the measurement are :mod:`wsiseg.bench.memory` and
:mod:`wsiseg.bench.gpu`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


from wsiseg.bench.common import SlideSpec, cached_synthetic_slide, machine_info, machine_lines, slide_sidecar
from wsiseg.errors import ConfigError, WsisegError

__all__ = [
    "mark",
    "LAYOUT_TARGETS",
    "Measurement",
    "SegmentBench",
    "SegmentRow",
    "bench_segment",
    "format_segment_section",
    "measure",
    "segment_section_name",
    "standard_model",
    "tiny_model",
]

#: The untrained bench model: the tiny net of the test suite, fixed seed.
TINY_NET = {
    "arch": "unet",
    "encoder": "resnet18",
    "num_classes": 3,
    "encoder_depth": 3,
    "decoder_channels": [32, 16, 8],
}
STANDARD_NET = {"arch": "unet", "encoder": "resnet34", "num_classes": 3}

# Issue targets (2-core machine, 40k x 30k JPEG pyramid).
TARGET_TOTAL_S = 15.0
#: End-to-end goal in seconds on the 2-core machine per slide layout (issue 12).
LAYOUT_TARGETS = {"synthetic": TARGET_TOTAL_S, "tma": 15.0, "resection": 30.0, "needle": 10.0, "fill": TARGET_TOTAL_S}
_LAYOUT_TITLES = {"tma": "TMA-like", "resection": "resection", "needle": "needle biopsies", "fill": "tissue everywhere"}
TARGET_MASK_MP_S = 500.0
#: Peak resident memory goal in MiB of one ``segment_slide`` run (bench segment and bench memory).
TARGET_RSS_MB = 1.5 * 1024
TARGET_RATIO = 100.0


def tiny_model(workdir: str | os.PathLike) -> Path:
    """A fixed-seed untrained tiny model (3 classes) in ``workdir``, built once.

    Speed does not depend on the weights, but what the labels look like does:
    random weights predict a different class at almost every grid node, a
    worst case (most tiles have boundaries) for the tile writer and the
    GeoJSON, which a trained model's smooth label maps are not.
    """
    return _untrained_model(workdir, "bench-tiny-untrained-seed0.safetensors", TINY_NET)


def standard_model(workdir: str | os.PathLike) -> Path:
    """A fixed-seed untrained U-Net on a full ResNet-34 encoder (smp's defaults), built once.

    The segmentation net most smp users start from (24 M parameters): what
    sliding-window inference costs with a typical net, next to the tiny ones.
    """
    return _untrained_model(workdir, "bench-unet-resnet34-untrained-seed0.safetensors", STANDARD_NET)


def _untrained_model(workdir: str | os.PathLike, name: str, segmenter: dict) -> Path:
    path = Path(workdir) / name
    if not path.is_file():
        import torch

        from wsiseg.models.io import save_deformseg
        from wsiseg.models.net import DeformSegNet
        from wsiseg.output.classes import default_classes

        Path(workdir).mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        net = DeformSegNet(segmenter, map_size=(32, 32), out_size=(64, 64)).eval()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_deformseg(tmp, net, default_classes(3))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------------------
# one measurement, in a child process


@dataclass(frozen=True)
class Measurement:
    """One ``segment_slide`` run in a fresh process.

    Attributes
    ----------
    mode : str
        ``"deformed"`` or ``"sliding-window"``.
    width, height : int
        Level-0 size of the slide.
    timings : dict
        The report's seconds per stage (and ``total``).
    startup_seconds : float
        Interpreter start, imports and model load before ``segment_slide``.
    cpu_seconds : float
        CPU time of ``segment_slide`` (all threads): less sensitive than
        wall time to other processes on the machine.
    wall_seconds : float
        The whole child process.
    peak_rss_mb : float
        Peak resident memory of the child (MiB): ``VmHWM`` on Linux.
    rss_before_mb : float
        The same just before ``segment_slide`` (imports and model).
    report : dict
        The slide report (``gather``, ``regions``, ``fraction_sampled``...).
    """

    mode: str
    width: int
    height: int
    timings: dict
    startup_seconds: float
    cpu_seconds: float
    wall_seconds: float
    peak_rss_mb: float
    rss_before_mb: float
    report: dict = field(repr=False)

    @property
    def total(self) -> float:
        return float(self.timings["total"])

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    @property
    def mask_mp_per_s(self) -> float:
        """Level-0 megapixels per second of the mask stage (mask + overlay + classes)."""
        return self.megapixels / self.timings["mask"]

    @property
    def region_pixels(self) -> int:
        """Level-0 pixels in the segmented regions' boxes."""
        return sum(int(w) * int(h) for _, _, w, h in self.report["regions"])

    @property
    def chunks(self) -> int:
        return sum(int(r.get("chunks", 0)) for r in self.report["gather"].get("regions", ()))

    @property
    def decoded_fraction(self) -> float:
        """Pixels of the decoded chunks over level-0 pixels (deformed mode)."""
        pixels = sum(int(r.get("pixels", 0)) for r in self.report["gather"].get("regions", ()))
        return pixels / (self.width * self.height)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process (MiB).

    Linux: ``VmHWM``, the peak of this process's own address space. Its
    ``ru_maxrss`` is not used there: it keeps the parent's resident size at
    ``fork`` across ``exec``, so a child started by a big process (``wsiseg
    bench all`` after other benchmarks) would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # Linux: KiB


def _constant_segmenter(num_classes: int):
    """A stand-in segmentation net predicting class 1 everywhere (the writer's best case)."""
    import torch

    class Constant(torch.nn.Module):
        def forward(self, x):
            logits = x.new_zeros((x.shape[0], num_classes, *x.shape[2:]))
            logits[:, min(1, num_classes - 1)] = 1.0
            return logits

    return Constant()


def _run(argv: list[str]) -> dict:
    """One run: ``SLIDE MODEL OUT MODE REGIONS GEOJSON QC LABELS`` -> start-up time, peak RSS and the report.

    ``LABELS`` is ``model`` (the model's own predictions) or ``constant``
    (its segmentation net replaced by one predicting class 1 everywhere).
    """
    t0 = time.perf_counter()
    slide, model_path, out, mode, regions, geojson, qc, labels = argv
    from wsiseg.models.io import load_deformseg
    from wsiseg.segment import SegmentOptions, segment_slide

    model = load_deformseg(model_path, device="cpu")
    if labels == "constant":
        model.net.segmenter = _constant_segmenter(len(model.classes))
    options = SegmentOptions(mode=mode, regions=regions, geojson=geojson == "1", qc=qc == "1", device="cpu")
    before = _peak_rss_mb()
    t1 = time.perf_counter()
    cpu = time.process_time()
    outputs = segment_slide(slide, model, out, "bench", options)
    cpu = time.process_time() - cpu
    report = json.loads((Path(out) / outputs["report"]).read_text())
    return {
        "startup_seconds": t1 - t0,
        "cpu_seconds": cpu,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_mb": before,
        "report": report,
    }


def _run_child(argv: list[str]) -> dict:
    """:func:`_run` in a fresh Python process, so that its peak memory is its own."""
    proc = subprocess.run(
        [sys.executable, "-m", "wsiseg.bench.segment", *argv], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise WsisegError("benchmark run failed: " + " | ".join(tail), argv[0])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(
    slide: str | os.PathLike,
    model: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    mode: str = "deformed",
    regions: str = "tissue",
    geojson: bool = True,
    qc: bool = True,
    labels: str = "model",
) -> Measurement:
    """Run ``segment_slide`` on ``slide`` in a fresh process; outputs go to a temporary folder, then away.

    ``labels="constant"`` replaces the segmentation net by one predicting a
    single class (the tile writer's and GeoJSON's best case).
    """
    out = Path(tempfile.mkdtemp(prefix="segment-", dir=workdir))
    try:
        t0 = time.perf_counter()
        data = _run_child(
            [str(slide), str(model), str(out), mode, regions, "1" if geojson else "0", "1" if qc else "0", labels]
        )
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rep = data["report"]
    return Measurement(
        mode=mode,
        width=int(rep["width"]),
        height=int(rep["height"]),
        timings=rep["timings"],
        startup_seconds=data["startup_seconds"],
        cpu_seconds=data["cpu_seconds"],
        wall_seconds=wall,
        peak_rss_mb=data["peak_rss_mb"],
        rss_before_mb=data["rss_before_mb"],
        report=rep,
    )


# ---------------------------------------------------------------------------
# wsiseg bench segment


@dataclass(frozen=True)
class SegmentRow:
    """One deformed-mode run of :func:`bench_segment` and the sliding-window run of the same net."""

    label: str
    model: str
    note: str
    run: Measurement
    sliding: Measurement

    @property
    def sliding_rate(self) -> float:
        """Sliding-window seconds per level-0 pixel (segment + mask stages of the window run)."""
        t = self.sliding.timings
        return (t["sample+segment"] + t["mask"]) / (self.sliding.width * self.sliding.height)

    @property
    def sliding_estimate(self) -> float:
        """Extrapolated sliding-window seconds on the large slide.

        The window's segment + mask seconds per pixel times the large
        slide's region area, plus this deformed run's own open, regions,
        GeoJSON and QC stages (the same work in both modes).
        """
        fixed = sum(float(self.run.timings.get(k, 0.0)) for k in ("open", "regions", "geojson", "qc"))
        return fixed + self.sliding_rate * self.run.region_pixels

    @property
    def ratio(self) -> float:
        return self.sliding_estimate / self.run.total


@dataclass(frozen=True)
class SegmentBench:
    """Result of :func:`bench_segment`."""

    spec: SlideSpec
    slide: Path
    write_seconds: float | None
    reused: bool
    file_bytes: int
    window: int
    rows: tuple[SegmentRow, ...]
    machine: dict = field(default_factory=dict)


def _more_models(workdir: Path) -> list[tuple[str, Path, str]]:
    """Rows after the tiny net's: the shipped demo model (if installed) and a standard-size net."""
    rows = []
    try:
        from wsiseg.demo import MODEL as demo
    except ImportError:
        demo = None
    if demo is not None and demo.is_file():
        rows.append(
            (
                "shipped demo model",
                demo,
                "the trained demo model (`wsiseg/demo`: UNet with a "
                "MobileNetV3-small encoder, grid 64 x 64, background/cellular/stroma), trained on texture "
                "mosaics, not on this slide: realistic label maps, not a quality measurement",
            )
        )
    rows.append(
        (
            "untrained U-Net ResNet-34",
            standard_model(workdir),
            "segmentation-models-pytorch's default U-Net "
            "(ResNet-34 encoder of depth 5, decoder 256-128-64-32-16, 24 M parameters; grid 64 x 64, density map "
            "32 x 32, 3 classes), untrained with a fixed seed: the size of net most users segment with, so the "
            "sliding-window cost of a typical net (its labels are noisy like the tiny net's)",
        )
    )
    return rows


def bench_segment(
    spec: SlideSpec,
    workdir: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    window: int = 4096,
    log=None,
) -> SegmentBench:
    """Time ``segment_slide`` (deformed) on a benchmark slide and the sliding-window baseline on a window.

    Rows: with ``model``, that model and the same with constant labels;
    without, on the synthetic slide, the untrained :func:`tiny_model` (noisy
    labels: the worst case for the tile writer and the GeoJSON), the same
    with constant labels (the best case), the trained demo model when the
    install ships one, and the untrained :func:`standard_model` (what
    sliding windows cost with a typical net); on a layout slide (TMA,
    resection, needle biopsies) only the last two.

    Parameters
    ----------
    spec : SlideSpec
        The large slide (built in ``workdir`` unless cached there): the
        mirror-tiled synthetic slide or a layout (``spec.layout``).
    workdir : path-like
        Cache of synthetic slides and the bench model; outputs are written
        in temporary folders there and removed.
    model : path-like, optional
        Model file.
    window : int
        Side of the square slide (same source, tile and quality; for a
        layout, the ``fill`` layout: the same texture, all tissue) on which
        the sliding-window mode is timed, whole slide as one region,
        for each net (the faster of two runs: a conservative estimate of the
        baseline, hence of the speed ratio).
    log : callable, optional
        Called with progress lines.
    """
    say = log or (lambda msg: None)
    if window < 64:
        raise ConfigError(f"--window must be at least 64 pixels, got {window}")
    machine = machine_info()
    workdir = Path(workdir)
    path, write_s, reused = cached_synthetic_slide(spec, workdir)
    say(
        f"{spec.layout} slide {spec.width}x{spec.height}: {'reused' if reused else f'written in {write_s:.1f} s'}: "
        f"{path}"
    )
    if model is not None:
        given = Path(model)
        plan = [
            ("given model", given, "model", "given with `--model`"),
            (
                "given model, constant labels",
                given,
                "constant",
                "its segmentation net replaced by one predicting a "
                "single class (deformation net, sampling and gather unchanged): the best case for the tile writer",
            ),
        ]
    elif spec.layout != "synthetic":
        # real layouts: the trained demo model (realistic label maps) and the standard-size net
        plan = [(label, path, "model", note) for label, path, note in _more_models(workdir)] or [
            ("untrained tiny net", tiny_model(workdir), "model", "the tiny test net, untrained with a fixed seed")
        ]
    else:
        tiny = tiny_model(workdir)
        plan = [
            (
                "untrained tiny net",
                tiny,
                "model",
                "the tiny test net (UNet, ResNet-18 encoder of depth 3, grid 64 x 64, "
                "density map 32 x 32, 3 classes), untrained with a fixed seed: it predicts a different class at almost "
                "every grid node, so the label map has boundaries everywhere, the worst case for the tile writer (few "
                "constant tiles, many pixels read one by one) and the GeoJSON (thousands of polygons)",
            ),
            (
                "untrained, constant labels",
                tiny,
                "constant",
                "the same, its segmentation net replaced by one "
                "predicting a single class (deformation net, sampling and gather unchanged): the best case",
            ),
        ]
        plan += [(label, path, "model", note) for label, path, note in _more_models(workdir)]
    # the sliding-window rate: a window-sized slide of the same texture, all tissue (a crop's worth, no glass)
    wlayout = "synthetic" if spec.layout == "synthetic" else "fill"
    wspec = SlideSpec(window, window, spec.source, spec.tile, spec.quality, spec.mpp, wlayout, spec.seed)
    wpath, _, _ = cached_synthetic_slide(wspec, workdir)
    sliding: dict[Path, Measurement] = {}
    rows = []
    for label, model_path, labels, note in plan:
        run = measure(path, model_path, workdir, labels=labels)
        say(
            f"  {label}: "
            + ", ".join(f"{k} {v:.2f} s" for k, v in run.timings.items())
            + f" (CPU {run.cpu_seconds:.2f} s); peak RSS {run.peak_rss_mb:.0f} MiB"
        )
        if model_path not in sliding:
            sliding[model_path] = min(
                (
                    measure(wpath, model_path, workdir, mode="sliding-window", regions="whole", geojson=False, qc=False)
                    for _ in range(2)
                ),
                key=lambda m: m.timings["sample+segment"] + m.timings["mask"],
            )
            ts = sliding[model_path].timings
            say(
                f"  sliding-window, {model_path.name}, {window}x{window}: segment {ts['sample+segment']:.2f} s, "
                f"mask {ts['mask']:.2f} s ({sliding[model_path].report['gather']['windows']} windows)"
            )
        row = SegmentRow(label, model_path.name, note, run, sliding[model_path])
        say(f"  {label}: sliding window extrapolated {row.sliding_estimate:.0f} s = {row.ratio:.0f}x")
        rows.append(row)
    return SegmentBench(spec, path, write_s, reused, path.stat().st_size, window, tuple(rows), machine)


def mark(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def segment_section_name(layout: str) -> str:
    """Section of docs/benchmarks.md that ``wsiseg bench segment --layout LAYOUT`` writes.

    ``"segment"`` for the synthetic slide (the section it always had),
    ``"segment-LAYOUT"`` for the others.
    """
    return "segment" if layout == "synthetic" else f"segment-{layout}"


def _slide_line(b: SegmentBench, built: str, first: Measurement) -> str:
    """The markdown line describing the benchmark slide and the regions found on it."""
    s = b.spec
    tissue = first.region_pixels
    found = (
        f"{len(first.report['regions'])} tissue regions, {tissue / 1e6:.0f} level-0 Mpx in their boxes "
        f"({100 * tissue / (first.width * first.height):.0f} % of the slide)"
    )
    size = (
        f"{s.width} x {s.height} ({s.width * s.height / 1e9:.2f} Gpx) BigTIFF, JPEG q{s.quality}, tiles {s.tile}, "
        f"{b.file_bytes / 2**20:.0f} MiB"
    )
    if s.layout == "synthetic":
        return (
            f"- Slide: synthetic {size}, mirror-tiled from `{s.source.name}` (the slide of `bench gather`); "
            f"{built}. {found}."
        )
    info = slide_sidecar(b.slide).get("layout", {})
    textures = ", ".join(f"`{t}`" for t in info.get("textures", [])) or f"`{s.source.name}`"
    pieces = info.get("pieces", "?")
    fraction = info.get("tissue_fraction")
    cover = "" if fraction is None else f" covering {100 * fraction:.1f} % of the slide"
    return (
        f"- Slide: {_LAYOUT_TITLES.get(s.layout, s.layout)} layout (`--layout {s.layout} --seed {s.seed}`), "
        f"{size}: {pieces} pieces of tissue{cover} on glass, real H&E texture quilted from {textures} "
        f"(512-px patches, random crops, flips and quarter turns; `wsiseg.bench.layouts`); {built}. "
        f"`segment` found {found}."
    )


def format_segment_section(b: SegmentBench, command: str) -> str:
    """Markdown for the ``segment`` (or ``segment-LAYOUT``) section of docs/benchmarks.md."""
    s = b.spec
    built = "write time unknown" if b.write_seconds is None else f"written in {b.write_seconds:.1f} s"
    if b.reused:
        built += " (reused from the cache)"
    first = b.rows[0].run
    stages = [k for k in first.timings if k != "total"]
    goal = LAYOUT_TARGETS.get(s.layout, TARGET_TOTAL_S)
    title = "## wsiseg segment end to end" + (
        "" if s.layout == "synthetic" else f": {_LAYOUT_TITLES.get(s.layout, s.layout)} layout"
    )
    window = (
        "synthetic slide of the same source"
        if s.layout == "synthetic"
        else "slide of the same quilted texture, all tissue (`--layout fill`: a crop's worth of tissue)"
    )

    def row(r: SegmentRow) -> str:
        m = r.run
        return (
            f"| {r.label} | "
            + " | ".join(f"{m.timings.get(k, 0.0):.2f}" for k in stages)
            + f" | **{m.total:.2f}** | {m.cpu_seconds:.2f} | {m.startup_seconds:.2f} | {m.peak_rss_mb:.0f} | "
            f"{m.decoded_fraction * m.width * m.height / 1e6:.0f} | {m.mask_mp_per_s:.0f} | "
            f"{int(m.report['gather'].get('pixels_refined', 0)) / 1e6:.1f} | "
            f"{r.sliding_rate * 1e6:.2f} | {r.sliding_estimate:.0f} | {r.ratio:.0f}x |"
        )

    def target(name, fmt, ok) -> str:
        return f"| {name} | " + " | ".join(f"{fmt(r)} ({mark(ok(r))})" for r in b.rows) + " |"

    lines = [
        title,
        "",
        f"- Command: `{command}`",
        *machine_lines(b.machine),
        _slide_line(b, built, first),
        "- Models (speed does not depend on the weights, but the tile writer and the GeoJSON do depend on how "
        "many label boundaries there are):",
        *[f"  - *{r.label}*: `{r.model}`, {r.note}." for r in b.rows],
        "- Each run is a fresh `python -m wsiseg.bench.segment` process on the CPU (peak RSS = `VmHWM` of that "
        "process, imports and model included); times are the report's stages of `segment_slide` with every output "
        "(mask, overlay, classes, GeoJSON, QC, report). *mask* = reverse sampling + pyramidal TIFF + overlay; "
        "mask Mpx/s = level-0 Mpx / mask seconds. CPU s = process CPU time of `segment_slide` (all threads); wall "
        "times grow with other load on this shared machine (load average above).",
        f"- Sliding window: `--mode sliding-window` with the same net (512 px windows + 32 px context, batches of "
        f"4) timed on a {b.window} x {b.window} {window}, whole slide as one region, no "
        "GeoJSON/QC, the faster of two runs; **extrapolated** (not run) linearly to the region boxes above, plus "
        "the row's own open, regions, GeoJSON and QC times.",
        "",
        "| deformed mode | " + " | ".join(stages) + " | total s | CPU s | start-up s | peak RSS MiB | decoded Mpx | "
        "mask Mpx/s | px read one by one (M) | sliding window s/Mpx | sliding window s (extrapolated) | ratio |",
        "|---|" + "---|" * (len(stages) + 10),
        *[row(r) for r in b.rows],
        "",
        f"- Fraction of level-0 pixels sampled ({b.rows[0].label}): {100 * first.report['fraction_sampled']:.4f} %; "
        f"chunks decoded: {first.chunks} ({100 * first.decoded_fraction:.3f} % of level-0 pixels)."
        + "".join(
            f" {r.label}: {100 * r.run.report['fraction_sampled']:.4f} % sampled, {r.run.chunks} chunks."
            for r in b.rows[1:]
            if r.model != b.rows[0].model
        ),
        "",
        "| issue target | " + " | ".join(r.label for r in b.rows) + " |",
        "|---|" + "---|" * len(b.rows),
        target(f"end to end <= {goal:.0f} s", lambda r: f"{r.run.total:.1f} s", lambda r: r.run.total <= goal),
        target(
            f"mask write >= {TARGET_MASK_MP_S:.0f} Mpx/s",
            lambda r: f"{r.run.mask_mp_per_s:.0f} Mpx/s",
            lambda r: r.run.mask_mp_per_s >= TARGET_MASK_MP_S,
        ),
        target(
            "peak RSS <= 1.5 GiB",
            lambda r: f"{r.run.peak_rss_mb:.0f} MiB",
            lambda r: r.run.peak_rss_mb <= TARGET_RSS_MB,
        ),
        target(
            f"sliding window / deformed >= {TARGET_RATIO:.0f}x",
            lambda r: f"{r.ratio:.0f}x (extrapolated)",
            lambda r: r.ratio >= TARGET_RATIO,
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(_run(sys.argv[1:])))
