"""What the training loop is fed: augmented items, collation and label checks, the working scale of a data set,
batch sizes that fit, and the data loader.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wsiseg.errors import WsisegError
from wsiseg.models.net import DeformSegNet
from wsiseg.models.scale import ModelScale, measure_scale
from wsiseg.sampling.geometry import SamplingGeometry
from wsiseg.training.config import TrainConfig, training_geometry

__all__ = [
    "ALONE_WHY",
    "BATCHNORM_ALONE",
    "Augmented",
    "alone_checker",
    "check_labels",
    "make_loader",
    "say_scale",
    "size_batches",
    "to_float",
    "training_scale",
    "trains_alone",
    "window_problem",
]

# ---------------------------------------------------------------------------
# data plumbing
# ---------------------------------------------------------------------------


class Augmented(Dataset):
    """Training items cropped and augmented with an RNG derived from (seed, epoch, index).

    ``TrainConfig.crop_size`` draws a random window of each item first
    (:func:`wsiseg.training.dataset.random_crop`), then flips, rotations and
    colour jitter; ``augment=False`` crops only (for a data set that
    augments itself).
    """

    def __init__(self, base: Dataset, config: TrainConfig, *, augment: bool = True):
        self.base = base
        self.seed = config.seed
        self.epoch = 0
        self.flips, self.rot90 = augment and config.flips, augment and config.rot90
        self.color_jitter = config.color_jitter if augment else 0.0
        self.crop = config.crop_size
        self.augments = self.flips or self.rot90 or self.color_jitter > 0
        self.active = self.augments or self.crop is not None
        self._augment = self._crop = None
        if self.active:
            from wsiseg.training.dataset import augment as augment_fn  # the data side owns the augmentations
            from wsiseg.training.dataset import random_crop

            self._augment, self._crop = augment_fn, random_crop

    def __len__(self) -> int:
        return len(self.base)

    def item_shape(self, i: int) -> tuple[int, int]:
        """``(h, w)`` of item ``i`` as this data set yields it (the window when cropping)."""
        h, w = _item_shape(self.base, i)
        if self.crop is None:
            return h, w
        return min(h, self.crop[0]), min(w, self.crop[1])

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        if not self.active:
            return item
        item = dict(item)
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        if self.crop is not None:
            item["image"], item["labels"] = self._crop(item["image"], item["labels"], self.crop, rng)
            item["size"] = tuple(item["labels"].shape[-2:])
        if self.augments:
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
        raise WsisegError(f"training regions in one batch differ in size {shapes}") from exc
    from wsiseg.training.dataset import known_mpp

    return {
        "image": image,
        "labels": labels,
        "name": [str(it.get("name", "")) for it in items],
        "mpp": [known_mpp(it) for it in items],
    }


def to_float(image: torch.Tensor) -> torch.Tensor:
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()


def check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int, names: list[str]) -> None:
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

    A data set that describes itself (``item_mpp``, :class:`wsiseg.training.dataset.RegionDataset`) or wraps one
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
        from wsiseg.training.dataset import known_mpp

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
            raise WsisegError(
                f"sample_spacing_um needs an MPP for every training region; {missing} of "
                f"{len(regions)} have none (give --mpp or an mpp column in the pairs CSV)"
            )
    return measure_scale(regions, net.geometry, spacing_um)


def say_scale(say: Callable[[str], None], scale: ModelScale) -> None:
    if not scale.known:
        say(
            "no MPP known for the training regions: the model records no physical scale and segments by pixel "
            "size (pass --mpp or an mpp column to record it)"
        )
        return
    missing = f"; {scale.regions_without_mpp} regions without MPP left out" if scale.regions_without_mpp else ""
    say(
        f"scale: {scale.mpp_working:.4g} um per working pixel, one sample every {scale.sample_spacing_um:.4g} um "
        f"({scale.source}, {scale.regions} regions{missing})"
    )


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
BATCHNORM_ALONE = "more than 1 value per channel"
ALONE_WHY = "BatchNorm needs more than one value per channel; the grid is too small for the encoder's depth"


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
            return BATCHNORM_ALONE not in str(exc)
        except (RuntimeError, NotImplementedError, TypeError):
            return True
        finally:
            module.train(was_training)
    return True


def alone_checker(net: DeformSegNet, ds: Dataset, config: TrainConfig, say: Callable[[str], None]):
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
    why = f"a batch of one region of their shape cannot train ({ALONE_WHY})"
    if shapes and lone == len(shapes):
        raise WsisegError(
            f"no training batch can run: {why}; use --batch-size 2 or more with regions of equal shape, "
            "or a larger --out-size"
        )
    if lone:
        say(f"warning: {lone} of {len(shapes)} training regions are left out: each is alone in its batch and {why}")
    return alone


def window_problem(net: DeformSegNet, config: TrainConfig) -> str | None:
    """Why ``config.crop_size`` windows are too small for ``net``'s encoder, or None.

    A window's grid (at the densest scale jitter: the smallest grid) must
    leave the encoder's deepest maps at least 2 x 2. At 1 x 1 every
    convolution there sees padding around one value, and its BatchNorm
    statistics differ by tens of standard deviations from those of the
    larger grids of whole regions at inference (measured on the tumour
    model's layers, docs/demo-model.md).
    """
    if config.crop_size is None or config.sample_spacing_um is None or config.working_mpp is None:
        return None
    from wsiseg.models.pretrained import find_encoder

    try:
        stride = int(getattr(find_encoder(net), "output_stride", 1))
    except WsisegError:
        return None
    crop = config.crop_size
    grid = training_geometry(net, crop, config.working_mpp, config.sample_spacing_um, 1 / config.scale_jitter).grid
    if min(math.ceil(n / stride) for n in grid) >= 2:
        return None
    return (
        f"a {crop[1]} x {crop[0]} px window at {config.working_mpp:g} um/px is sampled on as few as "
        f"{grid[1]} x {grid[0]} nodes: the encoder's deepest maps (stride {stride}) are 1 x 1, and its BatchNorm "
        f"statistics will not fit whole regions at inference; use a crop_size of at least "
        f"{math.ceil((stride + 1) * config.scale_jitter * config.sample_spacing_um / config.working_mpp)} px"
    )


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


def make_loader(
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
