"""One slide end to end: open -> regions -> d -> grid -> gather -> segment -> tiles -> files.

The net only ever sees a small deformed image per region; the full-resolution
mask is produced tile by tile by :class:`wsiseg.sampling.tiles.ReverseTiler`
and streamed into a pyramidal BigTIFF, so memory does not grow with the
slide's area.

Scale
-----
A model that records the physical scale it was trained at
(:mod:`wsiseg.models.scale`) samples every region of a slide with a known
MPP at its sample spacing in micrometres (:class:`ScalePlan`,
:func:`wsiseg.sampling.geometry.region_geometry`'s physical mode), so a
whole slide gets as many samples per micrometre as a training region did.
Regions whose grid would exceed ``max_grid`` are cut into the fewest equal
sub-boxes that fit (:func:`wsiseg.sampling.geometry.split_region`), each
segmented as its own region. Older models, fixed grids (``--size``,
``--long-side``) and slides without an MPP use the pixel rule.

``mode="sliding-window"`` is the usual baseline instead: the same
segmentation net on every level-0 window of the tissue regions, its labels
kept in a temporary file next to the outputs (:class:`LabelStore`), never in
memory. Both modes share the regions, the output writers, QC and report.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from wsiseg.device import resolve_device, usable_cpus
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.limits import mpp_problem
from wsiseg.models.io import LoadedModel
from wsiseg.output.ome import (
    FORMAT_SUFFIXES,
    MAX_MEGAPIXELS,
    ome_tiff_from_mask,
    ome_zarr_from_mask,
    parse_formats,
)
from wsiseg.sampling.coords import level_source_index, to_pixels, uniform_grid
from wsiseg.sampling.edges import uniform_density
from wsiseg.sampling.geometry import PhysicalScale, split_region
from wsiseg.sampling.sizes import sample_fraction
from wsiseg.sampling.tiles import RegionPrediction, ReverseTiler, coarse_inverse
from wsiseg.slide.gather import gather
from wsiseg.slide.lowres import read_lowres, thumbnail
from wsiseg.slide.multiscale import Multiscale

if TYPE_CHECKING:  # the tissue detector (scikit-image) is imported when regions are found
    from wsiseg.slide.tissue import TissueMask

__all__ = [
    "OUTPUT_SUFFIXES",
    "MODES",
    "BACKGROUNDS",
    "MAX_GRID",
    "SegmentOptions",
    "NO_MODEL_SCALE",
    "NO_SLIDE_MPP",
    "ScalePlan",
    "scale_plan",
    "RegionResult",
    "segment_region",
    "sliding_window",
    "LabelStore",
    "find_regions",
    "samples_on_glass",
    "output_paths",
    "reduced_mask_level",
    "segment_slide",
    "check_model_for_slides",
    "SlideSegmenter",
    "run_segment",
]

logger = logging.getLogger(__name__)

#: Output files per slide: kind -> suffix after the slide's name.
OUTPUT_SUFFIXES = {
    "mask": ".mask.tif",
    "overlay": ".overlay.tif",
    **FORMAT_SUFFIXES,  # "ome-tiff", "ome-zarr": only when asked for (SegmentOptions.formats)
    "classes": ".classes.json",
    "geojson": ".geojson.gz",
    "qc": ".qc.png",
    "report": ".report.json",
}


#: Segmentation modes: deformed sampling, or the net on every level-0 window.
MODES = ("deformed", "sliding-window")

#: Who labels glass in the mask (``SegmentOptions.background``): the tissue detector, or the net.
BACKGROUNDS = ("tissue", "model")

#: Sliding-window mode: side of the level-0 windows whose labels are kept, the
#: context read around them on each side (its predictions are cropped away),
#: and windows per forward pass.
SW_WINDOW, SW_MARGIN, SW_BATCH = 512, 32, 4

#: Largest ``(h, w)`` sampling grid of one region in physical mode (memory cap).
MAX_GRID = (512, 512)


@dataclass(frozen=True)
class SegmentOptions:
    """How to segment a slide (everything but the model's own settings).

    Attributes
    ----------
    regions : {"tissue", "whole"}
        Run the sampler per detected tissue region (biopsy core) or once on
        the whole slide.
    tissue_threshold : float, optional
        Override of the tissue score threshold (0..1).
    background : {"tissue", "model"}
        Who decides glass in the mask: ``"tissue"``, every pixel the tissue
        detector calls glass is background (value 0) whatever the net said
        (:class:`wsiseg.slide.tissue.TissueGate`); ``"model"``, the net's
        labels everywhere in the region boxes.
    out_size : (int, int), optional
        Grid size ``(h, w)`` per region; default: the model's sample
        spacing in micrometres when it records one and the slide's MPP is
        known (physical mode), else the model's grid adapted to the
        region's shape by the dynamic size rule (pixel rule).
    long_side : int, optional
        Long-side cap of the dynamic size rule (paper A.6); default four
        times the model's long side. Given, it selects the pixel rule.
    max_grid : (int, int)
        Largest ``(h, w)`` grid of one region in physical mode; larger
        regions are split into the fewest equal sub-boxes that fit.
    interp : {"nearest", "linear"}
        Read-back: nearest grid node (the paper) or bilinear class scores.
    gather_mode : {"lod", "exact"}
        Level-of-detail pyramid reads, or bilinear at level 0 (the paper).
    lod_bias : float
        Octaves added to the level choice (positive reads coarser).
    device : str
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    amp : bool, optional
        Mixed precision; default on for CUDA.
    tile : int
        Output TIFF tile size.
    mpp : float, optional
        Micrometres per level-0 pixel, overriding the slide's (and giving
        one to slides without, for physical mode).
    geojson, qc : bool
        Write the QuPath GeoJSON / the QC figure.
    mode : {"deformed", "sliding-window"}
        Deformed sampling (the method), or the segmentation net run on
        every level-0 window of the regions (the baseline, for comparisons).
    formats : tuple of str
        Mask formats (:data:`wsiseg.output.ome.FORMATS`): ``"tiff"`` (the
        mask and overlay TIFFs, always written) plus ``"ome-tiff"`` and/or
        ``"ome-zarr"``, made from the finished TIFF mask. Normalised by
        :func:`wsiseg.output.ome.parse_formats` (a comma-separated string
        is accepted too).
    ome_zarr_megapixels : float
        Largest finest level of the ``ome-zarr`` output in millions of
        pixels (image and labels; 0: no limit), see
        :func:`wsiseg.output.ome.ome_zarr_from_mask`.
    """

    regions: str = "tissue"
    tissue_threshold: float | None = None
    background: str = "tissue"
    out_size: tuple[int, int] | None = None
    long_side: int | None = None
    max_grid: tuple[int, int] = MAX_GRID
    interp: str = "nearest"
    gather_mode: str = "lod"
    lod_bias: float = 0.0
    device: str = "auto"
    amp: bool | None = None
    tile: int = 512
    mpp: float | None = None
    geojson: bool = True
    qc: bool = True
    mode: str = "deformed"
    formats: tuple[str, ...] = ("tiff",)
    ome_zarr_megapixels: float = MAX_MEGAPIXELS

    def __post_init__(self):
        object.__setattr__(self, "formats", parse_formats(self.formats))  # frozen: normalise in place
        if not self.ome_zarr_megapixels >= 0:
            raise ConfigError(f"OME-Zarr megapixels must be >= 0 (0: no limit), got {self.ome_zarr_megapixels}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.regions not in ("tissue", "whole"):
            raise ConfigError(f"regions must be 'tissue' or 'whole', got {self.regions!r}")
        if self.background not in BACKGROUNDS:
            raise ConfigError(f"background must be one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        if self.interp not in ("nearest", "linear"):
            raise ConfigError(f"interp must be 'nearest' or 'linear', got {self.interp!r}")
        if self.gather_mode not in ("lod", "exact"):
            raise ConfigError(f"gather mode must be 'lod' or 'exact', got {self.gather_mode!r}")
        if self.tissue_threshold is not None and not 0 < self.tissue_threshold < 1:
            raise ConfigError(f"tissue threshold must be in (0, 1), got {self.tissue_threshold}")
        if self.mpp is not None and (problem := mpp_problem(self.mpp)):
            raise ConfigError(f"--{problem}")
        try:
            max_grid = tuple(int(v) for v in self.max_grid)
        except (TypeError, ValueError):
            max_grid = ()
        if len(max_grid) != 2 or min(max_grid) < 1:
            raise ConfigError(f"max grid must be two positive integers (h, w), got {self.max_grid!r}")
        object.__setattr__(self, "max_grid", max_grid)

    def resolved(self) -> dict:
        """JSON-able settings that change the outputs (for resume fingerprints)."""
        d = asdict(self)
        for k in ("device", "amp"):  # where it runs does not change what it writes
            d.pop(k)
        if d["formats"] == ("tiff",):
            # the default leaves the fingerprint as before --format existed: finished folders stay done
            d.pop("formats")
        if d["max_grid"] == MAX_GRID:
            d.pop("max_grid")  # likewise for --max-grid
        if "ome-zarr" not in self.formats:
            # only the OME-Zarr depends on it; with one, the key also sets apart the stores that
            # held labels alone (before the RGB image was added): a resume redoes them
            d.pop("ome_zarr_megapixels")
        return d


#: Why a slide is sampled by pixel size (``ScalePlan.reason``).
NO_MODEL_SCALE = "the model records no physical scale"
NO_SLIDE_MPP = "slide has no MPP; pass --mpp"


@dataclass(frozen=True)
class ScalePlan:
    """How one slide's regions are sized: at the model's physical scale, or by pixels.

    Attributes
    ----------
    physical : PhysicalScale or None
        The slide's level-0 MPP and the model's sample spacing (physical
        mode); None for the pixel rule.
    reason : str or None
        Why the pixel rule (:data:`NO_MODEL_SCALE`, :data:`NO_SLIDE_MPP`,
        or the grid option that fixes it).
    max_grid : (int, int)
        Largest ``(h, w)`` grid of one region in physical mode.
    """

    physical: PhysicalScale | None
    reason: str | None = None
    max_grid: tuple[int, int] = MAX_GRID

    def boxes(self, box: tuple[int, int, int, int]) -> list[tuple[int, int, int, int]]:
        """The region's sub-boxes to segment: ``[box]`` unless its physical grid exceeds ``max_grid``."""
        if self.physical is None:
            return [tuple(box)]
        return split_region(box, self.physical, self.max_grid)

    def report(self, grids: int) -> dict:
        """The report's ``scale`` entry; ``grids``: sub-boxes segmented."""
        if self.physical is None:
            return {"mode": "pixels", "reason": self.reason}
        return {
            "mode": "physical",
            "sample_spacing_um": self.physical.spacing_um,
            "mpp": list(self.physical.mpp),
            "max_grid": list(self.max_grid),
            "grids": int(grids),
        }


def scale_plan(model: LoadedModel, mpp: tuple[float, float] | None, options: SegmentOptions) -> ScalePlan:
    """Physical mode when the model records a sample spacing and the slide's MPP is known.

    Parameters
    ----------
    model : LoadedModel
    mpp : (float, float) or None
        The slide's level-0 micrometres per pixel ``(x, y)`` (after ``--mpp``).
    options : SegmentOptions
        ``out_size`` or ``long_side`` (a grid in pixels) select the pixel
        rule; ``max_grid`` caps physical grids.
    """
    if options.out_size is not None:
        return ScalePlan(None, "--size fixes the grid", options.max_grid)
    if options.long_side is not None:
        return ScalePlan(None, "--long-side selects the pixel rule", options.max_grid)
    scale = model.scale
    if scale is None or not scale.known:
        return ScalePlan(None, NO_MODEL_SCALE, options.max_grid)
    if mpp is None:
        return ScalePlan(None, NO_SLIDE_MPP, options.max_grid)
    return ScalePlan(PhysicalScale(mpp, scale.sample_spacing_um), None, options.max_grid)


@dataclass
class RegionResult:
    """What one region's segmentation produced (for tiles, QC and report)."""

    box: tuple[int, int, int, int]
    grid_size: tuple[int, int]
    map_size: tuple[int, int]
    prediction: RegionPrediction
    points: np.ndarray
    density: np.ndarray
    gather_stats: dict = field(default_factory=dict)


def _autocast(device: torch.device, amp: bool | None):
    if device.type == "cuda" and amp is not False:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def segment_region(
    ms: Multiscale,
    box: tuple[int, int, int, int],
    model: LoadedModel,
    options: SegmentOptions,
    device: torch.device,
    *,
    plan: ScalePlan | None = None,
) -> RegionResult:
    """Segment one level-0 box of a slide on its own deformed grid.

    Parameters
    ----------
    ms : Multiscale
        The slide.
    box : (x, y, width, height)
        Level-0 region; in physical mode one whose grid fits ``max_grid``
        (a sub-box of :meth:`ScalePlan.boxes`).
    model : LoadedModel
        From :func:`wsiseg.models.io.load_deformseg`.
    options : SegmentOptions
    device : torch.device
    plan : ScalePlan, optional
        Default :func:`scale_plan` of the model, the slide's MPP and
        ``options``.

    Returns
    -------
    RegionResult

    Raises
    ------
    ValueError
        In physical mode, a box whose grid exceeds ``max_grid``.
    """
    check_model_for_slides(model)
    net = model.net
    x, y, bw, bh = box
    plan = plan if plan is not None else scale_plan(model, ms.mpp, options)
    geo = net.geometry(bh, bw, grid=options.out_size, long_side=options.long_side, physical=plan.physical)
    if plan.physical is not None and (geo.grid[0] > plan.max_grid[0] or geo.grid[1] > plan.max_grid[1]):
        raise ValueError(f"region {box} needs a {geo.grid} grid, over the cap {plan.max_grid}: "
                         "segment the sub-boxes of ScalePlan.boxes")
    (h, w), (hd, wd) = geo.grid, geo.map
    with torch.no_grad(), _autocast(device, options.amp):
        if net.sampler == "learned":
            x_lr = torch.from_numpy(read_lowres(ms, box, (hd, wd))).permute(2, 0, 1)[None].to(device)
            d = net.density(x_lr)
        else:
            d = uniform_density(1, hd, wd, device=device)
        grid = net.grid(d.float(), geo)
        points = to_pixels(grid[0].double().cpu().numpy(), bw, bh, origin=(x, y))
        g = gather(ms, points, mode=options.gather_mode, bias=options.lod_bias)
        image = torch.from_numpy(g.image).permute(2, 0, 1)[None].to(device)
        logits = net.segmenter(net.standardise(image))
    probs = torch.softmax(logits.float(), dim=1)[0].cpu()
    values = np.array([c.value for c in model.classes], dtype=np.uint8)
    labels = values[probs.argmax(dim=0).numpy()]
    pred = RegionPrediction(
        box=(x, y, bw, bh),
        labels=labels,
        inverse=coarse_inverse(grid[0].cpu(), (bh, bw)),
        scores=probs.numpy() if options.interp == "linear" else None,
        values=values,
    )
    return RegionResult(
        box=(x, y, bw, bh),
        grid_size=(h, w),
        map_size=(hd, wd),
        prediction=pred,
        points=points,
        density=d[0, 0].float().cpu().numpy(),
        gather_stats=_gather_dict(g.stats),
    )


def _gather_dict(stats) -> dict:
    return {
        "samples": int(stats.samples),
        "chunks": int(stats.chunks),
        "pixels": int(stats.pixels),
        "fraction_level0": float(stats.fraction),
        "levels": [
            {k: (float(v) if isinstance(v, float) else v) for k, v in asdict(lv).items()} for lv in stats.levels
        ],
    }


def _read_window(ms: Multiscale, x: int, y: int, size: int) -> np.ndarray:
    """Level-0 RGB ``size x size`` at ``(x, y)``, edge-replicated where it leaves the slide."""
    xa, ya = max(x, 0), max(y, 0)
    xb, yb = min(x + size, ms.width), min(y + size, ms.height)
    rgb = np.asarray(ms.levels[0].array[ya:yb, xa:xb].compute())
    pad = ((ya - y, y + size - yb), (xa - x, x + size - xb), (0, 0))
    return np.pad(rgb, pad, mode="edge") if any(a or b for a, b in pad) else rgb


def sliding_window(
    ms: Multiscale,
    boxes: list[tuple[int, int, int, int]],
    model: LoadedModel,
    options: SegmentOptions,
    device: torch.device,
    store: LabelStore,
    progress: Callable[[float], None] | None = None,
) -> dict:
    """Segment level-0 boxes window by window with the model's segmentation net.

    The baseline that deformed sampling is measured against: every level-0
    pixel of the boxes goes through the segmentation net (the deformation net
    is not used), in ``SW_WINDOW``-pixel windows read with ``SW_MARGIN``
    pixels of context on each side (whose predictions are discarded), a few
    windows per forward pass. Labels go to ``store`` as they are produced.

    Parameters
    ----------
    ms : Multiscale
    boxes : list of (x, y, width, height)
        Level-0 regions; labels outside them are left alone (background).
    model : LoadedModel
    options : SegmentOptions
        ``amp`` is used.
    device : torch.device
    store : LabelStore
    progress : callable, optional
        ``progress(fraction)`` after each batch.

    Returns
    -------
    dict
        ``windows`` run, ``window``/``margin``/``batch`` sizes and level-0
        ``pixels`` read (context included).
    """
    check_model_for_slides(model)
    net = model.net
    values = np.array([c.value for c in model.classes], dtype=np.uint8)
    windows = [
        (wx, wy, box)
        for box in boxes
        for wy in range(box[1], box[1] + box[3], SW_WINDOW)
        for wx in range(box[0], box[0] + box[2], SW_WINDOW)
    ]
    size, m = SW_WINDOW + 2 * SW_MARGIN, SW_MARGIN
    for start in range(0, len(windows), SW_BATCH):
        batch = windows[start : start + SW_BATCH]
        images = np.stack([_read_window(ms, wx - m, wy - m, size) for wx, wy, _ in batch])
        with torch.no_grad(), _autocast(device, options.amp):
            logits = net.segmenter(net.standardise(torch.from_numpy(images).permute(0, 3, 1, 2).to(device)))
        best = logits.float().argmax(dim=1)[:, m : m + SW_WINDOW, m : m + SW_WINDOW].cpu().numpy()
        for (wx, wy, (bx, by, bw, bh)), idx in zip(batch, best):
            # windows at a box's right/bottom edge are cropped to the box
            store.write(wx, wy, values[idx[: by + bh - wy, : bx + bw - wx]])
        if progress is not None:
            progress(min(start + SW_BATCH, len(windows)) / len(windows))
    return {
        "windows": len(windows),
        "window": SW_WINDOW,
        "margin": SW_MARGIN,
        "batch": SW_BATCH,
        "pixels": len(windows) * size * size,
    }


class LabelStore:
    """Level-0 labels of a slide in a temporary file next to the outputs.

    The sliding-window mode writes each window's labels here and the mask
    writer reads them back tile by tile, so no full-resolution array is ever
    held in memory. The file is a raw row-major ``uint8`` raster, created
    sparse (all 0: background) and read one band of rows at a time. It is a
    ``tile_source`` for :func:`wsiseg.output.mask.write_label_pyramid`:
    reduced levels pick the level-0 pixel under each level pixel's centre
    (:func:`wsiseg.sampling.coords.level_source_index`), the pyramid rule of
    the deformed mode.

    Reads and writes are plain ``pread``/``pwrite`` calls, not a memory map:
    a full disk then raises ``OSError`` (ENOSPC) at the write that hits it,
    which fails the slide, where a store to a mapped page of a sparse file
    killed the whole process with SIGBUS (on tmpfs even a mapped read of a
    hole allocates). The file stays sparse, so only the windows' rows take
    disk space.

    The file is named ``.NAME.sliding-window.tmp-PID`` like the temporaries
    of :func:`wsiseg.atomic.atomic_output`, so that a run killed outright
    (``kill -9``, a lost dask worker) leaves one that the next run on the
    folder removes when it takes over the slide's stale lock. Use the store
    as a context manager: the file is deleted on exit, errors included.

    Parameters
    ----------
    folder : path-like
        Where the file goes (the slide's output folder).
    name : str
        Output stem of the slide (part of the file name).
    width, height : int
        Level-0 size.

    Attributes
    ----------
    counts : numpy.ndarray
        ``(256,)`` level-0 pixels per label, counted as level 0 is read.
    """

    def __init__(self, folder: str | os.PathLike, name: str, width: int, height: int):
        self.path = Path(folder) / f".{name}.sliding-window.tmp-{os.getpid()}"
        self.path.unlink(missing_ok=True)  # left by a dead process whose pid this one now has
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(self._fd, int(width) * int(height))  # sparse: reads as 0 until written
        except BaseException:
            self.close()
            raise
        self.width, self.height = int(width), int(height)
        self.counts = np.zeros(256, np.int64)
        self._band: tuple[tuple[int, int, int], np.ndarray] | None = None

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close and delete the file."""
        self._band = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)

    def write(self, x: int, y: int, labels: np.ndarray) -> None:
        """Store ``labels`` ``(h, w)`` uint8 at level-0 ``(x, y)``.

        Raises
        ------
        OSError
            The disk is full (ENOSPC) or the file cannot be written; it names
            the store's file.
        """
        self._band = None
        labels = np.ascontiguousarray(labels, dtype=np.uint8)
        try:
            for r, row in enumerate(labels):
                data = memoryview(row)
                at = (y + r) * self.width + x
                while data:
                    n = os.pwrite(self._fd, data, at)
                    data, at = data[n:], at + n
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None

    def __call__(self, level, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        if level.index == 0:
            band = self._band_rows(0, y0, np.arange(y0, y0 + h))
            out = np.array(band[:, x0 : x0 + w])
            self.counts += np.bincount(out.ravel(), minlength=256)
            return out
        rows = level_source_index(self.height, level.height)[y0 : y0 + h]
        cols = level_source_index(self.width, level.width)[x0 : x0 + w]
        return self._band_rows(level.index, y0, rows)[:, cols]

    def _band_rows(self, level: int, y0: int, rows: np.ndarray) -> np.ndarray:
        # tiles come row by row: one read of the band's rows serves a whole row of tiles
        key = (level, y0, len(rows))
        if self._band is None or self._band[0] != key:
            self._band = None  # freed before the next band is read (peak memory)
            self._band = (key, self._read_rows(rows))
        return self._band[1]

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Full-width rows ``rows`` (ascending) of the raster; consecutive rows are one read."""
        out = np.empty((len(rows), self.width), np.uint8)
        starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)  # first index of each run of consecutive rows
        for i, j in zip(starts, [*starts[1:], len(rows)]):
            buf = memoryview(out[i:j]).cast("B")
            at = int(rows[i]) * self.width
            while buf:
                chunk = os.pread(self._fd, min(len(buf), 1 << 26), at)
                if not chunk:
                    raise OSError(errno.EIO, "label store is shorter than the slide", str(self.path))
                buf[: len(chunk)] = chunk
                buf, at = buf[len(chunk) :], at + len(chunk)
        return out


@dataclass
class _Segmentation:
    """What a mode hands to the shared output code.

    ``tile_source`` writes the mask and counts level-0 pixels per label in
    its ``counts`` as it goes; ``points`` and ``density`` (level-0) are empty
    for sliding windows; ``gather`` gives the report's read statistics once
    the mask is written.
    """

    tile_source: Callable
    boxes: list
    points: list
    density: list
    n_samples: int
    gather: Callable[[], dict]
    scale: dict | None = None


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op).

    glibc keeps freed blocks of the size of the per-region maps in the heap,
    so the resident memory of one stage would otherwise add to the next
    stage's peak (measured: 230 MiB on a 25k x 25k slide).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """One torch intra-op thread on the CPU, restored afterwards.

    A region's nets and inverse map work on a few thousand samples: torch's
    thread pool gains nothing there, and while another process holds a core
    its spinning workers make the stage many times slower (measured on 2
    cores under load: 20 regions in 2 s with one thread, 9-23 s with two).
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _segment_deformed(ms, boxes, model, options, device, progress, plan: ScalePlan) -> _Segmentation:
    results = []
    # regions too large for one grid at the model's scale become sub-boxes, each a region of its own
    boxes = [sub for box in boxes for sub in plan.boxes(box)]
    with _one_cpu_thread(device):
        for i, box in enumerate(boxes):
            results.append(segment_region(ms, box, model, options, device, plan=plan))
            progress((i + 1) / len(boxes))
    tiler = ReverseTiler([r.prediction for r in results], ms.width, ms.height, mode=options.interp)
    return _Segmentation(
        tile_source=tiler,
        boxes=[r.box for r in results],
        points=[r.points for r in results],
        density=[(r.density, r.box) for r in results],
        n_samples=sum(r.grid_size[0] * r.grid_size[1] for r in results),
        scale=plan.report(len(results)),
        gather=lambda: {
            "mode": options.gather_mode,
            "regions": [
                {"box": list(r.box), "grid": list(r.grid_size), "map": list(r.map_size), **r.gather_stats}
                for r in results
            ],
            "pixels_refined": int(tiler.pixels_refined),
        },
    )


def _segment_sliding_window(ms, boxes, model, options, device, store, progress) -> _Segmentation:
    stats = sliding_window(ms, boxes, model, options, device, store, progress)
    return _Segmentation(
        tile_source=store,
        boxes=list(boxes),
        points=[],
        density=[],
        n_samples=sum(b[2] * b[3] for b in boxes),  # every pixel of every box goes through the net
        gather=lambda: stats,
    )


def find_regions(
    ms: Multiscale, options: SegmentOptions
) -> tuple[list[tuple[int, int, int, int]], int | None, TissueMask]:
    """Level-0 boxes to segment (the same regions training uses), the tissue pixel count and the tissue mask.

    The tissue count is ``None`` for whole-slide runs; the mask is detected
    in both (on a low-resolution level), for :func:`samples_on_glass`.
    """
    from wsiseg.slide.tissue import detect_tissue, slide_regions

    tissue = detect_tissue(ms, threshold=options.tissue_threshold)
    if options.regions == "whole":
        return [(0, 0, ms.width, ms.height)], None, tissue
    regions = slide_regions(ms, "tissue", tissue=tissue)
    tissue_px = int(round(tissue.mask.sum() * tissue.downsample[0] * tissue.downsample[1]))
    return [(r.x, r.y, r.width, r.height) for r in regions], tissue_px, tissue


def samples_on_glass(
    tissue: TissueMask, points: list[np.ndarray], boxes: list[tuple[int, int, int, int]]
) -> dict[str, float] | None:
    """Fraction of the sampling points on glass, and of a uniform grid of the same size.

    Parameters
    ----------
    tissue : TissueMask
        The slide's tissue mask; glass is where it is False (looked up at
        each point, nearest mask pixel).
    points : list of numpy.ndarray
        Per region, the ``(h, w, 2)`` level-0 sampling points.
    boxes : list of (x, y, width, height)
        The regions, in the same order.

    Returns
    -------
    dict or None
        ``{"model": ..., "uniform": ...}``: over all regions' points, the
        fraction on glass of the model's grids and of uniform ``h x w``
        grids over the same boxes. None without points (sliding windows).
    """
    if not points:
        return None
    uniform = [
        to_pixels(uniform_grid(*p.shape[:2], dtype=torch.float64).numpy(), bw, bh, origin=(x, y))
        for p, (x, y, bw, bh) in zip(points, boxes)
    ]

    def glass(pts: list[np.ndarray]) -> float:
        flat = np.concatenate([p.reshape(-1, 2) for p in pts])
        return float(1.0 - tissue.tissue_at(flat).mean())

    return {"model": glass(points), "uniform": glass(uniform)}


def output_paths(out_dir: Path, name: str, options: SegmentOptions) -> dict[str, Path]:
    """Output kind -> path for one slide."""
    wanted = {"geojson": options.geojson, "qc": options.qc, **{f: f in options.formats for f in FORMAT_SUFFIXES}}
    kinds = [k for k in OUTPUT_SUFFIXES if wanted.get(k, True)]
    return {k: Path(out_dir) / f"{name}{OUTPUT_SUFFIXES[k]}" for k in kinds}


def reduced_mask_level(mask_path: Path, max_size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """The largest level of a written mask whose long side is <= ``max_size`` (or the smallest level)."""
    import tifffile

    with tifffile.TiffFile(mask_path) as tif:
        pages = [p for p in tif.pages if p.shape]
        w0, h0 = pages[0].shape[1], pages[0].shape[0]
        chosen = pages[-1]
        for p in pages:
            if max(p.shape[:2]) <= max_size:
                chosen = p
                break
        arr = chosen.asarray()
    return arr, (w0 / arr.shape[1], h0 / arr.shape[0])


def segment_slide(
    slide: str,
    model: LoadedModel,
    out_dir: str | Path,
    name: str,
    options: SegmentOptions = SegmentOptions(),
    *,
    mpp: float | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, str]:
    """Segment one slide and write all its outputs.

    Parameters
    ----------
    slide : str
        Slide path.
    model : LoadedModel
    out_dir : path-like
        Output folder (created if needed).
    name : str
        Output file stem.
    options : SegmentOptions
    mpp : float, optional
        Per-slide MPP override (wins over ``options.mpp``).
    progress : callable, optional
        ``progress(stage, fraction)``.

    Returns
    -------
    dict
        Output kind -> file name (relative to ``out_dir``).
    """
    from wsiseg.output.classes import write_classes_json
    from wsiseg.output.geojson import write_qupath_geojson
    from wsiseg.output.mask import write_label_pyramid
    from wsiseg.output.overlay import overlay_from_mask
    from wsiseg.output.report import SlideReport, class_areas, write_report_json
    from wsiseg.slide.open import open_slide
    from wsiseg.slide.tissue import TissueGate

    report_progress = progress or (lambda stage, fraction: None)
    out_dir = Path(out_dir)
    paths = output_paths(out_dir, name, options)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    device = resolve_device(options.device)
    model.net.to(device)

    def stage(label):
        report_progress(label, 0.0)
        return time.perf_counter()

    t = stage("open")
    ms = open_slide(slide, mpp=mpp if mpp is not None else options.mpp)
    timings["open"] = time.perf_counter() - t

    t = stage("regions")
    boxes, tissue_px, tissue = find_regions(ms, options)
    timings["regions"] = time.perf_counter() - t

    def step(fraction):
        report_progress("sample+segment", fraction)

    with contextlib.ExitStack() as cleanup:  # the sliding-window label store goes, whatever happens
        t = stage("sample+segment")
        if options.mode == "sliding-window":
            out_dir.mkdir(parents=True, exist_ok=True)
            store = cleanup.enter_context(LabelStore(out_dir, name, ms.width, ms.height))
            seg = _segment_sliding_window(ms, boxes, model, options, device, store, step)
        else:
            plan = scale_plan(model, ms.mpp, options)
            if plan.reason == NO_SLIDE_MPP:
                logger.warning("%s: slide has no MPP, sampled by pixel size instead of at the model's %.4g um "
                               "spacing; pass --mpp", slide, model.scale.sample_spacing_um)
            seg = _segment_deformed(ms, boxes, model, options, device, step, plan)
        timings["sample+segment"] = time.perf_counter() - t
        _trim_heap()

        t = stage("mask")
        if options.background == "tissue":
            seg.tile_source = TissueGate(seg.tile_source, tissue, ms.width, ms.height)
        # data tiles Deflate-encoded on a second core while this thread computes the next ones
        write_label_pyramid(
            paths["mask"], ms.width, ms.height, seg.tile_source, tile=options.tile, mpp=ms.mpp, overwrite=True,
            workers=1 if usable_cpus() > 1 else 0,
        )
        overlay_from_mask(paths["mask"], paths["overlay"], model.classes, overwrite=True)
        write_classes_json(paths["classes"], model.classes, overwrite=True)
        timings["mask"] = time.perf_counter() - t
        counts, gather = seg.tile_source.counts, seg.gather()
        # the reverse sampler's maps are not needed any more: free them before GeoJSON and QC (peak memory)
        seg.tile_source = seg.gather = None
    _trim_heap()

    # the other mask formats stream the finished mask: the sampler's work is reused, never redone
    if "ome-tiff" in paths:
        t = stage("ome-tiff")
        ome_tiff_from_mask(paths["mask"], paths["ome-tiff"], mpp=ms.mpp, name=name, overwrite=True)
        timings["ome-tiff"] = time.perf_counter() - t
    if "ome-zarr" in paths:
        t = stage("ome-zarr")
        ome_zarr_from_mask(paths["mask"], paths["ome-zarr"], model.classes, slide=ms, mpp=ms.mpp,
                           max_megapixels=options.ome_zarr_megapixels, overwrite=True)
        timings["ome-zarr"] = time.perf_counter() - t

    if options.geojson:
        t = stage("geojson")
        write_qupath_geojson(
            paths["geojson"], reduced_mask_level(paths["mask"], 8192), model.classes, mpp=ms.mpp, overwrite=True
        )
        timings["geojson"] = time.perf_counter() - t

    if options.qc:
        t = stage("qc")
        _write_qc(paths["qc"], ms, paths["mask"], seg, model, name)
        timings["qc"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - t_all
    report = SlideReport(
        slide=str(slide),
        width=ms.width,
        height=ms.height,
        mpp=ms.mpp,
        mpp_source=ms.mpp_source,
        mpp_ignored=ms.mpp_ignored,
        vendor=ms.vendor,
        model=model.path,
        model_hash=model.hash,
        device=str(device),
        mode=options.mode,
        regions=seg.boxes,
        class_areas=class_areas(counts, model.classes, ms.mpp),
        fraction_sampled=sample_fraction(1, seg.n_samples, ms.height, ms.width) if seg.n_samples else 0.0,
        samples_on_glass=samples_on_glass(tissue, seg.points, seg.boxes),
        scale=seg.scale,
        detected_tissue_pixels=tissue_px,
        gather=gather,
        timings=timings,
        config={"options": options.resolved(), "model": model.metadata.get("net", {})},
        outputs={k: p.name for k, p in paths.items()},
        status="ok",
    )
    write_report_json(paths["report"], report, overwrite=True)
    report_progress("done", 1.0)
    return {k: p.name for k, p in paths.items()}


def _write_qc(path: Path, ms: Multiscale, mask_path: Path, seg: _Segmentation, model: LoadedModel, name: str):
    from wsiseg.output.qc import render_qc

    thumb, (fx, fy) = thumbnail(ms, 1024)
    labels, _ = reduced_mask_level(mask_path, 2048)

    def scaled(b):
        return (b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy)

    samples = [np.stack([p[..., 0].ravel() * fx, p[..., 1].ravel() * fy], axis=-1) for p in seg.points]
    density = [(d, scaled(b)) for d, b in seg.density]
    boxes = [scaled(b) for b in seg.boxes]
    render_qc(path, thumb, labels, model.classes, samples, density, boxes, title=name, overwrite=True)


def check_model_for_slides(model: LoadedModel) -> None:
    """Refuse models that cannot segment unlabelled slides, before any work."""
    if model.net.sampler == "edge":
        raise WsisegError(
            "the model uses the edge sampler, an oracle baseline that needs labels; it cannot segment new slides",
            model.path,
        )


_MAX_MODELS = 2  # models cached per worker process
_MODELS: dict[tuple[str, str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class SlideSegmenter:
    """The per-slide function of ``wsiseg segment``, picklable for dask workers.

    Loads the model once per worker process (cached by path, hash and
    device) and calls :func:`segment_slide`, as a local run
    does.

    Attributes
    ----------
    model_path : str
        Absolute path of the model file, the same on every worker.
    model_hash : str
        :func:`wsiseg.hashing.file_hash` seen by the client; a worker whose
        file differs fails the slide instead of writing other results.
    options : SegmentOptions
    """

    model_path: str
    model_hash: str
    options: SegmentOptions

    def model(self):
        """The loaded model of this worker process."""
        from wsiseg.models.io import load_deformseg

        key = (self.model_path, self.model_hash, str(self.options.device))
        with _MODELS_LOCK:
            model = _MODELS.get(key)
            if model is None:
                model = load_deformseg(self.model_path, device=resolve_device(self.options.device))
                if model.hash != self.model_hash:
                    raise WsisegError(
                        f"the model file on this worker differs from the client's (hash {model.hash}, expected "
                        f"{self.model_hash}); workers need the same file on shared storage",
                        self.model_path,
                    )
                while len(_MODELS) >= _MAX_MODELS:
                    _MODELS.pop(next(iter(_MODELS)))
                _MODELS[key] = model
            return model

    def __call__(self, job, out_dir, *, fingerprint, overwrite, progress):
        from wsiseg.batch.jobs import SlideOutcome

        mpp = job.overrides.get("mpp")
        outputs = segment_slide(
            job.path, self.model(), out_dir, job.name, self.options,
            mpp=float(mpp) if mpp not in (None, "") else None, progress=progress,
        )
        return SlideOutcome("ok", outputs=outputs)



def run_segment(
    inputs,
    model_path: str | Path,
    out_dir: str | Path,
    options: SegmentOptions = SegmentOptions(),
    *,
    overwrite: bool = False,
    progress: str = "auto",
    stream=None,
    scheduler: str | None = None,
    workers: int | None = None,
    slide_timeout: float | None = None,
):
    """Segment a batch of slides: the library behind ``wsiseg segment``.

    Every slide is attempted even after failures; ``status.csv``, the resume
    markers and the locks are those of :func:`wsiseg.batch.runner.run_batch`; a
    ``report.csv`` summarises every slide that has a report.

    Parameters
    ----------
    inputs : sequence of str
        Slide files, folders, globs or CSV manifests
        (:func:`wsiseg.batch.inputs.expand_inputs`).
    model_path : path-like
        A wsiseg model file.
    out_dir : path-like
        Output folder.
    options : SegmentOptions
    overwrite : bool
        Redo slides that are already done.
    progress : {"auto", "tty", "jsonl", "none"}
    scheduler : str, optional
        Address of a dask scheduler (``tcp://host:8786``): one task per slide
        on its workers (:mod:`wsiseg.batch.dask`); paths must be shared.
    workers : int, optional
        Run on a local cluster of this many worker processes instead.
    slide_timeout : float, optional
        Seconds each slide may take; a slide past it is killed and fails
        with ``timed out after N s`` and the batch goes on. Each slide then
        runs in a worker process of its own that loads the model again
        (:mod:`wsiseg.batch.isolated`). Default: no limit.

    Returns
    -------
    wsiseg.batch.jobs.BatchResult

    Raises
    ------
    WsisegError
        Bad model, bad options, inputs that match nothing or an unreachable
        scheduler: before any slide is touched.
    """
    from wsiseg.batch.inputs import expand_inputs
    from wsiseg.batch.jobs import SlideOutcome
    from wsiseg.batch.markers import make_fingerprint
    from wsiseg.batch.runner import run_batch
    from wsiseg.batch.isolated import check_timeout
    from wsiseg.models.io import load_deformseg
    from wsiseg.output.report import read_report_json, write_batch_csv

    out_dir = Path(out_dir)
    slide_timeout = check_timeout(slide_timeout)
    distributed = scheduler is not None or workers is not None
    # On a cluster, or with a time limit (a worker process per slide), the slides' processes pick their own
    # device and load the model themselves; this one only checks it.
    device = "cpu" if distributed or slide_timeout is not None else resolve_device(options.device)
    model = load_deformseg(model_path, device=device)
    check_model_for_slides(model)
    jobs = expand_inputs(list(inputs), exclude=(out_dir,))
    fingerprint = make_fingerprint(model.hash, options.resolved())

    def process(job, out, *, fingerprint, overwrite, progress):
        mpp = job.overrides.get("mpp")
        outputs = segment_slide(
            job.path, model, out, job.name, options, mpp=float(mpp) if mpp not in (None, "") else None,
            progress=progress,
        )
        return SlideOutcome("ok", outputs=outputs)

    segmenter = SlideSegmenter(str(Path(model_path).absolute()), model.hash, options)
    if distributed:
        from wsiseg.batch.dask import run_batch_distributed

        result = run_batch_distributed(jobs, out_dir, segmenter, fingerprint=fingerprint, scheduler=scheduler,
                                       workers=workers, overwrite=overwrite, progress=progress, stream=stream,
                                       slide_timeout=slide_timeout)
    else:
        result = run_batch(jobs, out_dir, process if slide_timeout is None else segmenter, fingerprint=fingerprint,
                           overwrite=overwrite, progress=progress, stream=stream, slide_timeout=slide_timeout)
    reports = []
    for r in result.results:
        path = out_dir / f"{r.job.name}{OUTPUT_SUFFIXES['report']}"
        if r.status in ("ok", "skipped") and path.exists():
            rep = read_report_json(path)
            rep["status"] = r.status
            reports.append(rep)
        else:
            reports.append({"slide": r.job.path, "status": r.status, "error": r.outcome.error})
    write_batch_csv(out_dir / "report.csv", reports, overwrite=True)
    return result
