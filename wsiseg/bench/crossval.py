"""k-fold cross-validation of the shipped recipe: the ``crossval`` part of ``wsiseg bench quality``.

The ``recipe`` part (:mod:`wsiseg.bench.recipe`) scores each sampler on each
set's few fixed test images (3 OCDC tiles, 1 BCSS ROI): a split that small
let one machine's runs show learned sampling 8 points ahead on OCDC and
another machine's the reverse (docs/benchmarks.md). This part tests every
labelled image instead. Each set's images (sorted by name) are dealt round
robin into ``folds`` folds; fold ``f``'s model trains on every other image of
every set (and the glass textures, as the recipe does) and is scored on the
images of fold ``f``, one image at a time. Every image is then held out
exactly once per seed, and learned and uniform are compared on the same
images, folds and seeds.

Runs live in ``workdir/crossval/k<folds>f<fold>-<arm>-<spacing>um-s<seed>/``, where the arm is the
sampler, prefixed by the encoder variant unless it is the recipe's own (``learned``,
``imagenet-frozen-uniform``: :func:`arm`);
rows (one per held-out image, with its confusion matrix) go to
``workdir/crossval/rows/<run>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from wsiseg.bench.quality import write_json
from wsiseg.bench.recipe import (
    encoder_config,
    encoder_prefix,
    format_tta,
    mean_sd,
    method_config,
    recipe_grid,
    set_stem,
    train_run,
    truth_miou,
)
from wsiseg.training.regions import QUALITY_SETS, QualitySet

if TYPE_CHECKING:
    from wsiseg.training.config import TrainConfig
    from wsiseg.training.pairs import TrainingPair

__all__ = [
    "CV_APART",
    "CV_FOLDS",
    "CV_GRID_SCALES",
    "CV_METHODS",
    "area_error",
    "arm",
    "bench_crossval",
    "deal_folds",
    "fold_pairs",
    "format_crossval",
    "format_crossval_area",
    "format_crossval_scales",
    "format_crossval_tta",
    "stored_crossval_rows",
]

#: Folds of the cross-validation.
CV_FOLDS = 5
#: Samplers compared (:func:`wsiseg.bench.recipe.method_config`).
CV_METHODS: tuple[str, ...] = ("learned", "uniform")
#: Sampling densities each model is scored at besides its own (``grid_scale`` of
#: :func:`wsiseg.evaluation.scoring.evaluate_model`, as ``segment --grid-scale``).
CV_GRID_SCALES: tuple[float, ...] = (0.5, 2.0)


def deal_folds(stems: Sequence[str], folds: int) -> dict[str, int]:
    """Fold of each image: the sorted stems dealt round robin.

    Neighbouring tiles (consecutive ids) land in different folds, as the
    fixed splits hold out every fourth CAMELYON id. A set with fewer images
    than folds leaves the last folds without a test image of it.

    Examples
    --------
    >>> deal_folds(["c", "a", "b", "d"], 3)
    {'a': 0, 'b': 1, 'c': 2, 'd': 0}
    """
    if folds < 2:
        from wsiseg.errors import ConfigError

        raise ConfigError(f"cross-validation needs at least 2 folds, got {folds}")
    return {s: i % folds for i, s in enumerate(sorted(stems))}


def fold_pairs(pairs: Sequence[TrainingPair], sets: Sequence[QualitySet], folds: int, fold: int) -> list[TrainingPair]:
    """The pairs with fold ``fold`` of every set as the test split and the sets' other images as train.

    Pairs of no set (the glass textures) keep their split.
    """
    if not 0 <= fold < folds:
        from wsiseg.errors import ConfigError

        raise ConfigError(f"fold must be in [0, {folds}), got {fold}")
    keyed = [(p, set_stem(p, sets)) for p in pairs]
    deal = {qs.key: deal_folds([k[1] for _, k in keyed if k is not None and k[0] == qs.key], folds) for qs in sets}
    out = []
    for p, k in keyed:
        if k is not None:
            p = dataclasses.replace(p, split="test" if deal[k[0]][k[1]] == fold else "train")
        out.append(p)
    return out


def bench_crossval(
    data_root: str | os.PathLike,
    workdir: str | os.PathLike,
    sets: Sequence[QualitySet],
    base: TrainConfig,
    *,
    folds: int = CV_FOLDS,
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] = CV_METHODS,
    encoders: Sequence[str] = ("random",),
    imagenet_weights: str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Train ``base`` (the shipped recipe) per fold, sampler and seed; score each held-out image.

    Parameters
    ----------
    data_root, workdir : path-like
        Shared data; the prepared data, runs and rows go to ``workdir/crossval``.
    sets : sequence of QualitySet
        Sets trained on together; each one's images are dealt into the folds.
    base : wsiseg.training.config.TrainConfig
        The recipe, at its own sample spacing; each run changes its sampler and seed.
    folds : int
    seeds : sequence of int
    methods : sequence of str
        Samplers (:func:`wsiseg.bench.recipe.method_config`).
    encoders : sequence of {"random", "imagenet", "imagenet-frozen"}
        Encoder variants (:func:`wsiseg.bench.recipe.encoder_config`); ``"random"``: the recipe's own.
    imagenet_weights : str, optional
        Required with the imagenet variants: a local weights file.
    log : callable, optional

    Returns
    -------
    list of dict
        One row per run and held-out image: ``set``, ``image``, ``fold``, ``folds``, ``method``,
        ``encoder``, ``seed``, ``spacing_um``, ``matrix`` (confusion matrix, rows = targets), ``classes``,
        ``miou`` (over the classes of the image's labels), ``matrix_tta`` (the same model with
        test-time flips, ``segment --tta``), ``matrix_scaled`` and ``cost_scaled`` (at each of
        :data:`CV_GRID_SCALES`, keyed ``"0.5"``, ``"2"``), ``cost`` (samples / level-0 pixels),
        ``model`` and ``seconds``. Seeds go outermost, so an interrupted bench leaves whole seeds.
    """
    from wsiseg.demo.data import prepare_demo_data
    from wsiseg.device import resolve_device
    from wsiseg.training.classmap import load_class_map
    from wsiseg.training.pairs import dataset_hash, load_pairs

    say = log or (lambda _m: None)
    recipe_grid(base)  # refuse a config without physical scale before any work
    starts = {enc: encoder_config(base, enc, imagenet_weights) for enc in encoders}
    work = Path(workdir) / "crossval"
    csv_path = prepare_demo_data(data_root, work / "data", sets=[qs.key for qs in sets])
    class_map = load_class_map(csv_path.parent / "classes.yaml")
    pairs = load_pairs(csv_path)
    dev = resolve_device(base.device)
    rows: list[dict] = []
    for seed in seeds:
        for fold in range(folds):
            fp = fold_pairs(pairs, sets, folds, fold)
            data_hash = dataset_hash(fp)  # as `wsiseg train` fingerprints its pairs file
            for enc, start in starts.items():
                for method in methods:
                    cfg = dataclasses.replace(start, seed=seed, **method_config(method))
                    name = f"k{folds}f{fold}-{encoder_prefix(enc)}{method}-{cfg.sample_spacing_um:g}um-s{seed}"
                    rows += _crossval_run(
                        cfg, work, name, (enc, method), fold, folds, fp, sets, class_map, data_hash, dev, say
                    )
    return rows


def _crossval_run(cfg, work: Path, name, variant, fold, folds, pairs, sets, class_map, data_hash, dev, say) -> list:
    """One fold's run (``variant``: encoder, sampler), trained (or reused) and scored image by image;
    its stored rows if current."""
    from wsiseg.evaluation.scoring import evaluate_model
    from wsiseg.models.io import load_deformseg
    from wsiseg.training.dataset import config_dataset

    enc, method = variant
    stored = work / "rows" / f"{name}.json"
    t0 = time.perf_counter()
    path = train_run(cfg, work / name, method, pairs, class_map, data_hash, say)
    old = []
    if stored.is_file() and stored.stat().st_mtime > path.stat().st_mtime:
        old = json.loads(stored.read_text(encoding="utf-8"))
        if all("matrix_tta" in r and set(r.get("matrix_scaled", {})) == set(map(_key, CV_GRID_SCALES)) for r in old):
            return old  # else rows from before the flips or these scales: scored again, the model kept
    model = load_deformseg(path, device=dev)
    rows = []
    for p in pairs:
        key = set_stem(p, sets)
        if p.split != "test" or key is None:
            continue
        ds = config_dataset([p], class_map, cfg)  # read once, scored twice
        r = evaluate_model(model, ds, device=dev, name=method)
        flips = evaluate_model(model, ds, device=dev, name=method, tta=True)  # as segment --tta
        scaled = {_key(g): evaluate_model(model, ds, device=dev, name=method, grid_scale=g) for g in CV_GRID_SCALES}
        rows.append(
            {
                "set": key[0],
                "image": key[1],
                "fold": fold,
                "folds": folds,
                "method": method,
                "encoder": enc,
                "seed": cfg.seed,
                "spacing_um": cfg.sample_spacing_um,
                "matrix": r.full.matrix.tolist(),
                "matrix_tta": flips.full.matrix.tolist(),
                "matrix_scaled": {g: e.full.matrix.tolist() for g, e in scaled.items()},
                "cost_scaled": {g: None if not math.isfinite(e.cost) else e.cost for g, e in scaled.items()},
                "classes": list(r.class_names),
                "miou": truth_miou(r.full),
                "cost": None if not math.isfinite(r.cost) else r.cost,
                "model": os.fspath(path),
            }
        )
    # training and scoring; a run only scored again keeps the time it was trained and scored in
    seconds = old[0]["seconds"] if old else time.perf_counter() - t0
    for row in rows:
        row["seconds"] = seconds
    write_json(stored, rows)
    say(f"crossval {name}: " + ", ".join(f"{r['set']}/{r['image']} {r['miou']:.3f}" for r in rows))
    return rows


def _key(scale: float) -> str:
    """A grid scale as a JSON key: ``"0.5"``, ``"2"``."""
    return f"{scale:g}"


def arm(row: dict) -> str:
    """A row's encoder variant and sampler as one name: the sampler alone for the recipe's own encoder.

    Rows stored before encoder variants were cross-validated have no ``encoder``: the recipe's own.

    Examples
    --------
    >>> arm({"method": "learned"}), arm({"method": "uniform", "encoder": "imagenet-frozen"})
    ('learned', 'imagenet-frozen-uniform')
    """
    return encoder_prefix(row.get("encoder", "random")) + row["method"]


def stored_crossval_rows(workdir: str | os.PathLike) -> list[dict]:
    """Every row :func:`bench_crossval` stored in ``workdir``."""
    rows: list[dict] = []
    for p in sorted((Path(workdir) / "crossval" / "rows").glob("*.json")):
        rows += json.loads(p.read_text(encoding="utf-8"))
    return rows


#: Classes the cross-validated mIoU leaves out, scored apart: glass (the tissue detector's pieces touching
#: an image's border; 0-10 % of a set's pixels), so the masks of the tissue classes compare with the recipe
#: part's, whose test images hold no glass.
CV_APART = ("background",)


def _scores(matrices: Sequence, classes: Sequence[str]) -> tuple[float, float]:
    """(mIoU over the classes present in the targets but :data:`CV_APART`, IoU of those set apart).

    Of the confusion matrices summed (rows = targets); NaN where the targets hold no such class.
    """
    import numpy as np

    m = np.sum([np.asarray(x, dtype=np.int64) for x in matrices], axis=0)
    tp, truth = np.diag(m), m.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (truth + m.sum(0) - tp)
    apart = np.array([c in CV_APART for c in classes])
    kept, put = (truth > 0) & ~apart, (truth > 0) & apart
    return (
        float(iou[kept].mean()) if kept.any() else math.nan,
        float(iou[put].mean()) if put.any() else math.nan,
    )


def _set_images(rows: Sequence[dict]) -> dict[str, set[str]]:
    """The images of each set that the rows hold."""
    images: dict[str, set[str]] = {}
    for r in rows:
        images.setdefault(r["set"], set()).add(r["image"])
    return images


def _whole_seeds(rows: Sequence[dict], keep: Callable[[dict], bool] | None = None) -> dict[tuple, dict[str, dict]]:
    """Rows by (set, :func:`arm`, seed) and image, for the seeds where an arm has every image of the set
    (of those ``keep`` accepts; every image the rows hold counts)."""
    images = _set_images(rows)
    by: dict[tuple[str, str, int], dict[str, dict]] = {}
    for r in rows:
        if keep is None or keep(r):
            by.setdefault((r["set"], arm(r), int(r["seed"])), {})[r["image"]] = r
    return {k: per for k, per in by.items() if set(per) == images[k[0]]}


def _set_rank(key: str) -> tuple[int, str]:
    """Sort key of a set: the order of :data:`QUALITY_SETS`, others after them by name."""
    order = list(QUALITY_SETS)
    return (order.index(key) if key in order else len(order), key)


def format_crossval_tta(rows: Sequence[dict]) -> list[str]:
    """Markdown table: each sampler's cross-validated mIoU without and with test-time flips, and the gain.

    :func:`wsiseg.bench.recipe.format_tta` on the folds' pooled scores per set,
    sampler and seed (the seeds where every image of the set has both).
    """
    by: dict[tuple[str, str, str, int, float], list[dict]] = {}
    for r in rows:
        if "matrix_tta" in r:
            key = (r["set"], r.get("encoder", "random"), r["method"], int(r["seed"]), float(r["spacing_um"]))
            by.setdefault(key, []).append(r)
    images = _set_images(rows)
    pooled = []
    for (s, enc, method, seed, spacing), runs in by.items():
        if {r["image"] for r in runs} != images[s]:
            continue
        classes = runs[0]["classes"]
        pooled.append(
            {
                "set": s,
                "encoder": enc,
                "spacing_um": spacing,
                "method": method,
                "seed": seed,
                "miou_full": _scores([r["matrix"] for r in runs], classes)[0],
                "miou_full_tta": _scores([r["matrix_tta"] for r in runs], classes)[0],
            }
        )
    return format_tta(pooled)


def format_crossval_scales(rows: Sequence[dict]) -> list[str]:
    """Markdown table: each sampler's cross-validated mIoU at each sampling density it was scored at.

    Pooled as :func:`format_crossval` pools (the seeds where every image of
    the set was scored at every scale); cost: samples / level-0 pixels, mean
    over the images.
    """
    scales = sorted({float(g) for r in rows for g in r.get("matrix_scaled", {})} | {1.0})
    if len(scales) < 2:
        return []
    keys = {_key(g) for g in scales if g != 1.0}
    cells: dict[tuple[str, str], dict[float, tuple[list[float], list[float]]]] = {}
    for (s, method, _seed), per in _whole_seeds(rows, lambda r: set(r.get("matrix_scaled", {})) == keys).items():
        runs = list(per.values())
        for g in scales:
            key = None if g == 1.0 else _key(g)
            mats = [r["matrix"] if key is None else r["matrix_scaled"][key] for r in runs]
            costs = [r["cost"] if key is None else r["cost_scaled"][key] for r in runs]
            miou, cost = cells.setdefault((s, method), {}).setdefault(g, ([], []))
            miou.append(_scores(mats, runs[0]["classes"])[0])
            cost += [c for c in costs if c is not None]
    out = [
        "| set | method | " + " | ".join(f"x{g:g}" + (" (as trained)" if g == 1.0 else "") for g in scales) + " |",
        "|---|---|" + "---|" * len(scales),
    ]
    for (s, method), per in sorted(cells.items(), key=lambda kv: (_set_rank(kv[0][0]), kv[0][1])):
        vals = [f"{mean_sd(per[g][0])} ({100 * statistics.mean(per[g][1]):.3g} %)" for g in scales]
        out.append(f"| {s} | {method} | " + " | ".join(vals) + " |")
    return out if len(out) > 2 else []


def area_error(matrix: Sequence, classes: Sequence[str]) -> float:
    """How far an image's predicted class shares are from its labels' over the labelled tissue.

    :func:`wsiseg.metrics.class_share_error` over the pixels whose label is a
    tissue class (not :data:`CV_APART`): with two tissue classes, how much of
    the tissue is called the wrong one on balance (tumour area against the
    true tumour area), whatever the boundaries. NaN without labelled tissue.

    Examples
    --------
    >>> round(area_error([[0, 0, 0], [0, 60, 20], [0, 0, 20]], ["background", "non-tumour", "tumour"]), 6)
    0.2
    """
    from wsiseg.metrics import class_share_error

    return class_share_error(matrix, [c not in CV_APART for c in classes])


def format_crossval_area(rows: Sequence[dict], over: float = 0.2) -> list[str]:
    """Markdown table: per set and arm, how far each held-out image's predicted tissue-class shares are
    from its labels' (:func:`area_error`): mean ± sd over the image-seeds, and how many are off by more
    than ``over``.

    The seeds where the arm has every image of the set, as :func:`format_crossval` counts them.
    """
    cells: dict[tuple[str, str], list[float]] = {}
    for (s, name, _seed), per in _whole_seeds(rows).items():
        errs = [area_error(r["matrix"], r["classes"]) for r in per.values()]
        cells.setdefault((s, name), []).extend(e for e in errs if not math.isnan(e))
    out = [
        f"| set | method | image-seeds | tissue-class area error (points) | off by more than {100 * over:g} points |",
        "|---|---|---|---|---|",
    ]
    for (s, name), errs in sorted(cells.items(), key=lambda kv: (_set_rank(kv[0][0]), kv[0][1])):
        n = len(errs)
        out.append(f"| {s} | {name} | {n} | {mean_sd(errs, 100, '.1f')} | {sum(e > over for e in errs)} of {n} |")
    return out if len(out) > 2 else []


def format_crossval(rows: Sequence[dict], a: str = "learned", b: str = "uniform") -> list[str]:
    """Markdown table: cross-validated mIoU of arms ``a`` and ``b`` per set, and their paired difference.

    An arm is a sampler, prefixed by its encoder variant unless that is the
    recipe's own (:func:`arm`): ``"learned"``, ``"imagenet-frozen-learned"``.

    mIoU over the tissue classes present in the labels (glass, :data:`CV_APART`,
    in a column of its own). Per seed, the held-out images' confusion matrices
    are summed over the folds (every image counted once); a seed counts only
    where both samplers have every image of the set. The difference is taken
    per seed (mean ± sd over seeds) and per image and seed (the share where
    ``a`` scores higher, and a Wilcoxon signed-rank test of the per-image
    differences averaged over the seeds).
    """
    from scipy.stats import wilcoxon

    by = _whole_seeds(rows)
    set_images = _set_images(rows)
    out = [
        f"| set | images | seeds | {a} | {b} | {a} - {b} (points, per seed) | images where {a} is higher "
        f"| Wilcoxon p (per image) | glass IoU, {a} / {b} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sorted(set_images, key=_set_rank):
        images = sorted(set_images[s])
        seeds = sorted(seed for (k, m, seed) in by if k == s and m == a and (s, b, seed) in by)
        if not seeds:
            continue

        def score(m: str, seed: int, ims: Sequence[str] = images) -> tuple[float, float]:
            runs = [by[(s, m, seed)][im] for im in ims]
            return _scores([r["matrix"] for r in runs], runs[0]["classes"])

        (ma, ga), (mb, gb) = (zip(*(score(m, seed) for seed in seeds)) for m in (a, b))
        diffs = {im: [score(a, seed, [im])[0] - score(b, seed, [im])[0] for seed in seeds] for im in images}
        wins = sum(d > 0 for v in diffs.values() for d in v)
        n = sum(len(v) for v in diffs.values())
        per_image = [statistics.mean(v) for v in diffs.values()]
        p = wilcoxon(per_image).pvalue if len(per_image) >= 6 and any(per_image) else math.nan
        glass = "n/a" if math.isnan(ga[0]) else f"{statistics.mean(ga):.2f} / {statistics.mean(gb):.2f}"
        out.append(
            f"| {s} | {len(images)} | {len(seeds)} | {mean_sd(ma)} | {mean_sd(mb)} | "
            f"{mean_sd([x - y for x, y in zip(ma, mb)], 100, '+.1f')} | {wins} of {n} | "
            + ("n/a (under 6 images)" if math.isnan(p) else f"{p:.2f}" if p >= 0.01 else f"{p:.1g}")
            + f" | {glass} |"
        )
    return out if len(out) > 2 else []
