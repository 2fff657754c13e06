"""Learned vs fixed sampling at equal budgets on real labelled data: ``wsiseg bench sampling``.

Issue 5 of the project asks whether the learned sampler pays off: on the
NuCLS nucleus tiles and on the BCSS-geometry texture mosaics, the four
methods of the evaluation sweep (:data:`wsiseg.evaluation.results.SWEEP_METHODS`)

* ``learned``: learned deformation, joint loss (segmentation + edge loss, the paper's),
* ``single``: learned deformation, segmentation loss only (the paper's "single loss"),
* ``uniform``: the uniform grid,
* ``edge``: the oracle edge-based grid (density from the *labels*, also at test time),

are trained from one config at every output size (budget) and scored on the
held-out test split. Training and evaluation are those of
``wsiseg evaluate --sweep`` (:func:`wsiseg.evaluation.sweep.run_sweep`); this module
only prepares the data, pins the thread count and writes the
``<!-- bench:sampling -->`` section of ``docs/benchmarks.md``
(:func:`wsiseg.bench.common.write_section`).

Runs are kept in ``workdir/<dataset>-<digest>/sweep/<method>-<W>x<H>/``,
the digest naming the training config, the epochs and the training data: a
rerun with the same settings reuses finished runs and resumes unfinished ones
(so an interrupted benchmark costs only what was not done), and different
settings never mix.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsiseg.bench.common import machine_lines, machine_info
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.evaluation.results import SWEEP_METHODS
from wsiseg.evaluation.sweep import format_sweep_table, run_sweep, write_sweep_files
from wsiseg.viz.eval_figures import method_label

if TYPE_CHECKING:
    from wsiseg.training.config import TrainConfig

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_MOSAIC_SPEC",
    "BenchDataset",
    "DatasetRun",
    "SamplingBench",
    "bench_config",
    "bench_sampling",
    "format_sampling_section",
    "mosaic_dataset",
    "nucls_dataset",
]

#: The demo model's training config: the segmenter and optimiser of the benchmark.
DEFAULT_CONFIG = Path("pipelines") / "demo-model.yaml"
#: The demo model's mosaic spec (BCSS geometry, real H&E textures).
DEFAULT_MOSAIC_SPEC = Path("pipelines") / "demo-data.yaml"
_NUCLS = Path("labelled-tiles") / "nucls" / "square"
_NUCLS_CLASSES = Path("pipelines") / "classes" / "nucls.yaml"


@dataclass(frozen=True)
class BenchDataset:
    """One labelled data set of the benchmark.

    Attributes
    ----------
    key : str
        Short name, also the prefix of its run folder (``"nucls"``, ``"mosaics"``).
    title : str
        Heading of its results.
    data : pathlib.Path
        Pairs with ``train``/``test`` (and optionally ``val``) split marks
        (:func:`wsiseg.training.pairs.load_pairs`).
    classes : pathlib.Path
        Classes YAML.
    epochs : int
        Training epochs of every run on it.
    description : str
        One markdown sentence: what the data is.
    """

    key: str
    title: str
    data: Path
    classes: Path
    epochs: int
    description: str


@dataclass(frozen=True)
class DatasetRun:
    """The sweep on one data set.

    Attributes
    ----------
    dataset : BenchDataset
    pairs : dict of str -> int
        Pairs per split (``train``, ``val``, ``test``).
    rows : list of dict
        :func:`wsiseg.evaluation.sweep.run_sweep` rows (one per budget and method).
    run_dir : pathlib.Path
        Holds ``sweep/``, ``sweep.json``, ``sweep.csv``, ``sweep.png``.
    seconds : float
        Wall time of this call on the data set (reused runs cost only their evaluation).
    trained : int
        Runs trained or resumed in this call (the others were reused).
    """

    dataset: BenchDataset
    pairs: dict[str, int]
    rows: list[dict]
    run_dir: Path
    seconds: float
    trained: int


@dataclass(frozen=True)
class SamplingBench:
    """Result of :func:`bench_sampling`.

    Attributes
    ----------
    runs : tuple of DatasetRun
    config : wsiseg.training.config.TrainConfig
        The base training config (before each data set's epochs and each
        run's size and method).
    sizes : tuple of (int, int)
        Output sizes ``(h, w)``.
    threads : int
        torch CPU threads during the runs.
    seconds : float
        Wall time of the whole call.
    machine : dict
        :func:`wsiseg.bench.common.machine_info` at the start.
    versions : str
        torch, segmentation-models-pytorch and timm versions.
    load_after : str
        Load average at the end (others' work competes for the cores).
    """

    runs: tuple[DatasetRun, ...]
    config: TrainConfig
    sizes: tuple[tuple[int, int], ...]
    threads: int
    seconds: float
    machine: dict = field(default_factory=dict)
    versions: str = ""
    load_after: str = "n/a"


# ---------------------------------------------------------------------------
# data sets


def nucls_dataset(
    data_root: str | os.PathLike, epochs: int, *, classes: str | os.PathLike = _NUCLS_CLASSES
) -> BenchDataset:
    """The NuCLS square tiles of the shared data (10 train, 5 test tiles of 256 x 256).

    Parameters
    ----------
    data_root : path-like
        The shared data folder (``../shared/data``).
    epochs : int
    classes : path-like
        Classes YAML (default ``pipelines/classes/nucls.yaml``).

    Raises
    ------
    ConfigError
        The tiles or the classes file are missing.
    """
    data = Path(data_root) / _NUCLS
    if not data.is_dir():
        raise ConfigError(f"NuCLS tiles not found at {data} (pass --data, or set WSISEG_SHARED_DATA)")
    if not Path(classes).is_file():
        raise ConfigError(f"classes file {classes} not found (run from the project root)")
    return BenchDataset(
        "nucls",
        "NuCLS nucleus tiles",
        data,
        Path(classes),
        epochs,
        "real H&E breast-cancer tiles with hand-drawn nucleus labels (NuCLS, CC0), 256 x 256 at about "
        "0.2 um/px; classes background / non-tumour nucleus / tumour nucleus",
    )


def mosaic_dataset(
    spec: str | os.PathLike,
    data_root: str | os.PathLike,
    workdir: str | os.PathLike,
    counts: dict[str, int],
    epochs: int,
    *,
    log: Callable[[str], None] | None = None,
) -> BenchDataset:
    """BCSS-geometry texture mosaics of ``spec`` with ``counts`` per split, built once in ``workdir``.

    Mosaic ``i`` of a split depends only on the spec and ``i``
    (:mod:`wsiseg.training.mosaic`), so fewer mosaics are the first ones of the
    spec's full set.

    Parameters
    ----------
    spec : path-like
        Mosaic spec YAML (default of the command: ``pipelines/demo-data.yaml``).
    data_root : path-like
        Folder the spec's paths are relative to (the shared data).
    workdir : path-like
        Cache folder; the mosaics go to ``mosaics-<train>-<val>-<test>-<digest>/``.
    counts : dict of str -> int
        Mosaics per split (``train``, ``val``, ``test``).
    epochs : int
    log : callable, optional
    """
    from wsiseg.training.mosaic import CLASSES_NAME, build_mosaics, load_spec

    say = log or (lambda _m: None)
    spec = Path(spec)
    if not spec.is_file():
        raise ConfigError(f"mosaic spec {spec} not found (run from the project root or pass --mosaic-spec)")
    kwargs = load_spec(spec, data_root)
    kwargs["n"] = dict(counts)
    digest = hashlib.sha1(spec.read_bytes() + os.fsencode(os.path.abspath(data_root))).hexdigest()[:8]
    out = Path(workdir) / f"mosaics-{counts['train']}-{counts['val']}-{counts['test']}-{digest}"
    if (out / CLASSES_NAME).is_file():  # written atomically: present means complete
        say(f"mosaics: reusing {out}")
    else:
        t0 = time.perf_counter()
        build_mosaics(out_dir=out, extra={"spec": spec.name, "bench": "wsiseg bench sampling"}, **kwargs)
        say(f"mosaics: built {sum(counts.values())} in {time.perf_counter() - t0:.0f} s -> {out}")
    return BenchDataset(
        "mosaics",
        "BCSS-geometry texture mosaics",
        out,
        out / CLASSES_NAME,
        epochs,
        f"texture mosaics on real BCSS label geometry with real H&E textures (`{spec.as_posix()}`, the demo "
        "model's data; train/val/test hold out disjoint map bands and texture rows), 256 x 256; classes "
        "background / cellular / stroma",
    )


# ---------------------------------------------------------------------------
# the benchmark


def bench_config(path: str | os.PathLike = DEFAULT_CONFIG, **overrides: Any) -> TrainConfig:
    """The base training config: a YAML file (default the demo model's) with ``overrides`` applied.

    Returns
    -------
    wsiseg.training.config.TrainConfig
    """
    from wsiseg.training.config import TrainConfig, load_train_config

    if not Path(path).is_file():
        raise ConfigError(f"training config {path} not found (run from the project root or pass --config)")
    return TrainConfig.from_dict({**load_train_config(path), **overrides})


def _epochs_config(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """``cfg`` with ``epochs``; a step decay keeps its place in the schedule (demo: after 14 of 20 epochs)."""
    step = cfg.step_size
    if step is not None:
        step = max(1, round(step * epochs / cfg.epochs))
    return dataclasses.replace(cfg, epochs=epochs, step_size=step)


def _run_digest(cfg: TrainConfig, data_hash: str) -> str:
    """Names a run folder by everything that makes its results (not the device or loader workers)."""
    keep = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "num_workers")}
    return hashlib.sha1(json.dumps([keep, data_hash], sort_keys=True).encode()).hexdigest()[:10]


def _torch_versions() -> str:
    import segmentation_models_pytorch as smp
    import timm
    import torch

    return f"torch {torch.__version__}, segmentation-models-pytorch {smp.__version__}, timm {timm.__version__}"


def bench_sampling(
    datasets: Sequence[BenchDataset],
    config: TrainConfig,
    sizes: Sequence[tuple[int, int]],
    workdir: str | os.PathLike,
    *,
    threads: int = 1,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> SamplingBench:
    """Train and score learned (joint), learned (single), uniform and edge sampling at every size.

    Parameters
    ----------
    datasets : sequence of BenchDataset
    config : wsiseg.training.config.TrainConfig
        Base config (:func:`bench_config`); each data set sets its epochs
        (the step decay scaled alike), each run its size and method
        (:func:`wsiseg.evaluation.sweep.run_sweep`).
    sizes : sequence of (int, int)
        Output sizes ``(h, w)``: the budgets.
    workdir : path-like
        Run folders (see the module docstring).
    threads : int
        torch CPU threads for training and evaluation (restored afterwards):
        seconds per iteration depend on it.
    device : str
    log : callable, optional

    Returns
    -------
    SamplingBench
    """
    import torch

    from wsiseg.training.classmap import load_class_map
    from wsiseg.training.pairs import dataset_hash, load_pairs, split_pairs

    say = log or (lambda _m: None)
    if threads < 1:
        raise ConfigError(f"--threads must be positive, got {threads}")
    if not sizes:
        raise ConfigError("no sizes to benchmark")
    machine = machine_info()  # before the work: the load shows whether others shared the CPUs
    t_all = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    runs = []
    try:
        for ds in datasets:
            t0 = time.perf_counter()
            cfg = _epochs_config(dataclasses.replace(config, device=device), ds.epochs)
            class_map = load_class_map(ds.classes)
            pairs = load_pairs(ds.data)
            train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.seed)
            test_pairs = [p for p in pairs if p.split == "test"]
            if not train_pairs or not test_pairs:
                raise WsisegError("the benchmark needs pairs marked train and test", ds.data)

            build = functools.partial(_build, class_map=class_map, cfg=cfg)
            data_hash = dataset_hash(train_pairs + val_pairs)
            run_dir = Path(workdir) / f"{ds.key}-{_run_digest(cfg, data_hash)}"
            todo = sum(
                _epochs_done(run_dir / "sweep" / f"{m}-{w}x{h}") < cfg.epochs for (h, w) in sizes for m in SWEEP_METHODS
            )
            say(
                f"== {ds.title}: {len(train_pairs)} train, {len(val_pairs)} val, {len(test_pairs)} test pairs; "
                f"{cfg.epochs} epochs; {run_dir}"
            )
            rows, _ = run_sweep(
                cfg,
                sizes,
                run_dir / "sweep",
                build(train_pairs),
                build(val_pairs) if val_pairs else None,
                build(test_pairs),
                class_map.to_classes(),
                data_hash=data_hash,
                device=device,
                log=say,
            )
            write_sweep_files(
                run_dir,
                rows,
                {
                    "data": os.fspath(ds.data),
                    "split": "test",
                    "epochs": cfg.epochs,
                    "sizes": [list(s) for s in sizes],
                    "threads": threads,
                    "resolution": {"miou_full": "full (working resolution)", "miou_deformed": "deformed"},
                },
            )
            counts = {"train": len(train_pairs), "val": len(val_pairs), "test": len(test_pairs)}
            runs.append(DatasetRun(ds, counts, rows, run_dir, time.perf_counter() - t0, todo))
    finally:
        torch.set_num_threads(before)
    return SamplingBench(
        tuple(runs),
        config,
        tuple(tuple(s) for s in sizes),
        threads,
        time.perf_counter() - t_all,
        machine,
        _torch_versions(),
        machine_info()["load"],
    )


def _epochs_done(run: Path) -> int:
    """Epochs a run folder has logged (``log.csv``: a header and one line per epoch); 0 if none."""
    from wsiseg.training.checkpoint import LOG_NAME

    try:
        return max(0, len((run / LOG_NAME).read_text(encoding="utf-8").splitlines()) - 1)
    except OSError:
        return 0


# ---------------------------------------------------------------------------
# the section


def _build(pairs, *, class_map, cfg):
    from wsiseg.training.dataset import build_dataset

    return build_dataset(pairs, class_map, hr_size=cfg.hr_size, regions=cfg.regions, seed=cfg.seed)


def _gap(full: dict[str, float], a: str, b: str) -> str:
    d = full[a] - full[b]
    return f"{method_label(a)} {'+' if d >= 0 else '-'}{abs(d):.4f} vs {method_label(b)}"


def _by(rows: Sequence[dict], size: tuple[int, int]) -> dict[str, dict]:
    return {r["method"]: r for r in rows if (r["out_height"], r["out_width"]) == tuple(size)}


def _reading(run: DatasetRun, sizes: Sequence[tuple[int, int]]) -> list[str]:
    """Plain statements read off the numbers: the winner per budget and the learned-vs-fixed gaps."""
    out = []
    for size in sizes:
        m = _by(run.rows, size)
        full = {k: r.get("miou_full") for k, r in m.items() if r.get("miou_full") is not None}
        if not full:
            continue
        best = max(full, key=full.get)
        parts = [f"best full-resolution mIoU: {method_label(best)} ({full[best]:.4f})"]

        pairs = (("learned", "uniform"), ("single", "uniform"), ("learned", "single"), ("learned", "edge"))
        parts += [_gap(full, a, b) for a, b in pairs if a in full and b in full]
        out.append(f"- {size[1]}x{size[0]}: " + "; ".join(parts) + ".")
    return out


def format_sampling_section(b: SamplingBench, command: str) -> str:
    """Markdown for the ``sampling`` section of docs/benchmarks.md."""
    c = b.config
    dec = "-".join(str(x) for x in c.decoder_channels) if c.decoder_channels else "smp default"
    budgets = ", ".join(
        f"{w}x{h} grid = {h * w} samples = {100 * h * w / (c.hr_size[0] * c.hr_size[1]):.2f} %" for h, w in b.sizes
    )
    m = b.machine
    lines = [
        "## Learned vs fixed sampling at equal budgets (issue 5)",
        "",
        f"- Command: `{command}`",
        *machine_lines(m),
        f"- Training libraries: {b.versions}; Python {platform.python_version()}.",
        (
            f"- Threads: **{b.threads} torch CPU thread** for all training and evaluation (`torch.set_num_threads`; "
            f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}`), on a machine shared with other work; "
            f"load average at the end: {b.load_after}. Whole run: {b.seconds / 60:.1f} min wall, in which "
            f"{sum(r.trained for r in b.runs)} of {sum(len(r.rows) for r in b.runs)} runs were trained or resumed "
            "(finished runs are reused from the work folder and only evaluated)."
        ),
        f"- Model: {c.arch} / `{c.encoder}` (random init), decoder {dec}; focal loss; joint = focal + "
        f"{c.gamma_edge:g} x edge loss, single = focal only. Adam lr {c.lr:g}"
        + (f", x{c.lr_gamma:g} at {round(100 * c.step_size / c.epochs)} % of the epochs" if c.step_size else "")
        + f", batch {c.batch_size}, augmentation flips{'+rot90' if c.rot90 else ''}"
        f"{f' + colour jitter {c.color_jitter:g}' if c.color_jitter else ''}, seed {c.seed}, one run per "
        "method and budget (a single seed: differences of a few hundredths of mIoU can be run-to-run noise).",
        (
            f"- Working resolution {c.hr_size[1]}x{c.hr_size[0]} (the whole tile); density map side = "
            f"{c.map_size[0] / c.out_size[0]:g} x the grid side (min 4). "
            f"Budgets (cost = samples / working-resolution pixels): {budgets}."
        ),
        (
            "- Methods: *learned (joint loss)* = deformation net trained by segmentation + edge loss (the paper's); "
            "*learned (single loss)* = the same with the segmentation loss only; *uniform* = regular grid; "
            "*edge (oracle)* = density from the label boundaries, also at test time (an upper-bound-style baseline "
            "that a real slide cannot have)."
        ),
        (
            "- Scores on the held-out test split: *full res.* = the prediction reverse-sampled (nearest) to the "
            "working raster vs the labels (what a user gets); *deformed* = prediction vs labels read at the grid "
            "points (what the loss sees); mIoU(Y', Y) = labels sampled on the grid and read back (the sampler's own "
            "loss, 1 = lossless). Per-class IoU at full resolution. *train s/it* = median seconds per optimiser "
            "step over the epochs (data loading and augmentation included), as `wsiseg train` measures it."
        ),
    ]
    for run in b.runs:
        ds = run.dataset
        val = (
            f"{run.pairs['val']} val pairs select the best epoch by full-resolution val mIoU"
            if run.pairs["val"]
            else "no validation split: the last epoch is kept"
        )
        lines += [
            "",
            f"### {ds.title}",
            "",
            (
                f"{ds.description}. {run.pairs['train']} train / {run.pairs['test']} test pairs; {val}; "
                f"{ds.epochs} epochs per run; {run.seconds / 60:.1f} min for this data set. "
                f"Files: `{run.run_dir.as_posix()}/sweep.{{json,csv,png}}`."
            ),
            "",
            format_sweep_table(run.rows),
            "",
            *_reading(run, b.sizes),
        ]
    return "\n".join(lines)
