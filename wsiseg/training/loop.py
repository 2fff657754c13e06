"""Joint training of the deformation and segmentation nets (Jin et al., ICLR 2022).

(Some 720 lines, one module: :func:`train` reads as the steps of a run, each a private helper below it
(inputs, resume, nets, scale, data, then per epoch train, validate, record, write, say); they serve
nothing else and share the run's state in small dataclasses, of which only ``_RunState`` is
checkpointed. One optimiser step and one validation pass are :mod:`wsiseg.training.step`.)

One training step, on a batch of regions at working resolution ``(H, W)``:

1. ``X_lr``: anti-aliased down-sampling of the region to ``map_size``
   (:func:`wsiseg.models.net.lowres_view`, done inside the net);
2. the sampler's density ``d`` -> grid -> deformed image ``X^`` sampled
   bilinearly from the *high-resolution* tensor, so the segmentation loss
   reaches the deformation net through the grid;
3. ``L = L_s(logits, labels at the grid) + gamma * L_e(d, edge target)``
   (:class:`wsiseg.models.losses.JointLoss`), Adam, optional step decay.

After every epoch the validation split is scored twice: mIoU in the
*deformed* space (prediction vs. the labels at the grid points, what the
loss sees) and at *full* working resolution (the prediction reverse-sampled
to ``(H, W)`` with :func:`wsiseg.sampling.reverse.reverse_sample` vs. the
full labels, what a user gets).

Files in ``out_dir``
--------------------
``model.safetensors``
    Best model by validation mIoU (``monitor``), a wsiseg model file
    (:func:`wsiseg.models.io.save_deformseg`) whose metadata key
    ``"training"`` holds the config, data hash, scores and timings, and
    ``"scale"`` the micrometres per working pixel and the sample spacing in
    micrometres it was trained at (:mod:`wsiseg.models.scale`; ``null``
    when no training region has an MPP).
``checkpoint.safetensors``
    Written after every epoch: everything needed to continue exactly
    (weights, optimizer, scheduler, AMP scaler, RNG states, counters,
    history). Tensors are safetensors tensors; the non-tensor structure of
    the optimizer/scheduler/RNG states is JSON in the header, with tensors
    referenced by name. Nothing is pickled, so a checkpoint cannot run code.
``log.csv``, ``curves.png``, ``train_config.yaml``
    Per-epoch log, training curves (drawn with Pillow), resolved config.

Every file is written atomically (:func:`wsiseg.atomic.atomic_output`), so a
crash or a diverging loss always leaves the last good checkpoint.

Reproducibility
---------------
The initial weights come from ``seed`` (the encoder's from ``encoder_weights``
when given); the shuffling of epoch ``e`` from a generator seeded with
``(seed, e)`` and the augmentation of item ``i`` in epoch ``e`` from
``numpy.random.default_rng([seed, e, i])``. Nothing depends
on how many epochs ran in this process, so ``resume`` continues exactly as an
uninterrupted run would (bitwise on CPU). The global RNGs (torch, CUDA,
numpy, python) are checkpointed too, for modules that draw from them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from wsiseg.device import resolve_device
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.models.losses import JointLoss
from wsiseg.models.net import DeformSegNet
from wsiseg.models.pretrained import describe_encoder_init, find_encoder
from wsiseg.models.scale import ModelScale
from wsiseg.training.batches import (
    Augmented,
    alone_checker,
    make_loader,
    say_scale,
    training_scale,
    window_problem,
)
from wsiseg.training.checkpoint import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    CURVES_NAME,
    LOG_NAME,
    MODEL_NAME,
    Checkpoint,
    check_output_dir,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from wsiseg.training.config import (
    TrainConfig,
    amp_settings,
    build_net,
    epoch_generator,
    seed_everything,
)
from wsiseg.training.log import fmt, write_log
from wsiseg.training.step import Scores, train_step, validate
from wsiseg.viz.charts import draw_curves

__all__ = [
    "TrainResult",
    "train",
]

# Options that may change when a run is resumed; any other change would make
# the continued run a different experiment.
_RESUME_MUTABLE = frozenset({"epochs", "patience", "min_delta", "device", "num_workers", "amp"})


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes
    ----------
    out_dir, model_path, checkpoint_path, log_path, curves_path : pathlib.Path
    epochs : int
        Epochs completed (including those before a resume).
    steps : int
        Optimiser steps completed.
    best_epoch : int or None
        Epoch of the saved model.
    best_val_miou_full, best_val_miou_deformed : float or None
        Its validation scores (None without a validation split).
    stopped_early : bool
        Early stopping ended the run.
    seconds_per_iter : float or None
        Median training seconds per iteration over the epochs.
    history : list of dict
        One row per epoch (the :data:`LOG_COLUMNS`).
    """

    out_dir: Path
    model_path: Path
    checkpoint_path: Path
    log_path: Path
    curves_path: Path
    epochs: int
    steps: int
    best_epoch: int | None
    best_val_miou_full: float | None
    best_val_miou_deformed: float | None
    stopped_early: bool
    seconds_per_iter: float | None
    history: list[dict] = field(default_factory=list)


@dataclass
class _RunState:
    epoch: int = 0
    step: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    best_miou_full: float | None = None
    best_miou_deformed: float | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    warned_one_class: bool = False
    history: list[dict] = field(default_factory=list)


@dataclass
class _Run:
    """A run's inputs, checked: the same for every epoch (never checkpointed)."""

    cfg: TrainConfig
    classes: list
    say: Callable[[str], None]
    out: Path
    paths: dict[str, Path]
    train_ds: Dataset
    val_ds: Dataset | None
    has_val: bool
    data_hash: str | None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class _Nets:
    """The net on its device and what trains it."""

    device: torch.device
    amp: tuple[bool, torch.dtype, bool]
    net: DeformSegNet
    encoder_init: Any
    encoder_params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR | None
    scaler: torch.amp.GradScaler | None
    criterion: JointLoss


@dataclass
class _Data:
    """The training set as the loaders see it, its batch-of-one check and the validation loader."""

    train_set: Dataset
    alone: Any
    val_loader: DataLoader | None
    use_bar: bool


@dataclass
class _EpochLosses:
    """One epoch's training: its learning rate, mean loss terms, mean gradient norms and seconds per step."""

    lr: float
    means: list[float]
    grad_means: list[float]
    sec_per_iter: float


def _classes_list(classes) -> list:
    from wsiseg.output.classes import ClassInfo

    out = [c if isinstance(c, ClassInfo) else ClassInfo(**c) for c in classes]
    if not out:
        raise WsisegError("no classes given")
    return out


def _classes_json(classes) -> list[dict]:
    return [{"value": c.value, "name": c.name, "color": list(c.color)} for c in classes]


def _median(values: Sequence[float | None]) -> float | None:
    v = sorted(x for x in values if x is not None)
    return float(v[len(v) // 2]) if v else None


def train(
    config: TrainConfig | Mapping[str, Any],
    train_ds: Dataset,
    val_ds: Dataset | None,
    classes: Sequence,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    data_hash: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train deformation and segmentation nets jointly; write model, checkpoint, log, curves.

    Parameters
    ----------
    config : TrainConfig or dict
    train_ds, val_ds : torch.utils.data.Dataset
        Items are dicts with ``image`` (uint8 ``(3, H, W)``) and ``labels``
        (int64 ``(H, W)``, class *indices* in channel order, ``ignore_index``
        for unlabelled pixels), optionally ``name``; all of one size.
        ``val_ds`` may be None or empty: then the latest epoch is kept and
        there is no early stopping.
    classes : sequence of ClassInfo (or dicts)
        Channel ``i`` predicts ``classes[i]``; their count sets the output
        channels.
    out_dir : path-like
        Created if needed; see the module docstring for its files.
    resume : bool
        Continue from ``out_dir/checkpoint.safetensors`` exactly (starts
        afresh, with a message, when there is none). ``epochs``,
        ``patience``, ``min_delta``, ``device``, ``num_workers`` and ``amp``
        may differ from the checkpoint's; anything else is refused.
    progress : bool
        tqdm progress bars (only when stderr is a terminal).
    data_hash : str, optional
        Fingerprint of the training data (``wsiseg.training.pairs.dataset_hash``),
        stored with the model; a resume on different data is refused.
    overwrite : bool
        Start afresh even if ``out_dir`` holds a previous run.
    log : callable, optional
        Receives one line per epoch and notices (e.g. ``click.echo``).

    Returns
    -------
    TrainResult

    Raises
    ------
    WsisegError
        Bad data, a previous run in ``out_dir`` (without ``resume`` or
        ``overwrite``), a checkpoint that does not match, or a diverging
        loss ("training diverged: loss is NaN at epoch E step S ...").
    ConfigError
        Invalid options, unknown architecture/encoder, unavailable device.
    """
    run = _inputs(config, classes, train_ds, val_ds, out_dir, data_hash, log)
    ckpt = _open_checkpoint(run, resume=resume, overwrite=overwrite)
    nets = _build_nets(run, ckpt)
    st = _start_state(run, nets, ckpt)
    del ckpt
    scale = _record_scale(run, nets.net)
    data = _prepare_data(run, nets, progress=progress)

    done = _finished(run, st)
    if done:
        run.say(f"nothing to do: the run in {run.out} already finished after epoch {st.epoch}")
    while not done:
        epoch = st.epoch + 1
        losses = _train_epoch(run, nets, data, st, epoch)
        scores = _validate_epoch(run, nets, data, st)
        improved = _record_epoch(run, nets.net, st, epoch, losses, scores)
        _write_epoch(run, nets, st, improved, scale)
        _say_epoch(run, st, epoch, losses, scores, improved)
        done = st.stopped_early or st.epoch >= run.cfg.epochs
    return _result(run, st)


# -- the steps of train, in order ------------------------------------------------


def _inputs(
    config: TrainConfig | Mapping[str, Any],
    classes: Sequence,
    train_ds: Dataset,
    val_ds: Dataset | None,
    out_dir: str | os.PathLike,
    data_hash: str | None,
    log: Callable[[str], None] | None,
) -> _Run:
    """The config and classes resolved, the output paths, the splits checked."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    classes = _classes_list(classes)
    num_classes = len(classes)
    if 0 <= cfg.ignore_index < num_classes:
        raise ConfigError(f"ignore_index {cfg.ignore_index} collides with a class index (0..{num_classes - 1})")
    say = log or (lambda _msg: None)
    out = Path(out_dir)
    paths = {
        "model": out / MODEL_NAME,
        "checkpoint": out / CHECKPOINT_NAME,
        "log": out / LOG_NAME,
        "curves": out / CURVES_NAME,
    }
    if len(train_ds) == 0:
        raise WsisegError("no training regions: the training split is empty")
    has_val = val_ds is not None and len(val_ds) > 0
    return _Run(cfg, classes, say, out, paths, train_ds, val_ds, has_val, data_hash)


def _open_checkpoint(run: _Run, *, resume: bool, overwrite: bool) -> Checkpoint | None:
    """The checkpoint to resume from, checked against this run (None: a new run)."""
    ckpt: Checkpoint | None = None
    if check_output_dir(run.out, resume=resume, overwrite=overwrite):
        ckpt = load_checkpoint(run.paths["checkpoint"])
        _check_resumable(ckpt.meta, run.cfg, run.classes, run.data_hash, run.paths["checkpoint"])
    elif resume:
        run.say(f"no checkpoint in {run.out}: starting a new run")
    return ckpt


def _build_nets(run: _Run, ckpt: Checkpoint | None) -> _Nets:
    """Device, seeds, net, optimizer, scheduler, AMP scaler and loss, as a new run starts them."""
    cfg = run.cfg
    device = resolve_device(cfg.device)
    amp = amp_settings(cfg, device)
    if cfg.deterministic and device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    seed_everything(cfg.seed)

    # A resumed run takes every weight from its checkpoint: no download, no weights file.
    net = build_net(cfg, run.num_classes, pretrained=ckpt is None).to(device)
    encoder_init = (ckpt.meta.get("encoder_init") if ckpt is not None else None) or net.segmenter.encoder_init
    encoder_params = list(find_encoder(net).parameters()) if cfg.freeze_encoder_epochs else []
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.lr_gamma) if cfg.step_size else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp[2]) if amp[2] else None
    criterion = JointLoss(cfg.loss, cfg.effective_gamma_edge, cfg.ignore_index, cfg.edge_norm)
    return _Nets(device, amp, net, encoder_init, encoder_params, optimizer, scheduler, scaler, criterion)


def _start_state(run: _Run, nets: _Nets, ckpt: Checkpoint | None) -> _RunState:
    """A resumed run's weights, optimizer, scheduler, scaler, RNG states and counters; a new run's state."""
    cfg = run.cfg
    st = _RunState()
    if ckpt is not None:
        nets.net.load_state_dict({k: v.to(nets.device) for k, v in ckpt.model.items()}, strict=True)
        nets.optimizer.load_state_dict(ckpt.state["optimizer"])
        if nets.scheduler is not None and ckpt.state.get("scheduler"):
            nets.scheduler.load_state_dict(ckpt.state["scheduler"])
        if nets.scaler is not None and ckpt.state.get("scaler"):
            nets.scaler.load_state_dict(ckpt.state["scaler"])
        set_rng_state(ckpt.state["rng"])
        known = {f.name for f in dataclasses.fields(_RunState)}
        st = _RunState(**{k: v for k, v in ckpt.meta.get("run", {}).items() if k in known})
        run.say(f"resuming {run.out} after epoch {st.epoch} (step {st.step})")
    elif cfg.encoder_weights is not None or cfg.freeze_encoder_epochs:
        frozen = f", frozen for {cfg.freeze_encoder_epochs} epochs" if cfg.freeze_encoder_epochs else ""
        run.say(f"encoder {cfg.encoder}: {describe_encoder_init(nets.encoder_init)}{frozen}")
    return st


def _record_scale(run: _Run, net: DeformSegNet) -> ModelScale:
    """The physical scale of training, said; every validation region checked for an MPP when it needs one."""
    # The physical scale goes into the model file, so segment samples slides as densely as training did.
    scale = training_scale(net, run.train_ds, run.cfg.sample_spacing_um)
    if run.cfg.sample_spacing_um is not None and run.has_val and run.val_ds is not None:
        training_scale(net, run.val_ds, run.cfg.sample_spacing_um)  # every validation region needs an MPP too
    say_scale(run.say, scale)
    return scale


def _prepare_data(run: _Run, nets: _Nets, *, progress: bool) -> _Data:
    """``out_dir`` and its config file; the augmented training set and the validation loader."""
    cfg, say, train_ds, val_ds = run.cfg, run.say, run.train_ds, run.val_ds
    run.out.mkdir(parents=True, exist_ok=True)
    cfg.save(run.out / CONFIG_NAME)
    if not run.has_val:
        say("no validation split: the latest epoch is kept as the model and early stopping is off")

    if getattr(train_ds, "augmentation", None) and hasattr(train_ds, "set_epoch"):
        # A RegionDataset built with its own augmentation: do not augment twice.
        say("the training data set augments itself; flips/rot90/color_jitter of the config are not applied")
        train_set: Dataset = Augmented(train_ds, cfg, augment=False) if cfg.crop_size is not None else train_ds
    else:
        train_set = Augmented(train_ds, cfg)
    alone = alone_checker(nets.net, train_set, cfg, say)
    small = window_problem(nets.net, cfg)
    if small:
        say(f"warning: {small}")
    val_loader = (
        make_loader(val_ds, cfg, shuffle=False, generator=torch.Generator().manual_seed(0), device=nets.device)
        if run.has_val and val_ds is not None
        else None
    )
    return _Data(train_set, alone, val_loader, progress and sys.stderr.isatty())


def _finished(run: _Run, st: _RunState) -> bool:
    """True when the run (a resumed one) has nothing left to do."""
    cfg = run.cfg
    return (
        st.stopped_early
        or st.epoch >= cfg.epochs
        or (run.has_val and cfg.patience is not None and st.bad_epochs >= cfg.patience)
    )


def _epoch_loader(run: _Run, nets: _Nets, data: _Data, epoch: int) -> DataLoader:
    """The training data set to epoch ``epoch`` (its augmentation draws) and its shuffled loader."""
    train_set = data.train_set
    if isinstance(train_set, Augmented):
        train_set.epoch = epoch
    for ds in (train_set, getattr(train_set, "base", None)):
        if ds is not None and hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
    return make_loader(
        train_set,
        run.cfg,
        shuffle=True,
        generator=epoch_generator(run.cfg.seed, epoch),
        device=nets.device,
        alone=data.alone,
    )


def _train_mode(run: _Run, nets: _Nets, epoch: int) -> None:
    """The encoder frozen or not, the net in training mode, BatchNorm on running statistics when asked."""
    cfg, net = run.cfg, nets.net
    for p in nets.encoder_params:  # frozen: no gradient, so Adam skips them (BatchNorm statistics still adapt)
        p.requires_grad_(epoch > cfg.freeze_encoder_epochs)
    net.train()
    if cfg.freeze_bn_after is not None and epoch > cfg.freeze_bn_after:
        # BatchNorm on its running statistics, as at inference: batches group regions of one shape, so
        # batch statistics are one source's and the running ones fit none (docs/demo-model.md)
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def _train_epoch(run: _Run, nets: _Nets, data: _Data, st: _RunState, epoch: int) -> _EpochLosses:
    """One pass over the training set (``st.step`` counts its steps), then the scheduler's step."""
    cfg, device = run.cfg, nets.device
    loader = _epoch_loader(run, nets, data, epoch)
    lr = float(nets.optimizer.param_groups[0]["lr"])
    _train_mode(run, nets, epoch)
    # its own stream, so the shuffle (and runs without scale jitter) stay as they were
    jitter_rng = epoch_generator(cfg.seed + 1, epoch)
    sums = torch.zeros(3, dtype=torch.float64)
    grad_sums = torch.zeros(2, dtype=torch.float64)
    n_steps = 0
    t0 = time.perf_counter()
    kept = (
        f"the last good checkpoint is kept at {run.paths['checkpoint']}"
        if st.epoch > 0
        else "no checkpoint was written yet (it diverged in the first epoch)"
    )

    def diverged(what: str) -> str:
        return f"training diverged: loss is {what} at epoch {epoch} step {st.step + 1}; {kept} (try a lower --lr)"

    bar = None
    if data.use_bar:
        from tqdm import tqdm

        bar = tqdm(total=len(loader), desc=f"epoch {epoch}/{cfg.epochs}", unit="it", leave=False)
    try:
        for batch in loader:
            values, norms = train_step(
                nets.net,
                batch,
                cfg,
                nets.criterion,
                nets.optimizer,
                nets.scaler,
                nets.amp,
                device,
                run.num_classes,
                jitter_rng,
                diverged=diverged,
            )
            grad_sums += norms
            sums += values
            n_steps += 1
            st.step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{values[0].item():.4g}")
    finally:
        if bar is not None:
            bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sec_per_iter = (time.perf_counter() - t0) / max(n_steps, 1)
    if nets.scheduler is not None:
        nets.scheduler.step()
    means = (sums / max(n_steps, 1)).tolist()
    grad_means = (grad_sums / max(n_steps, 1)).tolist()
    return _EpochLosses(lr, means, grad_means, sec_per_iter)


def _validate_epoch(run: _Run, nets: _Nets, data: _Data, st: _RunState) -> Scores:
    """The validation scores (none without a validation split); warns once when it has one class or none."""
    scores = Scores(None, None, 0)
    if data.val_loader is not None:
        scores = validate(nets.net, data.val_loader, run.num_classes, run.cfg, nets.device, nets.amp)
        if scores.classes_present <= 1 and not st.warned_one_class:
            msg = (
                f"the validation split has only {scores.classes_present} class: mIoU is computed over the "
                "classes present and says little; use more or other validation data"
            )
            warnings.warn(msg, UserWarning, stacklevel=3)  # at the caller of train
            run.say(f"warning: {msg}")
            st.warned_one_class = True
    return scores


def _record_epoch(
    run: _Run, net: DeformSegNet, st: _RunState, epoch: int, losses: _EpochLosses, scores: Scores
) -> bool:
    """The epoch's log row, the best scores and the early-stopping count in ``st``; True when it improved."""
    cfg = run.cfg
    score = scores.miou_full if cfg.monitor == "full" else scores.miou_deformed
    if score is None or st.best_score is None:
        # Without a score the latest epoch is the best we know.
        improved = score is not None or st.best_score is None
    else:
        improved = score > st.best_score + cfg.min_delta
    st.epoch = epoch
    means, grad_means = losses.means, losses.grad_means
    row = {
        "epoch": epoch,
        "step": st.step,
        "lr": losses.lr,
        "loss": means[0],
        "seg": means[1],
        "edge": means[2],
        "grad_seg": grad_means[0] if net.deform is not None else None,
        "grad_edge": grad_means[1] if net.deform is not None else None,
        "val_miou_deformed": scores.miou_deformed,
        "val_miou_full": scores.miou_full,
        "sec_per_iter": losses.sec_per_iter,
    }
    st.history.append(row)
    if improved:
        st.best_score, st.best_epoch = score, epoch
        st.best_miou_full, st.best_miou_deformed = scores.miou_full, scores.miou_deformed
        st.bad_epochs = 0
    else:
        st.bad_epochs += 1
    if run.has_val and cfg.patience is not None and st.bad_epochs >= cfg.patience:
        st.stopped_early = True
    return improved


def _write_epoch(run: _Run, nets: _Nets, st: _RunState, improved: bool, scale: ModelScale) -> None:
    """The model (when the epoch improved), then the checkpoint, the log and the curves."""
    paths, cfg = run.paths, run.cfg
    if improved:
        _save_model(
            paths["model"],
            nets.net,
            run.classes,
            cfg,
            st,
            run.data_hash,
            len(run.train_ds),
            len(run.val_ds) if run.has_val and run.val_ds is not None else 0,
            nets.encoder_init,
            scale,
        )
    # The checkpoint goes after the model: a crash between the two at
    # worst repeats this epoch on resume.
    meta = {
        "config": cfg.to_dict(),
        "classes": _classes_json(run.classes),
        "data_hash": run.data_hash,
        "encoder_init": nets.encoder_init,
        "run": dataclasses.asdict(st),
    }
    save_checkpoint(paths["checkpoint"], nets.net, nets.optimizer, nets.scheduler, nets.scaler, meta)
    write_log(paths["log"], st.history)
    draw_curves(st.history, paths["curves"], gamma_edge=cfg.effective_gamma_edge)


def _say_epoch(run: _Run, st: _RunState, epoch: int, losses: _EpochLosses, scores: Scores, improved: bool) -> None:
    """The epoch's log line, and the notice when early stopping ends the run."""
    cfg, means = run.cfg, losses.means
    run.say(
        f"epoch {epoch}/{cfg.epochs}: loss {means[0]:.4g} (seg {means[1]:.4g}, edge {means[2]:.4g}), "
        f"lr {losses.lr:.3g}, val mIoU full-res {fmt(scores.miou_full) or 'n/a'}, "
        f"deformed {fmt(scores.miou_deformed) or 'n/a'}, {losses.sec_per_iter:.3g} s/it" + (" *" if improved else "")
    )
    if st.stopped_early:
        run.say(f"early stopping: no improvement of val mIoU ({cfg.monitor}) for {st.bad_epochs} epochs")


def _result(run: _Run, st: _RunState) -> TrainResult:
    paths = run.paths
    return TrainResult(
        out_dir=run.out,
        model_path=paths["model"],
        checkpoint_path=paths["checkpoint"],
        log_path=paths["log"],
        curves_path=paths["curves"],
        epochs=st.epoch,
        steps=st.step,
        best_epoch=st.best_epoch,
        best_val_miou_full=st.best_miou_full,
        best_val_miou_deformed=st.best_miou_deformed,
        stopped_early=st.stopped_early,
        seconds_per_iter=_median([r.get("sec_per_iter") for r in st.history]),
        history=[dict(r) for r in st.history],
    )


def _save_model(
    path: Path,
    net,
    classes,
    cfg: TrainConfig,
    st: _RunState,
    data_hash,
    n_train: int,
    n_val: int,
    encoder_init: dict,
    scale: ModelScale,
) -> None:
    from wsiseg.models.io import save_deformseg

    extra = {
        "encoder_init": encoder_init,
        "scale": scale.to_dict(),
        "training": {
            "config": cfg.to_dict(),
            "encoder_init": encoder_init,
            "data_hash": data_hash,
            "best": {
                "epoch": st.best_epoch,
                "val_miou_full": st.best_miou_full,
                "val_miou_deformed": st.best_miou_deformed,
                "monitor": cfg.monitor,
            },
            "epochs": st.epoch,
            "steps": st.step,
            "seconds_per_iter": _median([r.get("sec_per_iter") for r in st.history]),
            "train_regions": n_train,
            "val_regions": n_val,
            "environment": training_environment(net),
        },
    }
    save_deformseg(path, net, classes, extra=extra, overwrite=True)


def training_environment(net) -> dict[str, Any]:
    """Where a net was trained: package versions, CPU model, torch threads and device.

    Training is bit-reproducible on one machine, not across CPU models or
    devices (their arithmetic rounds differently), so a model file names them.
    """
    import torch

    from wsiseg.device import cpu_model
    from wsiseg.output.report import versions

    dev = next(net.parameters()).device
    return {
        **versions(),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
    }


def _check_resumable(meta: dict, cfg: TrainConfig, classes, data_hash: str | None, path: Path) -> None:
    old = meta.get("config") or {}
    try:
        old_cfg = TrainConfig.from_dict(old).to_dict()
    except ConfigError as exc:
        raise WsisegError(f"checkpoint holds an invalid training config ({exc})", path) from exc
    new_cfg = cfg.to_dict()
    diff = [k for k in new_cfg if k not in _RESUME_MUTABLE and old_cfg.get(k) != new_cfg[k]]
    if diff:
        shown = ", ".join(f"{k}={old_cfg.get(k)!r} (now {new_cfg[k]!r})" for k in diff[:4])
        raise ConfigError(
            f"cannot resume: the checkpoint was trained with {shown}; only "
            f"{', '.join(sorted(_RESUME_MUTABLE))} may change",
            path,
        )
    if meta.get("classes") != _classes_json(classes):
        raise ConfigError("cannot resume: the classes differ from the checkpoint's", path)
    old_hash = meta.get("data_hash")
    if data_hash is not None and old_hash is not None and old_hash != data_hash:
        raise WsisegError(
            f"cannot resume: the checkpoint was trained on other data (hash {old_hash}, now {data_hash})", path
        )
