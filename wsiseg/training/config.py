"""The training configuration and what it decides: :class:`TrainConfig` (validated), YAML loading, the net it
builds (:func:`build_net`), mixed precision and the seeds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiseg.atomic import atomic_output
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.limits import MAX_GRID_ITERATIONS, MAX_SAMPLE_SPACING_UM
from wsiseg.models.losses import EDGE_NORMS, LOSS_NAMES
from wsiseg.models.net import IMAGE_SAMPLING, SAMPLERS, DeformSegNet
from wsiseg.models.pretrained import IMAGENET
from wsiseg.models.segmenter import NORMS, build_segmenter
from wsiseg.sampling.geometry import PhysicalScale, SamplingGeometry

__all__ = [
    "TrainConfig",
    "amp_settings",
    "build_net",
    "epoch_generator",
    "load_train_config",
    "seed_everything",
    "training_geometry",
]

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


def _as_float(
    key: str,
    v: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    open_lo: bool = False,
    open_hi: bool = False,
    optional: bool = False,
) -> float | None:
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
    freeze_bn_after : int, optional
        From the epoch after this one, every BatchNorm layer normalises with
        its running statistics, as at inference, and stops updating them.
        Training batches group regions of one shape (and MPP), so batch
        statistics are often one source's, and running statistics learnt
        that way fit no source well (docs/demo-model.md). ``None``: batch
        statistics throughout.
    norm : {"batch", "group", "frozen"}
        The segmenter's normalisation layers. ``"group"``: GroupNorm
        (:func:`wsiseg.models.segmenter.to_group_norm`), which normalises
        each region by its own statistics in training and at inference
        alike; BatchNorm's running statistics fit neither other sources
        nor other grid sizes than those it was trained on (docs/demo-model.md).
        With ``encoder_weights``, each GroupNorm starts from its pretrained
        BatchNorm's scale and shift. ``"frozen"``: for ``encoder_weights``,
        the encoder keeps its pretrained BatchNorm statistics as a fixed
        per-channel scale and shift
        (:class:`wsiseg.models.segmenter.FrozenBatchNorm`), the decoder gets
        GroupNorm.
    out_size : (int, int)
        ``(h, w)`` of the sampling grid, deformed image and logits.
    map_size : (int, int)
        ``(hd, wd)`` of the low-resolution view and of the density; default
        twice the grid's side (a finer map lets the oracle edge grid beat
        uniform by 1.3-2.2 mIoU(Y', Y) points on the labelled regions,
        against 0.3-1.1 at half the grid's side; docs/benchmarks.md).
    sigma, support : float, int, optional
        Attraction kernel (defaults of :class:`~wsiseg.models.net.DeformSegNet`).
    grid_iterations : int
        Attraction steps from density to grid (1: the paper's single
        attraction; more move the samples toward equidistribution of the
        density: :func:`wsiseg.sampling.grid.density_to_grid`).
    sample_spacing_um : float, optional
        Physical mode: every training and validation region is sampled
        one node per this many micrometres (its grid is its extent over
        the spacing, :func:`wsiseg.sampling.geometry.physical_grid`), so
        regions of different resolutions and sizes are all seen at one
        scale, the one ``segment`` and ``evaluate`` then sample slides at.
        Every region needs an MPP (the images', ``--mpp`` or the pairs
        CSV's ``mpp`` column). ``None``: the pixel rule (each region gets
        the model's grid by the dynamic size rule, whatever its extent).
    working_mpp : float, optional
        Read every training and validation region at this many
        micrometres per working pixel instead of fitting ``hr_size``
        (:func:`wsiseg.training.dataset.physical_shape`); physical mode
        only. With ``crop_size``, regions of every source then share one
        batch shape.
    crop_size : (int, int), optional
        Train on a random ``(h, w)`` window of each region's working raster,
        drawn afresh every epoch (validation sees whole regions); physical
        mode only, where a window's grid is its extent over the spacing.
        Training batches group items of one shape (and MPP), so without
        crops each source trains in batches of its own and BatchNorm's
        running statistics fit none of them (docs/demo-model.md); with
        ``working_mpp`` and ``crop_size`` every batch can mix sources. A
        region shorter than the window on a side keeps that side whole.
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
    freeze_bn_after: int | None = None
    norm: str = "batch"
    out_size: tuple[int, int] = (64, 64)
    map_size: tuple[int, int] = (128, 128)
    sigma: float | None = None
    support: int | None = None
    grid_iterations: int = 1
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
    working_mpp: float | None = None
    crop_size: tuple[int, int] | None = None
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
        self.freeze_bn_after = _as_int("freeze_bn_after", self.freeze_bn_after, 0, optional=True)
        self.norm = _as_choice("norm", self.norm, NORMS)
        for key in ("out_size", "map_size", "hr_size"):
            setattr(self, key, _as_pair(key, getattr(self, key)))
        self.sigma = _as_float("sigma", self.sigma, 0.0, open_lo=True, optional=True)
        self.support = _as_int("support", self.support, 1, optional=True)
        if self.support is not None and self.support % 2 == 0:
            raise _bad("support", "must be odd", self.support)
        self.grid_iterations = _as_int("grid_iterations", self.grid_iterations, 1)
        if self.grid_iterations > MAX_GRID_ITERATIONS:  # a model file refuses more: fail before training
            raise _bad("grid_iterations", f"must be at most {MAX_GRID_ITERATIONS}", self.grid_iterations)
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
        self.sample_spacing_um = _as_float(
            "sample_spacing_um", self.sample_spacing_um, 0.0, MAX_SAMPLE_SPACING_UM, open_lo=True, optional=True
        )
        self.working_mpp = _as_float(
            "working_mpp", self.working_mpp, 0.0, MAX_SAMPLE_SPACING_UM, open_lo=True, optional=True
        )
        if self.crop_size is not None:
            self.crop_size = _as_pair("crop_size", self.crop_size)
        for key in ("working_mpp", "crop_size"):
            if getattr(self, key) is not None and self.sample_spacing_um is None:
                raise _bad(key, "needs sample_spacing_um (physical mode)", getattr(self, key))
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


def build_net(config: TrainConfig, num_classes: int, in_channels: int = 3, *, pretrained: bool = True) -> DeformSegNet:
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
    if config.norm != "batch":
        kwargs["norm"] = config.norm
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
        grid_iterations=config.grid_iterations,
    )


def amp_settings(config: TrainConfig, device: torch.device) -> tuple[bool, torch.dtype, bool]:
    """(enabled, autocast dtype, use grad scaler)."""
    enabled = config.amp if config.amp is not None else device.type == "cuda"
    if not enabled:
        return False, torch.float32, False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return True, torch.float16, True  # fp16 gradients underflow without loss scaling
    return True, torch.bfloat16, False


def seed_everything(seed: int) -> None:
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
            raise WsisegError(
                "sample_spacing_um needs an MPP for every training region (the images', --mpp or "
                "an mpp column in the pairs CSV)"
            )
        return net.geometry(h, w, physical=PhysicalScale(mpp, spacing_um), scale=factor)
    return net.geometry(h, w, scale=factor)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Depends only on (seed, epoch): the shuffle of an epoch is the same
    # whether or not the run was resumed before it.
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1))
    return g
