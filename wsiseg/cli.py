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
