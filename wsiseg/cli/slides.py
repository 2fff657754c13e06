"""``wsiseg info`` and ``wsiseg convert``: what a slide holds, and a slide as OME-Zarr."""

from __future__ import annotations

import click

from wsiseg.cli.options import IMPLAUSIBLE_MPP_HELP
from wsiseg.errors import WsisegError
from wsiseg.limits import MPP_RANGE

__all__ = [
    "convert_command",
    "info_command",
]


@click.command("info")
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of dicts instead of text.")
@click.option(
    "--mpp",
    type=float,
    default=None,
    help=f"Override micrometres per level-0 pixel ({MPP_RANGE[0]:g} to {MPP_RANGE[1]:g}), taken as "
    f"given. {IMPLAUSIBLE_MPP_HELP}",
)
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


@click.command("convert")
@click.argument("slide", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--chunk", type=click.IntRange(min=16), default=512, show_default=True, help="Chunk size in pixels.")
@click.option(
    "--ngff", "ngff_version", type=click.Choice(["0.4"]), default="0.4", show_default=True, help="NGFF version."
)
@click.option(
    "--mpp",
    type=float,
    default=None,
    help=f"Override micrometres per level-0 pixel ({MPP_RANGE[0]:g} to {MPP_RANGE[1]:g}).",
)
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
