"""Quality on real tissue: ``wsiseg bench quality``.

Is learned sampling better than a uniform grid on real H&E? This benchmark
answers on the real tumour masks of ``../shared/data/labelled-regions``
(lymph-node metastases, oral squamous cell carcinoma, breast-cancer ROIs),
never on data the project designed itself. Four parts:

1. **Grid capacity** (:func:`wsiseg.bench.capacity.grid_capacity`, no training): how much the
   sampling grid *can* gain. The oracle edge density (from the true labels)
   is turned into a grid with several density-map sizes and kernel widths,
   and the sampler's own loss mIoU(Y', Y) (labels sampled on the grid and
   read back, :func:`wsiseg.metrics` upsampling error) is compared with the
   uniform grid's at each budget. This picks the sampling defaults.
2. **Quality sweep** (:func:`bench_quality`): the four methods of
   ``wsiseg evaluate --sweep`` (learned with the joint loss, learned with
   the segmentation loss only, uniform, oracle edge) trained at three budgets
   (about 0.1 %, 0.4 % and 1.6 % of the level-0 pixels) with several seeds,
   from random and from ImageNet encoder weights, scored on fixed held-out
   images; plus the same segmentation net on every working pixel (the
   sliding-window ceiling). Mean +- sd over seeds.
3. **Loss balance** (:func:`loss_balance`): the deformation net's gradient
   from the segmentation term against the edge term's, for several edge
   weights and both edge-loss normalisations.
4. **The shipped recipe** (:func:`wsiseg.bench.recipe.bench_recipe`): the
   real-tissue demo model's configuration (one GroupNorm model over all the
   sets at one physical scale) trained with each sampler at several sample
   spacings, scored on each set.

Masks are JPEG as published: thresholded at 128 (the data's README) into
``0 = non-tumour``, ``1 = tumour`` PNGs in the work folder, with a
``pairs.csv`` that fixes each image's split. Training runs live in
``workdir`` under folders named by a digest of their config and data, so a
rerun reuses finished runs and resumes unfinished ones.

:mod:`wsiseg.bench.quality_report` runs the parts and writes the section of
docs/benchmarks.md; :mod:`wsiseg.demo.data` builds the real-tissue demo
model's data from the same sets.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsiseg.errors import ConfigError, WsisegError
from wsiseg.training.regions import REGIONS_DIR, QualitySet, region_stems

if TYPE_CHECKING:
    from wsiseg.training.config import TrainConfig

__all__ = [
    "bench_quality",
    "loss_balance",
    "prepare_set",
]

#: Classes of the thresholded masks.
CLASSES_FILE = Path("pipelines") / "classes" / "tumour.yaml"


# ---------------------------------------------------------------------------
# data


def prepare_set(data_root: str | os.PathLike, workdir: str | os.PathLike, qs: QualitySet) -> Path:
    """Threshold a set's JPEG masks into label PNGs and write its ``pairs.csv`` with the fixed split.

    Parameters
    ----------
    data_root : path-like
        The shared data folder (``../shared/data``).
    workdir : path-like
        The PNGs go to ``workdir/data/<key>/labels/``.
    qs : QualitySet

    Returns
    -------
    pathlib.Path
        The CSV (``image,annotation,split``; images point at the shared files).

    Raises
    ------
    ConfigError
        The set is missing.
    """
    import numpy as np
    from PIL import Image

    src = Path(data_root) / REGIONS_DIR / qs.folder
    if not (src / "images").is_dir() or not (src / "masks").is_dir():
        raise ConfigError(f"labelled regions not found at {src} (pass --data, or set WSISEG_SHARED_DATA)")
    stems = region_stems(src)
    missing = [s for s in qs.test if s not in stems]
    if missing:
        raise WsisegError(f"test images {missing} of set {qs.key} not found", src)
    out = Path(workdir) / "data" / qs.key
    (out / "labels").mkdir(parents=True, exist_ok=True)
    rows = []
    for stem in stems:
        label = out / "labels" / f"{stem}.png"
        if not label.is_file():
            with Image.open(src / "masks" / f"{stem}.jpg") as im:
                mask = (np.asarray(im.convert("L")) >= 128).astype(np.uint8)
            tmp = label.with_name(f".{stem}.{os.getpid()}.png")
            Image.fromarray(mask).save(tmp)
            os.replace(tmp, label)
        split = "test" if stem in qs.test else "train"
        rows.append((os.path.abspath(src / "images" / f"{stem}.jpg"), os.path.abspath(label), split))
    csv_path = out / "pairs.csv"
    tmp = out / f".pairs.csv.{os.getpid()}"  # parallel parts share the folder: replace atomically
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "annotation", "split"])
        w.writerows(rows)
    os.replace(tmp, csv_path)
    return csv_path


# ---------------------------------------------------------------------------
# shared: configs, data sets, run folders


def _quality_config(base: TrainConfig, qs: QualitySet, *, epochs: int, seed: int, encoder_weights: str | None):
    """``base`` for one set: its working resolution, whole regions, no validation split, the seed."""
    return dataclasses.replace(
        base,
        hr_size=(qs.hr_size, qs.hr_size),
        regions="whole",
        epochs=epochs,
        seed=seed,
        val_fraction=0.0,
        patience=None,
        encoder_weights=encoder_weights,
    )


def _datasets(csv_path: Path, qs: QualitySet, classes_file: Path):
    from wsiseg.training.classmap import load_class_map
    from wsiseg.training.dataset import build_dataset
    from wsiseg.training.pairs import dataset_hash, load_pairs

    class_map = load_class_map(classes_file)
    pairs = load_pairs(csv_path)
    train_pairs = [p for p in pairs if p.split == "train"]
    test_pairs = [p for p in pairs if p.split == "test"]
    hr = (qs.hr_size, qs.hr_size)
    train_ds = build_dataset(train_pairs, class_map, hr_size=hr, regions="whole")
    test_ds = build_dataset(test_pairs, class_map, hr_size=hr, regions="whole")
    return train_ds, test_ds, class_map.to_classes(), dataset_hash(train_pairs)


def _digest(config: dict, data_hash: str) -> str:
    """Run-folder digest of a config and its data; options at the value they had before they existed are
    left out, so folders made then are still found."""
    legacy = {"image_sampling": "bilinear"}
    keep = {k: v for k, v in config.items() if legacy.get(k, object()) != v}
    return hashlib.sha1(json.dumps([keep, data_hash], sort_keys=True, default=str).encode()).hexdigest()[:10]


def _read_log(run: Path) -> list[dict]:
    from wsiseg.training.checkpoint import LOG_NAME

    try:
        with open(run / LOG_NAME, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


# ---------------------------------------------------------------------------
# part 3: loss balance


@dataclass(frozen=True)
class BalanceRow:
    """One edge-loss setting: the deformation net's gradient from each term after warm-up."""

    edge_norm: str
    gamma: float
    grad_seg: float
    grad_edge: float
    seg: float
    edge: float
    miou_full: float | None
    upsampling_miou: float | None

    @property
    def ratio(self) -> float:
        """Edge-term over segmentation-term gradient norm (1 = balanced)."""
        return self.grad_edge / self.grad_seg if self.grad_seg > 0 else math.inf


def loss_balance(
    data_root: str | os.PathLike,
    workdir: str | os.PathLike,
    qs: QualitySet,
    base: TrainConfig,
    *,
    grid: int,
    gammas: Sequence[float] = (1.0, 10.0, 100.0),
    norms: Sequence[str] = ("mean", "sum"),
    epochs: int = 15,
    classes_file: str | os.PathLike = CLASSES_FILE,
    log: Callable[[str], None] | None = None,
) -> list[BalanceRow]:
    """Train the learned sampler (joint loss) at every edge weight and normalisation; read the gradient norms.

    The medians of ``grad_seg``/``grad_edge`` (``log.csv``) over the epochs
    after the first third (warm-up) are reported, with the held-out mIoU.
    """
    from wsiseg.evaluation.scoring import evaluate_model
    from wsiseg.evaluation.sweep import ensure_trained
    from wsiseg.models.io import load_deformseg

    say = log or (lambda _m: None)
    train_ds, test_ds, classes, data_hash = _datasets(prepare_set(data_root, workdir, qs), qs, Path(classes_file))
    rows = []
    for norm in norms:
        for gamma in gammas:
            cfg = dataclasses.replace(
                _quality_config(base, qs, epochs=epochs, seed=0, encoder_weights=base.encoder_weights),
                sampler="learned",
                joint=True,
                gamma_edge=gamma,
                edge_norm=norm,
                out_size=(grid, grid),
                map_size=(2 * grid, 2 * grid),
                sigma=None,
                support=None,
            )
            run = Path(workdir) / "balance" / f"{qs.key}-{norm}-{gamma:g}-{_digest(cfg.to_dict(), data_hash)}"
            path = ensure_trained(cfg, run, train_ds, None, classes, data_hash, say, "learned")
            hist = _read_log(run)[epochs // 3 :]
            med = {k: statistics.median(float(r[k]) for r in hist) for k in ("grad_seg", "grad_edge", "seg", "edge")}
            r = evaluate_model(load_deformseg(path), test_ds, device="cpu", name="learned")
            rows.append(
                BalanceRow(
                    norm,
                    gamma,
                    med["grad_seg"],
                    med["grad_edge"],
                    med["seg"],
                    med["edge"],
                    r.miou_full,
                    r.upsampling_miou,
                )
            )
            say(f"balance {norm} gamma {gamma:g}: grad edge/seg {rows[-1].ratio:.3g}, test mIoU {r.miou_full:.4f}")
    return rows


def format_balance(rows: Sequence[BalanceRow]) -> str:
    """Markdown table of :func:`loss_balance`."""
    lines = [
        "| edge-loss normalisation | gamma | grad seg | grad edge | edge / seg | L_seg | L_edge | "
        "test mIoU | mIoU(Y', Y) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.edge_norm} | {r.gamma:g} | {r.grad_seg:.3g} | {r.grad_edge:.3g} | {r.ratio:.3g} | "
            f"{r.seg:.3g} | {r.edge:.3g} | {fmt_score(r.miou_full)} | {fmt_score(r.upsampling_miou)} |"
        )
    return "\n".join(lines)


def fmt_score(v: float | None, nd: int = 4) -> str:
    """A score with ``nd`` decimals, ``n/a`` when missing or not finite."""
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{nd}f}"


# ---------------------------------------------------------------------------
# part 2: the quality sweep


#: Budget grids per set (square reference grids; the geometry rule keeps each region's aspect ratio):
#: about 0.1 %, 0.4 % and 1.6 % of the level-0 pixels of a typical image of the set.
GRIDS = {"camelyon": (16, 32, 64), "ocdc": (20, 40, 80), "bcss": (81, 162)}
#: Epochs per run (about 180, 100 and 80 optimiser steps).
EPOCHS = {"camelyon": 30, "ocdc": 50, "bcss": 40}
#: Methods trained per encoder initialisation.
METHODS = {"random": ("learned", "single", "uniform", "edge"), "imagenet": ("learned", "uniform")}
#: Sets whose large regions make every run costly on a CPU: only the main comparison there.
SET_METHODS = {"bcss": ("learned", "uniform")}
#: The sliding-window ceiling: the same segmentation net on every working pixel.
FULL = "full"


def bench_quality(
    data_root: str | os.PathLike,
    workdir: str | os.PathLike,
    sets: Sequence[QualitySet],
    base: TrainConfig,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    encoders: Sequence[str] = ("random", "imagenet"),
    imagenet_weights: str | None = None,
    methods: Sequence[str] | None = None,
    classes_file: str | os.PathLike = CLASSES_FILE,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Train and score every method at every budget, seed and encoder initialisation on each set.

    Parameters
    ----------
    data_root, workdir : path-like
        Shared data; run folders and the prepared labels.
    sets : sequence of QualitySet
    base : wsiseg.training.config.TrainConfig
        Segmenter, optimiser and sampling defaults; each run sets the
        working resolution, its size, method, seed and encoder weights.
    seeds : sequence of int
    encoders : sequence of {"random", "imagenet"}
        ``"imagenet"`` loads ``imagenet_weights`` (a local file) into the encoder.
    imagenet_weights : str, optional
        Required with ``"imagenet"``.
    methods : sequence of str, optional
        Only these methods (default: :data:`METHODS` of the encoder, within :data:`SET_METHODS`).
    classes_file : path-like
    log : callable, optional

    Returns
    -------
    list of dict
        :func:`wsiseg.evaluation.sweep.run_sweep` rows with ``set``, ``encoder``
        and ``seed`` added; also written to ``workdir/quality-rows.json``
        as they come.
    """
    from wsiseg.evaluation.sweep import run_sweep

    say = log or (lambda _m: None)
    if "imagenet" in encoders and not imagenet_weights:
        raise ConfigError(
            "the imagenet encoder runs need --imagenet-weights PATH (e.g. the offline EfficientNet-Lite0)"
        )
    rows: list[dict] = []
    for qs in sets:
        train_ds, test_ds, classes, data_hash = _datasets(prepare_set(data_root, workdir, qs), qs, Path(classes_file))
        grids = GRIDS[qs.key]
        for enc in encoders:
            weights = imagenet_weights if enc == "imagenet" else None
            for seed in seeds:
                cfg = _quality_config(base, qs, epochs=EPOCHS[qs.key], seed=seed, encoder_weights=weights)
                run = Path(workdir) / f"{qs.key}-{enc}-s{seed}-{_digest(cfg.to_dict(), data_hash)}"
                unit: list[dict] = []
                todo = tuple(
                    m
                    for m in METHODS[enc]
                    if m in SET_METHODS.get(qs.key, METHODS[enc]) and (methods is None or m in methods)
                )
                t0 = time.perf_counter()
                got, _ = run_sweep(
                    cfg,
                    [(g, g) for g in grids],
                    run / "sweep",
                    train_ds,
                    None,
                    test_ds,
                    classes,
                    data_hash=data_hash,
                    methods=todo,
                    device=base.device,
                    log=say,
                )
                for r in got:
                    r.update(set=qs.key, encoder=enc, seed=seed, seconds=time.perf_counter() - t0)
                    unit.append(r)
                # One file per (set, encoder, seed): parallel runs on other units never collide. Rows of
                # methods not run this time (a call with other methods) are kept.
                path = Path(workdir) / f"rows-{qs.key}-{enc}-s{seed}.json"
                done = {(r["method"], r["out_height"]) for r in unit}
                kept = [
                    r
                    for r in (json.loads(path.read_text(encoding="utf-8")) if path.is_file() else [])
                    if (r["method"], r["out_height"]) not in done
                ]
                write_json(path, kept + unit)
                say(
                    f"{qs.key} {enc} seed {seed}: "
                    + ", ".join(f"{r['method']}@{r['out_width']} {fmt_score(r['miou_full'])}" for r in got)
                )
                rows += unit
    return rows


def write_json(path: Path, doc: Any) -> None:
    """Write ``doc`` as indented JSON, atomically."""
    from wsiseg.atomic import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")


def stored_rows(workdir: str | os.PathLike) -> list[dict]:
    """Every quality row stored in ``workdir`` (``rows-<set>-<encoder>-s<seed>.json``)."""
    rows: list[dict] = []
    for p in sorted(Path(workdir).glob("rows-*.json")):
        rows += json.loads(p.read_text(encoding="utf-8"))
    return rows


# ---------------------------------------------------------------------------
# do the samplers differ?


def density_differences(
    data_root: str | os.PathLike,
    workdir: str | os.PathLike,
    qs: QualitySet,
    base: TrainConfig,
    *,
    seed: int = 0,
    classes_file: str | os.PathLike = CLASSES_FILE,
) -> list[dict]:
    """How far apart the densities of learned (joint), learned (single) and the edge oracle are.

    For each budget of the random-encoder runs of ``seed`` made from ``base`` (:func:`bench_quality`): every test
    image's density of each method, normalised to sum 1, compared pairwise by total-variation distance
    (0 = identical, 1 = disjoint), and each method's share of density mass on the true label boundaries'
    neighbourhood (the edge oracle's own support above its floor), averaged over the test images.

    Returns
    -------
    list of dict
        One per budget: ``grid``, ``tv`` (pair -> distance), ``edge_mass`` (method -> share).
    """
    import torch

    from wsiseg.models.io import load_deformseg

    _train, test_ds, _classes, data_hash = _datasets(prepare_set(data_root, workdir, qs), qs, Path(classes_file))
    cfg = _quality_config(base, qs, epochs=EPOCHS[qs.key], seed=seed, encoder_weights=None)
    run = Path(workdir) / f"{qs.key}-random-s{seed}-{_digest(cfg.to_dict(), data_hash)}" / "sweep"
    out = []
    for g in GRIDS[qs.key]:
        paths = {m: run / f"{m}-{g}x{g}" / "model.safetensors" for m in ("learned", "single", "edge")}
        if not all(p.is_file() for p in paths.values()):
            continue
        nets = {m: load_deformseg(p).net.eval() for m, p in paths.items()}
        tv: dict[str, list[float]] = {}
        mass: dict[str, list[float]] = {m: [] for m in nets}
        with torch.no_grad():
            for i in range(len(test_ds)):
                item = test_ds[i]
                image = item["image"][None].float() / 255
                labels = item["labels"][None].long()
                ds = {m: net(None, image, labels if m == "edge" else None).d for m, net in nets.items()}
                ds = {m: d / d.sum() for m, d in ds.items()}
                support = ds["edge"] > ds["edge"].min() * 1.5  # the oracle's boundary band
                for m, d in ds.items():
                    mass[m].append(float(d[support].sum()))
                ms = list(ds)
                for a in range(len(ms)):
                    for b in range(a + 1, len(ms)):
                        key = f"{ms[a]}-{ms[b]}"
                        tv.setdefault(key, []).append(float(0.5 * (ds[ms[a]] - ds[ms[b]]).abs().sum()))
        out.append(
            {
                "set": qs.key,
                "grid": g,
                "tv": {k: statistics.fmean(v) for k, v in tv.items()},
                "edge_mass": {k: statistics.fmean(v) for k, v in mass.items()},
            }
        )
    return out


# ---------------------------------------------------------------------------
# the sliding-window ceiling


class _RandomCrops:
    """``per_image`` random ``size x size`` windows of every item per epoch (seeded by seed, epoch, index)."""

    #: It augments itself (random windows, flips): the trainer calls :meth:`set_epoch` and adds nothing.
    augmentation = {"flips": True, "windows": True}

    def __init__(self, base, size: int, per_image: int, seed: int):
        self.base, self.size, self.per_image, self.seed = base, int(size), int(per_image), int(seed)
        self.epoch = 0

    def item_shape(self, i: int) -> tuple[int, int]:
        """Shape of item ``i`` without reading it (for the trainer's batches)."""
        h, w = self.base.items[i // self.per_image].shape
        s = min(self.size, h, w)
        return s, s

    def item_mpp(self, i: int) -> tuple[float | None, str]:
        """Micrometres per pixel of item ``i``: its image's (for the model's recorded scale)."""
        return self.base.item_mpp(i // self.per_image)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base) * self.per_image

    def __getitem__(self, i: int) -> dict:
        import numpy as np

        from wsiseg.training.dataset import random_crop

        item = self.base[i // self.per_image]
        h, w = item["labels"].shape[-2:]
        s = min(self.size, h, w)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image, labels = random_crop(item["image"], item["labels"], (s, s), rng)
        if rng.random() < 0.5:
            image, labels = image.flip(-1), labels.flip(-1)
        return {
            "image": image.contiguous(),
            "labels": labels.contiguous(),
            "name": f"{item.get('name', '')}#{i}",
            "size": (s, s),
        }


def full_resolution_ceiling(
    data_root: str | os.PathLike,
    workdir: str | os.PathLike,
    qs: QualitySet,
    base: TrainConfig,
    *,
    seed: int = 0,
    encoder: str = "random",
    imagenet_weights: str | None = None,
    crop: int = 128,
    classes_file: str | os.PathLike = CLASSES_FILE,
    log: Callable[[str], None] | None = None,
) -> dict:
    """The same segmentation net on every working pixel: trained on windows, applied to whole test images.

    The sliding-window baseline's quality: the uniform sampler with a grid as large as the working
    raster (the dynamic size rule never up-samples, so every pixel is a sample), trained on random
    ``crop``-pixel windows of the training images (as sliding-window training does; as many optimiser
    steps as the sampled runs) and scored on the whole test images at full working resolution.

    Returns
    -------
    dict
        A quality row (``method`` ``"full"``), also stored as ``rows-<set>-<encoder>-full-s<seed>.json``.
    """
    from wsiseg.evaluation.scoring import evaluate_model
    from wsiseg.evaluation.sweep import ensure_trained, sweep_row
    from wsiseg.models.io import load_deformseg

    say = log or (lambda _m: None)
    train_ds, test_ds, classes, data_hash = _datasets(prepare_set(data_root, workdir, qs), qs, Path(classes_file))
    weights = imagenet_weights if encoder == "imagenet" else None
    per_image = max(1, round(4 * 6 / len(train_ds)))  # about 6 steps of batch 4 per epoch, like camelyon's
    cfg = dataclasses.replace(
        _quality_config(base, qs, epochs=EPOCHS[qs.key], seed=seed, encoder_weights=weights),
        sampler="uniform",
        out_size=(qs.hr_size, qs.hr_size),
        map_size=(qs.hr_size, qs.hr_size),
        sigma=None,
        support=None,
    )
    run = Path(workdir) / f"{qs.key}-{encoder}-full-s{seed}-{_digest(cfg.to_dict(), data_hash)}"
    t0 = time.perf_counter()
    path = ensure_trained(
        cfg, run, _RandomCrops(train_ds, crop, per_image, seed), None, classes, data_hash, say, "uniform"
    )
    model = load_deformseg(path)
    r = evaluate_model(model, test_ds, device="cpu", name=FULL)
    row = sweep_row(r, (qs.hr_size, qs.hr_size), path, cfg.epochs, model.metadata.get("training") or {})
    row.update(
        set=qs.key,
        encoder=encoder,
        seed=seed,
        seconds=time.perf_counter() - t0,
        label="full resolution (sliding-window ceiling)",
    )
    write_json(Path(workdir) / f"rows-{qs.key}-{encoder}-full-s{seed}.json", [row])
    say(f"{qs.key} {encoder} full resolution seed {seed}: {fmt_score(row['miou_full'])}")
    return row
