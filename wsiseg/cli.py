"""The ``wsiseg`` command line: a thin Click group.

Each command parses and validates its options and calls one library
function. User-facing errors (:class:`wsiseg.errors.WsisegError`) become one
line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import click

from wsiseg import __version__
from wsiseg.errors import WsisegError


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


# Commands are defined in their own modules and registered here.
# (registration block: keep one line per command)


@main.command("info")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of dicts instead of text.")
@click.option("--mpp", type=float, default=None, help="Override micrometres per level-0 pixel.")
@click.pass_context
def info_command(ctx: click.Context, slides: tuple[str, ...], as_json: bool, mpp: float | None) -> None:
    """Show each SLIDE's pyramid: levels, downsamples, chunks, MPP, vendor.

    Every slide is reported; unreadable ones give a one-line error each and
    the exit code is 2.
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
@click.option("--ngff", "ngff_version", type=click.Choice(["0.4"]), default="0.4", show_default=True, help="NGFF version.")
@click.option("--mpp", type=float, default=None, help="Override micrometres per level-0 pixel.")
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
    """``WIDTHxHEIGHT`` -> ``(width, height)``, both positive."""

    name = "WIDTHxHEIGHT"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            a, b = (int(v) for v in str(value).lower().split("x"))
        except ValueError:
            self.fail(f"expected WIDTHxHEIGHT (e.g. 40000x30000), got {value!r}", param, ctx)
        if a < 1 or b < 1:
            self.fail(f"sizes must be positive, got {value!r}", param, ctx)
        return a, b


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
        type=click.Path(exists=True, dir_okay=False, path_type=str),
        default=None,
        help="Real slide or RGB image to mirror-tile [default: CMU-1-Small-Region.svs of $WSISEG_SHARED_DATA "
        "or ../shared/data].",
    )(f)
    f = click.option("--tile", type=click.IntRange(min=16), default=256, show_default=True, help="Slide tile size.")(f)
    f = click.option("--out", type=click.Path(dir_okay=False, path_type=str), default="docs/benchmarks.md",
                     show_default=True, help="Markdown file whose section is replaced.")(f)
    return f


def _bench_spec(size, source, tile):
    from pathlib import Path

    from wsiseg.bench import SlideSpec, default_source

    return SlideSpec(width=size[0], height=size[1], source=Path(source) if source else default_source(), tile=tile)


@main.group("bench")
def bench_group() -> None:
    """Benchmarks on large synthetic slides; results go to docs/benchmarks.md."""


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


@bench_group.command("all")
@click.option("--out", type=click.Path(dir_okay=False, path_type=str), default="docs/benchmarks.md",
              show_default=True, help="Markdown file whose sections are replaced.")
@click.pass_context
def bench_all_command(ctx: click.Context, out: str) -> None:
    """Run every benchmark with its defaults, writing each section of OUT."""
    for name, cmd in sorted(bench_group.commands.items()):
        if name == "all":
            continue
        click.echo(f"== bench {name}")
        kwargs = {"out": out} if any(p.name == "out" for p in cmd.params) else {}
        ctx.invoke(cmd, **kwargs)


@main.command("segment")
@click.argument("slides", nargs=-1, required=True)
@click.option("--model", "model_path", required=True, type=click.Path(path_type=str), help="wsiseg model file.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Redo slides whose outputs are already complete.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (default: on for CUDA).")
@click.option("--regions", type=click.Choice(["tissue", "whole"]), default="tissue", show_default=True,
              help="Sample per detected tissue region (biopsy core) or the whole slide at once.")
@click.option("--tissue-threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Tissue score threshold (default: Otsu).")
@click.option("--size", "grid_size", type=_Size(), default=None,
              help="Sampling grid WIDTHxHEIGHT per region (default: the model's, by the dynamic size rule).")
@click.option("--long-side", type=click.IntRange(min=8), default=None,
              help="Long-side cap of the dynamic size rule (default 4x the model's).")
@click.option("--interp", type=click.Choice(["nearest", "linear"]), default="nearest", show_default=True,
              help="Read-back: nearest grid node (paper) or bilinear class scores.")
@click.option("--gather", "gather_mode", type=click.Choice(["lod", "exact"]), default="lod", show_default=True,
              help="Level-of-detail pyramid reads, or bilinear at level 0 (paper).")
@click.option("--lod-bias", type=float, default=0.0, show_default=True, help="Octaves added to the level choice.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Micrometres per level-0 pixel for every slide (a manifest's mpp column wins).")
@click.option("--tile", type=click.IntRange(min=16), default=512, show_default=True, help="Output TIFF tile size.")
@click.option("--geojson/--no-geojson", default=True, show_default=True, help="Write QuPath GeoJSON.")
@click.option("--qc/--no-qc", default=True, show_default=True, help="Write the QC figure.")
@click.option("--progress", type=click.Choice(["auto", "tty", "jsonl", "none"]), default="auto", show_default=True,
              help="Progress bars on a terminal, JSON lines otherwise.")
@click.pass_context
def segment_command(ctx, slides, model_path, out_dir, overwrite, device, amp, regions, tissue_threshold, grid_size,
                    long_side, interp, gather_mode, lod_bias, mpp, tile, geojson, qc, progress) -> None:
    """Segment SLIDES (files, folders, globs or CSV manifests) into OUT.

    Per slide: <name>.mask.tif (pyramidal BigTIFF label mask, opens in
    QuPath/OpenSlide/ASAP), <name>.overlay.tif (colour overlay),
    <name>.classes.json, <name>.geojson.gz (QuPath annotations),
    <name>.qc.png and <name>.report.json; per batch status.csv and
    report.csv. Every slide is attempted; finished slides are skipped on a
    rerun with the same model and options. Exit code 0 only if no slide
    failed, 1 otherwise, 2 for bad options, model or inputs.
    """
    from wsiseg.segment import SegmentOptions, run_segment

    options = SegmentOptions(
        regions=regions, tissue_threshold=tissue_threshold,
        out_size=None if grid_size is None else (grid_size[1], grid_size[0]), long_side=long_side, interp=interp,
        gather_mode=gather_mode, lod_bias=lod_bias, device=device, amp=amp, tile=tile, mpp=mpp, geojson=geojson, qc=qc,
    )
    result = run_segment(slides, model_path, out_dir, options, overwrite=overwrite, progress=progress)
    counts = result.counts
    click.echo(
        f"{counts.get('ok', 0)} ok, {counts.get('skipped', 0)} skipped, {counts.get('failed', 0)} failed "
        f"-> {out_dir} (status.csv, report.csv)"
    )
    ctx.exit(result.exit_code)
