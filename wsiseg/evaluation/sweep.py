"""Budget sweeps (paper Fig. 6): each method trained at several output sizes with the model's own config, then
evaluated; their rows, files and table (:func:`run_sweep`, :func:`write_sweep_files`, :func:`format_sweep_table`).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from wsiseg.atomic import atomic_output
from wsiseg.device import resolve_device
from wsiseg.errors import ConfigError
from wsiseg.evaluation.results import (
    DEFAULT_TRIMAP_WIDTHS,
    SWEEP_CONFIG,
    SWEEP_CSV,
    SWEEP_JSON,
    SWEEP_METHODS,
    SWEEP_PNG,
    EvalResult,
    fmt,
    nan_to_none,
    percent,
    write_json,
    wxh,
)
from wsiseg.evaluation.scoring import evaluate_model
from wsiseg.viz.eval_figures import draw_sweep, method_label

__all__ = [
    "ensure_trained",
    "format_sweep_table",
    "run_sweep",
    "sweep_row",
    "write_sweep_files",
]


def ensure_trained(cfg, out: Path, train_ds, val_ds, classes, data_hash, say, name: str | None = None) -> Path:
    """Train into ``out`` unless done: resume an unfinished run, reuse a model without a checkpoint."""
    from wsiseg.training.checkpoint import CHECKPOINT_NAME, MODEL_NAME
    from wsiseg.training.loop import train

    model, ckpt = out / MODEL_NAME, out / CHECKPOINT_NAME
    if model.is_file() and not ckpt.is_file():
        say(f"using {model}")
        return model
    resume = ckpt.is_file()
    say(
        f"{'checking/resuming' if resume else 'training'} {method_label(name or cfg.sampler)} at "
        f"{wxh(cfg.out_size)} ({cfg.epochs} epochs) in {out}"
    )
    result = train(cfg, train_ds, val_ds, classes, out, resume=resume, progress=False, data_hash=data_hash, log=say)
    return Path(result.model_path)


def _scaled_config(cfg, size: tuple[int, int], method: str, epochs: int, device: str):
    """The model's training config at another output size (map and kernel scaled alike) for one sweep method."""
    if method not in SWEEP_CONFIG:
        raise ConfigError(f"unknown sweep method {method!r}; available: {', '.join(SWEEP_CONFIG)}")
    oh, ow = size
    rh, rw = cfg.map_size[0] / cfg.out_size[0], cfg.map_size[1] / cfg.out_size[1]
    mh, mw = max(4, round(oh * rh)), max(4, round(ow * rw))
    sigma = cfg.sigma * max(mh, mw) / max(cfg.map_size) if cfg.sigma is not None else None
    # An explicit support belongs to the old sigma: let the net derive it from the scaled one.
    return dataclasses.replace(
        cfg,
        out_size=(oh, ow),
        map_size=(mh, mw),
        sigma=sigma,
        support=None,
        epochs=epochs,
        device=device,
        **SWEEP_CONFIG[method],
    )


def run_sweep(
    cfg,
    sizes: Sequence[tuple[int, int]],
    out_dir: str | os.PathLike,
    train_ds,
    val_ds,
    eval_ds,
    classes: Sequence,
    *,
    data_hash: str | None = None,
    epochs: int | None = None,
    methods: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int = 4,
    widths: Sequence[float] = DEFAULT_TRIMAP_WIDTHS,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict], list[EvalResult]]:
    """Train every method at every output size from one config and evaluate each on the same data.

    The cost-performance sweep of ``wsiseg evaluate --sweep`` (paper Fig. 6),
    also used by ``wsiseg bench sampling``.

    Parameters
    ----------
    cfg : wsiseg.training.config.TrainConfig
        Base training config; each run changes only the output size (with
        ``map_size`` and ``sigma`` scaled alike), the epochs, the device and
        the fields of :data:`SWEEP_CONFIG` for its method.
    sizes : sequence of (int, int)
        Output sizes ``(h, w)``.
    out_dir : path-like
        Runs go to ``out_dir/<method>-<W>x<H>/``; a finished run there is
        reused and an unfinished one resumed (:func:`wsiseg.training.loop.train`
        refuses a checkpoint of another config or other data).
    train_ds, val_ds : torch.utils.data.Dataset
        Training and validation regions (``val_ds`` may be None).
    eval_ds : torch.utils.data.Dataset
        Held-out regions every model is evaluated on.
    classes : sequence of ClassInfo
        In channel order.
    data_hash : str, optional
        Fingerprint of the training data, stored with each model.
    epochs : int, optional
        Epochs per run (default ``cfg.epochs``).
    methods : sequence of str, optional
        Keys of :data:`SWEEP_CONFIG` (default :data:`SWEEP_METHODS`).
    device, batch_size, widths
        See :func:`evaluate_model`.
    log : callable, optional
        Progress messages.

    Returns
    -------
    rows : list of dict
        One per size and method, in that order (the ``sweep.json`` rows).
    results : list of EvalResult
        The same runs' evaluations.
    """
    from wsiseg.models.io import load_deformseg

    say = log or (lambda _m: None)
    methods = tuple(methods) if methods is not None else SWEEP_METHODS
    n_ep = epochs if epochs is not None else cfg.epochs
    if {"learned", "single"} <= set(methods) and cfg.gamma_edge == 0:
        say("note: gamma_edge is 0, so the joint and single losses are the same loss")
    dev = resolve_device(device)
    rows: list[dict] = []
    results: list[EvalResult] = []
    for size in sizes:
        for method in methods:
            mcfg = _scaled_config(cfg, size, method, n_ep, str(device))
            run_dir = Path(out_dir) / f"{method}-{size[1]}x{size[0]}"  # WIDTHxHEIGHT
            path = ensure_trained(mcfg, run_dir, train_ds, val_ds, classes, data_hash, say, method)
            model = load_deformseg(path, device=dev)
            r = evaluate_model(model, eval_ds, device=dev, batch_size=batch_size, widths=widths, name=method, log=say)
            rows.append(sweep_row(r, size, path, n_ep, model.metadata.get("training") or {}))
            results.append(r)
    return rows, results


def write_sweep_files(
    out_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]], doc: Mapping[str, Any]
) -> dict[str, Path]:
    """Write ``sweep.json`` (``doc`` plus the rows), ``sweep.csv`` and ``sweep.png`` into ``out_dir``.

    Returns
    -------
    dict of str -> Path
        ``sweep_json``, ``sweep_csv``, ``sweep_png``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "sweep_json": write_json(out / SWEEP_JSON, {**doc, "rows": list(rows)}),
        "sweep_csv": _write_sweep_csv(out / SWEEP_CSV, rows),
        "sweep_png": draw_sweep(rows, out / SWEEP_PNG),
    }


def _cost_text(level0: float | None, working: float | None) -> str:
    """``"0.39 %"``, or ``"0.39 %; 6.25 % of working px"`` where the working-resolution fraction differs."""
    text = f"{percent(level0)} %"
    if working is not None and level0 is not None and not math.isclose(working, level0):
        text += f"; {percent(working)} % of working px"
    return text


def format_sweep_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of sweep rows: one line per size and method, best full-resolution mIoU per size in bold.

    The grid column gives the cost in % of level-0 pixels, and in % of the
    working-resolution pixels where that differs.

    Parameters
    ----------
    rows : sequence of dict
        :func:`run_sweep` rows.

    Returns
    -------
    str
    """
    if not rows:
        return "(no sweep rows)"
    names = list((rows[0].get("iou_full") or {}).keys())
    lines = [
        (
            "| grid (cost: % of level-0 px) | method | mIoU full res. | mIoU deformed | mIoU(Y', Y) | IoU full res. "
            f"({' / '.join(names)}) | train s/it | epochs (best) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    best: dict[tuple[int, int], float] = {}
    for row in rows:
        key, v = (row["out_height"], row["out_width"]), row.get("miou_full")
        if v is not None:
            best[key] = max(best.get(key, v), v)
    for row in rows:
        key = (row["out_height"], row["out_width"])
        full = fmt(row.get("miou_full"))
        if row.get("miou_full") is not None and row["miou_full"] == best.get(key):
            full = f"**{full}**"
        grid = f"{wxh(key)} ({_cost_text(row.get('cost'), row.get('cost_working'))})"
        per_class = " / ".join(fmt(v, 3) for v in (row.get("iou_full") or {}).values())
        spi = row.get("sec_per_iter")
        spi_text = "n/a" if spi is None else f"{spi:.3f}"
        epochs = f"{row.get('epochs')} ({row.get('best_epoch') if row.get('best_epoch') is not None else 'n/a'})"
        lines.append(
            f"| {grid} | {method_label(row['method'])} | {full} | {fmt(row.get('miou_deformed'))} | "
            f"{fmt(row.get('upsampling_miou'))} | {per_class} | {spi_text} | {epochs} |"
        )
    return "\n".join(lines)


# ``cost``: fraction of level-0 pixels (as before the working fraction got its own column, ``cost_working``).
_SWEEP_COLUMNS = (
    "method",
    "out_height",
    "out_width",
    "map_height",
    "map_width",
    "cost",
    "cost_working",
    "miou_full",
    "miou_deformed",
    "upsampling_miou",
    "epochs",
    "model",
    "label",
    "joint",
    "sec_per_iter",
    "steps",
    "best_epoch",
)


def sweep_row(r: EvalResult, size: tuple[int, int], path: Path, epochs: int, training: Mapping[str, Any]) -> dict:
    """One sweep row; ``training`` is the model file's ``"training"`` metadata (timings, best epoch, config)."""
    orig, samp = r.class_frequency()
    config = training.get("config") or {}
    return {
        "method": r.name,
        "label": method_label(r.name),
        "out_height": size[0],
        "out_width": size[1],
        "map_height": r.map_size[0],
        "map_width": r.map_size[1],
        "cost": nan_to_none(r.cost),
        "cost_working": nan_to_none(r.cost_working),
        "samples_on_glass": {k: nan_to_none(v) for k, v in r.samples_on_glass.items()},
        "miou_full": nan_to_none(r.miou_full),
        "miou_deformed": nan_to_none(r.miou_deformed),
        "upsampling_miou": nan_to_none(r.upsampling_miou),
        "epochs": epochs,
        "model": os.fspath(path),
        # Whether the edge term was on (the trainer drops it for fixed samplers).
        "joint": (bool(config.get("joint")) and config.get("sampler") == "learned") if config else None,
        "sec_per_iter": training.get("seconds_per_iter"),
        "steps": training.get("steps"),
        "best_epoch": (training.get("best") or {}).get("epoch"),
        "iou_full": r._iou_dict(r.full.iou()),
        "iou_deformed": r._iou_dict(r.deformed.iou()),
        "trimap": dict(zip([f"{w:g}" for w in r.trimap_widths], [nan_to_none(v) for v in r.trimap_accuracy()])),
        "class_frequency": {
            "classes": r.class_names,
            "original": [nan_to_none(v) for v in orig],
            "sampled": [nan_to_none(v) for v in samp],
        },
    }


def _write_sweep_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    with atomic_output(path, overwrite=True) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(_SWEEP_COLUMNS)
        for row in rows:
            w.writerow(["" if row.get(c) is None else row.get(c) for c in _SWEEP_COLUMNS])
    return path
