"""One slide end to end: regions, either mode, the tissue gate, then mask, OME, GeoJSON, QC and report."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from wsiseg.device import resolve_device, usable_cpus
from wsiseg.models.io import LoadedModel
from wsiseg.output.ome import (
    FORMAT_SUFFIXES,
    ome_tiff_from_mask,
    ome_zarr_from_mask,
)
from wsiseg.sampling.sizes import sample_fraction
from wsiseg.sampling.tiles import ReverseTiler
from wsiseg.slide.lowres import thumbnail
from wsiseg.slide.multiscale import Multiscale
from wsiseg.segment.options import NO_SLIDE_MPP, OUTPUT_SUFFIXES, ScalePlan, SegmentOptions, scale_plan
from wsiseg.segment.regions import find_regions, samples_on_glass, segment_regions
from wsiseg.segment.sliding import LabelStore, sliding_window

__all__ = [
    "output_paths",
    "reduced_mask_level",
    "segment_slide",
]

logger = logging.getLogger(__name__)


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


def _segment_deformed(ms, boxes, model, options, device, progress, plan: ScalePlan, tissue=None) -> _Segmentation:
    # regions too large for one grid at the model's scale become sub-boxes, each a region of its own
    boxes = [sub for box in boxes for sub in plan.boxes(box)]
    with _one_cpu_thread(device):
        results = segment_regions(ms, boxes, model, options, device, plan=plan, progress=progress, tissue=tissue)
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


class _Stages:
    """A slide's progress reports and seconds per stage (``timings``, in the order they ran)."""

    def __init__(self, progress: Callable[[str, float], None] | None):
        self.report = progress or (lambda stage, fraction: None)
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, label: str):
        """Report ``label`` at 0, then time the block (kept only when it completes)."""
        self.report(label, 0.0)
        t = time.perf_counter()
        yield
        self.timings[label] = time.perf_counter() - t


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
    from wsiseg.output.report import write_report_json
    from wsiseg.slide.open import open_slide

    stages = _Stages(progress)
    out_dir = Path(out_dir)
    paths = output_paths(out_dir, name, options)
    t_all = time.perf_counter()
    device = resolve_device(options.device)
    model.net.to(device)

    with stages.stage("open"):
        ms = open_slide(slide, mpp=mpp if mpp is not None else options.mpp)
    with stages.stage("regions"):
        boxes, tissue_px, tissue = find_regions(ms, options)

    with contextlib.ExitStack() as cleanup:  # the sliding-window label store goes, whatever happens
        with stages.stage("sample+segment"):
            seg = _sample_and_segment(slide, ms, boxes, model, options, device, out_dir, name, cleanup, stages, tissue)
        _trim_heap()
        with stages.stage("mask"):
            _write_mask(paths, ms, seg, tissue, model, options)
        counts, gather = seg.tile_source.counts, seg.gather()
        # the reverse sampler's maps are not needed any more: free them before GeoJSON and QC (peak memory)
        seg.tile_source = seg.gather = None
    _trim_heap()

    _write_derived(paths, ms, seg, model, options, name, stages)
    stages.timings["total"] = time.perf_counter() - t_all
    report = _slide_report(slide, ms, model, device, options, paths, seg, tissue, tissue_px, counts, gather, stages)
    write_report_json(paths["report"], report, overwrite=True)
    stages.report("done", 1.0)
    return {k: p.name for k, p in paths.items()}


def _sample_and_segment(
    slide: str,
    ms: Multiscale,
    boxes: list,
    model: LoadedModel,
    options: SegmentOptions,
    device: torch.device,
    out_dir: Path,
    name: str,
    cleanup: contextlib.ExitStack,
    stages: _Stages,
    tissue=None,
) -> _Segmentation:
    """Either mode on the regions; the sliding-window label store joins ``cleanup``."""

    def step(fraction):
        stages.report("sample+segment", fraction)

    if options.mode == "sliding-window":
        out_dir.mkdir(parents=True, exist_ok=True)
        store = cleanup.enter_context(LabelStore(out_dir, name, ms.width, ms.height))
        return _segment_sliding_window(ms, boxes, model, options, device, store, step)
    plan = scale_plan(model, ms.mpp, options)
    if plan.reason == NO_SLIDE_MPP:
        logger.warning(
            "%s: slide has no MPP, sampled by pixel size instead of at the model's %.4g um spacing; pass --mpp",
            slide,
            model.scale.sample_spacing_um,
        )
    return _segment_deformed(ms, boxes, model, options, device, step, plan, tissue)


def _write_mask(
    paths: dict[str, Path], ms: Multiscale, seg: _Segmentation, tissue, model: LoadedModel, options: SegmentOptions
) -> None:
    """The label mask (glass gated by the tissue detector when asked), its overlay and the classes file."""
    from wsiseg.output.classes import write_classes_json
    from wsiseg.output.mask import write_label_pyramid
    from wsiseg.output.overlay import overlay_from_mask
    from wsiseg.slide.tissue import TissueGate

    if options.background == "tissue":
        seg.tile_source = TissueGate(seg.tile_source, tissue, ms.width, ms.height)
    # data tiles Deflate-encoded on a second core while this thread computes the next ones
    write_label_pyramid(
        paths["mask"],
        ms.width,
        ms.height,
        seg.tile_source,
        tile=options.tile,
        mpp=ms.mpp,
        overwrite=True,
        workers=1 if usable_cpus() > 1 else 0,
    )
    overlay_from_mask(paths["mask"], paths["overlay"], model.classes, overwrite=True)
    write_classes_json(paths["classes"], model.classes, overwrite=True)


def _write_derived(
    paths: dict[str, Path],
    ms: Multiscale,
    seg: _Segmentation,
    model: LoadedModel,
    options: SegmentOptions,
    name: str,
    stages: _Stages,
) -> None:
    """What is made from the finished mask: OME-TIFF, OME-Zarr, GeoJSON and QC, each when asked for."""
    from wsiseg.output.geojson import write_qupath_geojson

    # the other mask formats stream the finished mask: the sampler's work is reused, never redone
    if "ome-tiff" in paths:
        with stages.stage("ome-tiff"):
            ome_tiff_from_mask(paths["mask"], paths["ome-tiff"], mpp=ms.mpp, name=name, overwrite=True)
    if "ome-zarr" in paths:
        with stages.stage("ome-zarr"):
            ome_zarr_from_mask(
                paths["mask"],
                paths["ome-zarr"],
                model.classes,
                slide=ms,
                mpp=ms.mpp,
                max_megapixels=options.ome_zarr_megapixels,
                overwrite=True,
            )

    if options.geojson:
        with stages.stage("geojson"):
            write_qupath_geojson(
                paths["geojson"], reduced_mask_level(paths["mask"], 8192), model.classes, mpp=ms.mpp, overwrite=True
            )

    if options.qc:
        with stages.stage("qc"):
            _write_qc(paths["qc"], ms, paths["mask"], seg, model, name)


def _slide_report(
    slide: str,
    ms: Multiscale,
    model: LoadedModel,
    device: torch.device,
    options: SegmentOptions,
    paths: dict[str, Path],
    seg: _Segmentation,
    tissue,
    tissue_px,
    counts,
    gather: dict,
    stages: _Stages,
):
    """The slide's report (``report.json``)."""
    from wsiseg.output.report import SlideReport, class_areas
    from wsiseg.sampling.reverse import folded_cells

    return SlideReport(
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
        folded_cells=sum(folded_cells(p[None]) for p in seg.points) if seg.points else None,
        scale=seg.scale,
        detected_tissue_pixels=tissue_px,
        gather=gather,
        timings=stages.timings,
        # the file's net, and what its reader filled in where the file is silent (grid_border of older files)
        config={"options": options.resolved(), "model": {**model.net.config(), **model.metadata.get("net", {})}},
        outputs={k: p.name for k, p in paths.items()},
        status="ok",
    )


def _write_qc(path: Path, ms: Multiscale, mask_path: Path, seg: _Segmentation, model: LoadedModel, name: str):
    from wsiseg.viz.qc import render_qc

    thumb, (fx, fy) = thumbnail(ms, 1024)
    labels, _ = reduced_mask_level(mask_path, 2048)

    def scaled(b):
        return (b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy)

    samples = [np.stack([p[..., 0].ravel() * fx, p[..., 1].ravel() * fy], axis=-1) for p in seg.points]
    density = [(d, scaled(b)) for d, b in seg.density]
    boxes = [scaled(b) for b in seg.boxes]
    render_qc(path, thumb, labels, model.classes, samples, density, boxes, title=name, overwrite=True)
