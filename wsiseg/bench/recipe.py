"""The shipped tumour model's recipe with each sampler: the ``recipe`` part of ``wsiseg bench quality``.

The ``quality`` part (:func:`wsiseg.bench.quality.bench_quality`) trains one
net per set, at pixel budgets, with BatchNorm. The real-tissue demo model
(``pipelines/tumour-model.yaml``, docs/demo-model.md) is trained otherwise:
one model over the training images of all three sets, every region read at
one physical scale (micrometres per working pixel), random windows of one
physical size, GroupNorm, and a sample spacing in micrometres as the budget.
This part trains that recipe with each sampler (learned with the joint
loss, learned with the segmentation loss only, uniform, oracle edge) at
several sample spacings and seeds, and scores every model on each set's
fixed held-out images, so learned against uniform is measured on the
configuration the project ships.

The sliding-window ceiling (method ``full``) is the same net on every working
pixel: the uniform sampler at a spacing of one working pixel, trained on
:data:`RECIPE_FULL_WINDOW_UM` windows for as many steps as the sampled runs
and scored on the whole test images (runs ``full-s<seed>``).

Runs live in ``workdir/recipe/<method>-<spacing>um-s<seed>/``; a finished run
is reused (its config and data are checked, as ``wsiseg train --resume``
does), so runs made with ``wsiseg train --config`` on the same data and
config are taken as they are. Rows (one per set) go to
``workdir/recipe/rows/<method>-<spacing>um-s<seed>.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from wsiseg.bench.quality import FULL, fmt_score, write_json
from wsiseg.training.regions import QualitySet

if TYPE_CHECKING:
    from wsiseg.training.config import TrainConfig
    from wsiseg.training.pairs import TrainingPair

__all__ = [
    "RECIPE_CONFIG",
    "RECIPE_FULL",
    "RECIPE_FULL_WINDOW_UM",
    "RECIPE_IMAGENET_ENCODER",
    "RECIPE_STEPS",
    "RECIPE_NORMS",
    "RECIPE_RUNS",
    "bench_recipe",
    "encoder_config",
    "encoder_prefix",
    "format_tta",
    "full_config",
    "mean_sd",
    "method_config",
    "recipe_grid",
    "set_stem",
    "stored_recipe_rows",
    "train_run",
    "truth_miou",
]

#: The shipped real-tissue model's training config.
RECIPE_CONFIG = Path("pipelines") / "tumour-model.yaml"
#: Attraction steps of the ``-steps`` methods (:func:`wsiseg.sampling.grid.density_to_grid`).
RECIPE_STEPS = 8


def method_config(method: str) -> dict:
    """Training-config changes of a recipe method.

    The sweep's four (:data:`wsiseg.evaluation.results.SWEEP_CONFIG`), and
    ``<method>-steps``: the same sampler with the attraction repeated
    :data:`RECIPE_STEPS` times toward equidistribution (``grid_iterations``;
    the uniform grid is the same either way, so only ``learned-steps`` and
    ``edge-steps`` are run).
    """
    from wsiseg.evaluation.results import SWEEP_CONFIG

    base, steps = (method[: -len("-steps")], RECIPE_STEPS) if method.endswith("-steps") else (method, 1)
    return {**SWEEP_CONFIG[base], "grid_iterations": steps}


#: Methods per encoder initialisation and sample spacing (um). At 1 um per working pixel, 32 / 16 / 8 um is
#: about 0.1 / 0.4 / 1.6 % of the level-0 pixels of CAMELYON (~1 um/px), 0.02 / 0.1 / 0.4 % of OCDC's
#: (0.5 um/px) and 0.006 / 0.02 / 0.1 % of the BCSS ROIs' (0.25 um/px). The single-loss and oracle
#: samplers, and the pretrained encoder, only at the shipped spacing.
RECIPE_RUNS: dict[str, dict[float, tuple[str, ...]]] = {
    "random": {
        32.0: ("learned", "uniform"),
        16.0: ("learned", "uniform"),
        8.0: ("learned", "single", "uniform", "edge", "learned-steps", "edge-steps"),
    },
    "imagenet": {8.0: ("learned", "uniform")},
    "imagenet-frozen": {8.0: ("learned", "uniform")},
}
#: Encoder initialisations whose sliding-window ceiling (method ``full``) is trained.
RECIPE_FULL: tuple[str, ...] = ("random",)
#: Side of the ceiling's training windows (um). The sampled runs' 512 um windows at one sample per working
#: pixel would cost 64x an 8 um run per step; 128 um windows cost 4x, which a CPU can afford for 3 seeds.
#: Less context per window than the sampled runs see (512 um), the same detail (every working pixel).
RECIPE_FULL_WINDOW_UM = 128.0
#: Recipe-only encoder variants: the pretrained encoder with its BatchNorm statistics frozen (``norm: frozen``)
#: instead of moved to GroupNorm.
RECIPE_NORMS = {"imagenet": None, "imagenet-frozen": "frozen"}
#: The encoder of the pretrained variant: the one the offline ImageNet weights fit
#: (:func:`wsiseg.models.pretrained.offline_imagenet_weights`), in place of the recipe's own.
RECIPE_IMAGENET_ENCODER = "tu-efficientnet_lite0"


def recipe_grid(cfg: TrainConfig) -> int:
    """Samples across one training window: the grid side a spacing gives (the cells' key in the report)."""
    if cfg.crop_size is None or cfg.working_mpp is None or cfg.sample_spacing_um is None:
        from wsiseg.errors import ConfigError

        raise ConfigError("the recipe config needs crop_size, working_mpp and sample_spacing_um")
    return max(1, round(cfg.crop_size[0] * cfg.working_mpp / cfg.sample_spacing_um))


def truth_miou(cm) -> float | None:
    """Mean IoU over the classes present in the targets of a confusion matrix (rows = targets).

    Examples
    --------
    >>> from wsiseg.metrics import ConfusionMatrix
    >>> cm = ConfusionMatrix(3)
    >>> cm.update([0, 1, 2, 2], [1, 1, 2, 2])  # class 0 predicted once, never in the targets
    >>> round(cm.miou(), 3), truth_miou(cm)
    (0.5, 0.75)
    """
    import numpy as np

    present = cm.matrix.sum(1) > 0
    return float(np.mean(cm.iou()[present])) if present.any() else None


def _recipe(cfg: TrainConfig) -> dict:
    """What the report says about the recipe a row was trained with."""
    assert cfg.crop_size is not None and cfg.working_mpp is not None
    return {
        "arch": cfg.arch,
        "encoder": cfg.encoder,
        "norm": cfg.norm,
        "encoder_weights": cfg.encoder_weights,
        "working_mpp": cfg.working_mpp,
        "window_um": cfg.crop_size[0] * cfg.working_mpp,
        "epochs": cfg.epochs,
    }


def set_stem(pair: TrainingPair, sets: Sequence[QualitySet]) -> tuple[str, str] | None:
    """(set key, image stem) of a prepared pair, None for pairs of no set (the glass textures).

    :func:`wsiseg.demo.data.prepare_demo_data` names the label files ``<set>-<stem>``.
    """
    name = Path(pair.annotation).stem
    for qs in sets:
        if name.startswith(f"{qs.key}-"):
            return qs.key, name[len(qs.key) + 1 :]
    return None


def mean_sd(v: Sequence[float], scale: float = 1.0, fmt: str = ".3f") -> str:
    """Mean ± sd of ``scale`` times the values (the value alone for one), each in format ``fmt``."""
    import statistics

    v = [scale * x for x in v]
    if len(v) == 1:
        return f"{v[0]:{fmt}}"
    return f"{statistics.mean(v):{fmt}} ± {statistics.stdev(v):{fmt.lstrip('+')}}"


def bench_recipe(
    data_root: str | os.PathLike,
    workdir: str | os.PathLike,
    sets: Sequence[QualitySet],
    base: TrainConfig,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    encoders: Sequence[str] = ("random",),
    imagenet_weights: str | None = None,
    runs: Mapping[str, Mapping[float, Sequence[str]]] | None = None,
    full: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Train ``base`` (the shipped recipe) with each sampler, spacing and seed; score each set's test images.

    Parameters
    ----------
    data_root, workdir : path-like
        Shared data; the prepared data, runs and rows go to ``workdir/recipe``.
    sets : sequence of QualitySet
        Sets trained on together and scored one by one.
    base : wsiseg.training.config.TrainConfig
        The recipe (physical scale: ``working_mpp``, ``crop_size``, ``sample_spacing_um``); each run
        changes its sampler (:func:`method_config`), spacing and seed.
    seeds : sequence of int
    encoders : sequence of {"random", "imagenet", "imagenet-frozen"}
        ``"random"``: the recipe as it is; ``"imagenet"``: its encoder replaced by
        :data:`RECIPE_IMAGENET_ENCODER` with ``imagenet_weights`` (runs named ``imagenet-...``);
        ``"imagenet-frozen"``: the same with ``norm: frozen`` (the encoder's BatchNorm statistics
        kept, the decoder on GroupNorm; runs named ``imagenet-frozen-...``).
    imagenet_weights : str, optional
        Required with the imagenet variants: a local weights file.
    runs : mapping, optional
        Methods per encoder and spacing (default :data:`RECIPE_RUNS`).
    full : sequence of str, optional
        Encoders (of ``encoders``) whose sliding-window ceiling is trained (default :data:`RECIPE_FULL`):
        the uniform sampler on every working pixel, trained on :data:`RECIPE_FULL_WINDOW_UM` windows.
    log : callable, optional

    Returns
    -------
    list of dict
        :func:`wsiseg.evaluation.sweep.sweep_row` rows with ``set``, ``encoder``, ``seed``,
        ``spacing_um`` and ``recipe`` added, one per run and set. A run's rows are stored and reused
        while they are newer than its model file.
    """
    import dataclasses

    from wsiseg.demo.data import prepare_demo_data
    from wsiseg.device import resolve_device
    from wsiseg.training.classmap import load_class_map
    from wsiseg.training.pairs import dataset_hash, load_pairs

    say = log or (lambda _m: None)
    recipe_grid(base)  # refuse a config without physical scale before any work
    for enc in encoders:
        encoder_config(base, enc, imagenet_weights)  # a missing weights file is named before any work
    work = Path(workdir) / "recipe"
    csv_path = prepare_demo_data(data_root, work / "data", sets=[qs.key for qs in sets])
    class_map = load_class_map(csv_path.parent / "classes.yaml")
    pairs = load_pairs(csv_path)
    data_hash = dataset_hash(pairs)  # as `wsiseg train` fingerprints its pairs file
    tests = {
        qs.key: [p for p in pairs if p.split == "test" and (set_stem(p, sets) or ("",))[0] == qs.key] for qs in sets
    }
    dev = resolve_device(base.device)
    rows: list[dict] = []
    for enc in encoders:
        start = encoder_config(base, enc, imagenet_weights)
        for spacing, methods in (runs or RECIPE_RUNS)[enc].items():
            for method in methods:
                for seed in seeds:
                    cfg = dataclasses.replace(
                        start, sample_spacing_um=float(spacing), seed=seed, **method_config(method)
                    )
                    name = f"{encoder_prefix(enc)}{method}-{spacing:g}um-s{seed}"
                    rows += _recipe_run(cfg, work, name, enc, method, pairs, tests, class_map, data_hash, dev, say)
        if enc in (RECIPE_FULL if full is None else full):
            for seed in seeds:
                cfg = dataclasses.replace(start, seed=seed, **full_config(start))
                name = f"{encoder_prefix(enc)}{FULL}-s{seed}"
                rows += _recipe_run(cfg, work, name, enc, FULL, pairs, tests, class_map, data_hash, dev, say)
    return rows


def encoder_config(base: TrainConfig, encoder: str, imagenet_weights: str | None = None) -> TrainConfig:
    """The recipe with encoder initialisation ``encoder``: as it is for ``"random"``, else its
    encoder replaced by :data:`RECIPE_IMAGENET_ENCODER` with ``imagenet_weights`` (and, for
    ``"imagenet-frozen"``, ``norm: frozen``).

    Raises
    ------
    wsiseg.errors.ConfigError
        An unknown variant, or a pretrained one without ``imagenet_weights``.
    """
    import dataclasses

    from wsiseg.errors import ConfigError

    if encoder == "random":
        return base
    if encoder not in RECIPE_NORMS:
        raise ConfigError(f"encoder variant must be random, {' or '.join(RECIPE_NORMS)}, got {encoder!r}")
    if not imagenet_weights:
        raise ConfigError("the imagenet recipe runs need --imagenet-weights PATH (e.g. the offline EfficientNet-Lite0)")
    return dataclasses.replace(
        base,
        encoder=RECIPE_IMAGENET_ENCODER,
        encoder_weights=imagenet_weights,
        norm=RECIPE_NORMS[encoder] or base.norm,
    )


def encoder_prefix(encoder: str) -> str:
    """Prefix of a run's name for its encoder variant: none for the recipe's own (``"random"``).

    Examples
    --------
    >>> encoder_prefix("random"), encoder_prefix("imagenet-frozen")
    ('', 'imagenet-frozen-')
    """
    return "" if encoder == "random" else f"{encoder}-"


def full_config(base: TrainConfig) -> dict:
    """Training-config changes of the sliding-window ceiling: every working pixel a sample.

    The uniform sampler at a spacing of one working pixel, on windows of
    :data:`RECIPE_FULL_WINDOW_UM` (or the recipe's own, if smaller).
    """
    assert base.crop_size is not None and base.working_mpp is not None
    side = min(base.crop_size[0], max(1, round(RECIPE_FULL_WINDOW_UM / base.working_mpp)))
    return {**method_config("uniform"), "sample_spacing_um": base.working_mpp, "crop_size": (side, side)}


def train_run(cfg, out: Path, method: str, pairs, class_map, data_hash: str, say) -> Path:
    """Train ``cfg`` on the train (and val) pairs of ``pairs`` into ``out``, or reuse the run there.

    :func:`wsiseg.evaluation.sweep.ensure_trained` on the regions ``wsiseg train``
    reads for ``cfg``; ``data_hash`` fingerprints ``pairs`` as it does.

    Returns
    -------
    pathlib.Path
        The model file.
    """
    from wsiseg.evaluation.sweep import ensure_trained
    from wsiseg.training.dataset import config_dataset
    from wsiseg.training.pairs import split_pairs

    train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.seed)
    return ensure_trained(
        cfg,
        out,
        config_dataset(train_pairs, class_map, cfg),
        config_dataset(val_pairs, class_map, cfg) if val_pairs else None,
        class_map.to_classes(),
        data_hash,
        say,
        method,
    )


def _recipe_run(cfg, work: Path, name: str, enc: str, method: str, pairs, tests, class_map, data_hash, dev, say):
    """One recipe run, trained (or reused) and scored on each set's test pairs (``tests``: set key -> pairs);
    its stored rows if current."""
    from wsiseg.evaluation.scoring import evaluate_model
    from wsiseg.evaluation.sweep import sweep_row
    from wsiseg.models.io import load_deformseg
    from wsiseg.training.dataset import config_dataset

    def dataset(ps):
        return config_dataset(ps, class_map, cfg)

    stored = work / "rows" / f"{name}.json"
    t0 = time.perf_counter()
    path = train_run(cfg, work / name, method, pairs, class_map, data_hash, say)
    if stored.is_file() and stored.stat().st_mtime > path.stat().st_mtime:
        rows = json.loads(stored.read_text(encoding="utf-8"))
        if all("miou_full_tta" in r for r in rows):  # rows from before the test-time flips are scored again
            return rows
    model = load_deformseg(path, device=dev)
    training = model.metadata.get("training") or {}
    unit = []
    for key, test in tests.items():
        ds = dataset(test)  # read once, scored twice
        r = evaluate_model(model, ds, device=dev, name=method)
        flips = evaluate_model(model, ds, device=dev, name=method, tta=True)
        row = sweep_row(r, (recipe_grid(cfg),) * 2, path, cfg.epochs, training)
        row.update(
            set=key,
            encoder=enc,
            seed=cfg.seed,
            spacing_um=cfg.sample_spacing_um,
            recipe=_recipe(cfg),
            # The test labels hold no glass: a few pixels called background would add a 0 to
            # the mean. mIoU over the classes of the test labels (all classes: miou_full_all).
            miou_full_all=row["miou_full"],
            miou_full=truth_miou(r.full),
            # the same model with test-time flips (segment --tta)
            miou_full_tta=truth_miou(flips.full),
        )
        unit.append(row)
    for row in unit:
        row["seconds"] = time.perf_counter() - t0
    write_json(stored, unit)
    say(f"recipe {name}: " + ", ".join(f"{r['set']} {fmt_score(r['miou_full'])}" for r in unit))
    return unit


def format_tta(rows: Sequence[dict]) -> list[str]:
    """Markdown table: held-out mIoU of each recipe cell without and with test-time flips, and the gain.

    The gain is the mean ± sd over seeds of each model's own difference (the
    same model scored twice), so the seeds' spread does not hide it.
    """
    cells: dict[tuple[str, str, float, str], list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("miou_full") is None or r.get("miou_full_tta") is None:
            continue
        key = (r["set"], r["encoder"], float(r["spacing_um"]), r["method"])
        cells.setdefault(key, []).append((float(r["miou_full"]), float(r["miou_full_tta"])))
    if not cells:
        return []

    out = [
        "| set | encoder | spacing | method | seeds | mIoU | with test-time flips | gain (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (key, enc, sp, method), v in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2], kv[0][3])):
        plain, flips = [a for a, _ in v], [b for _, b in v]
        gain = mean_sd([b - a for a, b in v], 100, "+.1f")
        out.append(
            f"| {key} | {enc} | {sp:g} um | {method} | {len(v)} | {mean_sd(plain)} | {mean_sd(flips)} | {gain} |"
        )
    return out


def stored_recipe_rows(workdir: str | os.PathLike) -> list[dict]:
    """Every row :func:`bench_recipe` stored in ``workdir``."""
    rows: list[dict] = []
    for p in sorted((Path(workdir) / "recipe" / "rows").glob("*.json")):
        rows += json.loads(p.read_text(encoding="utf-8"))
    return rows
