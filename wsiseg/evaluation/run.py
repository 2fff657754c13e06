"""``wsiseg evaluate``: a model on one split, its baselines and budget sweeps, with the files they write.

:func:`run_evaluation` is the ``wsiseg evaluate`` command: the model on one
split, optionally against the uniform and oracle edge baselines trained with
the model's own training config at the same budget (``compare``), and the
cost-performance sweep over several output sizes (``sweep``, paper Fig. 6;
:func:`run_sweep`): the learned sampler with the joint loss (``learned``)
and with the segmentation loss only (``single``), and the uniform and edge
baselines (:data:`SWEEP_METHODS`, named in tables by :data:`METHOD_LABELS`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiseg.device import resolve_device
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.evaluation.results import (
    BASELINES,
    CLASS_FREQUENCY_PNG,
    DEFAULT_TRIMAP_WIDTHS,
    EVAL_NAME,
    EvalResult,
    format_table,
    percent,
    write_json,
    wxh,
)
from wsiseg.evaluation.scoring import evaluate_model
from wsiseg.evaluation.sweep import ensure_trained, run_sweep, write_sweep_files
from wsiseg.viz.eval_figures import draw_class_frequency

__all__ = [
    "EvaluationRun",
    "parse_sizes",
    "run_evaluation",
]


# ---------------------------------------------------------------------------
# the command: data, baselines, sweeps
# ---------------------------------------------------------------------------


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"32,48,96x64"`` -> ``[(32, 32), (48, 48), (64, 96)]``: ``(height, width)`` pairs.

    Each size is ``N`` (square) or ``WIDTHxHEIGHT``, written width first as
    every size on the command line; duplicates are dropped.

    Raises
    ------
    ConfigError
        Empty, non-integer or non-positive sizes.
    """
    out = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            wh = [int(v) for v in part.lower().split("x")]
        except ValueError:
            raise ConfigError(f"bad size {part!r} in {text!r}: expected N or WIDTHxHEIGHT, comma separated") from None
        if len(wh) == 1:
            wh = wh * 2
        if len(wh) != 2 or min(wh) < 1:
            raise ConfigError(f"bad size {part!r} in {text!r}: expected N or WIDTHxHEIGHT of positive integers")
        out.append((wh[1], wh[0]))
    if not out:
        raise ConfigError(f"no sizes in {text!r}")
    return list(dict.fromkeys(out))


class _Remapped(torch.utils.data.Dataset):
    """Items whose label values are turned into the model's channel indices."""

    def __init__(self, base, lut: np.ndarray):
        self.base = base
        self.lut = torch.from_numpy(lut.astype(np.int64))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[i])
        item["labels"] = self.lut[torch.as_tensor(item["labels"]).long()]
        return item


def _label_lut(model, class_map, classes_path, ignore_index: int = 255) -> np.ndarray | None:
    """Label value -> model channel, matching classes by name; None when it is the identity.

    Raises
    ------
    WsisegError
        Naming both files, when names or counts differ.
    """
    model_names = [c.name for c in model.classes]
    yaml_names = class_map.names
    values = [class_map.lookup(n) for n in model_names]
    if len(model_names) != len(yaml_names) or any(v is None or v == ignore_index for v in values):
        raise WsisegError(
            f"classes ({len(yaml_names)}: {', '.join(yaml_names)}) do not match the {len(model_names)} classes of "
            f"the model {model.path} ({', '.join(model_names)})",
            classes_path,
        )
    if values == list(range(len(values))):
        return None
    lut = np.full(256, ignore_index, dtype=np.int64)
    for channel, v in enumerate(values):
        lut[v] = channel
    return lut


def _model_train_config(model):
    """The model's training config (metadata), or one rebuilt from its net config."""
    from wsiseg.training.config import TrainConfig

    cfg = (model.metadata.get("training") or {}).get("config")
    if isinstance(cfg, dict):
        try:
            return TrainConfig.from_dict(cfg), True
        except ConfigError as exc:
            raise WsisegError(f"the model's training config is invalid ({exc})", model.path) from exc
    net = model.net.config()
    seg = dict(net.get("segmenter") or {})
    known = {"arch", "encoder", "encoder_depth", "decoder_channels"}
    opts = {k: seg[k] for k in known if k in seg}
    extra = set(seg) - known - {"num_classes", "in_channels", "pad_mode"}
    if "arch" not in opts or extra:
        raise WsisegError(
            "the model has no training config and its segmenter cannot be rebuilt from options; "
            "pass the baselines with --baseline NAME=PATH",
            model.path,
        )
    opts.update(
        out_size=net["out_size"],
        map_size=net["map_size"],
        sigma=net["sigma"],
        support=net["support"],
        sampler=net["sampler"],
    )
    return TrainConfig.from_dict(opts), False


def _select_pairs(pairs, split: str, cfg, data, say) -> list:
    from wsiseg.training.pairs import split_pairs

    if split == "all":
        return list(pairs)
    if split == "val":
        return split_pairs(pairs, cfg.val_fraction, cfg.seed)[1]
    marked = sorted({p.split for p in pairs if p.split})
    if not marked:
        say(f"{data}: no train/val/test marks: all {len(pairs)} pairs are evaluated as test data")
        return list(pairs)
    test = [p for p in pairs if p.split == "test"]
    if not test:
        raise WsisegError(f"no test pairs (splits found: {', '.join(marked)}); use --split val or --split all", data)
    return test


@dataclass
class EvaluationRun:
    """What :func:`run_evaluation` produced.

    Attributes
    ----------
    results : list of EvalResult
        The model first, then the baselines (one table column each).
    document : dict
        The content of ``eval.json``.
    table : str
        :func:`format_table` of ``results``.
    files : dict of str -> Path
        ``eval``, ``class_frequency`` and, with a sweep, ``sweep_json``,
        ``sweep_csv``, ``sweep_png``.
    sweep : list of dict
        Sweep rows (empty without a sweep).
    """

    results: list[EvalResult]
    document: dict
    table: str
    files: dict[str, Path]
    sweep: list[dict] = field(default_factory=list)


def run_evaluation(
    model_path: str | os.PathLike,
    data: str | os.PathLike,
    classes_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    device: str = "auto",
    batch_size: int = 4,
    widths: Sequence[float] = DEFAULT_TRIMAP_WIDTHS,
    compare: Sequence[str] = (),
    baselines: Mapping[str, str] | None = None,
    epochs: int | None = None,
    sweep: Sequence[tuple[int, int]] = (),
    sweep_epochs: int | None = None,
    train_data: str | os.PathLike | None = None,
    hr_size: tuple[int, int] | None = None,
    ignore_unmapped: bool = False,
    value_names: str | os.PathLike | None = None,
    mpp: float | None = None,
    log: Callable[[str], None] | None = None,
    grid_scale: float = 1.0,
    tta: bool = False,
    glass_weight: float = 1.0,
    grid_iterations: int | None = None,
) -> EvaluationRun:
    """The ``wsiseg evaluate`` command: evaluate, compare with baselines, sweep the budget.

    Parameters
    ----------
    model_path : path-like
        wsiseg model file.
    data : path-like
        Labelled pairs (folder or CSV, :func:`wsiseg.training.pairs.load_pairs`).
    classes_path : path-like
        Classes YAML; its class names must be the model's.
    out_dir : path-like
        Receives ``eval.json``, ``class_frequency.png``, ``baselines/<name>/``
        and the sweep's ``sweep/<method>-<W>x<H>/``, ``sweep.json``,
        ``sweep.csv``, ``sweep.png``.
    split : {"test", "val", "all"}
        Pairs to evaluate: those marked test (all pairs when none carries a
        split mark), the validation split the model's training config
        draws (``val_fraction``, ``seed``), or all.
    device, batch_size, widths
        See :func:`evaluate_model`.
    compare : sequence of {"uniform", "edge"}
        Baselines to evaluate next to the model, each trained with the
        model's training config with only the sampler changed (same grid,
        same budget) into ``out_dir/baselines/<name>/`` (resumed or reused
        when already there), unless given in ``baselines``.
    baselines : mapping of str -> path, optional
        Ready baseline model files by name.
    epochs : int, optional
        Epochs for the baselines (default: the model's).
    sweep : sequence of (int, int)
        Output sizes ``(h, w)``: every method of :data:`SWEEP_METHODS`
        (learned with the joint loss, learned with the single loss, uniform,
        edge) is trained at each (the model's config with ``out_size`` and,
        proportionally, ``map_size`` and ``sigma`` changed, and the method's
        :data:`SWEEP_CONFIG`) into ``out_dir/sweep/<method>-<W>x<H>/``,
        reused or resumed when already there (:func:`run_sweep`).
    sweep_epochs : int, optional
        Epochs per sweep model (default: the model's).
    train_data : path-like, optional
        Pairs for baselines and sweeps, split into train and validation as
        the model's config says; default all of ``data``'s pairs (those
        marked test never train). Training pairs must not be evaluated.
    hr_size : (int, int), optional
        Working-resolution size ``(H, W)`` of the evaluation; default the
        model's training ``hr_size`` (baselines always train at that).
    ignore_unmapped, value_names
        As for :func:`wsiseg.training.dataset.build_dataset`.
    mpp : float, optional
        Micrometres per level-0 pixel of every image whose pair gives none
        (``--mpp``, :func:`wsiseg.training.pairs.with_mpp`), for evaluation and
        baseline training alike.
    log : callable, optional
        Progress messages.
    grid_scale : float
        Sample the evaluated regions this many times as densely per axis
        (``--grid-scale``, :func:`evaluate_model`; baselines and sweeps
        train as usual).
    tta : bool
        Test-time flips for the model and its baselines (``--tta``,
        :func:`evaluate_model`).
    glass_weight, grid_iterations
        The learned density weighted down on glass, and the grid's attraction
        steps, for every evaluated model (``--glass-weight``,
        ``--grid-iterations``, :func:`evaluate_model`).

    Returns
    -------
    EvaluationRun

    Raises
    ------
    WsisegError
        Model file problems (:class:`~wsiseg.models.io.ModelFileError`),
        classes that do not match the model's, no pairs to evaluate, training
        data overlapping the evaluated data.
    """
    from wsiseg.models.io import load_deformseg
    from wsiseg.training.classmap import load_class_map

    say = log or (lambda _m: None)
    compare, baselines, out = _check_arguments(split, compare, baselines, out_dir)
    dev = resolve_device(device)

    model = load_deformseg(model_path, device=dev)
    class_map = load_class_map(classes_path)
    lut = _label_lut(model, class_map, classes_path)
    tcfg, has_training = _model_train_config(model)
    # Evaluation may use another working size; baselines still train at the model's.
    hr = tuple(hr_size) if hr_size is not None else tcfg.hr_size
    dataset = functools.partial(
        _dataset,
        class_map=class_map,
        lut=lut,
        tcfg=tcfg,
        ignore_unmapped=ignore_unmapped,
        value_names=value_names,
        # A model trained at one working MPP reads regions at it, unless another size is asked for.
        working_mpp=tcfg.working_mpp if hr_size is None else None,
    )
    pairs, eval_pairs, eval_ds = _evaluation_data(data, split, mpp, tcfg, hr, dataset, say)

    evaluate = functools.partial(
        evaluate_model,
        dataset=eval_ds,
        device=dev,
        batch_size=batch_size,
        widths=widths,
        log=say,
        grid_scale=grid_scale,
        tta=tta,
        glass_weight=glass_weight,
        grid_iterations=grid_iterations,
    )
    main_name = model.net.sampler if model.net.sampler not in compare else "model"
    results = [evaluate(model, name=main_name)]

    # Training data for baselines and sweeps (never the evaluated pairs): read when first needed.
    training_data = functools.cache(
        functools.partial(_training_data, model, data, train_data, mpp, pairs, eval_pairs, tcfg, dataset, say)
    )
    for name in compare:
        if name in baselines:
            path = Path(baselines[name])
        else:
            path = _train_baseline(name, model, tcfg, has_training, device, epochs, out, training_data, say)
        results.append(evaluate(_load_baseline(path, name, model, dev, say), name=name))

    doc = _eval_document(data, split, model_path, model, len(eval_pairs), len(eval_ds), hr, results)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"eval": write_json(out / EVAL_NAME, doc)}
    table = format_table(results)

    sweep_rows: list[dict] = []
    freq_results = results
    if sweep:
        sweep_rows, freq_results, sweep_files = _sweep(
            sweep,
            sweep_epochs,
            tcfg,
            model.classes,
            training_data,
            eval_ds,
            out,
            data,
            split,
            results[0].resolution,
            device=device,
            batch_size=batch_size,
            widths=widths,
            say=say,
        )
        files.update(sweep_files)
    files["class_frequency"] = _draw_class_frequency(freq_results, out)
    return EvaluationRun(results=results, document=doc, table=table, files=files, sweep=sweep_rows)


# ---------------------------------------------------------------------------
# the steps of run_evaluation
# ---------------------------------------------------------------------------


def _check_arguments(
    split: str, compare: Sequence[str], baselines: Mapping[str, str] | None, out_dir: str | os.PathLike
) -> tuple[list[str], dict[str, str], Path]:
    """The baselines to compare (named or given as files, in order), the given files by name, the output folder."""
    if split not in ("test", "val", "all"):
        raise ConfigError(f"split must be test, val or all, got {split!r}")
    baselines = dict(baselines or {})
    unknown = [n for n in list(compare) + list(baselines) if n not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline {unknown[0]!r}; available: {', '.join(BASELINES)}")
    compare = list(dict.fromkeys(list(compare) + list(baselines)))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise WsisegError("output folder is a file", out)
    return compare, baselines, out


def _dataset(ps, size, *, class_map, lut: np.ndarray | None, tcfg, ignore_unmapped: bool, value_names, working_mpp):
    """Regions of pairs ``ps`` at working size ``size`` (or ``working_mpp``), labels in the model's channel order."""
    from wsiseg.training.dataset import build_dataset

    ds = build_dataset(
        ps,
        class_map,
        hr_size=size,
        regions=tcfg.regions,
        seed=tcfg.seed,
        ignore_unmapped=ignore_unmapped,
        value_names=value_names,
        working_mpp=working_mpp,
    )
    return _Remapped(ds, lut) if lut is not None else ds


def _evaluation_data(data, split: str, mpp: float | None, tcfg, hr, dataset, say) -> tuple[list, list, Any]:
    """All pairs of ``data``, those of ``split`` and their regions at working size ``hr``."""
    from wsiseg.training.pairs import load_pairs, with_mpp

    pairs = with_mpp(load_pairs(data), mpp)
    eval_pairs = _select_pairs(pairs, split, tcfg, data, say)
    if not eval_pairs:
        raise WsisegError(f"no pairs to evaluate in the {split} split", data)
    eval_ds = dataset(eval_pairs, hr)
    if len(eval_ds) == 0:
        raise WsisegError(f"no regions to evaluate in the {split} split", data)
    at = f"{tcfg.working_mpp:g} um per working pixel" if dataset.keywords["working_mpp"] else f"size {wxh(hr)}"
    say(f"evaluating {len(eval_pairs)} {split} pairs ({len(eval_ds)} regions) at working {at}")
    return pairs, eval_pairs, eval_ds


def _training_data(model, data, train_data, mpp: float | None, pairs, eval_pairs, tcfg, dataset, say) -> tuple:
    """Training and validation regions for baselines and sweeps, at the model's working size, and their data hash.

    Raises
    ------
    WsisegError
        No training pairs, or training pairs that are evaluated.
    """
    from wsiseg.training.pairs import dataset_hash, load_pairs, split_pairs, with_mpp

    tpairs = with_mpp(load_pairs(train_data), mpp) if train_data is not None else pairs
    tr, va = split_pairs(tpairs, tcfg.val_fraction, tcfg.seed)
    source = train_data if train_data is not None else data
    if not tr:
        raise WsisegError("no training pairs for the baselines (pass --train-data)", source)
    # Validation pairs only select the best epoch (as for the model, with --split val).
    evaluated = {os.path.realpath(p.image) for p in eval_pairs}
    overlap = [p for p in tr if os.path.realpath(p.image) in evaluated]
    if overlap:
        raise WsisegError(
            f"training data for the baselines overlaps the evaluated data ({len(overlap)} pairs, e.g. "
            f"{Path(overlap[0].image).name}); pass --train-data, or a DATA with train/ and test/ folders",
            source,
        )
    h = dataset_hash(tpairs)  # what `wsiseg train` stores for the same data
    old = (model.metadata.get("training") or {}).get("data_hash")
    if old and old != h:
        say(f"note: the baselines' training data differs from the model's (hash {h[:12]} vs {old[:12]})")
    return dataset(tr, tcfg.hr_size), dataset(va, tcfg.hr_size) if va else None, h


def _train_baseline(
    name: str, model, tcfg, has_training: bool, device: str, epochs: int | None, out: Path, training_data, say
) -> Path:
    """Baseline ``name`` trained (or resumed, or reused) with the model's config in ``out/baselines/<name>/``."""
    if not has_training:
        say("note: the model carries no training config; baselines use its net config with default training options")
    cfg = dataclasses.replace(
        tcfg, sampler=name, device=str(device), epochs=epochs if epochs is not None else tcfg.epochs
    )
    tr_ds, va_ds, h = training_data()
    return ensure_trained(cfg, out / "baselines" / name, tr_ds, va_ds, model.classes, h, say)


def _load_baseline(path: Path, name: str, model, dev, say):
    """Baseline ``name`` from ``path``, refused when its classes are not the model's."""
    from wsiseg.models.io import load_deformseg

    bm = load_deformseg(path, device=dev)
    _check_same_classes(model, bm)
    if tuple(bm.net.out_size) != tuple(model.net.out_size):
        say(
            f"note: baseline {name} samples {bm.net.out_size} points, the model {model.net.out_size}: "
            "not the same budget"
        )
    return bm


def _eval_document(data, split: str, model_path, model, n_pairs: int, n_regions: int, hr, results) -> dict:
    """The content of ``eval.json``."""
    return {
        "data": os.fspath(data),
        "split": split,
        "pairs": n_pairs,
        "regions": n_regions,
        "hr_size": list(hr),
        "model": os.fspath(model_path),
        "model_hash": model.hash,
        "resolution": {
            "deformed": "on the sampling grid (out_size points per region)",
            "full": results[0].resolution,
        },
        "methods": {r.name: r.to_dict() for r in results},
    }


def _sweep(
    sweep: Sequence[tuple[int, int]],
    sweep_epochs: int | None,
    tcfg,
    classes,
    training_data,
    eval_ds,
    out: Path,
    data,
    split: str,
    resolution: str,
    *,
    device: str,
    batch_size: int,
    widths: Sequence[float],
    say,
) -> tuple[list[dict], list[EvalResult], dict[str, Path]]:
    """The budget sweep (:func:`run_sweep`) and its files: its rows, the results at the smallest size, the files."""
    n_ep = sweep_epochs if sweep_epochs is not None else tcfg.epochs
    tr_ds, va_ds, h = training_data()
    sweep_rows, sweep_results = run_sweep(
        tcfg,
        sweep,
        out / "sweep",
        tr_ds,
        va_ds,
        eval_ds,
        classes,
        data_hash=h,
        epochs=n_ep,
        device=device,
        batch_size=batch_size,
        widths=widths,
        log=say,
    )
    smallest = min(sweep, key=lambda s: s[0] * s[1])
    freq_results = [r for r in sweep_results if tuple(r.out_size) == tuple(smallest)]
    files = write_sweep_files(
        out,
        sweep_rows,
        {
            "data": os.fspath(data),
            "split": split,
            "regions": len(eval_ds),
            "epochs": n_ep,
            "sizes": [list(s) for s in sweep],
            "resolution": {"miou_full": resolution, "miou_deformed": "deformed"},
        },
    )
    return sweep_rows, freq_results, files


def _draw_class_frequency(freq_results: list[EvalResult], out: Path) -> Path:
    """``class_frequency.png``: the class frequency of the labels and of each result's samples."""
    first = freq_results[0]
    original = first.class_frequency()[0]
    sampled = {r.name: r.class_frequency()[1] for r in freq_results}
    return draw_class_frequency(
        first.class_names,
        original,
        sampled,
        out / CLASS_FREQUENCY_PNG,
        title=f"class frequency: original vs sampled at {wxh(first.out_size)} "
        f"(cost {percent(first.cost)} % of level-0 pixels)",
    )


def _check_same_classes(model, other) -> None:
    a, b = [c.name for c in model.classes], [c.name for c in other.classes]
    if a != b:
        raise WsisegError(
            f"baseline classes ({', '.join(b)}) differ from those of the model {model.path} ({', '.join(a)})",
            other.path,
        )
