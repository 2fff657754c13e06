"""``wsiseg segment`` and ``wsiseg demo``: slides -> masks, overlays, GeoJSON, QC figures and reports."""

from __future__ import annotations

import os

import click

from wsiseg.cli.options import (
    GLASS_WEIGHT,
    GRID_ITERATIONS,
    GRID_SCALE,
    IMPLAUSIBLE_MPP_HELP,
    MPP,
    Formats,
    Size,
    hw,
)

__all__ = [
    "demo_command",
    "segment_command",
]


@click.command("segment")
@click.argument("slides", nargs=-1, required=True)
@click.option(
    "--model",
    "model_path",
    required=True,
    type=click.Path(path_type=str),
    help="wsiseg model file, or a shipped model by name: 'tumour' (background / non-tumour / tumour, "
    "trained on real H&E tumour masks) or 'demo' / 'mosaic' (the demo model; docs/demo-model.md).",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Redo slides whose outputs are already complete.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--amp/--no-amp", default=None, help="Mixed precision (default: on for CUDA).")
@click.option(
    "--mode",
    type=click.Choice(["deformed", "sliding-window"]),
    default="deformed",
    show_default=True,
    help="Deformed sampling, or the baseline: the model's segmentation net on every level-0 window "
    "(512 px, 32 px context) of the regions; far slower, for comparisons.",
)
@click.option(
    "--regions",
    type=click.Choice(["tissue", "whole"]),
    default="tissue",
    show_default=True,
    help="Sample per detected tissue region (biopsy core) or the whole slide at once.",
)
@click.option(
    "--tissue-threshold",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Tissue score threshold (default: Otsu).",
)
@click.option(
    "--background",
    type=click.Choice(["tissue", "model"]),
    default="tissue",
    show_default=True,
    help="Who labels glass: 'tissue', every pixel the tissue detector calls glass is background (0) "
    "whatever the net says (nets see whole region boxes and may call glass inside them tissue); "
    "'model', the net's labels everywhere.",
)
@click.option(
    "--size",
    "grid_size",
    type=Size(),
    default=None,
    help="Sampling grid WIDTHxHEIGHT per region [default: one sample per the model's recorded sample "
    "spacing in um when the slide's MPP is known, else the model's grid by the dynamic size rule].",
)
@click.option(
    "--long-side",
    type=click.IntRange(min=8),
    default=None,
    help="Long-side cap of the dynamic size rule in samples (default 4x the model's); selects that "
    "pixel rule even for a model that records its scale.",
)
@click.option(
    "--max-grid",
    type=Size(),
    default="512x512",
    show_default=True,
    help="Largest sampling grid WIDTHxHEIGHT of one region at the model's scale; a larger region is "
    "split into the fewest equal sub-boxes whose grids fit, each segmented on its own.",
)
@click.option(
    "--interp",
    type=click.Choice(["nearest", "linear"]),
    default="nearest",
    show_default=True,
    help="Read-back: nearest grid node (paper) or bilinear class scores.",
)
@click.option(
    "--gather",
    "gather_mode",
    type=click.Choice(["lod", "exact"]),
    default="lod",
    show_default=True,
    help="Level-of-detail pyramid reads, or bilinear at level 0 (paper).",
)
@click.option("--lod-bias", type=float, default=0.0, show_default=True, help="Octaves added to the level choice.")
@click.option(
    "--tta/--no-tta",
    default=False,
    show_default=True,
    help="Test-time augmentation: average the segmentation net over the image it sees and its three "
    "flips (4x the net's time; see docs/benchmarks.md for what it gains).",
)
@click.option(
    "--glass-weight",
    type=GLASS_WEIGHT,
    default=1.0,
    show_default=True,
    help="Move a learned sampler's samples off glass: its grid is built on a warp toward a prior that is this "
    "on the density-map nodes the tissue detector calls glass and 1 elsewhere (flat on tissue-only regions, "
    "so they are sampled as trained); 1: off. 0.1 puts 24 % of CMU-1-Small-Region's samples on glass "
    "instead of 51 % (docs/demo-model.md).",
)
@click.option(
    "--grid-iterations",
    type=GRID_ITERATIONS,
    default=None,
    help="Attraction steps of the sampling grid instead of the model's own (the attraction repeated toward "
    "equidistribution, as train --grid-iterations; no effect on a uniform-grid model). Not needed for "
    "--glass-weight, whose warp has steps of its own.",
)
@click.option(
    "--grid-scale",
    type=GRID_SCALE,
    default=1.0,
    show_default=True,
    help="Sample every region this many times as densely per axis as the model's scale says (its sample "
    "spacing over this, or the pixel rule's grid times this; evaluate --grid-scale measures it on labelled "
    "regions). 4x the samples and the net's time at 2; cross-validated on real tumour masks 2 gained 5-6 "
    "mIoU points on oral SCC, 0-1 on lymph nodes and lost 3-4 on the breast ROIs (docs/benchmarks.md).",
)
@click.option(
    "--mpp",
    type=MPP,
    default=None,
    help="Micrometres per level-0 pixel for every slide (a manifest's mpp column wins), taken as given. "
    f"{IMPLAUSIBLE_MPP_HELP} Slides without an MPP get no areas in um2 and are sampled by pixel "
    "size, with a warning, when the model records its scale.",
)
@click.option(
    "--tile",
    type=click.IntRange(min=16),
    default=512,
    show_default=True,
    help="Output TIFF tile size (a multiple of 16); a level smaller than one tile is one tile of the "
    "smallest multiple of 16 that covers it.",
)
@click.option("--geojson/--no-geojson", default=True, show_default=True, help="Write QuPath GeoJSON.")
@click.option("--qc/--no-qc", default=True, show_default=True, help="Write the QC figure.")
@click.option(
    "--format",
    "formats",
    type=Formats(),
    multiple=True,
    default=["tiff"],
    show_default=True,
    help="Mask formats, repeated or comma-separated: tiff (<name>.mask.tif and .overlay.tif; always "
    "written, the other outputs are made from it), ome-tiff (<name>.mask.ome.tif: OME-TIFF, "
    "reduced levels as SubIFDs), ome-zarr (<name>.ome.zarr: OME-Zarr NGFF 0.4 image of the slide's "
    "RGB pyramid with the mask as its label image labels/segmentation, on the same levels). "
    "The extra formats are copied from the finished mask, not segmented again.",
)
@click.option(
    "--ome-zarr-megapixels",
    type=click.FloatRange(min=0),
    default=256,
    show_default=True,
    help="Largest finest level of <name>.ome.zarr in millions of pixels: a larger slide's store (RGB and "
    "labels alike) starts at the first mask level within it, as an RGB copy of a whole slide at "
    "level 0 takes several times the slide's size (the full-resolution mask stays in "
    "<name>.mask.tif). 0: always level 0.",
)
@click.option(
    "--progress",
    type=click.Choice(["auto", "tty", "jsonl", "none"]),
    default="auto",
    show_default=True,
    help="Progress bars on a terminal, JSON lines otherwise.",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="Run one task per slide on the dask.distributed cluster at ADDRESS (e.g. tcp://host:8786); "
    "slides, model and OUT must have the same paths on every worker.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Run on a local dask cluster of N worker processes (one slide each at a time).",
)
@click.option(
    "--slide-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Time limit per slide: a slide still running after SECONDS is killed and marked failed "
    "('timed out after N s') and the batch goes on. Each slide then runs in a process of its own "
    "that loads the model again (a few seconds per slide); also with --workers/--scheduler. "
    "[default: no limit]",
)
@click.pass_context
def segment_command(
    ctx,
    slides,
    model_path,
    out_dir,
    overwrite,
    device,
    amp,
    regions,
    tissue_threshold,
    background,
    grid_size,
    long_side,
    max_grid,
    interp,
    gather_mode,
    lod_bias,
    tta,
    glass_weight,
    grid_iterations,
    grid_scale,
    mpp,
    tile,
    geojson,
    qc,
    formats,
    ome_zarr_megapixels,
    progress,
    scheduler,
    workers,
    mode,
    slide_timeout,
) -> None:
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
        regions=regions,
        tissue_threshold=tissue_threshold,
        background=background,
        out_size=hw(grid_size),
        long_side=long_side,
        max_grid=hw(max_grid),
        interp=interp,
        gather_mode=gather_mode,
        lod_bias=lod_bias,
        tta=tta,
        glass_weight=glass_weight,
        grid_iterations=grid_iterations,
        grid_scale=grid_scale,
        device=device,
        amp=amp,
        tile=tile,
        mpp=mpp,
        geojson=geojson,
        qc=qc,
        mode=mode,
        formats=[f for group in formats for f in group],
        ome_zarr_megapixels=ome_zarr_megapixels,
    )
    if scheduler is not None and workers is not None:
        raise click.UsageError("--scheduler and --workers exclude each other")
    if model_path in ("demo", "mosaic", "tumour") and not os.path.exists(model_path):
        from wsiseg.demo import demo_model

        model_path = str(demo_model("mosaic" if model_path == "demo" else model_path))
    result = run_segment(
        slides,
        model_path,
        out_dir,
        options,
        overwrite=overwrite,
        progress=progress,
        scheduler=scheduler,
        workers=workers,
        slide_timeout=slide_timeout,
    )
    counts = result.counts
    click.echo(
        f"{counts.get('ok', 0)} ok, {counts.get('skipped', 0)} skipped, {counts.get('failed', 0)} failed "
        f"-> {out_dir} (status.csv, report.csv)"
    )
    ctx.exit(result.exit_code)


@click.command("demo")
@click.option(
    "--out",
    "out_dir",
    default="wsiseg-demo",
    show_default=True,
    type=click.Path(file_okay=False, path_type=str),
    help="Output folder.",
)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--overwrite", is_flag=True, help="Redo the demo even if its outputs exist.")
@click.option(
    "--model",
    "model_name",
    type=click.Choice(["mosaic", "tumour"]),
    default="mosaic",
    show_default=True,
    help="Shipped model: background / non-tumour / tumour trained on real H&E tumour masks, or "
    "background / cellular / stroma trained on texture mosaics (docs/demo-model.md).",
)
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
