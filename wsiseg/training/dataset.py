"""Training data: image/annotation pairs -> fixed-size region items.

A dataset is a list of :class:`TrainingPair` (an image and its annotation),
found in a folder or listed in a CSV (:func:`~wsiseg.training.pairs.load_pairs`). Slides are cut
into the **same tissue regions that inference uses** (:func:`slide_regions`:
:func:`~wsiseg.slide.tissue.detect_tissue` then
:func:`~wsiseg.slide.tissue.tissue_regions` with their defaults); plain
images (PNG/JPEG tiles such as NuCLS) are one region each.
:func:`build_dataset` makes one item per (pair, region).

Working resolution
------------------
Each region (a level-0 box ``bw x bh``) is read at the downsample
``t = max(bw / W, bh / H, 1)`` for ``hr_size = (H, W)``: the largest raster
with the box's aspect ratio that fits ``hr_size``, never upsampled (small
images keep their native resolution). The raster is
``(round(bh / t), round(bw / t))``. Pixels come from the coarsest pyramid
level not coarser than ``t`` (never level 0 of a pyramid when a reduced level
will do), block-averaged by the integer part of the remaining factor
(lazily, chunk by chunk, so a single-level gigapixel slide is never loaded
whole), then anti-aliased (Gaussian, ``sigma = (s - 1) / 2`` for the
residual factor ``s < 2``) and bilinearly sampled at the raster's pixel
centres (:mod:`wsiseg.sampling.coords`). At ``t = 1`` on level 0 this is an
exact copy. Labels are produced for the same box and raster, by pixel-centre
rasterisation or nearest reads (:meth:`wsiseg.training.annotations.Annotation.labels`),
so image and labels align exactly.

With ``working_mpp`` (physical-mode training, ``TrainConfig.working_mpp``) the raster
is the box's extent over that pixel size instead (:func:`physical_shape`), so regions
of every scanner share one scale; training then cuts random windows of it
(:func:`random_crop`, ``TrainConfig.crop_size``) that share one shape.

No padding
----------
Items are the working raster itself, never padded: a region is sampled on
its own extent with the geometry every path shares
(:mod:`wsiseg.sampling.geometry`), so padding can neither attract samples
nor take part in the grid. Training batches group items of equal shape
(:func:`wsiseg.training.batches.size_batches`). ``item["size"]`` is the ``(h, w)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage as ndi

from wsiseg.errors import WsisegError, one_line
from wsiseg.slide import Multiscale, open_slide
from wsiseg.slide.common import pil_rgb_on_white
from wsiseg.slide.tissue import Region, slide_regions, whole_region
from wsiseg.training.annotations import Annotation, load_annotation
from wsiseg.training.classmap import ClassMap
from wsiseg.training.pairs import PLAIN_IMAGE_SUFFIXES, TrainingPair, suffix

__all__ = [
    "MAX_WORKING_PIXELS",
    "RegionDataset",
    "RegionItem",
    "augment",
    "build_dataset",
    "config_dataset",
    "known_mpp",
    "physical_shape",
    "random_crop",
    "read_region",
    "slide_regions",
    "working_shape",
]


# ---------------------------------------------------------------------------
# reading regions


def _open_image(path: str, mpp: float | None) -> Multiscale:
    """A slide via :func:`open_slide`, or a plain image (PNG/JPEG) as a one-level Multiscale."""
    if suffix(Path(path)) not in PLAIN_IMAGE_SUFFIXES:
        return open_slide(path, mpp=mpp)
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            arr = pil_rgb_on_white(im)
    except FileNotFoundError as exc:
        raise WsisegError("image not found", path) from exc
    except Exception as exc:  # decoder errors: one line naming the file
        raise WsisegError(f"cannot read image: {one_line(exc)}", path) from exc
    chunk = max(256, min(4096, max(arr.shape[:2])))
    xy = None if mpp is None else (float(mpp), float(mpp))  # (x, y), as open_slide gives it
    return Multiscale.from_arrays([arr], path=path, mpp=xy, chunks=chunk, vendor="image", reader="pillow")


def _nan_if_none(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def known_mpp(item: Mapping[str, Any]) -> float | None:
    """An item's ``mpp`` (micrometres per working pixel), None when it has none (absent, None or NaN)."""
    v = item.get("mpp")
    return float(v) if v is not None and math.isfinite(float(v)) else None


def working_shape(box: Region, hr_size: tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` of the working raster of ``box``: fits ``hr_size``, same aspect, never upsampled."""
    H, W = hr_size
    t = max(box.width / W, box.height / H, 1.0)
    return max(1, min(H, round(box.height / t))), max(1, min(W, round(box.width / t)))


def physical_shape(box: Region, mpp: tuple[float, float], working_mpp: float) -> tuple[int, int]:
    """``(h, w)`` of the working raster of ``box`` at ``working_mpp`` micrometres per pixel.

    The box's extent (``mpp`` micrometres per level-0 pixel, ``(x, y)``)
    over the working pixel size, rounded: every region of every image at
    one scale, whatever its scanner, so regions of different sources share
    shapes (and batches) once cropped. Up-sampled when the image is
    coarser than ``working_mpp``.

    Examples
    --------
    >>> physical_shape(Region(0, 0, 640, 480), (0.5, 0.5), 1.0)
    (240, 320)
    """
    return (
        max(1, round(box.height * float(mpp[1]) / working_mpp)),
        max(1, round(box.width * float(mpp[0]) / working_mpp)),
    )


# Working rasters at ``working_mpp`` are cached whole; past this a region is a slide, not a training region.
MAX_WORKING_PIXELS = 64_000_000


def _item_raster(
    box: Region, hr: tuple[int, int], ms: Multiscale, working_mpp: float | None, image: str
) -> tuple[int, int]:
    """The working raster shape of one region: fitting ``hr`` (the pixel rule) or at ``working_mpp``."""
    if working_mpp is None:
        return working_shape(box, hr)
    if ms.mpp is None:
        raise WsisegError("working_mpp needs the image's MPP (give --mpp or an mpp column in the pairs CSV)", image)
    h, w = physical_shape(box, ms.mpp, working_mpp)
    if h * w > MAX_WORKING_PIXELS:
        raise WsisegError(
            f"a region of {box.width} x {box.height} px is {w} x {h} px at working_mpp {working_mpp:g} "
            f"(over {MAX_WORKING_PIXELS:,}): use a coarser working_mpp or regions: tissue",
            image,
        )
    return h, w


def random_crop(
    image: torch.Tensor, labels: torch.Tensor, size: tuple[int, int], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size`` window of ``(C, H, W)`` ``image`` and ``(H, W)`` ``labels`` at a random position.

    A side shorter than the window is kept whole (never padded: padding
    would take part in the sampling grid), so such items batch only with
    items of their own shape.
    """
    h, w = labels.shape[-2:]
    ch, cw = min(int(size[0]), h), min(int(size[1]), w)
    y = int(rng.integers(h - ch + 1))
    x = int(rng.integers(w - cw + 1))
    return image[..., y : y + ch, x : x + cw], labels[..., y : y + ch, x : x + cw]


def _linear_taps(coords: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weight of 1-D linear interpolation at ``coords`` (centres at integers), border replicated."""
    c = np.clip(coords, 0, size - 1)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, size - 1)
    return i0, i1, (c - i0).astype(np.float32)


def read_region(ms: Multiscale, box: Region, out_shape: tuple[int, int]) -> np.ndarray:
    """RGB of a level-0 box resampled to ``out_shape`` (area-like downsampling).

    Output pixel ``(i, j)`` is the image around the level-0 point
    ``(box.x + (j + 0.5) * box.width / w, box.y + (i + 0.5) * box.height / h)``,
    the same points at which labels are sampled. See the module docstring for
    the level choice and the filtering.

    Returns
    -------
    numpy.ndarray
        ``(h, w, 3)`` uint8.
    """
    h, w = (int(s) for s in out_shape)
    tx, ty = box.width / w, box.height / h
    lv = ms.levels[ms.level_for_downsample(min(tx, ty))]
    dx, dy = lv.downsample
    if (dx, dy) == (1.0, 1.0) and (box.width, box.height) == (w, h):
        # Native resolution: an exact copy.
        return np.asarray(lv.array[box.y : box.y1, box.x : box.x1].compute())
    fx, fy = max(1, math.floor(tx / dx)), max(1, math.floor(ty / dy))
    # Crop (in level pixels) with a margin for the filter, aligned to the block size.
    x0 = max(0, math.floor(box.x / dx) - 2 * fx)
    y0 = max(0, math.floor(box.y / dy) - 2 * fy)
    x1 = min(lv.width, math.ceil(box.x1 / dx) + 2 * fx)
    y1 = min(lv.height, math.ceil(box.y1 / dy) + 2 * fy)
    crop = lv.array[y0:y1, x0:x1]
    if fx > 1 or fy > 1:
        import dask.array as da

        pad_y, pad_x = -(y1 - y0) % fy, -(x1 - x0) % fx
        if pad_y or pad_x:
            crop = da.pad(crop, ((0, pad_y), (0, pad_x), (0, 0)), mode="edge")
        crop = da.coarsen(np.mean, crop.astype(np.float32), {0: fy, 1: fx})
    a = np.asarray(crop.compute(), dtype=np.float32)
    # Residual factor in [1, 2): Gaussian anti-aliasing as skimage.transform.resize does.
    sx, sy = tx / (dx * fx), ty / (dy * fy)
    sigma = (max(0.0, (sy - 1) / 2), max(0.0, (sx - 1) / 2), 0.0)
    if sigma[0] > 0 or sigma[1] > 0:
        a = ndi.gaussian_filter(a, sigma, mode="nearest")
    # Output centres -> block-array index coordinates (centres at integers).
    u = ((box.x + (np.arange(w) + 0.5) * tx) / dx - x0) / fx - 0.5
    v = ((box.y + (np.arange(h) + 0.5) * ty) / dy - y0) / fy - 0.5
    c0, c1, wc = _linear_taps(u, a.shape[1])
    r0, r1, wr = _linear_taps(v, a.shape[0])
    rows = a[r0] * (1 - wr)[:, None, None] + a[r1] * wr[:, None, None]
    out = rows[:, c0] * (1 - wc)[None, :, None] + rows[:, c1] * wc[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# dataset


@dataclass(frozen=True)
class RegionItem:
    """One dataset item: a region of one pair at a working resolution.

    Attributes
    ----------
    pair : int
        Index into :attr:`RegionDataset.pairs`.
    name : str
        ``NAME`` for single-region images, ``NAME#k`` for region ``k`` of a slide.
    box : Region
        Level-0 box.
    shape : (int, int)
        Working raster ``(h, w)`` before padding (fits ``hr_size``).
    """

    pair: int
    name: str
    box: Region
    shape: tuple[int, int]

    @property
    def downsample(self) -> float:
        """Level-0 pixels per working pixel (along x; y differs only by rounding)."""
        return self.box.width / self.shape[1]


class RegionDataset(torch.utils.data.Dataset):
    """Fixed-size (image, labels) items, one per (pair, region).

    Built by :func:`build_dataset`. Each item is a dict:

    ``image``
        ``(3, h, w)`` uint8 tensor, the working raster (fits ``hr_size``).
    ``labels``
        ``(h, w)`` int64 tensor, class values, 255 = ignore.
    ``name``
        str (see :class:`RegionItem`).
    ``box``
        ``(x, y, w, h)`` level-0 box.
    ``downsample``
        float, level-0 pixels per working pixel.
    ``mpp``
        float, micrometres per working pixel: the image's MPP (its pair's
        ``mpp`` when given, else the slide's own) times ``downsample``;
        NaN when unknown, so items still batch with the default collate
        (:meth:`item_mpp`, :func:`known_mpp`).
    ``size``
        ``(h, w)`` of the unpadded working raster.

    Slides are opened lazily in each process (so the dataset pickles to
    DataLoader workers); items are cached in memory after the first read
    when ``cache`` is true (datasets are small). With ``augmentation`` set,
    :func:`augment` is applied with a generator seeded by
    ``(seed, epoch, index)``: reproducible whatever the number of workers.
    Call :meth:`set_epoch` each epoch.
    """

    def __init__(
        self,
        pairs: Sequence[TrainingPair],
        items: Sequence[RegionItem],
        annotations: Sequence[Annotation],
        class_map: ClassMap,
        *,
        hr_size: tuple[int, int],
        seed: int = 0,
        cache: bool = True,
        augmentation: Mapping[str, Any] | None = None,
        working_mpp: float | None = None,
    ):
        self.pairs = list(pairs)
        self.items = list(items)
        self.annotations = list(annotations)
        self.class_map = class_map
        self.hr_size = (int(hr_size[0]), int(hr_size[1]))
        self.seed = int(seed)
        self.cache = bool(cache)
        self.augmentation = dict(augmentation) if augmentation else None
        self.working_mpp = float(working_mpp) if working_mpp is not None else None
        self.epoch = 0
        self._slides: dict[int, Multiscale] = {}
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_slides"] = {}  # reopened in the worker
        return state

    def set_epoch(self, epoch: int) -> None:
        """Epoch number for the augmentation seed."""
        self.epoch = int(epoch)

    def slide(self, pair: int) -> Multiscale:
        """The opened image of pair ``pair`` (opened once per process)."""
        ms = self._slides.get(pair)
        if ms is None:
            p = self.pairs[pair]
            ms = self._slides[pair] = _open_image(p.image, p.mpp)
        return ms

    def item_mpp(self, index: int) -> tuple[float | None, str]:
        """Micrometres per working pixel of item ``index`` (along x) and where the MPP came from.

        Returns
        -------
        (float or None, str)
            ``(mpp * downsample, "mpp option")`` when the pair gives an MPP
            (CSV column, ``--mpp``), ``(..., "slide")`` from the image's own
            metadata, ``(None, "unknown")`` otherwise. Reads no pixels.
            With ``working_mpp`` set, that value exactly (the raster's
            rounding to whole pixels is below one pixel over the region), so
            regions of every source share the batch key.
        """
        it = self.items[index]
        mpp = self.slide(it.pair).mpp
        if mpp is None:
            return None, "unknown"
        value = self.working_mpp if self.working_mpp is not None else float(mpp[0]) * it.downsample
        return value, "mpp option" if self.pairs[it.pair].mpp is not None else "slide"

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(h, w, 3)`` uint8 image and ``(h, w)`` uint8 labels of item ``index`` (no augmentation)."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        it = self.items[index]
        image = np.ascontiguousarray(read_region(self.slide(it.pair), it.box, it.shape), dtype=np.uint8)
        labels = np.ascontiguousarray(self.annotations[it.pair].labels(it.box, it.shape), dtype=np.uint8)
        if self.cache:
            self._cache[index] = (image, labels)
        return image, labels

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        it = self.items[index]
        image_np, labels_np = self.arrays(index)
        image = torch.from_numpy(np.ascontiguousarray(image_np.transpose(2, 0, 1)))
        labels = torch.from_numpy(labels_np.astype(np.int64))
        if self.augmentation:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, labels = augment(image, labels, rng, **self.augmentation)
        return {
            "image": image,
            "labels": labels,
            "name": it.name,
            "box": (it.box.x, it.box.y, it.box.width, it.box.height),
            "downsample": float(it.downsample),
            "mpp": _nan_if_none(self.item_mpp(index)[0]),
            "size": it.shape,
        }

    def __repr__(self) -> str:
        return f"RegionDataset({len(self.pairs)} pairs, {len(self)} items, hr_size={self.hr_size})"


def build_dataset(
    pairs: Sequence[TrainingPair],
    class_map: ClassMap,
    *,
    hr_size: tuple[int, int] = (1024, 1024),
    regions: Literal["tissue", "whole"] = "tissue",
    seed: int = 0,
    ignore_unmapped: bool = False,
    value_names: Mapping[int, str] | str | os.PathLike | None = None,
    cache: bool = True,
    augmentation: Mapping[str, Any] | None = None,
    working_mpp: float | None = None,
) -> RegionDataset:
    """Load annotations, cut slides into regions, and make a :class:`RegionDataset`.

    Every annotation is loaded and checked against its image now (classes,
    size), so bad inputs fail before training starts; pixels are read on
    first access.

    Parameters
    ----------
    pairs : sequence of TrainingPair
    class_map : ClassMap
    hr_size : (int, int)
        Item size ``(H, W)``: the largest working raster.
    regions : {"tissue", "whole"}
        Slides: tissue regions (as inference) or the whole slide. Plain
        images are always one whole region.
    seed : int
        Augmentation seed.
    ignore_unmapped : bool
        Unknown annotation classes become ignore (255) instead of an error.
    value_names : mapping or path-like, optional
        Value -> class name table for label masks (e.g. BCSS ``GTcodes.csv``).
    cache : bool
        Keep items in memory after the first read.
    augmentation : mapping, optional
        Keyword arguments of :func:`augment` (``flips``, ``rot90``,
        ``color_jitter``); None for no augmentation.
    working_mpp : float, optional
        Read every region at this many micrometres per pixel
        (:func:`physical_shape`) instead of fitting ``hr_size``
        (``TrainConfig.working_mpp``); every image needs an MPP.

    Returns
    -------
    RegionDataset

    Raises
    ------
    WsisegError
        No pairs, unreadable files, unmapped classes, masks whose size does
        not match their slide, an image without MPP when ``working_mpp``
        is given, or a region whose raster would exceed
        :data:`MAX_WORKING_PIXELS` at it.
    """
    hr = (int(hr_size[0]), int(hr_size[1]))
    if min(hr) < 1:
        raise WsisegError(f"hr_size must be positive, got {hr_size}")
    if not pairs:
        raise WsisegError("no training pairs")
    if augmentation:
        unknown = set(augmentation) - {"flips", "rot90", "color_jitter"}
        if unknown:
            raise WsisegError(f"unknown augmentation options {sorted(unknown)}")
    annotations: list[Annotation] = []
    items: list[RegionItem] = []
    ds = RegionDataset(
        pairs,
        [],
        [],
        class_map,
        hr_size=hr,
        seed=seed,
        cache=cache,
        augmentation=augmentation,
        working_mpp=working_mpp,
    )
    for k, pair in enumerate(pairs):
        ann = load_annotation(
            pair.annotation,
            class_map,
            downsample=pair.downsample,
            ignore_unmapped=ignore_unmapped,
            value_names=value_names,
        )
        ms = ds.slide(k)
        ann.check_slide_size((ms.width, ms.height), pair.image)
        annotations.append(ann)
        plain = suffix(Path(pair.image)) in PLAIN_IMAGE_SUFFIXES
        boxes = [whole_region(ms)] if plain else slide_regions(ms, regions)
        for r, box in enumerate(boxes):
            name = pair.name if len(boxes) == 1 else f"{pair.name}#{r}"
            items.append(RegionItem(k, name, box, _item_raster(box, hr, ms, working_mpp, pair.image)))
    ds.items, ds.annotations = items, annotations
    return ds


def config_dataset(
    pairs: Sequence[TrainingPair],
    class_map: ClassMap,
    config: Any,
    *,
    ignore_unmapped: bool = False,
    value_names: Mapping[int, str] | str | os.PathLike | None = None,
) -> RegionDataset:
    """:func:`build_dataset` with the working size, regions, seed and working MPP of a training config.

    The regions ``wsiseg train`` reads for ``config`` (a
    :class:`~wsiseg.training.config.TrainConfig`).
    """
    return build_dataset(
        pairs,
        class_map,
        hr_size=config.hr_size,
        regions=config.regions,
        seed=config.seed,
        ignore_unmapped=ignore_unmapped,
        value_names=value_names,
        working_mpp=config.working_mpp,
    )


# ---------------------------------------------------------------------------
# augmentation


def augment(
    image: torch.Tensor,
    labels: torch.Tensor,
    rng: np.random.Generator | int | None = None,
    flips: bool = True,
    rot90: bool = False,
    color_jitter: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips, 90-degree rotations and colour jitter (paper A.7).

    Geometric transforms are exact permutations of pixels applied to image
    and labels alike (labels are never interpolated). Colour jitter changes
    the image only.

    Parameters
    ----------
    image : torch.Tensor
        ``(C, H, W)``, uint8 (jittered values rounded and clamped to 0-255)
        or floating point (not clamped).
    labels : torch.Tensor
        ``(H, W)`` integer.
    rng : numpy.random.Generator or int, optional
    flips : bool
        Horizontal and vertical flips, each with probability 1/2.
    rot90 : bool
        Rotation by a random multiple of 90 degrees; by 0 or 180 only when
        ``H != W`` (the shape must not change, so items still batch).
    color_jitter : float
        Brightness, contrast and saturation each scaled by a random factor
        in ``[1 - c, 1 + c]``.

    Returns
    -------
    (image, labels) : torch.Tensor
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if image.ndim != 3 or labels.ndim != 2 or image.shape[-2:] != labels.shape:
        raise ValueError(
            f"image (C, H, W) and labels (H, W) must match, got {tuple(image.shape)}, {tuple(labels.shape)}"
        )
    if flips:
        if rng.random() < 0.5:
            image, labels = image.flip(-1), labels.flip(-1)
        if rng.random() < 0.5:
            image, labels = image.flip(-2), labels.flip(-2)
    if rot90:
        square = image.shape[-1] == image.shape[-2]
        k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
        if k:
            image, labels = torch.rot90(image, k, (-2, -1)), torch.rot90(labels, k, (-2, -1))
    if color_jitter > 0:
        c = float(color_jitter)
        b, ct, s = (float(rng.uniform(max(0.0, 1 - c), 1 + c)) for _ in range(3))
        dtype = image.dtype
        x = image.float()
        x = x * b
        gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]) if x.shape[0] == 3 else x.mean(0)
        x = (x - gray.mean()) * ct + gray.mean()
        gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]) if x.shape[0] == 3 else x.mean(0)
        x = gray + (x - gray) * s
        if dtype == torch.uint8:
            x = x.round().clamp(0, 255)
        image = x.to(dtype)
    return image.contiguous(), labels.contiguous()
