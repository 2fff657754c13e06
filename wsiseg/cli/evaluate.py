"""``wsiseg evaluate``: a model's quality against sampling cost (:mod:`wsiseg.evaluation.run`)."""

from __future__ import annotations

import click

from wsiseg.cli.options import GLASS_WEIGHT, GRID_ITERATIONS, GRID_SCALE, MPP, Size, hw

__all__ = [
    "evaluate_command",
]


@click.command("evaluate")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=str))
@click.argument("data", type=click.Path(exists=True, path_type=str))
@click.option(
    "--classes",
    "classes_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    help="Classes YAML; its class names must be the model's.",
)
@click.option(
    "--split",
    type=click.Choice(["test", "val", "all"]),
    default="test",
    show_default=True,
    help="Pairs to evaluate: marked test (all when DATA has no split marks), the model's validation split, or all.",
)
@click.option(
    "--out",
    "out_dir",
    default="wsiseg-eval",
    show_default=True,
    type=click.Path(file_okay=False, path_type=str),
    help="Output folder: eval.json, class_frequency.png, baselines/, sweep files.",
)
@click.option("--json", "as_json", is_flag=True, help="Print eval.json instead of the table.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present), cpu, cuda, cuda:N, mps.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Regions per forward pass."
)
@click.option(
    "--compare",
    default=None,
    metavar="uniform,edge",
    help="Baselines to compare at the same budget; trained with the model's training config "
    "(only the sampler changed) into OUT/baselines/NAME unless given with --baseline.",
)
@click.option(
    "--baseline",
    "baseline_specs",
    multiple=True,
    metavar="NAME=PATH",
    help="Ready baseline model file (repeatable), e.g. uniform=runs/uniform/model.safetensors.",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=None, help="Epochs for trained baselines [default: the model's]."
)
@click.option(
    "--sweep",
    default=None,
    metavar="32,48,64,96",
    help="Cost-performance sweep: output sizes (N or WIDTHxHEIGHT); learned (joint loss), learned "
    "(single loss: no edge term), uniform and edge are trained at each into OUT/sweep/METHOD-WxH "
    "(finished runs are reused, unfinished ones resumed).",
)
@click.option(
    "--sweep-epochs", type=click.IntRange(min=1), default=None, help="Epochs per sweep model [default: the model's]."
)
@click.option(
    "--train-data",
    type=click.Path(exists=True, path_type=str),
    default=None,
    help="Training pairs for baselines and sweeps [default: DATA's train/val pairs].",
)
@click.option(
    "--hr-size",
    type=Size(),
    default=None,
    help="Working-resolution region WIDTHxHEIGHT (or N) [default: the model's training size].",
)
@click.option(
    "--trimap-widths", default="1,2,4,8,16", show_default=True, help="Trimap band widths in working-resolution pixels."
)
@click.option("--ignore-unmapped", is_flag=True, help="Annotation classes missing from --classes become ignored.")
@click.option(
    "--value-names",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    default=None,
    help="Label-mask value -> class name table (CSV, e.g. BCSS GTcodes.csv).",
)
@click.option(
    "--mpp",
    type=MPP,
    default=None,
    help="Micrometres per level-0 pixel of every image (a CSV's mpp column wins). A model that records "
    "its scale samples regions with an MPP at its sample spacing in um, as segment does.",
)
@click.option(
    "--grid-scale",
    type=GRID_SCALE,
    default=1.0,
    show_default=True,
    help="Sample every evaluated region this many times as densely per axis as segment would: how "
    "the scores hold up off the model's scale (e.g. a slide whose MPP is wrong).",
)
@click.option(
    "--tta/--no-tta",
    default=False,
    show_default=True,
    help="Test-time augmentation: average the segmenter over the deformed image and its three flips "
    "(4x the segmentation net's time), as segment --tta does.",
)
@click.option(
    "--glass-weight",
    type=GLASS_WEIGHT,
    default=1.0,
    show_default=True,
    help="As segment --glass-weight: a learned sampler's grid built on a warp away from the nodes where "
    "the region's tissue score says glass (the glass of 'samples on glass'); 1: off.",
)
@click.option(
    "--grid-iterations",
    type=GRID_ITERATIONS,
    default=None,
    help="Attraction steps of the sampling grid instead of the model's own, as segment --grid-iterations.",
)
def evaluate_command(
    model_path,
    data,
    classes_path,
    split,
    out_dir,
    as_json,
    device,
    batch_size,
    compare,
    baseline_specs,
    epochs,
    sweep,
    sweep_epochs,
    train_data,
    hr_size,
    trimap_widths,
    ignore_unmapped,
    value_names,
    mpp,
    grid_scale,
    tta,
    glass_weight,
    grid_iterations,
) -> None:
    """Evaluate MODEL on the labelled pairs in DATA (folder or CSV).

    Reports mIoU and per-class IoU in the deformed space (on the sampling
    grid) and at full working resolution, mIoU(Y', Y) (what the sampler
    alone loses), trimap accuracy, cost (fraction of level-0 pixels sampled,
    and of working-resolution pixels where that differs), the fraction of
    samples on glass (tissue detector's threshold) next to a uniform grid's,
    the class frequencies before and after sampling, and per region the
    class-share error (the share of its labelled pixels given to the wrong
    class on balance: a wrong tumour area, whatever the boundaries; eval.json:
    class_shares). A model that
    records its physical scale samples regions whose MPP is known at its
    sample spacing in um (eval.json: scale). Writes OUT/eval.json and
    OUT/class_frequency.png and prints a table (one column per method).
    """
    import json

    from wsiseg.errors import ConfigError
    from wsiseg.evaluation.run import parse_sizes, run_evaluation
    from wsiseg.evaluation.sweep import format_sweep_table

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
        model_path,
        data,
        classes_path,
        out_dir,
        split=split,
        device=device,
        batch_size=batch_size,
        widths=widths,
        compare=names,
        baselines=baselines,
        epochs=epochs,
        sweep=parse_sizes(sweep) if sweep else (),
        sweep_epochs=sweep_epochs,
        train_data=train_data,
        hr_size=hw(hr_size),
        ignore_unmapped=ignore_unmapped,
        value_names=value_names,
        mpp=mpp,
        log=lambda m: click.echo(m, err=True),
        grid_scale=grid_scale,
        tta=tta,
        glass_weight=glass_weight,
        grid_iterations=grid_iterations,
    )
    if as_json:
        click.echo(json.dumps(run.document, indent=2))
    else:
        click.echo(run.table)
        if run.sweep:
            click.echo(f"\nsweep (held-out {split} split):\n{format_sweep_table(run.sweep)}")
    for path in run.files.values():
        click.echo(f"wrote {path}", err=True)
