"""Benchmarks on realistic synthetic slides, recorded as sections of a markdown file.

``wsiseg bench gather`` times the level-of-detail gather against the exact
(level-0 bilinear) gather on a large mirror-tiled JPEG pyramid;
``wsiseg bench convert`` times the OME-Zarr conversion of the same slide
(``wsiseg bench cluster``, slides per hour on local dask worker processes, is
:mod:`wsiseg.bench.cluster`). Each benchmark owns one section of
``docs/benchmarks.md`` between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->`` markers (:func:`write_section`), so benchmarks
update their own results without touching the others'.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsiseg import __version__
from wsiseg.errors import ConfigError, WsisegError

__all__ = [
    "GatherRun",
    "GatherBench",
    "ConvertBench",
    "SlideSpec",
    "bench_gather",
    "bench_convert",
    "cached_synthetic_slide",
    "default_source",
    "default_textures",
    "deformed_points",
    "format_convert_section",
    "format_gather_section",
    "machine_info",
    "machine_lines",
    "shared_data_dir",
    "slide_sidecar",
    "uniform_points",
    "write_section",
]

_DEFAULT_SOURCE = Path("slides") / "CMU-1-Small-Region.svs"


# ---------------------------------------------------------------------------
# environment


def shared_data_dir() -> Path:
    """The shared test data: ``$WSISEG_SHARED_DATA`` if set, else ``../shared/data`` from the working directory.

    ``../shared/data`` relative to the project root is the project's
    documented layout; the folder may not exist.
    """
    root = os.environ.get("WSISEG_SHARED_DATA")
    return Path(root) if root else Path.cwd().parent / "shared" / "data"


def default_source() -> Path:
    """The default real source region: CMU-1-Small-Region.svs of the shared test data (:func:`shared_data_dir`)."""
    path = shared_data_dir() / _DEFAULT_SOURCE
    if not path.is_file():
        raise ConfigError(f"no --source given and the default source {path} does not exist (set WSISEG_SHARED_DATA)")
    return path


def default_textures() -> Path:
    """The default texture of layout slides: the ``textures`` folder of the shared data (:func:`shared_data_dir`)."""
    path = shared_data_dir() / "textures"
    if not path.is_dir():
        raise ConfigError(
            f"no --source given and the default textures folder {path} does not exist (set WSISEG_SHARED_DATA)"
        )
    return path


def machine_info() -> dict:
    """Where a benchmark ran: platform, CPUs, RAM, library versions, date (UTC)."""
    import dask
    import imagecodecs
    import tifffile
    import zarr

    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = float("nan")
    from wsiseg.device import cpu_model, usable_cpus

    usable = usable_cpus()
    try:
        import openslide

        osv = openslide.__library_version__
    except Exception:  # optional here: only reported
        osv = "n/a"
    try:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except (OSError, AttributeError):
        load = "n/a"
    return {
        "load": load,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpus": f"{usable} usable of {os.cpu_count()}",
        "ram_gib": round(ram, 1),
        "versions": (
            f"wsiseg {__version__}, Python {platform.python_version()}, numpy {np.__version__}, "
            f"dask {dask.__version__}, tifffile {tifffile.__version__}, zarr {zarr.__version__}, "
            f"imagecodecs {imagecodecs.__version__}, OpenSlide {osv}"
        ),
    }


def write_section(path: str | os.PathLike, name: str, body: str) -> Path:
    """Replace (or append) the section ``name`` of a markdown file.

    The section is the text between ``<!-- bench:NAME -->`` and
    ``<!-- /bench:NAME -->``; the rest of the file is kept byte for byte. A
    missing file is created with a title. Written atomically.
    """
    path = Path(path)
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    i, j = text.find(start), text.find(end)
    if (i < 0) != (j < 0) or j < i:
        raise WsisegError(f"malformed benchmark section markers for {name!r}", path)
    if i >= 0:
        text = text[:i] + block + text[j + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------
# the synthetic slide, cached by its parameters


@dataclass(frozen=True)
class SlideSpec:
    """Parameters of a benchmark slide.

    ``layout="synthetic"`` (the default, as in every benchmark before
    layouts existed): ``source`` mirror-tiled over the whole slide
    (:func:`wsiseg.slide.synthetic.write_synthetic_slide`). Any name of
    :data:`wsiseg.bench.layouts.LAYOUTS` (``"tma"``, ``"resection"``,
    ``"needle"``, ``"fill"``): tissue pieces laid out like real slides on
    glass, textured with a quilt of the H&E images of ``source`` (a folder
    or one image), drawn from ``seed``
    (:func:`wsiseg.bench.layouts.write_layout_slide`).
    """

    width: int
    height: int
    source: Path
    tile: int = 256
    quality: int = 90
    mpp: float = 0.5
    layout: str = "synthetic"
    seed: int = 0

    def cache_name(self) -> str:
        if self.layout != "synthetic":
            from wsiseg.bench.layouts import texture_digest

            return (
                f"layout-{self.layout}-{self.width}x{self.height}-seed{self.seed}-t{self.tile}-q{self.quality}-"
                f"mpp{self.mpp:g}-{texture_digest(self.source)}.tiff"
            )
        st = self.source.stat()
        digest = hashlib.sha1(f"{self.source.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
        return f"synthetic-{self.width}x{self.height}-t{self.tile}-q{self.quality}-mpp{self.mpp:g}-{digest}.tiff"


def cached_synthetic_slide(spec: SlideSpec, workdir: str | os.PathLike) -> tuple[Path, float | None, bool]:
    """Path of the benchmark slide for ``spec`` in ``workdir``, writing it if absent.

    The slide is cached by its parameters (:meth:`SlideSpec.cache_name`);
    a ``.json`` sidecar keeps the seconds its writing took, the machine and,
    for layouts, what was built (:func:`slide_sidecar`).

    Returns
    -------
    (pathlib.Path, float or None)
        The slide and the seconds its writing took (``None`` if unknown).
    bool
        Whether the slide was reused from ``workdir``.
    """
    from wsiseg.bench.layouts import write_layout_slide
    from wsiseg.slide.synthetic import write_synthetic_slide

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / spec.cache_name()
    if path.is_file():
        try:
            return path, float(slide_sidecar(path)["write_seconds"]), True
        except (ValueError, KeyError, TypeError):
            return path, None, True
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    t0 = time.perf_counter()
    extra: dict = {}
    try:
        if spec.layout == "synthetic":
            write_synthetic_slide(tmp, spec.width, spec.height, spec.source, spec.tile, spec.quality, spec.mpp)
        else:
            extra = {
                "layout": write_layout_slide(
                    tmp,
                    spec.layout,
                    spec.width,
                    spec.height,
                    spec.source,
                    seed=spec.seed,
                    tile=spec.tile,
                    quality=spec.quality,
                    mpp=spec.mpp,
                )
            }
        seconds = time.perf_counter() - t0
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps({"write_seconds": seconds, "machine": machine_info(), **extra}, indent=1))
    return path, seconds, False


def slide_sidecar(path: str | os.PathLike) -> dict:
    """What :func:`cached_synthetic_slide` recorded next to a slide (``{}`` when nothing readable)."""
    try:
        data = json.loads(Path(path).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------
# grids


def uniform_points(h: int, w: int, width: float, height: float) -> np.ndarray:
    """Uniform ``h x w`` grid over the whole slide, in level-0 pixels (:mod:`wsiseg.sampling.coords`)."""
    from wsiseg.sampling.coords import to_pixels, uniform_grid

    return to_pixels(uniform_grid(h, w).double().numpy(), width, height)


def deformed_points(h: int, w: int, width: float, height: float, strength: float = 0.99) -> np.ndarray:
    """A smooth monotone grid concentrating samples in the middle of the slide.

    Each normalised axis ``u`` is warped to ``u + strength * sin(2 pi u) / (2 pi)``
    (separable, monotone for ``strength < 1``): spacing is ``1 - strength``
    times the uniform spacing at the centre and ``1 + strength`` times at the
    edges, so the middle is read from level 0 and the border from coarse
    levels.
    """
    if not 0 <= strength < 1:
        raise ConfigError(f"deformation strength must be in [0, 1), got {strength}")
    g = uniform_points(h, w, 1.0, 1.0)
    g = g + strength * np.sin(2 * np.pi * g) / (2 * np.pi)
    return g * np.array([width, height], dtype=np.float64)


# ---------------------------------------------------------------------------
# gather benchmark


@dataclass(frozen=True)
class GatherRun:
    """One grid x mode: timings of cold runs and what the (last) run decoded."""

    grid: str
    mode: str
    seconds: tuple[float, ...]
    open_seconds: tuple[float, ...]
    levels: tuple  # LevelStats of the last run
    chunks: int
    pixels: int
    fraction: float

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass(frozen=True)
class GatherBench:
    """Result of :func:`bench_gather`."""

    slide: Path
    spec: SlideSpec
    write_seconds: float | None
    reused: bool
    samples: tuple[int, int]
    levels: tuple[tuple[int, int], ...]
    file_bytes: int
    first_call_seconds: float
    baseline_seconds: float
    runs: tuple[GatherRun, ...]
    machine: dict = field(default_factory=dict)


def _cold_gather(path: Path, points: np.ndarray, mode: str, bias: float):
    """Open the slide afresh (no decoded chunk survives from earlier runs) and gather once."""
    from wsiseg.slide.gather import gather
    from wsiseg.slide.open import open_slide

    t0 = time.perf_counter()
    ms = open_slide(path)
    t1 = time.perf_counter()
    res = gather(ms, points, mode, bias)
    return t1 - t0, time.perf_counter() - t1, res


def _decode_level0_seconds(path: Path) -> float:
    """Seconds tifffile alone takes to read and decode every level-0 tile (all CPUs).

    The floor for an exact gather that touches every tile: the rest of its
    time is per-chunk overhead of the slide's dask/zarr read path.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        t0 = time.perf_counter()
        for _ in tif.pages[0].segments(maxworkers=os.cpu_count()):
            pass
        return time.perf_counter() - t0


def bench_gather(
    spec: SlideSpec,
    workdir: str | os.PathLike,
    samples: tuple[int, int] = (512, 512),
    *,
    repeats: int = 5,
    exact_repeats: int = 1,
    bias: float = 0.0,
    modes: tuple[str, ...] = ("lod", "exact"),
    log=None,
) -> GatherBench:
    """Time LOD and exact gathers of a uniform and a deformed grid on a synthetic slide.

    Every run opens the slide afresh, so chunks are decoded from the file
    each time (the OS page cache may still hold the file's bytes). One
    gather before the timed runs pays the process's one-off costs (imports,
    thread pools), and is reported as ``first_call_seconds``.

    Parameters
    ----------
    spec : SlideSpec
        The synthetic slide (built in ``workdir`` unless already there).
    samples : (int, int)
        Grid size ``(h, w)``.
    repeats, exact_repeats : int
        Timed runs per grid for the LOD and the (slow) exact mode.
    log : callable, optional
        Called with progress lines.
    """
    import tifffile

    say = log or (lambda msg: None)
    machine = machine_info()  # before the work: the load shows whether others shared the CPUs
    h, w = samples
    if h < 1 or w < 1:
        raise ConfigError(f"--samples must be positive, got {h}x{w}")
    say(f"synthetic slide {spec.width}x{spec.height} (tile {spec.tile}, JPEG q{spec.quality}) in {workdir}")
    path, write_s, reused = cached_synthetic_slide(spec, workdir)
    say(f"  {'reused' if reused else f'written in {write_s:.1f} s'}: {path}")
    with tifffile.TiffFile(path) as tif:
        levels = tuple((p.imagewidth, p.imagelength) for p in tif.pages)
    grids = {
        "uniform": uniform_points(h, w, spec.width, spec.height),
        "deformed": deformed_points(h, w, spec.width, spec.height),
    }
    _, first, _ = _cold_gather(path, uniform_points(8, 8, spec.width, spec.height), "lod", bias)
    baseline = _decode_level0_seconds(path)
    say(f"  baseline: tifffile alone decodes every level-0 tile in {baseline:.1f} s")
    runs = []
    for gname, pts in grids.items():
        for mode in modes:
            times, opens, res = [], [], None
            for _ in range(exact_repeats if mode == "exact" else repeats):
                t_open, t_gather, res = _cold_gather(path, pts, mode, bias)
                times.append(t_gather)
                opens.append(t_open)
            s = res.stats
            run = GatherRun(gname, mode, tuple(times), tuple(opens), s.levels, s.chunks, s.pixels, s.fraction)
            say(
                f"  {gname:8s} {mode:5s} {run.median:8.3f} s  {s.chunks:6d} chunks  "
                f"{100 * s.fraction:7.3f} % of level 0"
            )
            runs.append(run)
    return GatherBench(
        slide=path,
        spec=spec,
        write_seconds=write_s,
        reused=reused,
        samples=(h, w),
        levels=levels,
        file_bytes=path.stat().st_size,
        first_call_seconds=first,
        baseline_seconds=baseline,
        runs=tuple(runs),
        machine=machine,
    )


def _per_level(levels) -> str:
    parts = []
    for st in levels:
        if st.samples:
            parts.append(
                f"L{st.level} (x{max(st.downsample):.4g}): {st.samples} smp, {st.chunks} ch, {st.pixels / 1e6:.3g} MP"
            )
    return "; ".join(parts)


def machine_lines(m: dict) -> list[str]:
    """Markdown lines naming the machine, the date and the versions of :func:`machine_info`."""
    return [
        f"- Machine: {m['platform']}, {m['processor']}, CPUs {m['cpus']}, RAM {m['ram_gib']} GiB",
        f"- Date: {m['date']}; load average (1, 5, 15 min) at start: {m['load']}",
        f"- Versions: {m['versions']}",
    ]


def format_gather_section(b: GatherBench, command: str) -> str:
    """Markdown for the ``gather`` section of docs/benchmarks.md."""
    s = b.spec
    built = "write time unknown" if b.write_seconds is None else f"written in {b.write_seconds:.1f} s"
    if b.reused:
        built += " (reused from the cache)"
    lines = [
        "## Level-of-detail gather",
        "",
        f"- Command: `{command}`",
        *machine_lines(b.machine),
        f"- Slide: synthetic {s.width} x {s.height} ({s.width * s.height / 1e9:.2f} Gpx) BigTIFF, JPEG q{s.quality}, "
        f"tiles {s.tile}, {len(b.levels)} levels ({', '.join(f'{w}x{h}' for w, h in b.levels)}), "
        f"{b.file_bytes / 2**20:.0f} MiB, mirror-tiled from `{s.source.name}`; {built}.",
        f"- Grids: {b.samples[1]} x {b.samples[0]} (w x h) samples; *uniform* over the whole slide; "
        "*deformed* = separable "
        "warp `u + 0.99 sin(2 pi u) / (2 pi)` per axis (spacing 0.01x uniform at the centre, 1.99x at the edges).",
        "- Cold runs: every run opens the slide afresh (no decoded chunk is reused; the OS page cache may hold "
        f"the file). Time = `gather()` wall time, median of the runs; open = `open_slide()`. "
        f"An untimed warm-up gather (8 x 8 points) first pays one-off imports and thread pools "
        f"({b.first_call_seconds:.2f} s).",
        f"- Baseline: tifffile alone (`TiffPage.segments`, {os.cpu_count()} threads) reads and decodes every level-0 "
        f"tile in {b.baseline_seconds:.1f} s: the floor for an exact gather touching every tile; the rest of the "
        "exact time is per-chunk overhead of the `open_slide` read path (dask task + zarr store per tile).",
        "- Issue target: 512 x 512 samples on a 40k x 30k JPEG pyramid decode <= 1 % of level-0 pixels in < 1 s on "
        "2 cores (uniform LOD row).",
        "",
        "| grid | mode | time s (runs) | open s | chunks | decoded Mpx | % of level-0 px "
        "| per level: samples, chunks, Mpx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in b.runs:
        runs = ", ".join(f"{t:.3f}" for t in r.seconds)
        lines.append(
            f"| {r.grid} | {r.mode} | **{r.median:.3f}** ({runs}) | {statistics.median(r.open_seconds):.3f} | "
            f"{r.chunks} | {r.pixels / 1e6:.2f} | {100 * r.fraction:.3f} | {_per_level(r.levels)} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# convert benchmark


@dataclass(frozen=True)
class ConvertBench:
    """Result of :func:`bench_convert`."""

    slide: Path
    spec: SlideSpec
    chunk: int
    seconds: float
    megapixels: float
    out_bytes: int
    machine: dict = field(default_factory=dict)

    @property
    def mp_per_s(self) -> float:
        return self.megapixels / self.seconds


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_convert(spec: SlideSpec, workdir: str | os.PathLike, chunk: int = 512, log=None) -> ConvertBench:
    """Time :func:`wsiseg.slide.convert.convert_to_ngff` on a synthetic slide (all levels).

    Throughput is level-0 megapixels per second of wall time; the output is
    written in ``workdir`` and removed afterwards.
    """
    from wsiseg.slide.convert import convert_to_ngff
    from wsiseg.slide.open import open_slide

    say = log or (lambda msg: None)
    machine = machine_info()
    path, write_s, reused = cached_synthetic_slide(spec, workdir)
    say(f"synthetic slide {'reused' if reused else f'written in {write_s:.1f} s'}: {path}")
    out = Path(tempfile.mkdtemp(prefix="convert-", dir=workdir)) / "out.zarr"
    try:
        t0 = time.perf_counter()
        ms = open_slide(path)
        convert_to_ngff(ms, out, chunk=chunk, progress=False)
        seconds = time.perf_counter() - t0
        size = _tree_bytes(out)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    mp = spec.width * spec.height / 1e6
    say(f"  converted {mp:.0f} Mpx in {seconds:.1f} s: {mp / seconds:.1f} Mpx/s")
    return ConvertBench(path, spec, chunk, seconds, mp, size, machine)


def format_convert_section(b: ConvertBench, command: str) -> str:
    """Markdown for the ``convert`` section of docs/benchmarks.md."""
    s = b.spec
    return "\n".join(
        [
            "## Convert to OME-Zarr",
            "",
            f"- Command: `{command}`",
            *machine_lines(b.machine),
            f"- Slide: synthetic {s.width} x {s.height} BigTIFF, JPEG q{s.quality}, tiles {s.tile}, "
            f"mirror-tiled from `{s.source.name}`; output NGFF 0.4, chunks {b.chunk}, all levels copied.",
            "",
            "| level-0 Mpx | time s | throughput Mpx/s | output MiB |",
            "|---|---|---|---|",
            f"| {b.megapixels:.0f} | {b.seconds:.1f} | **{b.mp_per_s:.1f}** | {b.out_bytes / 2**20:.0f} |",
        ]
    )


def command_line() -> str:
    """The command as typed (program name shortened to ``wsiseg``)."""
    return " ".join(["wsiseg", *sys.argv[1:]])
