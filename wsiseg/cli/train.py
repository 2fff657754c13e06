"""``wsiseg train``: a model from labelled images (:mod:`wsiseg.training`)."""

from __future__ import annotations

import click

from wsiseg.cli.options import GRID_ITERATIONS, MPP, Size, hw
from wsiseg.errors import WsisegError

__all__ = [
    "train_command",
]


@click.command("train")
@click.argument("data", type=click.Path(exists=True, path_type=str))
@click.option(
    "--classes",
    "classes_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    help="Classes YAML (names, values, colours, aliases, ignored names).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=str),
    help="Output folder: model.safetensors, checkpoint.safetensors, log.csv, curves.png.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    multiple=True,
    help="Training options YAML; the options below override it. Repeat to layer files, each overriding the "
    "ones before (e.g. pipelines/tumour-model.yaml, then pipelines/imagenet-frozen.yaml).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Number of epochs [default: 50].")
@click.option(
    "--out-size",
    type=Size(),
    default=None,
    help="Sampling grid / deformed image WIDTHxHEIGHT (or N for NxN) [default: 64x64].",
)
@click.option(
    "--map-size", type=Size(), default=None, help="Low-res view / density WIDTHxHEIGHT (or N) [default: 128x128]."
)
@click.option(
    "--hr-size", type=Size(), default=None, help="Working-resolution region WIDTHxHEIGHT (or N) [default: 512x512]."
)
@click.option(
    "--sampler",
    type=click.Choice(["learned", "uniform", "edge"]),
    default=None,
    help="Learned deformation, or the uniform / oracle edge baselines [default: learned].",
)
@click.option("--loss", type=click.Choice(["focal", "ce"]), default=None, help="Segmentation loss [default: focal].")
@click.option(
    "--gamma-edge",
    type=click.FloatRange(min=0),
    default=None,
    help="Edge-loss weight (the paper's is 100; 10 balances the two loss terms' gradients on "
    "the deformation net, docs/benchmarks.md) [default: 10].",
)
@click.option(
    "--image-sampling",
    type=click.Choice(["lod", "bilinear"]),
    default=None,
    help="How regions are sampled at the grid in training: level of detail, as segment reads slides, "
    "or the paper's bilinear point samples [default: lod].",
)
@click.option(
    "--grid-iterations",
    type=GRID_ITERATIONS,
    default=None,
    help="Attraction steps from density to sampling grid: 1 is the paper's single Gaussian attraction; "
    "more move the samples toward equidistribution of the density (at 8 the oracle edge grid reads "
    "labels back better, but the learned sampler scored 2-3 points lower; docs/benchmarks.md) [default: 1].",
)
@click.option(
    "--edge-norm",
    type=click.Choice(["mean", "sum"]),
    default=None,
    help="Edge loss compares density and edge target at unit mean, or at unit sum as the paper's "
    "distributions [default: mean].",
)
@click.option("--arch", default=None, help="smp architecture [default: unet].")
@click.option("--encoder", default=None, help="smp encoder or tu-<timm model> [default: resnet18].")
@click.option(
    "--encoder-weights",
    default=None,
    metavar="imagenet|PATH",
    help="Initial encoder weights: 'imagenet' has smp download them (opt-in, needs the internet), PATH "
    "reads a local state dict (.safetensors or a torch file; tensors only, never code) matched by "
    "name or, for a torch file, by position [default: random]. Recorded in the model file.",
)
@click.option(
    "--freeze-encoder-epochs",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="The encoder's weights get no updates for the first N epochs (its BatchNorm statistics still "
    "adapt) [default: 0].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Batch size [default: 4]; batches hold regions of one shape, and a region alone in its batch "
    "whose grid is too small for BatchNorm to train on one sample is left out, with a warning.",
)
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Adam learning rate [default: 1e-3]."
)
@click.option(
    "--patience",
    type=click.IntRange(min=0),
    default=None,
    help="Early stopping after N epochs without improvement, 0 = never [default: 10].",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="Fraction of pairs held out for validation [default: 0.2].",
)
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Random seed [default: 0].")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps [default: auto].")
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
    help="Micrometres per level-0 pixel of every image, e.g. for PNG/JPEG tiles that carry none (a CSV's "
    "mpp column wins). The model records the physical scale it was trained at, so `wsiseg segment` "
    "samples slides as densely; without any MPP it records none and segments by pixel size.",
)
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its checkpoint (its options by default).")
@click.option("--overwrite", is_flag=True, help="Start afresh even if OUT holds a previous run.")
def train_command(
    data,
    classes_path,
    out_dir,
    config_path,
    epochs,
    out_size,
    map_size,
    hr_size,
    sampler,
    loss,
    gamma_edge,
    image_sampling,
    grid_iterations,
    edge_norm,
    arch,
    encoder,
    encoder_weights,
    freeze_encoder_epochs,
    batch_size,
    lr,
    patience,
    val_fraction,
    seed,
    device,
    ignore_unmapped,
    value_names,
    mpp,
    resume,
    overwrite,
) -> None:
    """Train a model on DATA (a folder of image/annotation pairs or a CSV).

    Deformation and segmentation nets are trained jointly (Jin et al.,
    ICLR 2022). Options come from the defaults, then the --resume
    checkpoint, then each --config in turn, then the options given here. The best model
    by validation mIoU (full resolution) is OUT/model.safetensors, ready for
    `wsiseg segment --model`; it records its physical scale (micrometres per
    working pixel and sample spacing) when the images' MPP is known.
    """
    from wsiseg.training.classmap import load_class_map
    from wsiseg.training.dataset import config_dataset
    from wsiseg.training.pairs import dataset_hash, load_pairs, split_pairs, with_mpp
    from wsiseg.training.checkpoint import check_output_dir, read_checkpoint_config
    from wsiseg.training.config import TrainConfig, load_train_config
    from wsiseg.training.loop import train

    check_output_dir(out_dir, resume=resume, overwrite=overwrite)  # fail before reading any data
    options: dict = dict(read_checkpoint_config(out_dir) or {}) if resume else {}
    for path in config_path:  # later files override earlier ones
        options.update(load_train_config(path))
    given = {
        "epochs": epochs,
        "out_size": hw(out_size),
        "map_size": hw(map_size),
        "hr_size": hw(hr_size),
        "sampler": sampler,
        "loss": loss,
        "gamma_edge": gamma_edge,
        "image_sampling": image_sampling,
        "grid_iterations": grid_iterations,
        "edge_norm": edge_norm,
        "arch": arch,
        "encoder": encoder,
        "encoder_weights": encoder_weights,
        "freeze_encoder_epochs": freeze_encoder_epochs,
        "batch_size": batch_size,
        "lr": lr,
        "patience": patience,
        "val_fraction": val_fraction,
        "seed": seed,
        "device": device,
    }
    options.update({k: v for k, v in given.items() if v is not None})
    cfg = TrainConfig.from_dict(options)

    class_map = load_class_map(classes_path)
    pairs = with_mpp(load_pairs(data), mpp)
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.seed)
    if not train_pairs:
        raise WsisegError("no training pairs after the train/validation split", data)

    def dataset(ps):
        return config_dataset(ps, class_map, cfg, ignore_unmapped=ignore_unmapped, value_names=value_names)

    train_ds = dataset(train_pairs)
    val_ds = dataset(val_pairs) if val_pairs else None
    click.echo(
        f"{len(train_pairs)} training pairs ({len(train_ds)} regions), "
        f"{len(val_pairs)} validation pairs ({len(val_ds) if val_ds else 0} regions)"
    )
    result = train(
        cfg,
        train_ds,
        val_ds,
        class_map.to_classes(),
        out_dir,
        resume=resume,
        overwrite=overwrite,
        data_hash=dataset_hash(pairs),
        log=click.echo,
    )

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    click.echo(
        f"model: {result.model_path} (epoch {result.best_epoch} of {result.epochs}; val mIoU full-res "
        f"{fmt(result.best_val_miou_full)}, deformed {fmt(result.best_val_miou_deformed)})"
    )
