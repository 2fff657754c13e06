"""The combined model: low-res view -> density -> grid -> deformed image -> logits.

:class:`DeformSegNet` is the whole of Jin et al. (ICLR 2022) as one module:

1. the deformation net sees the low-resolution view ``X_lr`` (``hd x wd``)
   and predicts a density ``d``;
2. the fixed Gaussian attraction (:class:`wsiseg.sampling.grid.DeformedGrid`)
   turns ``d`` into a normalised sampling grid of ``h x w`` points;
3. the pixels at those points form the deformed image ``X^`` (``h x w``);
4. the segmenter turns ``X^`` into logits on the same ``h x w`` points.

Where ``X^`` comes from is up to the caller. Training on tiles passes the
high-resolution tile as a tensor and ``X^`` is sampled bilinearly, which is
differentiable with respect to the grid, so the segmentation loss trains the
deformation net. Whole-slide inference passes a callable
``gather(grid) -> X^`` that reads the pixels from the slide pyramid
(level-of-detail gather); no gradient flows through it.

Images are float tensors in ``[0, 1]`` (``uint8`` is divided by 255); the
module standardises them itself with ``image_mean``/``image_std``, so a
checkpoint carries its own input convention and the gather callable returns
raw pixels. Bilinear sampling is linear, so standardising before or after
sampling is the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wsiseg.models.deformation import DeformationNet
from wsiseg.errors import ModelConfigError
from wsiseg.limits import MAX_GRID_ITERATIONS
from wsiseg.models.segmenter import build_segmenter
from wsiseg.sampling.coords import uniform_grid
from wsiseg.sampling.edges import (
    IGNORE_INDEX,
    edge_density,
    edge_target,
    label_validity,
    uniform_density,
    weight_glass,
)
from wsiseg.sampling.geometry import GeometryRule, PhysicalScale, SamplingGeometry, default_support, region_geometry
from wsiseg.sampling.grid import DeformedGrid, check_border, check_iterations, density_to_grid, prior_grid
from wsiseg.sampling.sample import downsample_labels, sample_image, sample_image_lod, sample_labels

__all__ = [
    "IMAGE_SAMPLING",
    "DeformSegNet",
    "DeformSegOutput",
    "LowResPrediction",
    "SAMPLERS",
    "TTA_FLIPS",
    "lowres_view",
]

#: How tensor sources are sampled (see :class:`DeformSegNet`).
IMAGE_SAMPLING = ("lod", "bilinear")
#: Sampler kinds: the learned one and the paper's two baselines.
SAMPLERS = ("learned", "uniform", "edge")

#: ImageNet statistics: the usual convention of smp/timm encoders.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Test-time augmentation: the flips (tensor dims of ``(B, C, h, w)``) whose predictions are averaged
#: with the unflipped one, each flipped back first. Flips keep any grid shape; on a deformed image a flip
#: of the image is a flip of the grid points, so every point's prediction stays its own.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((-1,), (-2,), (-2, -1))

Gather = Callable[[torch.Tensor], Any]
Source = torch.Tensor | Gather


@dataclass
class DeformSegOutput:
    """Everything one forward pass produces.

    Attributes
    ----------
    d : torch.Tensor
        ``(B, 1, hd, wd)`` sampling density (sums to 1 per sample).
    grid : torch.Tensor
        ``(B, h, w, 2)`` normalised sampling grid, ``(x, y)`` in ``[0, 1]``.
    image : torch.Tensor
        ``(B, C, h, w)`` deformed image ``X^`` as sampled, before
        standardisation (``[0, 1]``).
    logits : torch.Tensor
        ``(B, K, h, w)`` segmenter logits on the grid points.
    labels : torch.Tensor or None
        ``(B, h, w)`` labels read at the grid points (nearest), when labels
        were given: the target of the segmentation loss.
    labels_lr : torch.Tensor or None
        ``(B, hd, wd)`` uniformly down-sampled labels, when labels were given.
    edge_target : torch.Tensor or None
        ``(B, 1, hd, wd)`` edge-loss target from ``labels_lr``, when labels
        were given (0 on ignored pixels; see
        :func:`wsiseg.sampling.edges.edge_target`).
    edge_valid : torch.Tensor or None
        ``(B, 1, hd, wd)`` bool, ``labels_lr`` is a class (not the ignore
        value or region padding), when labels were given: the positions
        the edge loss compares (``JointLoss(..., valid=edge_valid)``).
    """

    d: torch.Tensor
    grid: torch.Tensor
    image: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor | None = None
    labels_lr: torch.Tensor | None = None
    edge_target: torch.Tensor | None = None
    edge_valid: torch.Tensor | None = None


@dataclass
class LowResPrediction:
    """Prediction on the sampling grid (before reverse sampling).

    Attributes
    ----------
    labels : torch.Tensor
        ``(B, h, w)`` int64 argmax class per grid point.
    probs : torch.Tensor
        ``(B, K, h, w)`` float32 softmax probabilities.
    grid : torch.Tensor
        ``(B, h, w, 2)`` the grid the points sit on.
    d : torch.Tensor
        ``(B, 1, hd, wd)`` the density behind the grid.
    """

    labels: torch.Tensor
    probs: torch.Tensor
    grid: torch.Tensor
    d: torch.Tensor


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        v = (v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 2 or min(t) < 1:
        raise ModelConfigError(f"{name} must be two positive integers (h, w), got {v!r}")
    return t  # type: ignore[return-value]


def _to_float_image(x) -> torch.Tensor:
    """Tensor/array ``(B, C, h, w)`` -> float tensor in ``[0, 1]`` (uint8 / 255)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected an image tensor or array, got {type(x).__name__}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {x.dtype}")
    return x


def lowres_view(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Anti-aliased low-resolution view of an image batch (the ``X_lr`` of a tile).

    Parameters
    ----------
    image : torch.Tensor
        ``(B, C, H, W)`` float (or uint8, divided by 255).
    size : (int, int)
        ``(hd, wd)``.

    Returns
    -------
    torch.Tensor
        ``(B, C, hd, wd)``: bilinear with anti-aliasing, pixel-centre
        convention (``align_corners=False``), the same as reading the slide
        pyramid at that scale.
    """
    image = _to_float_image(image)
    hd, wd = _pair(size, "size")
    if tuple(image.shape[-2:]) == (hd, wd):
        return image
    return F.interpolate(image, size=(hd, wd), mode="bilinear", align_corners=False, antialias=True)


class DeformSegNet(nn.Module):
    """Deformation net + Gaussian-attraction sampler + segmenter, trained jointly.

    Parameters
    ----------
    segmenter : torch.nn.Module or dict
        Maps ``(B, C, h, w)`` to logits ``(B, K, h, w)`` for the output size,
        e.g. :func:`wsiseg.models.segmenter.build_segmenter`; or that
        function's keyword arguments (as in :meth:`config`).
    sampler : {"learned", "uniform", "edge"}, default "learned"
        Where the density comes from. ``"learned"``: the
        :class:`~wsiseg.models.deformation.DeformationNet`. ``"uniform"``:
        constant (the plain down-sampling baseline). ``"edge"``: the
        edge density of the uniformly down-sampled labels
        (:func:`wsiseg.sampling.edges.edge_density`). The edge baseline
        needs labels at inference too: it is an *oracle* baseline (paper
        A.5, simulating a perfect edge detector), for comparisons only.
        All three share the grid, the sampling and the segmenter code.
    map_size : (int, int), default (64, 64)
        ``(hd, wd)``: size of the low-resolution view and of ``d``.
    out_size : (int, int), default (256, 256)
        ``(h, w)``: size of the sampling grid, ``X^`` and the logits.
    sigma : float, optional
        Standard deviation of the attraction kernel in density-map nodes;
        default ``max(hd, wd) / 32``. Wider kernels give smoother grids that
        can pull samples from further away, but on real tumour masks a
        narrow kernel on a fine map lets the oracle edge grid concentrate
        samples at boundaries far better (``/8`` on a map of half the grid's
        side was the default before; docs/benchmarks.md, "grid capacity").
    support : int, optional
        Odd side of the kernel; default ``2 * ceil(2 * sigma) + 1``
        (+-2 sigma; the kernel's mass beyond is under 5 %).
    edge_radius : float, optional
        Blur of the ``"edge"`` baseline's density in density-map nodes;
        default ``max(hd, wd) / 128``. Unused by the other samplers.
    in_channels : int, default 3
        Image channels.
    image_sampling : {"lod", "bilinear"}, default "lod"
        How a tensor source is sampled: level of detail (each point from
        the pyramid level matching the local spacing, as ``wsiseg segment``
        reads slides: :func:`~wsiseg.sampling.sample.sample_image_lod`), or
        bilinear at full resolution (the paper's point samples; models
        saved before this option existed).
    grid_iterations : int, default 1
        Attraction steps from density to grid
        (:func:`~wsiseg.sampling.grid.density_to_grid`): 1 is the paper's
        single Gaussian attraction (and every model saved before this
        option); more repeat it toward equidistribution, so the samples
        follow the density more closely (docs/benchmarks.md, grid capacity).
        At most :data:`wsiseg.limits.MAX_GRID_ITERATIONS`, the bound model
        files are read with.
    grid_border : {"mirror", "replicate"}, default "mirror"
        How the density continues past the map's edges in the attraction
        (:func:`~wsiseg.sampling.grid.density_to_grid`): mirrored keeps every
        node inside the region without collapsing any onto an edge;
        ``"replicate"`` is the rule of models trained before 2026-12-07, which
        :meth:`from_config` gives files that do not record one.
    image_mean, image_std : sequence of float
        Per-channel standardisation of ``[0, 1]`` images before both nets;
        default ImageNet statistics.

    Notes
    -----
    The kernel is a buffer of the sampler, never a parameter: parameters
    are those of ``deform`` (learned sampler only) and ``segmenter``.
    """

    # buffers registered in __init__ (typed here: nn.Module.__getattr__ would give Tensor | Module)
    image_mean: torch.Tensor
    image_std: torch.Tensor

    def __init__(
        self,
        segmenter: nn.Module | dict,
        sampler: str = "learned",
        map_size: Sequence[int] = (64, 64),
        out_size: Sequence[int] = (256, 256),
        sigma: float | None = None,
        support: int | None = None,
        edge_radius: float | None = None,
        in_channels: int = 3,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        image_sampling: str = "lod",
        grid_iterations: int = 1,
        grid_border: str = "mirror",
    ):
        super().__init__()
        if image_sampling not in IMAGE_SAMPLING:
            raise ModelConfigError(f"unknown image sampling {image_sampling!r}; available: {', '.join(IMAGE_SAMPLING)}")
        self.image_sampling = image_sampling
        if sampler not in SAMPLERS:
            raise ModelConfigError(f"unknown sampler {sampler!r}; available: {', '.join(SAMPLERS)}")
        self.sampler = sampler
        self.map_size = _pair(map_size, "map_size")
        self.out_size = _pair(out_size, "out_size")
        self.in_channels = int(in_channels)
        self.sigma = float(sigma) if sigma is not None else max(self.map_size) / 32.0
        if not self.sigma > 0:
            raise ModelConfigError(f"sigma must be positive, got {sigma}")
        self.support = int(support) if support is not None else default_support(self.sigma)
        self.edge_radius = float(edge_radius) if edge_radius is not None else max(self.map_size) / 128.0
        if not self.edge_radius > 0:
            raise ModelConfigError(f"edge_radius must be positive, got {edge_radius}")
        if len(image_mean) != self.in_channels or len(image_std) != self.in_channels or min(image_std) <= 0:
            raise ModelConfigError(
                f"image_mean/image_std need {self.in_channels} values (std > 0), got {image_mean}, {image_std}"
            )
        if isinstance(segmenter, dict):
            segmenter = build_segmenter(**segmenter)
        self.segmenter = segmenter
        self.deform = DeformationNet(self.in_channels) if sampler == "learned" else None
        self.grid_iterations = grid_iterations
        self.grid_border = grid_border
        try:
            # the bound a model file is read with: a net built here can always be saved and loaded again
            check_iterations(grid_iterations, "grid_iterations", most=MAX_GRID_ITERATIONS)
            check_border(grid_border, "grid_border")
            self.deformed_grid = DeformedGrid(self.sigma, self.support, grid_iterations, grid_border)
        except ValueError as exc:
            raise ModelConfigError(str(exc)) from exc
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1))

    # -- configuration ---------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Hyper-parameters as a plain, JSON-able dict; see :meth:`from_config`.

        ``"segmenter"`` holds :func:`build_segmenter`'s arguments when the
        segmenter came from it (else ``None``: rebuild needs the module).
        """
        # any module with a config() (nn.Module's typed __getattr__ does not know it)
        seg_cfg = cast(Any, self.segmenter).config() if hasattr(self.segmenter, "config") else None
        return {
            "sampler": self.sampler,
            "map_size": list(self.map_size),
            "out_size": list(self.out_size),
            "sigma": self.sigma,
            "support": self.support,
            "edge_radius": self.edge_radius,
            "in_channels": self.in_channels,
            "image_mean": [float(v) for v in self.image_mean.flatten()],
            "image_std": [float(v) for v in self.image_std.flatten()],
            "image_sampling": self.image_sampling,
            "grid_iterations": self.grid_iterations,
            "grid_border": self.grid_border,
            "segmenter": seg_cfg,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], segmenter: nn.Module | None = None) -> DeformSegNet:
        """Rebuild an (untrained) net from :meth:`config`; load the weights after.

        Parameters
        ----------
        config : dict
            As returned by :meth:`config` (e.g. read back from JSON).
        segmenter : torch.nn.Module, optional
            Used instead of ``config["segmenter"]`` (required when that is ``None``).
        """
        cfg = dict(config)
        cfg.setdefault("image_sampling", "bilinear")  # model files from before the option: point samples
        cfg.setdefault("grid_border", "replicate")  # and the attraction's border as they were trained with
        seg = segmenter if segmenter is not None else cfg.pop("segmenter", None)
        cfg.pop("segmenter", None)
        if seg is None:
            raise ModelConfigError("config has no segmenter spec; pass the segmenter module")
        return cls(seg, **cfg)

    @property
    def num_classes(self) -> int | None:
        """Number of classes, when the segmenter says."""
        return getattr(self.segmenter, "num_classes", None)

    # -- pieces ------------------------------------------------------------
    def standardise(self, image: torch.Tensor) -> torch.Tensor:
        """``(image - mean) / std`` per channel, for ``[0, 1]`` images."""
        image = _to_float_image(image)
        mean = self.image_mean.to(device=image.device, dtype=image.dtype)
        std = self.image_std.to(device=image.device, dtype=image.dtype)
        return (image - mean) / std

    def geometry_rule(self) -> GeometryRule:
        """This model's sampling geometry as a rule for any region shape."""
        # A support that is just the default of the model's sigma scales with
        # each region's sigma; only an explicitly different one stays fixed.
        fixed = self.support if self.support != default_support(self.sigma) else None
        return GeometryRule(self.out_size, self.map_size, self.sigma, fixed, iterations=self.grid_iterations)

    def geometry(
        self,
        height: int,
        width: int,
        *,
        grid: Sequence[int] | None = None,
        long_side: int | None = None,
        physical: PhysicalScale | None = None,
        scale: float = 1.0,
    ) -> SamplingGeometry:
        """Sampling geometry of a ``height x width`` region (:func:`~wsiseg.sampling.geometry.region_geometry`).

        Training, validation, ``evaluate`` and ``segment`` all call this, so
        a region gets the same grid, density map and kernel on every path.
        ``physical`` (the region's micrometres per pixel and the model's
        recorded sample spacing) samples it at the model's physical scale;
        ``scale`` samples ``scale`` times as densely per axis.
        """
        return region_geometry(
            height,
            width,
            self.geometry_rule(),
            grid=cast(tuple[int, int], tuple(grid)) if grid is not None else None,
            long_side=long_side,
            physical=physical,
            scale=scale,
        )

    def density(
        self,
        x_lr: torch.Tensor | None,
        labels_lr: torch.Tensor | None = None,
        batch: int | None = None,
        map_size: Sequence[int] | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sampling density ``d (B, 1, hd, wd)`` of the configured sampler.

        Parameters
        ----------
        x_lr : torch.Tensor or None
            ``(B, C, hd, wd)`` low-resolution view in ``[0, 1]`` (needed by
            the learned sampler).
        labels_lr : torch.Tensor, optional
            ``(B, hd, wd)`` down-sampled labels (needed by the edge sampler).
        batch : int, optional
            Batch size when neither input says.
        map_size : (int, int), optional
            ``(hd, wd)`` when neither input says; default ``map_size``.
        valid : torch.Tensor, optional
            ``(B, hd, wd)`` bool: labelled pixels of ``labels_lr`` (edge
            sampler; default: not the ignore value 255).
        """
        if self.sampler == "learned":
            if x_lr is None:
                raise ValueError("the learned sampler needs the low-resolution view x_lr")
            assert self.deform is not None  # built in __init__ for the learned sampler
            return self.deform(self.standardise(x_lr))
        if self.sampler == "edge":
            if labels_lr is None:
                raise ValueError("the edge sampler is an oracle baseline: it needs labels, also at inference")
            hd, wd = labels_lr.shape[-2:]
            # The blur radius is a fixed fraction of the map, like sigma.
            radius = self.edge_radius * math.sqrt(hd * wd / (self.map_size[0] * self.map_size[1]))
            return edge_density(labels_lr, radius, valid=valid)
        if x_lr is not None:
            b, (hd, wd), device = x_lr.shape[0], x_lr.shape[-2:], x_lr.device
        else:
            b, device = batch or 1, self.image_mean.device
            hd, wd = map_size if map_size is not None else self.map_size
        return uniform_density(b, hd, wd, device=device)

    def grid(
        self, d: torch.Tensor, geometry: SamplingGeometry | None = None, prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sampling grid ``(B, h, w, 2)`` of a density ``(B, 1, hd, wd)``.

        With ``geometry`` the kernel and grid size are the region's; without,
        the model's reference ones. With ``prior`` (a density on the same
        map, e.g. low on glass) a learned or edge sampler's grid is built on
        a warp toward it (:func:`wsiseg.sampling.grid.prior_grid`).
        """
        if self.sampler == "uniform":
            # A constant density gives exactly the uniform grid; skip the attraction (a 512 x 512 map
            # with a 65-node kernel costs seconds).
            h, w = geometry.grid if geometry is not None else self.out_size
            return uniform_grid(h, w, dtype=torch.float32, device=d.device).expand(d.shape[0], -1, -1, -1)
        g = geometry if geometry is not None else self.reference_geometry()
        if prior is not None:
            return prior_grid(
                d, prior, g.sigma, g.support, out_size=g.grid, iterations=g.iterations, border=self.grid_border
            )
        if geometry is None:
            return self.deformed_grid(d, out_size=self.out_size)
        return density_to_grid(d, g.sigma, g.support, out_size=g.grid, iterations=g.iterations, border=self.grid_border)

    def uses_glass(self, glass_weight: float) -> bool:
        """Whether a glass weight changes this model's grid (a learned sampler, a weight below 1): callers find
        the glass nodes only then."""
        return glass_weight != 1.0 and self.sampler == "learned"

    def glass_prior(self, d: torch.Tensor, glass: torch.Tensor | None, glass_weight: float) -> torch.Tensor | None:
        """The prior of a glass weight for :meth:`grid`: ``glass_weight`` on ``glass``, 1 elsewhere (normalised).

        None when the weight is 1 or the sampler is not learned (the grid is then the model's own).
        """
        if not self.uses_glass(glass_weight):
            return None
        if glass is None:
            raise ValueError("a glass weight below 1 needs the glass nodes of the density map")
        return weight_glass(torch.ones_like(d, dtype=torch.float32), glass, glass_weight)

    def segment_probs(
        self, image: torch.Tensor, *, tta: bool = False, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Class probabilities ``(B, K, h, w)`` (float32) of the segmenter on a deformed image.

        Parameters
        ----------
        image : torch.Tensor
            ``(B, C, h, w)`` in ``[0, 1]`` (or uint8), as sampled.
        tta : bool
            Test-time augmentation: the mean of the softmax over the image
            and its flips (:data:`TTA_FLIPS`), each flipped back; four
            segmenter passes instead of one.
        logits : torch.Tensor, optional
            The segmenter's logits on ``image`` when already computed.
        """
        x = self.standardise(image)
        probs = torch.softmax((self.segmenter(x) if logits is None else logits).float(), dim=1)
        if tta:
            for dims in TTA_FLIPS:
                probs = probs + torch.softmax(self.segmenter(x.flip(dims)).float(), dim=1).flip(dims)
            probs = probs / (1 + len(TTA_FLIPS))
        return probs

    # -- forward -------------------------------------------------------------
    def reference_geometry(self) -> SamplingGeometry:
        """The geometry of the model's reference shape: ``out_size``, ``map_size``, its sigma and support."""
        return SamplingGeometry(self.out_size, self.map_size, self.sigma, self.support, self.grid_iterations)

    def forward(
        self,
        x_lr: torch.Tensor | None,
        source: Source,
        labels: torch.Tensor | None = None,
        geometry: SamplingGeometry | None = None,
        ignore_index: int | None = IGNORE_INDEX,
        glass: torch.Tensor | None = None,
        glass_weight: float = 1.0,
    ) -> DeformSegOutput:
        """Run the whole model.

        Parameters
        ----------
        x_lr : torch.Tensor or None
            ``(B, C, hd, wd)`` low-resolution view, ``[0, 1]`` float or
            uint8, exactly the geometry's map size. ``None`` when ``source``
            is a tensor: then it is :func:`lowres_view` of it.
        source : torch.Tensor or callable
            Where the deformed image comes from. A tensor
            ``(B, C, H, W)`` (the high-resolution region, ``[0, 1]`` or
            uint8, unpadded) is sampled bilinearly with the grid,
            differentiably. A callable ``gather(grid) -> X^`` gets the
            detached grid ``(B, h, w, 2)`` and returns ``(B, C, h, w)``
            pixels (tensor or array, ``[0, 1]`` float or uint8); no gradient
            reaches the deformation net through it (inference).
        labels : torch.Tensor, optional
            ``(B, H, W)`` integer labels on the same region as ``source``.
            When given, the output carries the labels at the grid points,
            the down-sampled labels, the edge target and its validity
            mask. Required by the ``"edge"`` sampler.
        geometry : SamplingGeometry, optional
            Grid, map and kernel of this region. Default: :meth:`geometry`
            of the source tensor's ``(H, W)`` (so every path samples a region
            alike), or :meth:`reference_geometry` for a gather callable.
        ignore_index : int or None, default 255
            Label of unsupervised pixels: they make no edges in the edge
            target or the edge sampler's density. ``None``: every label
            value is a class.
        glass : torch.Tensor, optional
            ``(B, hd, wd)`` bool: the density-map nodes on glass; needed with
            ``glass_weight`` below 1.
        glass_weight : float
            In ``(0, 1]``: a learned sampler's grid is built on a warp toward
            a prior that is this on ``glass`` and 1 elsewhere
            (:meth:`glass_prior`, :func:`wsiseg.sampling.grid.prior_grid`),
            so samples leave glass while the density acts as trained on
            tissue; 1 (the default): the model's own grid. Other samplers
            ignore it.

        Returns
        -------
        DeformSegOutput
        """
        is_tensor = isinstance(source, (torch.Tensor, np.ndarray))
        if not is_tensor and not callable(source):
            raise TypeError("source must be a (B, C, H, W) image tensor or a callable gather(grid)")
        if is_tensor:
            source = _to_float_image(source)
            if source.ndim != 4 or source.shape[1] != self.in_channels:
                raise ValueError(f"source image must be (B, {self.in_channels}, H, W), got {tuple(source.shape)}")
            if geometry is None:
                geometry = self.geometry(int(source.shape[-2]), int(source.shape[-1]))
            if x_lr is None:
                x_lr = lowres_view(source, geometry.map)
        elif geometry is None:
            geometry = self.reference_geometry()
        hd, wd = geometry.map
        if x_lr is not None:
            x_lr = _to_float_image(x_lr)
            if x_lr.ndim != 4 or tuple(x_lr.shape[-2:]) != (hd, wd) or x_lr.shape[1] != self.in_channels:
                raise ValueError(
                    f"x_lr must be (B, {self.in_channels}, {hd}, {wd}) (the region's density map), "
                    f"got {tuple(x_lr.shape)}"
                )
        if labels is not None and labels.ndim != 3:
            raise ValueError(f"labels must be (B, H, W), got {tuple(labels.shape)}")

        labels_lr = downsample_labels(labels, (hd, wd)) if labels is not None else None
        valid_lr = label_validity(labels_lr, ignore_index=ignore_index) if labels_lr is not None else None
        batch = labels.shape[0] if labels is not None else None
        d = self.density(x_lr, labels_lr, batch=batch, map_size=(hd, wd), valid=valid_lr)
        grid = self.grid(d, geometry, prior=self.glass_prior(d, glass, glass_weight))

        if is_tensor:
            hr = cast(torch.Tensor, source)  # made a float tensor above
            image = sample_image_lod(hr, grid) if self.image_sampling == "lod" else sample_image(hr, grid)
        else:
            gather = cast(Gather, source)
            with torch.no_grad():
                image = gather(grid.detach())
            image = _to_float_image(image).to(device=grid.device)
            want = (grid.shape[0], self.in_channels, *geometry.grid)
            if tuple(image.shape) != want:
                raise ValueError(f"gather returned {tuple(image.shape)}, expected {want}")
        logits = self.segmenter(self.standardise(image))

        out = DeformSegOutput(d=d, grid=grid, image=image, logits=logits)
        if labels is not None:
            assert labels_lr is not None and valid_lr is not None  # computed above from labels
            out.labels = sample_labels(labels, grid)
            out.labels_lr = labels_lr
            out.edge_target = edge_target(labels_lr, valid=valid_lr)
            out.edge_valid = valid_lr.unsqueeze(1)
        return out

    @torch.no_grad()
    def predict_lowres(
        self,
        x_lr: torch.Tensor | None,
        source: Source,
        labels: torch.Tensor | None = None,
        geometry: SamplingGeometry | None = None,
        tta: bool = False,
        glass: torch.Tensor | None = None,
        glass_weight: float = 1.0,
    ) -> LowResPrediction:
        """Predict classes on the sampling grid (eval mode, no gradients).

        Same arguments as :meth:`forward` (``labels`` only for the oracle
        ``"edge"`` sampler, ``glass`` and ``glass_weight`` as there), and
        ``tta`` (:meth:`segment_probs`). The module
        is switched to eval mode for the call and restored afterwards.

        Returns
        -------
        LowResPrediction
            Argmax labels ``(B, h, w)``, softmax probabilities
            ``(B, K, h, w)``, the grid and the density.
        """
        was_training = self.training
        self.eval()
        try:
            out = self.forward(x_lr, source, labels=labels, geometry=geometry, glass=glass, glass_weight=glass_weight)
            probs = self.segment_probs(out.image, tta=tta, logits=out.logits)
        finally:
            self.train(was_training)
        return LowResPrediction(labels=probs.argmax(dim=1), probs=probs, grid=out.grid, d=out.d)

    def extra_repr(self) -> str:
        return (
            f"sampler={self.sampler!r}, map_size={self.map_size}, out_size={self.out_size}, "
            f"image_sampling={self.image_sampling!r}"
        )
