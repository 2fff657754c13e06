"""Where the tissue is: a low-resolution tissue mask and its regions.

Needle-biopsy slides hold a few thin cores on mostly empty glass, so
segmenting the whole slide wastes most of the work on glass. This module
finds the tissue on a small view of the slide (never level 0 of a pyramid)
and turns it into level-0 bounding boxes, one per piece of tissue.

Coordinates follow :mod:`wsiseg.sampling.coords`: mask pixel ``(i, j)``
covers the level-0 rectangle ``[j * dx, (j + 1) * dx) x [i * dy, (i + 1) * dy)``
where ``(dx, dy)`` is :attr:`TissueMask.downsample`; :class:`Region` boxes are
half-open integer level-0 rectangles.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import dask.array as da
import numpy as np
from scipy import ndimage as ndi
from skimage import color, filters, measure, morphology

from wsiseg.errors import ConfigError, WsisegError
from wsiseg.sampling.coords import level_source_index, nearest_index
from wsiseg.sampling.tiles import label_counts
from wsiseg.slide.lowres import mean32
from wsiseg.slide.multiscale import Multiscale

logger = logging.getLogger(__name__)

__all__ = [
    "TissueMask",
    "TissueGate",
    "Region",
    "detect_tissue",
    "threshold_tissue",
    "tissue_score",
    "tissue_regions",
    "whole_region",
    "OTSU_CLIP",
    "GLASS_SCORE",
]

#: Otsu's threshold on the tissue score is clipped to this range. Glass in
#: the test slides scores about 0.03 and stained tissue mostly above 0.2;
#: clipping keeps Otsu from splitting glass-only noise (empty slide) or
#: tissue-only stain variation (slide without glass) into two classes.
OTSU_CLIP = (0.05, 0.2)
#: Tissue score at or below which a pixel counts as glass where no slide-level threshold applies (labelled
#: regions that may hold no glass at all): between glass (about 0.03) and faint eosin (about 0.15).
GLASS_SCORE = 0.1
#: Pixel size assumed for morphology sizes when the slide has no MPP (20x).
ASSUMED_MPP = 0.5
# Morphology sizes in micrometres, converted to mask pixels per slide.
_CLOSING_UM = 25.0  # bridges stain gaps and tears inside a piece of tissue
_DUST_UM2 = 25.0 * 25.0  # removed before the closing
_MIN_OBJECT_UM2 = 50.0 * 50.0  # debris, compression artefacts; removed after it
_MAX_HOLE_UM2 = 200.0 * 200.0  # lumina and fat vacuoles count as tissue
# Nearly black, unsaturated pixels are scanner padding or pen, not stain.
_BLACK_GRAY, _BLACK_SAT = 0.2, 0.15


@dataclass(frozen=True, eq=False)  # holds an array: compare by identity
class TissueMask:
    """A boolean tissue mask at low resolution.

    Attributes
    ----------
    mask : numpy.ndarray
        ``(h, w)`` bool, True on tissue.
    downsample : (float, float)
        Level-0 pixels per mask pixel along ``(x, y)``. The last mask column
        or row may reach past the slide edge by less than one mask pixel.
    threshold : float
        Threshold applied to the tissue score (0..1).
    method : str
        ``"otsu"``, ``"otsu-clipped"`` (Otsu's value clipped to
        :data:`OTSU_CLIP`), ``"constant"`` (flat score, decided by the clip
        range's midpoint) or ``"threshold"`` (user override).
    level : int
        Pyramid level that was read.
    slide_size : (int, int)
        Level-0 ``(width, height)``, for clamping.
    mpp : (float, float) or None
        Level-0 micrometres per pixel of the slide, if known.
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    threshold: float
    method: str
    level: int
    slide_size: tuple[int, int]
    mpp: tuple[float, float] | None = None

    @property
    def fraction(self) -> float:
        """Fraction of mask pixels that are tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def tissue_at(self, points) -> np.ndarray:
        """Whether level-0 points lie on tissue.

        Parameters
        ----------
        points : array-like
            ``(..., 2)`` continuous level-0 coordinates ``(x, y)``.

        Returns
        -------
        numpy.ndarray
            Bool ``(...)``: the mask pixel containing each point (clamped
            to the mask, so points on the slide's last partial mask pixel
            read it).
        """
        p = np.asarray(points, dtype=np.float64)
        h, w = self.mask.shape
        j = nearest_index(p[..., 0] / self.downsample[0], w)
        i = nearest_index(p[..., 1] / self.downsample[1], h)
        return self.mask[i, j]

    def tissue_block(self, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Tissue at the centres of a block of level-0 pixels.

        Parameters
        ----------
        cols, rows : numpy.ndarray
            Integer level-0 pixel indices (x and y) of the block's columns
            and rows.

        Returns
        -------
        numpy.ndarray
            Bool ``(len(rows), len(cols))``: the mask pixel holding each
            level-0 pixel's centre, as :meth:`tissue_at`.
        """
        h, w = self.mask.shape
        j = nearest_index((np.asarray(cols) + 0.5) / self.downsample[0], w)
        i = nearest_index((np.asarray(rows) + 0.5) / self.downsample[1], h)
        if i.size and j.size and (np.diff(i) >= 0).all() and (np.diff(j) >= 0).all():
            # Increasing indices (a pyramid level's pixels): each mask pixel repeated over its run of
            # pixels, several times faster than gathering every pixel.
            sub = self.mask[i[0] : i[-1] + 1, j[0] : j[-1] + 1]
            return np.repeat(np.repeat(sub, np.bincount(i - i[0]), axis=0), np.bincount(j - j[0]), axis=1)
        return self.mask[np.ix_(i, j)]

    def block_span(self, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The mask pixels between those of a block's first and last level-0 pixels.

        With ``cols`` and ``rows`` non-decreasing (as a pyramid level's
        source pixels are), :meth:`tissue_block` reads only pixels of this
        sub-array: where it is all tissue or all glass, so is the block,
        without a lookup per pixel.

        Returns
        -------
        numpy.ndarray
            Bool view of ``mask``.
        """
        h, w = self.mask.shape
        j = nearest_index((np.asarray([cols[0], cols[-1]]) + 0.5) / self.downsample[0], w)
        i = nearest_index((np.asarray([rows[0], rows[-1]]) + 0.5) / self.downsample[1], h)
        return self.mask[i[0] : i[1] + 1, j[0] : j[1] + 1]


class TissueGate:
    """A label tile source whose pixels on glass are background (value 0).

    Wraps a ``tile_source`` of :func:`wsiseg.output.mask.write_label_pyramid`
    (the reverse sampler, or the sliding-window label store): every pixel the
    tissue detector calls glass gets label 0, whatever the segmentation net
    said. The nets see whole region boxes, and a model can call glass inside
    a box tissue (the real-tissue demo model calls it non-tumour); the
    detector's tissue outline is the better judge there. Reduced levels are
    gated at the level-0 pixel each level pixel reads
    (:func:`wsiseg.sampling.coords.level_source_index`), so the pyramid stays
    level 0 subsampled.

    Parameters
    ----------
    source : callable
        ``source(level, x0, y0, w, h)``: ``(h, w)`` uint8 labels, or an int
        for a constant tile (kept one where it can be).
    tissue : TissueMask
        The slide's tissue mask.
    width, height : int
        Level-0 size of the slide.

    Attributes
    ----------
    counts : numpy.ndarray
        ``(256,)`` int64 level-0 pixels per label value after gating.
    """

    def __init__(self, source, tissue: TissueMask, width: int, height: int):
        self.source = source
        self.tissue = tissue
        self.width, self.height = int(width), int(height)
        self.counts = np.zeros(256, np.int64)
        self._index: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, level, x0: int, y0: int, w: int, h: int):
        labels = self.source(level, x0, y0, w, h)  # (h, w) uint8, or an int for a constant tile
        if level.index not in self._index:  # once per level, not per tile
            self._index[level.index] = (
                level_source_index(self.width, level.width),
                level_source_index(self.height, level.height),
            )
        cols, rows = self._index[level.index]
        cols, rows = cols[x0 : x0 + w], rows[y0 : y0 + h]
        # Most tiles lie wholly on tissue or on glass: decide those from the mask pixels they span.
        span = self.tissue.block_span(cols, rows)
        constant = np.ndim(labels) == 0
        if span.all() or (constant and int(labels) == 0):
            pass  # nothing to gate
        elif not span.any():
            labels = 0  # all glass: stays a constant tile (the writer shares one encoded copy)
        else:
            tissue = self.tissue.tissue_block(cols, rows)
            if not tissue.any():
                labels = 0
            elif not tissue.all():
                # labels times the tissue mask, 0 on glass: several times cheaper than numpy.where
                if constant:
                    labels = tissue.view(np.uint8) * np.uint8(labels)
                else:
                    labels = np.multiply(np.asarray(labels, dtype=np.uint8), tissue)
        if level.index == 0:
            self.counts += label_counts(labels, w * h)
        return labels


@dataclass(frozen=True)
class Region:
    """A half-open level-0 rectangle ``[x, x + width) x [y, y + height)``.

    Attributes
    ----------
    x, y : int
        Top-left corner in level-0 pixels.
    width, height : int
        Size in level-0 pixels, both >= 1.
    """

    x: int
    y: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"region size must be positive, got {self.width}x{self.height}")

    @property
    def x1(self) -> int:
        """Right edge (exclusive)."""
        return self.x + self.width

    @property
    def y1(self) -> int:
        """Bottom edge (exclusive)."""
        return self.y + self.height

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``, right and bottom exclusive."""
        return self.x, self.y, self.x1, self.y1

    @property
    def area(self) -> int:
        return self.width * self.height


def whole_region(ms: Multiscale) -> Region:
    """The whole slide as one :class:`Region`."""
    return Region(0, 0, ms.width, ms.height)


def _pick_level(ms: Multiscale, max_size: int) -> int:
    """Coarsest level whose long side is still >= ``max_size / 2``.

    Every coarser level would have to be upsampled to reach the target
    resolution; if none is that large, the slide is small and level 0 is read.
    """
    best = 0
    for i, lv in enumerate(ms.levels):
        if max(lv.width, lv.height) >= max_size / 2:
            best = i
    return best


def _low_res_rgb(ms: Multiscale, level: int, max_size: int) -> tuple[np.ndarray, int]:
    """Mean colour of ``f x f`` blocks of a level, long side <= ``max_size``.

    Block means (not point samples) so that thin tissue is not missed and
    JPEG noise on glass averages out. Computed chunk by chunk by dask, so a
    single-level slide never has to fit in memory.
    """
    arr = ms.levels[level].array
    h, w = arr.shape[:2]
    f = max(1, math.ceil(max(h, w) / max_size))
    if f > 1:
        # Edge-replicate up to a multiple of f so no border pixels are lost.
        arr = da.pad(arr, ((0, -h % f), (0, -w % f), (0, 0)), mode="edge")
        arr = da.coarsen(mean32, arr, {0: f, 1: f})
    rgb = np.asarray(arr.compute(), dtype=np.float32)
    return rgb / np.float32(255.0), f


def tissue_score(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel tissue score in ``[0, 1]``: mean of saturation and darkness.

    Stain makes tissue both coloured (HSV saturation) and darker than glass
    (``1 - gray``); averaging the two keeps pale eosin and dark, greyish
    haematoxylin-rich regions above glass. Near-black, unsaturated pixels
    (scanner padding, pen) score 0.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(h, w, 3)`` float in ``[0, 1]`` or uint8.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        rgb = rgb.astype(np.float32) / np.float32(255.0)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    # HSV saturation, (max - min) / max, as skimage.color.rgb2hsv defines it
    # (without computing the hue it would also return).
    sat = np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)
    gray = color.rgb2gray(rgb)
    score = 0.5 * (sat + (1.0 - gray))
    score[(gray < _BLACK_GRAY) & (sat < _BLACK_SAT)] = 0.0
    return score


def threshold_tissue(rgb: np.ndarray, threshold: float | None = None) -> tuple[np.ndarray, float, str]:
    """Tissue where :func:`tissue_score` exceeds a threshold (no clean-up).

    The thresholding step of :func:`detect_tissue`, for any RGB array (a
    slide's low-resolution view, or a region image at any resolution).

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(h, w, 3)`` float in ``[0, 1]`` or uint8.
    threshold : float, optional
        Fixed score threshold; default Otsu's threshold of the score,
        clipped to :data:`OTSU_CLIP` (the clip range's midpoint when the
        score is flat).

    Returns
    -------
    mask : numpy.ndarray
        ``(h, w)`` bool, True on tissue.
    threshold : float
        The threshold used.
    method : str
        ``"otsu"``, ``"otsu-clipped"``, ``"constant"`` or ``"threshold"``
        (see :class:`TissueMask`).
    """
    score = tissue_score(rgb)
    lo, hi = OTSU_CLIP
    if threshold is not None:
        t, method = float(threshold), "threshold"
    elif score.max() - score.min() < 1e-3:
        # Otsu is undefined on a flat image; the clip midpoint tells glass from stain.
        t, method = 0.5 * (lo + hi), "constant"
    else:
        otsu = float(filters.threshold_otsu(score))
        t = min(max(otsu, lo), hi)
        method = "otsu" if t == otsu else "otsu-clipped"
    return score > t, t, method


def detect_tissue(ms: Multiscale, *, max_size: int = 2048, threshold: float | None = None) -> TissueMask:
    """Detect tissue on a low-resolution view of a slide.

    The coarsest pyramid level whose long side is at least ``max_size / 2``
    is read (level 0 only when no reduced level is that large) and
    block-averaged by an integer factor until its long side is at most
    ``max_size``. Tissue is where :func:`tissue_score` exceeds Otsu's
    threshold, clipped to :data:`OTSU_CLIP`, or ``threshold`` if given
    (:func:`threshold_tissue`).
    The mask is then cleaned at a physical scale: specks below 625 µm²
    removed, closing (25 µm radius), holes below 0.04 mm² filled, objects
    below 2500 µm² removed (sizes use the slide's MPP, or
    :data:`ASSUMED_MPP` when it is unknown).

    Parameters
    ----------
    ms : Multiscale
        The slide.
    max_size : int
        Upper bound on the mask's long side, in pixels (>= 16).
    threshold : float, optional
        Fixed score threshold in ``[0, 1]``; higher keeps less tissue.

    Returns
    -------
    TissueMask

    Notes
    -----
    A slide with no glass and one with no tissue are both handled: their
    score is (nearly) constant or Otsu's value falls outside the clip range,
    and the mask comes out all tissue or empty, never split in two.
    """
    if max_size < 16:
        raise ConfigError(f"max_size must be >= 16, got {max_size}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"tissue threshold must be in [0, 1], got {threshold}")
    level = _pick_level(ms, max_size)
    rgb, f = _low_res_rgb(ms, level, max_size)
    ds = ms.levels[level].downsample
    downsample = (float(ds[0]) * f, float(ds[1]) * f)
    mask, t, method = threshold_tissue(rgb, threshold)

    px_um = (ms.mpp[0] if ms.mpp else ASSUMED_MPP) * math.sqrt(downsample[0] * downsample[1])
    mask = _clean(mask, px_um)
    return TissueMask(
        mask=mask,
        downsample=downsample,
        threshold=t,
        method=method,
        level=level,
        slide_size=(ms.width, ms.height),
        mpp=ms.mpp,
    )


def _clean(mask: np.ndarray, px_um: float) -> np.ndarray:
    """Closing, hole filling and speck removal at physical sizes."""
    if not mask.any() or mask.all():
        return mask
    px_area = px_um * px_um
    # Dust first: otherwise the closing bridges specks near tissue into spikes.
    mask = morphology.remove_small_objects(mask, max_size=int(_DUST_UM2 / px_area), connectivity=2)
    radius = max(1, round(_CLOSING_UM / px_um))
    # Distance-transform closing: cost independent of the radius. Padding
    # keeps tissue that touches the border from being eroded.
    padded = morphology.isotropic_closing(np.pad(mask, radius), radius)
    mask = padded[radius:-radius, radius:-radius]
    mask = morphology.remove_small_holes(mask, max_size=max(1, int(_MAX_HOLE_UM2 / px_area)))
    mask = morphology.remove_small_objects(mask, max_size=max(0, int(_MIN_OBJECT_UM2 / px_area)), connectivity=2)
    return mask


def tissue_regions(
    tissue: TissueMask,
    *,
    pad_um: float | None = None,
    pad_px: float | None = None,
    min_area_fraction: float = 0.01,
    merge_overlapping: bool = True,
) -> list[Region]:
    """Level-0 bounding boxes of the pieces of tissue.

    One box per connected component of the mask (8-connectivity), grown by
    a margin, clamped to the slide; boxes that overlap after padding are
    merged (repeatedly, until none overlap).

    Parameters
    ----------
    tissue : TissueMask
        From :func:`detect_tissue`.
    pad_um : float, optional
        Margin in micrometres (needs the slide's MPP).
    pad_px : float, optional
        Margin in level-0 pixels. Default when neither is given: two mask
        pixels, which covers the mask's own boundary uncertainty.
    min_area_fraction : float
        Components smaller than this fraction of the *largest* component are
        dropped (specks next to real cores). A fraction of the total tissue
        would drop every core of an array of more than ``1 /
        min_area_fraction`` equal cores.
    merge_overlapping : bool
        Merge boxes that overlap (touching edges do not count).

    Returns
    -------
    list of Region
        Sorted by top edge, then left edge; empty when there is no tissue.

    Raises
    ------
    ConfigError
        Both margins given, a negative margin, or ``pad_um`` without MPP.
    """
    if pad_um is not None and pad_px is not None:
        raise ConfigError("give pad_um or pad_px, not both")
    if pad_um is not None:
        if tissue.mpp is None:
            raise ConfigError("pad_um needs the slide's MPP, which is unknown; give pad_px instead")
        pad = (pad_um / tissue.mpp[0], pad_um / tissue.mpp[1])
    elif pad_px is not None:
        pad = (float(pad_px), float(pad_px))
    else:
        pad = (2.0 * tissue.downsample[0], 2.0 * tissue.downsample[1])
    if min(pad) < 0:
        raise ConfigError(f"region padding must be >= 0, got {pad}")
    if not 0.0 <= min_area_fraction < 1.0:
        raise ConfigError(f"min_area_fraction must be in [0, 1), got {min_area_fraction}")

    labels = measure.label(tissue.mask, connectivity=2)
    if labels.max() == 0:
        return []
    areas = np.bincount(labels.ravel())[1:]
    keep_min = min_area_fraction * areas.max()
    W, H = tissue.slide_size
    dx, dy = tissue.downsample
    boxes = []
    for i, sl in enumerate(ndi.find_objects(labels)):
        if sl is None or areas[i] < keep_min:
            continue
        r0, r1, c0, c1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        # Mask edges -> level-0 edges, widened to whole pixels, padded, clamped.
        x0 = max(0, math.floor(c0 * dx - pad[0]))
        y0 = max(0, math.floor(r0 * dy - pad[1]))
        x1 = min(W, math.ceil(c1 * dx + pad[0]))
        y1 = min(H, math.ceil(r1 * dy + pad[1]))
        if x1 > x0 and y1 > y0:
            boxes.append((x0, y0, x1, y1))
    if merge_overlapping:
        boxes = _merge_boxes(boxes)
    boxes.sort(key=lambda b: (b[1], b[0], b[3], b[2]))
    return [Region(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes]


def _merge_boxes(boxes: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Union overlapping half-open boxes until no two overlap."""
    boxes = list(boxes)
    merged = True
    while merged:
        merged = False
        out: list[tuple[int, int, int, int]] = []
        for b in boxes:
            for k, o in enumerate(out):
                if b[0] < o[2] and o[0] < b[2] and b[1] < o[3] and o[1] < b[3]:
                    out[k] = (min(b[0], o[0]), min(b[1], o[1]), max(b[2], o[2]), max(b[3], o[3]))
                    merged = True
                    break
            else:
                out.append(b)
        boxes = out
    return boxes


def slide_regions(
    ms: Multiscale,
    regions: str = "tissue",
    *,
    threshold: float | None = None,
    tissue: TissueMask | None = None,
) -> list[Region]:
    """The regions a slide is cut into, shared by training and inference.

    Parameters
    ----------
    ms : Multiscale
        The slide.
    regions : {"tissue", "whole"}
        ``"tissue"``: :func:`tissue_regions` of :func:`detect_tissue` (one
        box per biopsy core); a slide where no tissue is found is one
        whole-slide region (logged). ``"whole"``: the whole slide.
    threshold : float, optional
        Tissue score threshold override for :func:`detect_tissue`.
    tissue : TissueMask, optional
        An already computed tissue mask (saves detecting it twice).
    """
    if regions == "whole":
        return [whole_region(ms)]
    if regions != "tissue":
        raise WsisegError(f"regions must be 'tissue' or 'whole', got {regions!r}")
    found = tissue_regions(tissue if tissue is not None else detect_tissue(ms, threshold=threshold))
    if not found:
        logger.warning("%s: no tissue found; using the whole slide as one region", ms.path)
        return [whole_region(ms)]
    return found
