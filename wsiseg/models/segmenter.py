"""Segmenter factory over segmentation-models-pytorch (smp).

Any smp architecture and encoder can segment the deformed image, chosen by
name. Encoders start from random weights; training may ask for initial
encoder weights (``encoder_weights``: smp's ImageNet download, strictly
opt-in, or a local file, see :mod:`wsiseg.models.pretrained`). A model
rebuilt from its :meth:`PaddedSegmenter.config` never downloads or reads
such a file: trained weights come from wsiseg model files.

smp models need input sizes divisible by the encoder's output stride (32
for most). The deformed image has whatever size the sampler was asked for
(e.g. ``36 x 800``), so :class:`PaddedSegmenter` pads the input up to a
multiple of the stride and crops the logits back.

Sizes (float32 parameters, 3 classes, smp 0.6): unet/resnet18 14.3 M
(57 MB), unet/mobilenet_v2 6.6 M (27 MB), unet/tu-mobilenetv3_small_100
3.6 M (14 MB), fpn/mobilenet_v2 4.2 M (17 MB), deeplabv3plus/mobilenet_v2
4.4 M (18 MB), pspnet/mobilenet_v2 2.3 M (9 MB), segformer/mit_b0 3.7 M
(15 MB), linknet/tu-mobilenetv3_small_100 1.4 M (5 MB). Use
:func:`count_parameters` for others.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsiseg.errors import ModelConfigError

__all__ = [
    "GROUPS",
    "NORMS",
    "FrozenBatchNorm",
    "freeze_batch_norm",
    "PaddedSegmenter",
    "available_architectures",
    "available_encoders",
    "build_segmenter",
    "count_parameters",
    "to_group_norm",
]


def _smp():
    # Imported lazily: smp pulls in timm and torchvision (about a second).
    import segmentation_models_pytorch as smp

    return smp


def available_architectures() -> list[str]:
    """Names of the smp architectures, lower case (``"unet"``, ``"fpn"``, ...)."""
    return sorted(_smp().MODEL_ARCHITECTURES_MAPPING)


@functools.lru_cache(maxsize=1)
def _native_encoders() -> tuple[str, ...]:
    return tuple(_smp().encoders.get_encoder_names())


def available_encoders() -> list[str]:
    """Names of smp's native encoders.

    Any timm model is also accepted as ``"tu-<timm name>"`` (e.g.
    ``"tu-mobilenetv3_small_100"``), see ``timm.list_models()``.
    """
    return list(_native_encoders())


def _check_encoder(encoder: str) -> None:
    if encoder.startswith("tu-"):
        import timm

        if timm.is_model(encoder[3:]):
            return
        raise ModelConfigError(
            f"unknown timm encoder {encoder!r}: {encoder[3:]!r} is not in timm.list_models(); "
            f"native encoders: {', '.join(available_encoders())}"
        )
    if encoder not in _native_encoders():
        raise ModelConfigError(
            f"unknown encoder {encoder!r}; available: {', '.join(available_encoders())}, "
            "or any timm model as 'tu-<name>'"
        )


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of a module.

    Multiply by 4 (float32) or 2 (float16) for the size of its weights.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# Normalisation layers a segmenter can be built with (:func:`build_segmenter`).
NORMS = ("batch", "group", "frozen")
# The most groups a GroupNorm layer gets (gcd with its channels): 8 suits the small decoders (16 channels).
GROUPS = 8


class FrozenBatchNorm(nn.Module):
    """A BatchNorm layer frozen at its running statistics: a per-channel scale and shift.

    ``y = x * weight + bias`` with ``weight = gamma / sqrt(var + eps)`` and
    ``bias = beta - mean * weight`` taken from the BatchNorm it replaces,
    both trainable. It normalises the same in training and at inference and
    never looks at the batch, so a pretrained encoder keeps the statistics
    it was trained with (ImageNet's) however small or mixed the batches
    are. timm's BatchNorm with a built-in activation keeps its dropout and
    activation after the affine.

    Parameters
    ----------
    bn : torch.nn.BatchNorm2d
        The layer to freeze (its running statistics and affine transform).
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        c = int(bn.num_features)
        mean = bn.running_mean.detach() if bn.running_mean is not None else torch.zeros(c)
        var = bn.running_var.detach() if bn.running_var is not None else torch.ones(c)
        gamma = bn.weight.detach() if bn.affine else torch.ones(c)
        beta = bn.bias.detach() if bn.affine else torch.zeros(c)
        scale = gamma / torch.sqrt(var + bn.eps)
        self.weight = nn.Parameter(scale.clone())
        self.bias = nn.Parameter((beta - mean * scale).clone())
        self.drop: nn.Module = getattr(bn, "drop", None) or nn.Identity()
        self.act: nn.Module = getattr(bn, "act", None) or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.weight.view(1, -1, 1, 1).to(x.dtype) + self.bias.view(1, -1, 1, 1).to(x.dtype)
        return self.act(self.drop(y))


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` inside ``module`` by a :class:`FrozenBatchNorm` of it, in place.

    Returns
    -------
    torch.nn.Module
        ``module`` itself.
    """
    return _replace_batch_norm(module, FrozenBatchNorm)


def _replace_batch_norm(module: nn.Module, make: Callable[[nn.BatchNorm2d], nn.Module]) -> nn.Module:
    """Replace every ``BatchNorm2d`` inside ``module`` by ``make(it)``, in place; ``module`` itself."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, make(child))
        else:
            _replace_batch_norm(child, make)
    return module


def to_group_norm(module: nn.Module, groups: int = GROUPS) -> nn.Module:
    """Replace every ``BatchNorm2d`` inside ``module`` by a ``GroupNorm`` of the same channels, in place.

    Each layer gets ``gcd(channels, groups)`` groups and the BatchNorm's
    affine transform (weight 1, bias 0 in a fresh net; a pretrained net's
    learnt scales and shifts, which is how pretrained detectors are moved
    to GroupNorm: the convolutions keep their weights, each layer's output
    its learnt scale). timm's BatchNorm with a built-in activation
    (``BatchNormAct2d``) becomes timm's ``GroupNormAct`` with the same
    activation and dropout modules.

    Parameters
    ----------
    module : torch.nn.Module
    groups : int
        The most groups a layer gets.

    Returns
    -------
    torch.nn.Module
        ``module`` itself.
    """

    def make(child: nn.BatchNorm2d) -> nn.Module:
        c = int(child.num_features)
        if hasattr(child, "act"):  # timm's BatchNormAct2d: keep its activation (and dropout)
            from timm.layers import GroupNormAct

            gn: nn.Module = GroupNormAct(c, math.gcd(c, groups), eps=child.eps, apply_act=False)
            gn.drop, gn.act = child.drop, child.act
        else:
            gn = nn.GroupNorm(math.gcd(c, groups), c, eps=child.eps, affine=True)
        if child.affine:
            # not strict: a timm activation with parameters of its own keeps them as they are
            gn.load_state_dict({"weight": child.weight.detach(), "bias": child.bias.detach()}, strict=False)
        return gn

    return _replace_batch_norm(module, make)


class PaddedSegmenter(nn.Module):
    """Run a segmentation model on any input size by padding and cropping.

    The input is padded on all four sides (as evenly as possible, so the
    content stays centred) to the next multiple of ``stride``, and the
    logits are cropped back to the input size.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(B, C, H, W)`` to ``(B, K, H, W)`` for ``H, W`` multiples of
        ``stride``.
    stride : int, optional
        Size multiple the model needs; default ``model.encoder.output_stride``
        when present, else 32.
    pad_mode : {"reflect", "replicate", "constant"}, default "reflect"
        How to pad. ``"reflect"`` falls back to ``"replicate"`` when the
        padding is not smaller than the input (reflection needs it).
    spec : dict, optional
        The arguments that rebuild the model with :func:`build_segmenter`
        (set by it); see :meth:`config`.

    Attributes
    ----------
    encoder_init : dict
        Where the encoder's weights came from when this module was built:
        ``{"source": "random"}``, or what
        :func:`wsiseg.models.pretrained.load_encoder_weights` returned.
        Not part of :meth:`config`; a model file records it in its metadata.

    Notes
    -----
    Some decoders (e.g. PAN, PSPNet's pooling, the ASPP image pooling of
    DeepLab in training mode with batch size 1) also need a minimum size
    or batch; padding does not change that.
    """

    def __init__(
        self, model: nn.Module, stride: int | None = None, pad_mode: str = "reflect", spec: dict | None = None
    ):
        super().__init__()
        if pad_mode not in ("reflect", "replicate", "constant"):
            raise ModelConfigError(f"pad_mode must be reflect, replicate or constant, got {pad_mode!r}")
        if stride is None:
            stride = int(getattr(getattr(model, "encoder", None), "output_stride", 32) or 32)
        if stride < 1:
            raise ModelConfigError(f"stride must be >= 1, got {stride}")
        self.model = model
        self.stride = int(stride)
        self.pad_mode = pad_mode
        self.spec = dict(spec) if spec else {}
        self.encoder_init: dict[str, Any] = {"source": "random"}

    @property
    def num_classes(self) -> int | None:
        """Number of output classes, when known."""
        return self.spec.get("num_classes")

    def config(self) -> dict[str, Any]:
        """Plain, JSON-able arguments of :func:`build_segmenter` that rebuild this model."""
        return {**self.spec, "pad_mode": self.pad_mode}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` for an input ``(B, C, H, W)`` of any size."""
        if x.ndim != 4:
            raise ValueError(f"expected (B, C, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph == 0 and pw == 0:
            return self.model(x)
        top, left = ph // 2, pw // 2
        pad = (left, pw - left, top, ph - top)
        mode = self.pad_mode
        if mode == "reflect" and (max(pad[:2]) >= w or max(pad[2:]) >= h):
            mode = "replicate"
        y = self.model(F.pad(x, pad, mode=mode))
        return y[..., top : top + h, left : left + w]

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_mode={self.pad_mode!r}"


def build_segmenter(
    arch: str = "unet",
    encoder: str = "resnet18",
    num_classes: int = 2,
    in_channels: int = 3,
    *,
    pad_mode: str = "reflect",
    encoder_weights: str | os.PathLike | None = None,
    norm: str = "batch",
    **kwargs: Any,
) -> PaddedSegmenter:
    """Build an smp segmentation model by name, offline, for any input size.

    Parameters
    ----------
    arch : str, default "unet"
        smp architecture (case-insensitive), see :func:`available_architectures`.
    encoder : str, default "resnet18"
        smp encoder, see :func:`available_encoders`, or ``"tu-<timm name>"``.
    num_classes : int, default 2
        Output channels (classes, background included).
    in_channels : int, default 3
        Input channels.
    pad_mode : str, default "reflect"
        See :class:`PaddedSegmenter`.
    encoder_weights : str or path-like, optional
        Initial encoder weights: ``"imagenet"`` (smp downloads them; only
        when asked) or a local state dict file, see
        :func:`wsiseg.models.pretrained.load_encoder_weights`. Not part of
        ``config()``; recorded in ``encoder_init``.
    norm : {"batch", "group", "frozen"}, default "batch"
        ``"group"`` replaces every BatchNorm layer by a GroupNorm
        (:func:`to_group_norm`): each region is normalised by its own
        statistics, in training and at inference alike, so they match
        whatever the batch holds and whatever the grid's size. Pretrained
        encoder weights are loaded first, into the BatchNorm encoder; each
        GroupNorm then takes its BatchNorm's learnt scale and shift (the
        running statistics are dropped). ``"frozen"``: the encoder's
        BatchNorm layers become :class:`FrozenBatchNorm` (their running
        statistics, ImageNet's with pretrained weights, folded into a
        trainable per-channel scale and shift), the decoder's GroupNorm;
        for pretrained encoders (docs/benchmarks.md: on the recipe it beat
        both GroupNorm throughout and random initialisation).
    **kwargs
        Passed to the smp model (e.g. ``decoder_channels``,
        ``encoder_depth``). Must be JSON-able for :meth:`PaddedSegmenter.config`.

    Returns
    -------
    PaddedSegmenter
        Randomly initialised model (but for ``encoder_weights``);
        ``config()`` gives the arguments.

    Raises
    ------
    ModelConfigError
        (a :class:`ValueError`) for an unknown architecture or encoder, an
        unsupported combination, or encoder weights that cannot be had
        (one line: missing or unfitting file, failed download).

    Examples
    --------
    >>> seg = build_segmenter("unet", "resnet18", num_classes=3)
    >>> seg(torch.rand(1, 3, 36, 80)).shape
    torch.Size([1, 3, 36, 80])
    """
    smp = _smp()
    arch_key = str(arch).lower()
    if arch_key not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise ModelConfigError(f"unknown architecture {arch!r}; available: {', '.join(available_architectures())}")
    _check_encoder(str(encoder))
    if num_classes < 1 or in_channels < 1:
        raise ModelConfigError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
    try:
        model = smp.create_model(
            arch_key,
            encoder_name=encoder,
            encoder_weights=None,
            in_channels=int(in_channels),
            classes=int(num_classes),
            **kwargs,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelConfigError(f"cannot build {arch_key} with encoder {encoder!r}: {exc}") from exc
    if norm not in NORMS:
        raise ModelConfigError(f"unknown norm {norm!r}; available: {', '.join(NORMS)}")
    spec = {
        "arch": arch_key,
        "encoder": str(encoder),
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        **kwargs,
    }
    init = None
    if encoder_weights is not None:  # into the BatchNorm encoder the weights were made for
        from wsiseg.models.pretrained import load_encoder_weights

        init = load_encoder_weights(model.encoder, encoder_weights, encoder_name=str(encoder))
    if norm == "frozen":  # the encoder keeps its (pretrained) statistics, the rest normalises per region
        freeze_batch_norm(model.encoder)
    if norm != "batch":  # model files with BatchNorm keep the spec they always had
        to_group_norm(model)
        spec["norm"] = norm
    seg = PaddedSegmenter(model, pad_mode=pad_mode, spec=spec)
    if init is not None:
        seg.encoder_init = init
    return seg
