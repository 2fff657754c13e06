"""Joint training of the deformation and segmentation nets (Jin et al., ICLR 2022).

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

import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsiseg.atomic import atomic_output
from wsiseg.device import resolve_device
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.limits import MAX_SAMPLE_SPACING_UM, loads_json
from wsiseg.metrics import ConfusionMatrix
from wsiseg.models.losses import EDGE_NORMS, LOSS_NAMES, JointLoss
from wsiseg.models.net import IMAGE_SAMPLING, SAMPLERS, DeformSegNet
from wsiseg.models.pretrained import IMAGENET, describe_encoder_init, find_encoder
from wsiseg.models.scale import ModelScale, measure_scale
from wsiseg.models.segmenter import build_segmenter
from wsiseg.sampling.geometry import PhysicalScale, SamplingGeometry

__all__ = [
    "CHECKPOINT_NAME",
    "MODEL_NAME",
    "TrainConfig",
    "TrainResult",
    "build_net",
    "chart_panel",
    "check_output_dir",
    "draw_curves",
    "load_checkpoint",
    "load_train_config",
    "read_checkpoint_config",
    "save_checkpoint",
    "size_batches",
    "train",
    "trains_alone",
    "training_geometry",
    "training_scale",
    "chart_ticks",
    "tick_label",
]

MODEL_NAME = "model.safetensors"
CHECKPOINT_NAME = "checkpoint.safetensors"
LOG_NAME = "log.csv"
CURVES_NAME = "curves.png"
CONFIG_NAME = "train_config.yaml"

CHECKPOINT_FORMAT = "wsiseg-checkpoint"
CHECKPOINT_VERSION = 1
_META_KEY = "wsiseg"

#: Columns of ``log.csv``, one row per epoch.
LOG_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "loss",
    "seg",
    "edge",
    "grad_seg",
    "grad_edge",
    "val_miou_deformed",
    "val_miou_full",
    "sec_per_iter",
)

# Options that may change when a run is resumed; any other change would make
# the continued run a different experiment.
_RESUME_MUTABLE = frozenset({"epochs", "patience", "min_delta", "device", "num_workers", "amp"})

# smp's U-Net default decoder, deepest block first.
_UNET_DECODER = (256, 128, 64, 32, 16)


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------


def _bad(key: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"invalid training option {key!r}: {what}, got {value!r}")


def _as_pair(key: str, v: Any) -> tuple[int, int]:
    if isinstance(v, str):  # "WIDTHxHEIGHT" as on the command line; lists are (height, width)
        parts = v.lower().replace(" ", "").split("x")
        try:
            v = [int(p) for p in reversed(parts)]
        except ValueError:
            raise _bad(key, "must be WIDTHxHEIGHT (e.g. 64x64) or [height, width]", v) from None
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = (v, v)
    if (
        not isinstance(v, (list, tuple))
        or len(v) != 2
        or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1 for x in v)
    ):
        raise _bad(key, "must be two positive integers (height, width)", v)
    return int(v[0]), int(v[1])


def _as_int(key: str, v: Any, lo: int | None = None, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str):
        try:
            v = int(v)
        except ValueError:
            pass
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or (lo is not None and v < lo):
        what = "must be an integer" + (f" >= {lo}" if lo is not None else "")
        raise _bad(key, what + (" or null" if optional else ""), v)
    return int(v)


def _as_float(key: str, v: Any, lo: float | None = None, hi: float | None = None, *, open_lo: bool = False,
              open_hi: bool = False, optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, str):  # PyYAML reads "1e-3" (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
        raise _bad(key, "must be a number" + (" or null" if optional else ""), v)
    v = float(v)
    if lo is not None and (v < lo or (open_lo and v == lo)):
        raise _bad(key, f"must be {'>' if open_lo else '>='} {lo}", v)
    if hi is not None and (v > hi or (open_hi and v == hi)):
        raise _bad(key, f"must be {'<' if open_hi else '<='} {hi}", v)
    return v


def _as_bool(key: str, v: Any, optional: bool = False) -> bool | None:
    if v is None and optional:
        return None
    if not isinstance(v, bool):
        raise _bad(key, "must be true or false" + (" (or null for auto)" if optional else ""), v)
    return v


def _as_choice(key: str, v: Any, choices: Sequence[str]) -> str:
    if not isinstance(v, str) or v.lower() not in choices:
        raise _bad(key, f"must be one of {', '.join(choices)}", v)
    return v.lower()


@dataclass
class TrainConfig:
    """Everything that defines a training run; validated on construction.

    Attributes
    ----------
    arch, encoder : str
        Segmenter (smp architecture and encoder, ``"tu-<timm>"`` allowed),
        see :func:`wsiseg.models.segmenter.build_segmenter`.
    encoder_depth : int, optional
        Encoder stages (smp default 5). For U-Nets without
        ``decoder_channels`` the last ``encoder_depth`` default decoder
        widths are used.
    decoder_channels : tuple of int, optional
        Decoder widths (smp default when omitted).
    encoder_weights : str, optional
        Initial encoder weights: ``None`` (random), ``"imagenet"`` (smp
        downloads them; strictly opt-in) or the path of a local state dict
        (``.safetensors`` or a torch file), see
        :func:`wsiseg.models.pretrained.load_encoder_weights`. Read when a
        run starts, never on resume (the checkpoint holds the weights).
    freeze_encoder_epochs : int
        The encoder's parameters get no updates in the first this many
        epochs (no gradients, so Adam neither steps nor keeps state for
        them); its BatchNorm layers stay in training mode, so their running
        statistics keep adapting to the training images.
    out_size : (int, int)
        ``(h, w)`` of the sampling grid, deformed image and logits.
    map_size : (int, int)
        ``(hd, wd)`` of the low-resolution view and of the density; default
        twice the grid's side (a finer map lets the oracle edge grid beat
        uniform by 1.3-2.2 mIoU(Y', Y) points on the labelled regions,
        against 0.3-1.1 at half the grid's side; docs/benchmarks.md).
    sigma, support : float, int, optional
        Attraction kernel (defaults of :class:`~wsiseg.models.net.DeformSegNet`).
    sample_spacing_um : float, optional
        Physical mode: every training and validation region is sampled
        one node per this many micrometres (its grid is its extent over
        the spacing, :func:`wsiseg.sampling.geometry.physical_grid`), so
        regions of different resolutions and sizes are all seen at one
        scale, the one ``segment`` and ``evaluate`` then sample slides at.
        Every region needs an MPP (the images', ``--mpp`` or the pairs
        CSV's ``mpp`` column). ``None``: the pixel rule (each region gets
        the model's grid by the dynamic size rule, whatever its extent).
    sampler : {"learned", "uniform", "edge"}
        Learned deformation, or the paper's uniform / oracle edge baselines
        (no trainable deformation net; the edge term is then off).
    loss : {"focal", "ce"}
        Segmentation loss.
    gamma_edge : float
        Weight of the edge loss (paper: 100; default 10, which balances the
        two terms' gradients on the deformation net, docs/benchmarks.md).
    edge_norm : {"mean", "sum"}
        How density and edge target are normalised in the edge loss
        (:func:`wsiseg.models.losses.edge_loss`): unit mean, or unit sum
        (the paper's distributions).
    image_sampling : {"lod", "bilinear"}
        How training regions are sampled at the grid: level of detail, as
        ``wsiseg segment`` reads slides (default), or the paper's bilinear
        point samples at working resolution.
    joint : bool
        ``False`` gives the single-loss variant (edge loss off).
    epochs, batch_size : int
    lr : float
        Adam learning rate (paper A.7: 1e-3).
    step_size : int, optional
        Multiply the learning rate by ``lr_gamma`` every ``step_size``
        epochs; ``None``: constant.
    lr_gamma : float
    flips, rot90 : bool
        Random flips / 90-degree rotations of training regions.
    color_jitter : float
        Colour jitter strength (0: off).
    scale_jitter : float
        Scale augmentation (1: off). Each training batch is sampled on a
        grid whose sides are the region's grid times a factor drawn
        log-uniformly from ``[1 / scale_jitter, scale_jitter]`` (the density
        map and kernel follow, :func:`wsiseg.sampling.geometry.region_geometry`),
        so the segmenter sees its tissue at sample spacings around the
        trained one: a model trained at one spacing alone mislabels
        regions sampled 1.5x denser (docs/demo-model.md). Validation uses
        the region's own grid.
    val_fraction : float
        Fraction of the training pairs held out for validation (used by
        the caller when splitting).
    patience : int, optional
        Stop after this many epochs without validation improvement
        (``None`` or 0: never).
    min_delta : float
        Improvement smaller than this does not count.
    monitor : {"full", "deformed"}
        Which validation mIoU selects the best model.
    seed : int
    device : str
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:1"``, ``"mps"``.
    amp : bool, optional
        Mixed precision; ``None``: on for CUDA only.
    deterministic : bool
        Deterministic cuDNN kernels (CUDA; CPU is deterministic already).
    hr_size : (int, int)
        Working-resolution size ``(H, W)`` of the training regions (used by
        the caller when building the data set).
    regions : {"tissue", "whole"}
        Which regions of the labelled images the data set yields.
    num_workers : int
        DataLoader worker processes.
    ignore_index : int
        Label value excluded from losses and metrics.
    """

    arch: str = "unet"
    encoder: str = "resnet18"
    encoder_depth: int | None = None
    decoder_channels: tuple[int, ...] | None = None
    encoder_weights: str | None = None
    freeze_encoder_epochs: int = 0
    out_size: tuple[int, int] = (64, 64)
    map_size: tuple[int, int] = (128, 128)
    sigma: float | None = None
    support: int | None = None
    sampler: str = "learned"
    loss: str = "focal"
    gamma_edge: float = 10.0
    edge_norm: str = "mean"
    image_sampling: str = "lod"
    joint: bool = True
    epochs: int = 50
    batch_size: int = 4
    lr: float = 1e-3
    step_size: int | None = None
    lr_gamma: float = 0.1
    flips: bool = True
    rot90: bool = False
    color_jitter: float = 0.0
    scale_jitter: float = 1.0
    sample_spacing_um: float | None = None
    val_fraction: float = 0.2
    patience: int | None = 10
    min_delta: float = 0.0
    monitor: str = "full"
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    deterministic: bool = True
    hr_size: tuple[int, int] = (512, 512)
    regions: str = "tissue"
    num_workers: int = 0
    ignore_index: int = 255

    def __post_init__(self) -> None:
        for key in ("arch", "encoder"):
            v = getattr(self, key)
            if not isinstance(v, str) or not v.strip():
                raise _bad(key, "must be a non-empty name", v)
        self.encoder_depth = _as_int("encoder_depth", self.encoder_depth, 1, optional=True)
        if self.decoder_channels is not None:
            dc = self.decoder_channels
            if isinstance(dc, str):
                dc = [p for p in dc.replace(",", " ").split() if p]
            if not isinstance(dc, (list, tuple)) or not dc:
                raise _bad("decoder_channels", "must be a list of positive integers or null", self.decoder_channels)
            self.decoder_channels = tuple(_as_int("decoder_channels", c, 1) for c in dc)
        if self.encoder_weights is not None:
            w = self.encoder_weights
            w = os.fspath(w) if isinstance(w, os.PathLike) else w
            if not isinstance(w, str) or not w.strip():
                raise _bad("encoder_weights", "must be imagenet, the path of a weights file, or null", w)
            self.encoder_weights = IMAGENET if w.strip().lower() == IMAGENET else w
        self.freeze_encoder_epochs = _as_int("freeze_encoder_epochs", self.freeze_encoder_epochs, 0)
        for key in ("out_size", "map_size", "hr_size"):
            setattr(self, key, _as_pair(key, getattr(self, key)))
        self.sigma = _as_float("sigma", self.sigma, 0.0, open_lo=True, optional=True)
        self.support = _as_int("support", self.support, 1, optional=True)
        if self.support is not None and self.support % 2 == 0:
            raise _bad("support", "must be odd", self.support)
        self.sampler = _as_choice("sampler", self.sampler, SAMPLERS)
        self.loss = _as_choice("loss", self.loss, LOSS_NAMES)
        self.gamma_edge = _as_float("gamma_edge", self.gamma_edge, 0.0)
        self.edge_norm = _as_choice("edge_norm", self.edge_norm, EDGE_NORMS)
        self.image_sampling = _as_choice("image_sampling", self.image_sampling, IMAGE_SAMPLING)
        self.joint = _as_bool("joint", self.joint)
        self.epochs = _as_int("epochs", self.epochs, 1)
        self.batch_size = _as_int("batch_size", self.batch_size, 1)
        self.lr = _as_float("lr", self.lr, 0.0, open_lo=True)
        self.step_size = _as_int("step_size", self.step_size, 1, optional=True)
        self.lr_gamma = _as_float("lr_gamma", self.lr_gamma, 0.0, 1.0, open_lo=True)
        self.flips = _as_bool("flips", self.flips)
        self.rot90 = _as_bool("rot90", self.rot90)
        self.color_jitter = _as_float("color_jitter", self.color_jitter, 0.0, 1.0)
        self.scale_jitter = _as_float("scale_jitter", self.scale_jitter, 1.0, 4.0)
        self.sample_spacing_um = _as_float("sample_spacing_um", self.sample_spacing_um, 0.0, MAX_SAMPLE_SPACING_UM,
                                           open_lo=True, optional=True)
        self.val_fraction = _as_float("val_fraction", self.val_fraction, 0.0, 1.0, open_hi=True)
        self.patience = _as_int("patience", self.patience, 0, optional=True) or None
        self.min_delta = _as_float("min_delta", self.min_delta, 0.0)
        self.monitor = _as_choice("monitor", self.monitor, ("full", "deformed"))
        self.seed = _as_int("seed", self.seed, 0)
        if not isinstance(self.device, str):
            raise _bad("device", "must be auto, cpu, cuda, cuda:N or mps", self.device)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise _bad("device", "must be auto, cpu, cuda, cuda:N or mps", self.device) from None
        self.amp = _as_bool("amp", self.amp, optional=True)
        self.deterministic = _as_bool("deterministic", self.deterministic)
        self.regions = _as_choice("regions", self.regions, ("tissue", "whole"))
        self.num_workers = _as_int("num_workers", self.num_workers, 0)
        self.ignore_index = _as_int("ignore_index", self.ignore_index)

    @property
    def effective_gamma_edge(self) -> float:
        """Edge-loss weight actually used: 0 for the single-loss variant and fixed samplers."""
        return self.gamma_edge if self.joint and self.sampler == "learned" else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (tuples as lists); inverse of :meth:`from_dict`."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build and validate a config; unknown keys are refused.

        Raises
        ------
        ConfigError
            Naming the unknown or invalid key.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"training config must be a mapping of options, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(
                f"unknown training option {unknown[0]!r}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                + f"; known options: {', '.join(sorted(known))}"
            )
        return cls(**dict(data))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a YAML or JSON file, see :func:`load_train_config`."""
        return cls.from_dict(load_train_config(path))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as YAML, atomically."""
        import yaml

        with atomic_output(path, overwrite=True) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return Path(path)


def load_train_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read training options from a YAML (or JSON) file.

    The file is a mapping of :class:`TrainConfig` options; a mapping with a
    single ``train:`` section (a shared config file) is also accepted.
    Values are not validated here (see :meth:`TrainConfig.from_dict`).
    """
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read training config: {exc.strerror or exc}", p) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {str(exc).splitlines()[0]}", p) from exc
    if data is None:
        return {}
    if isinstance(data, dict) and isinstance(data.get("train"), dict) and len(data) == 1:
        data = data["train"]
    if not isinstance(data, dict):
        raise ConfigError("training config must be a mapping of options", p)
    return data


# ---------------------------------------------------------------------------
# model, device, seeding
# ---------------------------------------------------------------------------


def build_net(
    config: TrainConfig, num_classes: int, in_channels: int = 3, *, pretrained: bool = True
) -> DeformSegNet:
    """The untrained :class:`DeformSegNet` a config describes.

    Parameters
    ----------
    config : TrainConfig
    num_classes, in_channels : int
    pretrained : bool
        Load ``config.encoder_weights`` into the encoder (when set);
        ``False`` leaves it random (a resumed run takes every weight from
        its checkpoint). ``net.segmenter.encoder_init`` says what was loaded.

    Raises
    ------
    ModelConfigError
        (a :class:`ConfigError`) for an unknown architecture/encoder, an
        invalid combination, or encoder weights that cannot be had.
    """
    kwargs: dict[str, Any] = {}
    if config.encoder_depth is not None:
        kwargs["encoder_depth"] = config.encoder_depth
    if config.decoder_channels is not None:
        kwargs["decoder_channels"] = list(config.decoder_channels)
    elif config.encoder_depth is not None and config.arch.lower() in ("unet", "unetplusplus"):
        # smp wants one decoder width per encoder stage; keep its shallow end.
        kwargs["decoder_channels"] = list(_UNET_DECODER[-config.encoder_depth :])
    if pretrained and config.encoder_weights is not None:
        kwargs["encoder_weights"] = config.encoder_weights
    seg = build_segmenter(config.arch, config.encoder, num_classes=num_classes, in_channels=in_channels, **kwargs)
    return DeformSegNet(
        seg,
        sampler=config.sampler,
        map_size=config.map_size,
        out_size=config.out_size,
        sigma=config.sigma,
        support=config.support,
        in_channels=in_channels,
        image_sampling=config.image_sampling,
    )


def _amp_settings(config: TrainConfig, device: torch.device) -> tuple[bool, torch.dtype, bool]:
    """(enabled, autocast dtype, use grad scaler)."""
    enabled = config.amp if config.amp is not None else device.type == "cuda"
    if not enabled:
        return False, torch.float32, False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return True, torch.float16, True  # fp16 gradients underflow without loss scaling
    return True, torch.bfloat16, False


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def training_geometry(
    net: DeformSegNet, shape: tuple[int, int], mpp: float | None, spacing_um: float | None, factor: float = 1.0
) -> SamplingGeometry:
    """The geometry a training or validation region of ``shape`` is sampled with.

    Parameters
    ----------
    net : DeformSegNet
    shape : (int, int)
        ``(h, w)`` of the region's working raster.
    mpp : float or None
        Micrometres per working pixel of the region.
    spacing_um : float or None
        ``TrainConfig.sample_spacing_um``: physical mode (``mpp`` required),
        else the pixel rule.
    factor : float
        Scale augmentation (``TrainConfig.scale_jitter``): ``factor`` times
        as densely per axis (``scale`` of
        :func:`wsiseg.sampling.geometry.region_geometry`).

    Returns
    -------
    SamplingGeometry
        With ``factor`` 1, what ``evaluate`` and ``segment`` give the same
        region (:meth:`DeformSegNet.geometry`).
    """
    h, w = shape
    if spacing_um is not None:
        if mpp is None:
            raise WsisegError("sample_spacing_um needs an MPP for every training region (the images', --mpp or "
                              "an mpp column in the pairs CSV)")
        return net.geometry(h, w, physical=PhysicalScale(mpp, spacing_um), scale=factor)
    return net.geometry(h, w, scale=factor)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Depends only on (seed, epoch): the shuffle of an epoch is the same
    # whether or not the run was resumed before it.
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1))
    return g


# ---------------------------------------------------------------------------
# data plumbing
# ---------------------------------------------------------------------------


class _Augmented(Dataset):
    """Training items augmented with an RNG derived from (seed, epoch, index)."""

    def __init__(self, base: Dataset, config: TrainConfig):
        self.base = base
        self.seed = config.seed
        self.epoch = 0
        self.flips, self.rot90, self.color_jitter = config.flips, config.rot90, config.color_jitter
        self.active = config.flips or config.rot90 or config.color_jitter > 0
        self._augment = None
        if self.active:
            from wsiseg.data import augment  # the data side owns the augmentations

            self._augment = augment

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        if not self.active:
            return item
        item = dict(item)
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        item["image"], item["labels"] = self._augment(
            item["image"], item["labels"], rng, flips=self.flips, rot90=self.rot90, color_jitter=self.color_jitter
        )
        return item


def _collate(items: list[dict]) -> dict:
    """Stack images and labels; keep names (boxes may be None, so no default_collate)."""
    try:
        image = torch.stack([torch.as_tensor(it["image"]) for it in items])
        labels = torch.stack([torch.as_tensor(it["labels"]).long() for it in items])
    except RuntimeError as exc:
        shapes = sorted({tuple(torch.as_tensor(it["image"]).shape) for it in items})
        raise WsisegError(
            f"training regions in one batch differ in size {shapes}"
        ) from exc
    from wsiseg.data import known_mpp

    return {"image": image, "labels": labels, "name": [str(it.get("name", "")) for it in items],
            "mpp": [known_mpp(it) for it in items]}


def _to_float(image: torch.Tensor) -> torch.Tensor:
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()


def _check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int, names: list[str]) -> None:
    valid = labels[labels != ignore_index]
    if valid.numel() == 0:
        return
    lo, hi = int(valid.min()), int(valid.max())
    if lo < 0 or hi >= num_classes:
        bad = hi if hi >= num_classes else lo
        raise WsisegError(
            f"label value {bad} in {', '.join(n for n in names if n) or 'a training region'} is not a class "
            f"index in 0..{num_classes - 1} (or the ignore value {ignore_index})"
        )


def _item_shape(ds: Dataset, i: int) -> tuple[int, int]:
    """Unpadded ``(h, w)`` of item ``i``, from the data set's own description when it has one."""
    shape_of = getattr(ds, "item_shape", None)
    if callable(shape_of):
        return tuple(int(v) for v in shape_of(i))  # type: ignore[return-value]
    items = getattr(ds, "items", None)
    if items is not None and hasattr(items[i], "shape"):
        return tuple(int(v) for v in items[i].shape)  # type: ignore[return-value]
    base = getattr(ds, "base", None)
    if base is not None:
        return _item_shape(base, i)
    return tuple(int(v) for v in torch.as_tensor(ds[i]["labels"]).shape[-2:])  # type: ignore[return-value]


def _item_mpp(ds: Dataset, i: int) -> tuple[float | None, str]:
    """Micrometres per working pixel of item ``i`` and its source, from the data set's description.

    A data set that describes itself (``item_mpp``, :class:`wsiseg.data.RegionDataset`) or wraps one
    (``base``) is asked without reading pixels; a list of item dicts by their ``mpp``; anything else
    is unknown.
    """
    describe = getattr(ds, "item_mpp", None)
    if describe is not None:
        return describe(i)
    base = getattr(ds, "base", None)
    if base is not None:
        return _item_mpp(base, i)
    if isinstance(ds, (list, tuple)):
        from wsiseg.data import known_mpp

        mpp = known_mpp(ds[i])
        return (mpp, "items") if mpp is not None else (None, "unknown")
    return None, "unknown"


def training_scale(net: DeformSegNet, ds: Dataset, spacing_um: float | None = None) -> ModelScale:
    """The physical scale of training on ``ds`` with ``net``'s geometry (:func:`~wsiseg.models.scale.measure_scale`).

    ``spacing_um``: physical-mode training (``TrainConfig.sample_spacing_um``), recorded as it is.

    Raises
    ------
    WsisegError
        Physical mode with a region whose MPP is unknown.
    """
    regions = [(_item_shape(ds, i), *_item_mpp(ds, i)) for i in range(len(ds))]
    if spacing_um is not None:
        missing = sum(mpp is None for _, mpp, _ in regions)
        if missing:
            raise WsisegError(f"sample_spacing_um needs an MPP for every training region; {missing} of "
                              f"{len(regions)} have none (give --mpp or an mpp column in the pairs CSV)")
    return measure_scale(regions, net.geometry, spacing_um)


def _say_scale(say: Callable[[str], None], scale: ModelScale) -> None:
    if not scale.known:
        say("no MPP known for the training regions: the model records no physical scale and segments by pixel "
            "size (pass --mpp or an mpp column to record it)")
        return
    missing = f"; {scale.regions_without_mpp} regions without MPP left out" if scale.regions_without_mpp else ""
    say(f"scale: {scale.mpp_working:.4g} um per working pixel, one sample every {scale.sample_spacing_um:.4g} um "
        f"({scale.source}, {scale.regions} regions{missing})")


def size_batches(
    shapes: Sequence[tuple],
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    alone: Callable[[tuple[int, int]], bool] | None = None,
) -> list[list[int]]:
    """Batches of item indices whose shapes agree, so regions are never padded.

    Parameters
    ----------
    shapes : sequence of tuple
        Shape of every item (``(h, w)``, or any key items of one batch
        must share, e.g. ``(h, w, mpp)``).
    batch_size : int
    shuffle : bool
        Shuffle the items (within each shape) and the order of the batches,
        with ``generator`` only: the batches of an epoch depend on nothing
        else, so a resumed run sees the same ones.
    generator : torch.Generator, optional
    alone : callable, optional
        ``alone(shape)``: whether a batch of one item of that shape can
        train (:func:`trains_alone`). When shuffling (training), a batch of
        one item whose shape cannot is dropped.

    Returns
    -------
    list of list of int
        Every index exactly once, but for the dropped batches of one item.
        When shuffling, a last batch of one item in a shape that has more
        than ``batch_size`` items is dropped (a batch of one breaks
        BatchNorm in training; the shuffle puts another item last next
        epoch), and so is any batch of one whose shape ``alone`` refuses.
    """
    n = len(shapes)
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    groups: dict[tuple, list[int]] = {}
    for i in order:
        groups.setdefault(tuple(shapes[i]), []).append(i)
    batches: list[list[int]] = []
    for shape, idx in groups.items():
        chunks = [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)]
        if shuffle and alone is not None and not alone(shape):
            chunks = [c for c in chunks if len(c) > 1]
        elif shuffle and len(idx) > batch_size and len(chunks[-1]) == 1:
            chunks.pop()
        batches.extend(chunks)
    if shuffle:
        batches = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


# BatchNorm's refusal of a batch with one value per channel, and why it happens here.
_BATCHNORM_ALONE = "more than 1 value per channel"
_ALONE_WHY = "BatchNorm needs more than one value per channel; the grid is too small for the encoder's depth"


def trains_alone(net: DeformSegNet, shape: tuple[int, int], geometry: SamplingGeometry | None = None) -> bool:
    """Whether a batch of one region of ``shape`` can train ``net``.

    BatchNorm in training needs more than one value per channel; with one
    region, a layer whose maps are ``1 x 1`` (a small grid at the deepest
    encoder level, DeepLab's image pooling) fails. The deformation net and
    the segmenter run at the region's geometry on the meta device: shapes
    only, no memory and no arithmetic.

    Parameters
    ----------
    net : DeformSegNet
    shape : (int, int)
        ``(h, w)`` of the region's working raster.
    geometry : SamplingGeometry, optional
        The region's geometry (default: :meth:`DeformSegNet.geometry` of
        ``shape``, the pixel rule).

    Returns
    -------
    bool
        False when BatchNorm would refuse; True otherwise (also when a
        layer cannot run on the meta device: the real step then tells).
    """
    from torch.func import functional_call

    geometry = geometry if geometry is not None else net.geometry(int(shape[0]), int(shape[1]))
    parts = [(net.segmenter, geometry.grid)] + ([(net.deform, geometry.map)] if net.deform is not None else [])
    for module, (h, w) in parts:
        tensors = (*module.named_parameters(), *module.named_buffers())
        state = {k: torch.empty_like(v, device="meta") for k, v in tensors}
        was_training = module.training
        module.train()
        try:
            functional_call(module, state, (torch.empty(1, net.in_channels, h, w, device="meta"),))
        except ValueError as exc:
            return _BATCHNORM_ALONE not in str(exc)
        except (RuntimeError, NotImplementedError, TypeError):
            return True
        finally:
            module.train(was_training)
    return True


def _alone_checker(net: DeformSegNet, ds: Dataset, config: TrainConfig, say: Callable[[str], None]):
    """:func:`trains_alone` for the training set's shapes, cached; says how many regions it leaves out.

    Raises
    ------
    WsisegError
        Every training region would be left out.
    """
    cache: dict[tuple, bool] = {}

    def alone(key: tuple) -> bool:
        if key not in cache:
            shape = (int(key[0]), int(key[1]))
            mpp = key[2] if len(key) > 2 else None
            cache[key] = trains_alone(net, shape, training_geometry(net, shape, mpp, config.sample_spacing_um))
        return cache[key]

    shapes = [_batch_key(ds, i, config) for i in range(len(ds))]
    lone = _lone_regions(shapes, config.batch_size, alone)
    why = f"a batch of one region of their shape cannot train ({_ALONE_WHY})"
    if shapes and lone == len(shapes):
        raise WsisegError(
            f"no training batch can run: {why}; use --batch-size 2 or more with regions of equal shape, "
            "or a larger --out-size"
        )
    if lone:
        say(f"warning: {lone} of {len(shapes)} training regions are left out: each is alone in its batch and {why}")
    return alone


def _batch_key(ds: Dataset, i: int, config: TrainConfig) -> tuple:
    """What item ``i`` must share with the others of its batch: its shape, and in physical mode its MPP."""
    shape = _item_shape(ds, i)
    return (*shape, _item_mpp(ds, i)[0]) if config.sample_spacing_um is not None else shape


def _lone_regions(shapes: Sequence[tuple], batch_size: int, alone: Callable[[tuple], bool]) -> int:
    """How many training regions :func:`size_batches` leaves out every epoch because they cannot train alone."""
    counts: dict[tuple, int] = {}
    for s in shapes:
        counts[tuple(s)] = counts.get(tuple(s), 0) + 1
    return sum(n for s, n in counts.items() if (n == 1 or batch_size == 1) and not alone(s))


def _make_loader(
    ds: Dataset, config: TrainConfig, *, shuffle: bool, generator: torch.Generator, device, alone=None
) -> DataLoader:
    shapes = [_batch_key(ds, i, config) for i in range(len(ds))]
    return DataLoader(
        ds,
        batch_sampler=size_batches(shapes, config.batch_size, shuffle=shuffle, generator=generator, alone=alone),
        num_workers=config.num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )


# ---------------------------------------------------------------------------
# checkpoints: safetensors + JSON structure, never pickles
# ---------------------------------------------------------------------------

_TENSOR, _TUPLE, _ITEMS, _NDARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"


def _pack(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of ``obj`` with tensors moved to ``tensors`` by name.

    Tuples, non-string dict keys (optimizer state is keyed by int) and
    numpy arrays (numpy's RNG state) are tagged so :func:`_unpack` restores
    them exactly.
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {_NDARRAY: prefix, "dtype": obj.dtype.str}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _pack(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
        if not all(isinstance(k, (str, int, float, bool)) or k is None for k in obj):
            raise TypeError(f"cannot store dict keys of type {sorted({type(k).__name__ for k in obj})}")
        return {_ITEMS: [[k, _pack(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_pack(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_pack(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _unpack(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _NDARRAY in obj:
            return tensors[obj[_NDARRAY]].numpy().astype(np.dtype(obj["dtype"]))
        if _TUPLE in obj:
            return tuple(_unpack(v, tensors) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {k: _unpack(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in cuda])


@dataclass
class Checkpoint:
    """A training checkpoint read back from disk.

    Attributes
    ----------
    meta : dict
        Counters, scores, history, config, classes, data hash.
    model : dict of str -> torch.Tensor
        The net's state dict.
    state : dict
        ``optimizer``, ``scheduler`` (or None), ``scaler`` and ``rng`` states,
        in the form their ``load_state_dict``/setters take.
    """

    meta: dict
    model: dict
    state: dict


def save_checkpoint(
    path: str | os.PathLike,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    meta: dict,
) -> Path:
    """Write a training checkpoint (one safetensors file), atomically.

    Parameters
    ----------
    path : path-like
    net, optimizer, scheduler, scaler
        Their ``state_dict()`` is stored (``scheduler``/``scaler`` may be None).
    meta : dict
        JSON-able counters and provenance (epoch, step, best, history, ...).

    Notes
    -----
    Model weights are stored as ``model/<key>``; optimizer, scheduler,
    scaler and RNG states are walked recursively: their tensors become
    ``state/...`` tensors and the rest (param groups, step counts, Python
    and numpy RNG words) JSON in the header, so loading never unpickles.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {
        f"model/{k}": v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()
    }
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": _rng_state(),
    }
    doc = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        **meta,
        "state": _pack(state, "state", tensors),
    }
    text = json.dumps(doc, sort_keys=True)
    with atomic_output(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: text})
    return Path(path)


def _read_checkpoint_meta(path: Path) -> tuple[dict, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        doc = loads_json(header[_META_KEY])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise WsisegError(f"not a readable wsiseg training checkpoint ({str(exc).strip()[:200]})", path) from exc
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise WsisegError("not a wsiseg training checkpoint", path)
    version = doc.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:  # bool is an int: refuse true
        raise WsisegError(f"invalid checkpoint format version {version!r} (expected an integer >= 1)", path)
    if version > CHECKPOINT_VERSION:
        raise WsisegError(f"checkpoint format version {version!r} is newer than this wsiseg understands", path)
    return doc, doc.pop("state", None)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (onto the CPU).

    Raises
    ------
    WsisegError
        Missing, damaged, not a checkpoint, or from a newer wsiseg.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise WsisegError("checkpoint not found", p)
    meta, packed = _read_checkpoint_meta(p)
    try:
        tensors = load_file(str(p), device="cpu")
        state = _unpack(packed, tensors) if packed is not None else {}
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
        raise WsisegError(f"damaged training checkpoint ({str(exc).strip()[:200]})", p) from exc
    model = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    return Checkpoint(meta=meta, model=model, state=state)


def check_output_dir(out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> bool:
    """Check that a run may write to ``out_dir``; True when it will resume from a checkpoint there.

    Cheap, so a command line can call it before loading any data.

    Raises
    ------
    WsisegError
        ``out_dir`` holds a previous run (a checkpoint or model) and neither
        ``resume`` nor ``overwrite`` is set, or it is a file.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise WsisegError("output folder is a file", out)
    has_ckpt = (out / CHECKPOINT_NAME).is_file()
    if resume and not has_ckpt and not overwrite and (out / MODEL_NAME).exists():
        raise WsisegError("holds a model but no checkpoint to resume from; use --overwrite to start afresh", out)
    if resume:
        return has_ckpt
    if not overwrite and (has_ckpt or (out / MODEL_NAME).exists()):
        raise WsisegError(
            "holds a previous training run; use --resume to continue it, --overwrite to replace it, "
            "or choose another output folder",
            out,
        )
    return False


def read_checkpoint_config(out_dir: str | os.PathLike) -> dict | None:
    """The training config stored in ``out_dir``'s checkpoint, or None without one.

    Lets ``wsiseg train --resume`` continue with the options of the
    interrupted run when none are given again.
    """
    p = Path(out_dir) / CHECKPOINT_NAME
    if not p.is_file():
        return None
    meta, _ = _read_checkpoint_meta(p)
    cfg = meta.get("config")
    return dict(cfg) if isinstance(cfg, dict) else None


# ---------------------------------------------------------------------------
# log and curves
# ---------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _write_log(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    with atomic_output(path, overwrite=True) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(LOG_COLUMNS)
        for row in history:
            w.writerow([_fmt(row.get(c)) for c in LOG_COLUMNS])


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / max(target, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= m * mag:
            return m * mag
    return 10.0 * mag


def chart_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About ``target`` round tick values (1, 2, 5 x 10^k steps) covering ``[lo, hi]`` of a chart axis."""
    step = _nice_step(hi - lo, target)
    first = math.ceil(lo / step - 1e-9) * step
    out, v = [], first
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


def tick_label(v: float) -> str:
    """A short axis label for tick value ``v`` (``"0"``, ``"0.25"``, ``"1e-04"``)."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.0e}"
    return f"{v:.4g}"


def chart_panel(
    draw, font, box, title: str, xs: Sequence[float], series, *, y_range=None, log_y=False,
    x_label: str = "epoch", integer_x: bool = True,
) -> None:
    """One chart into a Pillow ``draw``: title and legend above, axes, ticks, grid, lines with markers.

    Parameters
    ----------
    draw, font
        ``PIL.ImageDraw.Draw`` and the font of every label.
    box : (int, int, int, int)
        ``(x0, y0, x1, y1)`` of the panel in the image.
    title : str
    xs : sequence of float
        X of every point (shared by the series).
    series : sequence of (str, (int, int, int), sequence of float or None)
        Name, colour and y values; ``None`` or non-finite values leave gaps.
    y_range : (float, float), optional
        Fixed y range; default: the data's, padded.
    log_y : bool
        Logarithmic y axis.
    x_label : str
        Label under the x axis.
    integer_x : bool
        Integer x ticks (epochs); otherwise round fractional ones (costs).
    """
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 52, x1 - 12, y0 + 44, y1 - 34
    black, grey, dark = (0, 0, 0), (225, 225, 225), (60, 60, 60)
    draw.text(((left + right) // 2, y0 + 6), title, fill=black, font=font, anchor="mt")
    shown = [(n, c) for n, c, ys in series if any(v is not None and math.isfinite(v) for v in ys)]
    lx = left
    for name, color in shown:  # legend in one row above the plot, never over the data
        draw.line([(lx, y0 + 30), (lx + 16, y0 + 30)], fill=color, width=3)
        draw.text((lx + 20, y0 + 30), name, fill=black, font=font, anchor="lm")
        lx += 20 + int(draw.textlength(name, font=font)) + 16

    vals = [v for _, _, ys in series for v in ys if v is not None and math.isfinite(v) and (v > 0 or not log_y)]
    if y_range is not None:
        ylo, yhi = y_range
    elif vals:
        ylo, yhi = min(vals), max(vals)
        if log_y:
            ylo, yhi = math.log10(ylo), math.log10(yhi)
        if yhi - ylo < 1e-12:
            ylo, yhi = ylo - 0.5, yhi + 0.5
        pad = 0.05 * (yhi - ylo)
        ylo, yhi = ylo - pad, yhi + pad
        if not log_y and min(vals) >= 0:
            ylo = max(ylo, 0.0)
    else:
        ylo, yhi = 0.0, 1.0
    xlo, xhi = (min(xs), max(xs)) if xs else (1, 1)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1

    def px(x: float) -> float:
        return left + (x - xlo) / (xhi - xlo) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - ylo) / (yhi - ylo) * (bottom - top)

    if log_y:
        # Decades, plus 2 and 5 times them when fewer than three decades show.
        decades = range(math.floor(ylo), math.ceil(yhi) + 1)
        mult = (1.0,) if math.floor(yhi) - math.ceil(ylo) >= 2 else (1.0, 2.0, 5.0)
        yt = [math.log10(m * 10.0**e) for e in decades for m in mult]
    else:
        yt = chart_ticks(ylo, yhi)
    for t in yt:
        if ylo - 1e-9 <= t <= yhi + 1e-9:
            y = py(t)
            draw.line([(left, y), (right, y)], fill=grey)
            draw.line([(left - 4, y), (left, y)], fill=dark)
            label = tick_label(float(f"{10.0**t:.3g}") if log_y else t)
            draw.text((left - 6, y), label, fill=dark, font=font, anchor="rm")
    if integer_x:
        xt = [t for t in chart_ticks(xlo, xhi, 6) if float(t).is_integer() and xlo <= t <= xhi] or [xlo]
    else:
        xt = [t for t in chart_ticks(xlo, xhi, 5) if xlo - 1e-9 <= t <= xhi + 1e-9]
    for t in xt:
        x = px(t)
        draw.line([(x, bottom), (x, bottom + 4)], fill=dark)
        draw.text((x, bottom + 6), str(int(t)) if integer_x else tick_label(t), fill=dark, font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=dark)
    draw.text(((left + right) // 2, y1 - 4), x_label, fill=dark, font=font, anchor="mb")
    if not shown:
        draw.text(((left + right) // 2, (top + bottom) // 2), "no data", fill=dark, font=font, anchor="mm")

    # Drawn in reverse so the first (main) series ends up on top.
    for _name, color, ys in reversed(series):
        pts: list[tuple[float, float]] = []
        for i, (x, v) in enumerate(zip(xs, ys)):
            ok = v is not None and math.isfinite(v) and (v > 0 or not log_y)
            if ok:
                pts.append((px(x), py(math.log10(v) if log_y else v)))
            if (not ok or i == len(xs) - 1) and pts:  # a gap or the end: flush the segment
                if len(pts) > 1:
                    draw.line(pts, fill=color, width=2)
                for p in pts:
                    draw.ellipse([p[0] - 2.5, p[1] - 2.5, p[0] + 2.5, p[1] + 2.5], fill=color)
                pts = []


def draw_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, gamma_edge: float = 1.0) -> Path:
    """Draw training curves (loss terms; validation mIoU; deformation-net gradients) to a PNG with Pillow.

    Parameters
    ----------
    history : sequence of dict
        Rows with the :data:`LOG_COLUMNS` keys.
    path : path-like
        Output PNG, written atomically.
    gamma_edge : float
        Weight shown with the edge term (``gamma * edge``), so the three
        loss curves add up.
    """
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        font = ImageFont.load_default()
    xs = [int(r["epoch"]) for r in history]

    def col(name: str, scale: float = 1.0) -> list[float | None]:
        out = []
        for r in history:
            v = r.get(name)
            out.append(None if v is None else float(v) * scale)
        return out

    # A third panel when the run has a deformation net: which loss term steers it.
    grads = [("segmentation", (31, 119, 180), col("grad_seg")), ("edge", (255, 127, 14), col("grad_edge"))]
    has_grads = any(v for _, _, ys in grads for v in ys if v)
    w, h = (1320 if has_grads else 880), 320
    pw = w // 3 if has_grads else w // 2
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)

    losses = [("total", (20, 20, 20), col("loss")), ("seg", (31, 119, 180), col("seg"))]
    if gamma_edge > 0 and any(v for v in col("edge") if v):
        losses.append((f"{gamma_edge:g}*edge", (255, 127, 14), col("edge", gamma_edge)))
    pos = [v for _, _, ys in losses for v in ys if v is not None and math.isfinite(v) and v > 0]
    log_y = bool(pos) and max(pos) / min(pos) > 30
    chart_panel(draw, font, (0, 0, pw, h), "training loss" + (" (log)" if log_y else ""), xs, losses, log_y=log_y)
    mious = [
        ("full res", (214, 39, 40), col("val_miou_full")),
        ("deformed", (44, 160, 44), col("val_miou_deformed")),
    ]
    chart_panel(draw, font, (pw, 0, 2 * pw, h), "validation mIoU", xs, mious, y_range=(0.0, 1.0))
    if has_grads:
        chart_panel(draw, font, (2 * pw, 0, w, h), "deformation-net gradient norm (log)", xs, grads, log_y=True)
    with atomic_output(path, overwrite=True) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


@dataclass
class _Scores:
    miou_deformed: float | None
    miou_full: float | None
    classes_present: int


@torch.no_grad()
def _validate(net: DeformSegNet, loader: DataLoader, num_classes: int, config: TrainConfig, device, amp) -> _Scores:
    """mIoU in the deformed space and at full working resolution."""
    from wsiseg.sampling.reverse import reverse_sample

    enabled, dtype, _ = amp
    cm_def = ConfusionMatrix(num_classes, config.ignore_index)
    cm_full = ConfusionMatrix(num_classes, config.ignore_index)
    net.eval()
    for batch in loader:
        image = _to_float(batch["image"].to(device, non_blocking=True))
        labels = batch["labels"].to(device, non_blocking=True)
        _check_labels(labels, num_classes, config.ignore_index, batch["name"])
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled):
            geometry = training_geometry(net, (int(image.shape[-2]), int(image.shape[-1])), batch["mpp"][0],
                                         config.sample_spacing_um)
            out = net(None, image, labels, geometry=geometry, ignore_index=config.ignore_index)
        pred = out.logits.argmax(dim=1)
        cm_def.update(pred, out.labels)
        full = reverse_sample(pred, out.grid.float(), tuple(labels.shape[-2:]))
        cm_full.update(full, labels)
    present = int((cm_full.matrix.sum(axis=1) > 0).sum())

    def score(cm: ConfusionMatrix) -> float | None:
        v = cm.miou()
        return v if math.isfinite(v) else None

    return _Scores(score(cm_def), score(cm_full), present)


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


def _edge_gradient(net: DeformSegNet, edge: torch.Tensor, gamma: float) -> list[torch.Tensor] | None:
    """Gradient of ``gamma * L_e`` on the deformation net's parameters (None when there is none).

    The edge term reaches only the deformation net, so this is one small
    extra backward pass through it; the segmentation term's share is then the
    total gradient minus this (:func:`_gradient_norms`).
    """
    if net.deform is None or gamma == 0.0 or not edge.requires_grad:
        return None
    params = [p for p in net.deform.parameters() if p.requires_grad]
    grads = torch.autograd.grad(gamma * edge, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def _gradient_norms(net: DeformSegNet, g_edge: list[torch.Tensor] | None) -> torch.Tensor:
    """L2 norms ``(segmentation term, gamma * edge term)`` of the deformation net's gradient.

    Logged per epoch (``grad_seg``, ``grad_edge``) to show which term steers
    the sampler; call after ``backward`` of the total (unscaled gradients).
    """
    if net.deform is None:
        return torch.zeros(2, dtype=torch.float64)
    params = [p for p in net.deform.parameters() if p.requires_grad]
    # Summed on the parameters' device and read back once: one device sync per step, not one per tensor.
    sums = torch.zeros(2, dtype=torch.float64, device=params[0].device)
    for i, p in enumerate(params):
        total = p.grad if p.grad is not None else torch.zeros_like(p)
        e = g_edge[i] if g_edge is not None else torch.zeros_like(p)
        sums[0] += (total.double() - e.double()).square().sum()
        sums[1] += e.double().square().sum()
    return sums.sqrt().cpu()


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
        Fingerprint of the training data (``wsiseg.data.dataset_hash``),
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

    ckpt: Checkpoint | None = None
    if check_output_dir(out, resume=resume, overwrite=overwrite):
        ckpt = load_checkpoint(paths["checkpoint"])
        _check_resumable(ckpt.meta, cfg, classes, data_hash, paths["checkpoint"])
    elif resume:
        say(f"no checkpoint in {out}: starting a new run")

    device = resolve_device(cfg.device)
    amp = _amp_settings(cfg, device)
    if cfg.deterministic and device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    _seed_everything(cfg.seed)

    # A resumed run takes every weight from its checkpoint: no download, no weights file.
    net = build_net(cfg, num_classes, pretrained=ckpt is None).to(device)
    encoder_init = (ckpt.meta.get("encoder_init") if ckpt is not None else None) or net.segmenter.encoder_init
    encoder_params = list(find_encoder(net).parameters()) if cfg.freeze_encoder_epochs else []
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.step_size, cfg.lr_gamma) if cfg.step_size else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp[2]) if amp[2] else None
    criterion = JointLoss(cfg.loss, cfg.effective_gamma_edge, cfg.ignore_index, cfg.edge_norm)

    st = _RunState()
    if ckpt is not None:
        net.load_state_dict({k: v.to(device) for k, v in ckpt.model.items()}, strict=True)
        optimizer.load_state_dict(ckpt.state["optimizer"])
        if scheduler is not None and ckpt.state.get("scheduler"):
            scheduler.load_state_dict(ckpt.state["scheduler"])
        if scaler is not None and ckpt.state.get("scaler"):
            scaler.load_state_dict(ckpt.state["scaler"])
        _set_rng_state(ckpt.state["rng"])
        known = {f.name for f in dataclasses.fields(_RunState)}
        st = _RunState(**{k: v for k, v in ckpt.meta.get("run", {}).items() if k in known})
        say(f"resuming {out} after epoch {st.epoch} (step {st.step})")
        del ckpt
    elif cfg.encoder_weights is not None or cfg.freeze_encoder_epochs:
        frozen = f", frozen for {cfg.freeze_encoder_epochs} epochs" if cfg.freeze_encoder_epochs else ""
        say(f"encoder {cfg.encoder}: {describe_encoder_init(encoder_init)}{frozen}")

    # The physical scale goes into the model file, so segment samples slides as densely as training did.
    scale = training_scale(net, train_ds, cfg.sample_spacing_um)
    if cfg.sample_spacing_um is not None and has_val:
        training_scale(net, val_ds, cfg.sample_spacing_um)  # every validation region needs an MPP too
    _say_scale(say, scale)

    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / CONFIG_NAME)
    if not has_val:
        say("no validation split: the latest epoch is kept as the model and early stopping is off")

    if getattr(train_ds, "augmentation", None) and hasattr(train_ds, "set_epoch"):
        # A RegionDataset built with its own augmentation: do not augment twice.
        say("the training data set augments itself; flips/rot90/color_jitter of the config are not applied")
        train_set: Dataset = train_ds
    else:
        train_set = _Augmented(train_ds, cfg)
    alone = _alone_checker(net, train_set, cfg, say)
    val_loader = (
        _make_loader(val_ds, cfg, shuffle=False, generator=torch.Generator().manual_seed(0), device=device)
        if has_val
        else None
    )
    use_bar = progress and sys.stderr.isatty()

    def meta() -> dict:
        return {
            "config": cfg.to_dict(),
            "classes": _classes_json(classes),
            "data_hash": data_hash,
            "encoder_init": encoder_init,
            "run": dataclasses.asdict(st),
        }

    done = st.stopped_early or st.epoch >= cfg.epochs or (
        has_val and cfg.patience is not None and st.bad_epochs >= cfg.patience
    )
    if done:
        say(f"nothing to do: the run in {out} already finished after epoch {st.epoch}")

    while not done:
        epoch = st.epoch + 1
        if isinstance(train_set, _Augmented):
            train_set.epoch = epoch
        else:
            train_set.set_epoch(epoch)
        loader = _make_loader(
            train_set, cfg, shuffle=True, generator=_epoch_generator(cfg.seed, epoch), device=device, alone=alone
        )
        lr = float(optimizer.param_groups[0]["lr"])
        for p in encoder_params:  # frozen: no gradient, so Adam skips them (BatchNorm statistics still adapt)
            p.requires_grad_(epoch > cfg.freeze_encoder_epochs)
        net.train()
        # its own stream, so the shuffle (and runs without scale jitter) stay as they were
        jitter_rng = _epoch_generator(cfg.seed + 1, epoch)
        sums = torch.zeros(3, dtype=torch.float64)
        grad_sums = torch.zeros(2, dtype=torch.float64)
        n_steps = 0
        t0 = time.perf_counter()
        bar = None
        if use_bar:
            from tqdm import tqdm

            bar = tqdm(total=len(loader), desc=f"epoch {epoch}/{cfg.epochs}", unit="it", leave=False)
        try:
            for batch in loader:
                image = _to_float(batch["image"].to(device, non_blocking=True))
                labels = batch["labels"].to(device, non_blocking=True)
                _check_labels(labels, num_classes, cfg.ignore_index, batch["name"])
                try:
                    factor = 1.0
                    if cfg.scale_jitter > 1.0:
                        span = math.log(cfg.scale_jitter)
                        factor = math.exp(float(torch.empty(()).uniform_(-span, span, generator=jitter_rng)))
                    geometry = training_geometry(net, (int(image.shape[-2]), int(image.shape[-1])), batch["mpp"][0],
                                                 cfg.sample_spacing_um, factor)
                    with torch.autocast(device_type=device.type, dtype=amp[1], enabled=amp[0]):
                        out_ = net(None, image, labels, geometry=geometry, ignore_index=cfg.ignore_index)
                        terms = criterion(out_.logits, out_.labels, out_.d, out_.edge_target, out_.edge_valid)
                except ValueError as exc:  # a layer trains_alone could not foresee on the meta device
                    if _BATCHNORM_ALONE not in str(exc):
                        raise
                    raise WsisegError(f"cannot train on a batch of one region of shape {tuple(image.shape[-2:])}: "
                                      f"{_ALONE_WHY}; use --batch-size 2 or more, or a larger --out-size") from exc
                values = torch.stack([terms.total.detach(), terms.seg.detach(), terms.edge.detach()]).double().cpu()
                if not torch.isfinite(values).all():
                    what = "NaN" if torch.isnan(values).any() else "infinite"
                    kept = (
                        f"the last good checkpoint is kept at {paths['checkpoint']}"
                        if st.epoch > 0
                        else "no checkpoint was written yet (it diverged in the first epoch)"
                    )
                    raise WsisegError(
                        f"training diverged: loss is {what} at epoch {epoch} step {st.step + 1}; {kept} "
                        "(try a lower --lr)"
                    )
                optimizer.zero_grad(set_to_none=True)
                g_edge = _edge_gradient(net, terms.edge, criterion.gamma_edge)
                if scaler is not None:
                    scaler.scale(terms.total).backward()
                    scaler.unscale_(optimizer)  # true gradients for the norms below
                    grad_sums += _gradient_norms(net, g_edge)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    terms.total.backward()
                    grad_sums += _gradient_norms(net, g_edge)
                    optimizer.step()
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
        if scheduler is not None:
            scheduler.step()
        means = (sums / max(n_steps, 1)).tolist()
        grad_means = (grad_sums / max(n_steps, 1)).tolist()

        scores = _Scores(None, None, 0)
        if val_loader is not None:
            scores = _validate(net, val_loader, num_classes, cfg, device, amp)
            if scores.classes_present <= 1 and not st.warned_one_class:
                msg = (
                    f"the validation split has only {scores.classes_present} class: mIoU is computed over the "
                    "classes present and says little; use more or other validation data"
                )
                warnings.warn(msg, UserWarning, stacklevel=2)
                say(f"warning: {msg}")
                st.warned_one_class = True

        score = scores.miou_full if cfg.monitor == "full" else scores.miou_deformed
        if score is None or st.best_score is None:
            # Without a score the latest epoch is the best we know.
            improved = score is not None or st.best_score is None
        else:
            improved = score > st.best_score + cfg.min_delta
        st.epoch = epoch
        row = {
            "epoch": epoch,
            "step": st.step,
            "lr": lr,
            "loss": means[0],
            "seg": means[1],
            "edge": means[2],
            "grad_seg": grad_means[0] if net.deform is not None else None,
            "grad_edge": grad_means[1] if net.deform is not None else None,
            "val_miou_deformed": scores.miou_deformed,
            "val_miou_full": scores.miou_full,
            "sec_per_iter": sec_per_iter,
        }
        st.history.append(row)
        if improved:
            st.best_score, st.best_epoch = score, epoch
            st.best_miou_full, st.best_miou_deformed = scores.miou_full, scores.miou_deformed
            st.bad_epochs = 0
        else:
            st.bad_epochs += 1
        if has_val and cfg.patience is not None and st.bad_epochs >= cfg.patience:
            st.stopped_early = True

        if improved:
            _save_model(paths["model"], net, classes, cfg, st, data_hash, len(train_ds), len(val_ds) if has_val else 0,
                        encoder_init, scale)
        # The checkpoint goes after the model: a crash between the two at
        # worst repeats this epoch on resume.
        save_checkpoint(paths["checkpoint"], net, optimizer, scheduler, scaler, meta())
        _write_log(paths["log"], st.history)
        draw_curves(st.history, paths["curves"], gamma_edge=cfg.effective_gamma_edge)

        say(
            f"epoch {epoch}/{cfg.epochs}: loss {means[0]:.4g} (seg {means[1]:.4g}, edge {means[2]:.4g}), "
            f"lr {lr:.3g}, val mIoU full-res {_fmt(scores.miou_full) or 'n/a'}, "
            f"deformed {_fmt(scores.miou_deformed) or 'n/a'}, {sec_per_iter:.3g} s/it" + (" *" if improved else "")
        )
        if st.stopped_early:
            say(f"early stopping: no improvement of val mIoU ({cfg.monitor}) for {st.bad_epochs} epochs")
        done = st.stopped_early or st.epoch >= cfg.epochs

    return TrainResult(
        out_dir=out,
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


def _save_model(path: Path, net, classes, cfg: TrainConfig, st: _RunState, data_hash, n_train: int, n_val: int,
                encoder_init: dict, scale: ModelScale) -> None:
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
        }
    }
    save_deformseg(path, net, classes, extra=extra, overwrite=True)


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
