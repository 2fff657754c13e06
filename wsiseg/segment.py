"""One slide end to end: open -> regions -> d -> grid -> gather -> segment -> tiles -> files.

The net only ever sees a small deformed image per region; the full-resolution
mask is produced tile by tile by :class:`wsiseg.sampling.tiles.ReverseTiler`
and streamed into a pyramidal BigTIFF, so memory does not grow with the
slide's area.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from wsiseg.device import resolve_device
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.models.io import LoadedModel
from wsiseg.sampling.coords import to_pixels
from wsiseg.sampling.edges import uniform_density
from wsiseg.sampling.sizes import dynamic_output_size, sample_fraction
from wsiseg.sampling.tiles import RegionPrediction, ReverseTiler, coarse_inverse
from wsiseg.slide.gather import gather
from wsiseg.slide.lowres import read_lowres, thumbnail
from wsiseg.slide.multiscale import Multiscale

#: Output files per slide: kind -> suffix after the slide's name.
OUTPUT_SUFFIXES = {
    "mask": ".mask.tif",
    "overlay": ".overlay.tif",
    "classes": ".classes.json",
    "geojson": ".geojson.gz",
    "qc": ".qc.png",
    "report": ".report.json",
}


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
    out_size : (int, int), optional
        Grid size ``(h, w)`` per region; default the model's, adapted to the
        region's shape by the dynamic size rule.
    long_side : int, optional
        Long-side cap of the dynamic size rule (paper A.6); default four
        times the model's long side.
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
        Micrometres per level-0 pixel, overriding the slide's.
    geojson, qc : bool
        Write the QuPath GeoJSON / the QC figure.
    """

    regions: str = "tissue"
    tissue_threshold: float | None = None
    out_size: tuple[int, int] | None = None
    long_side: int | None = None
    interp: str = "nearest"
    gather_mode: str = "lod"
    lod_bias: float = 0.0
    device: str = "auto"
    amp: bool | None = None
    tile: int = 512
    mpp: float | None = None
    geojson: bool = True
    qc: bool = True

    def __post_init__(self):
        if self.regions not in ("tissue", "whole"):
            raise ConfigError(f"regions must be 'tissue' or 'whole', got {self.regions!r}")
        if self.interp not in ("nearest", "linear"):
            raise ConfigError(f"interp must be 'nearest' or 'linear', got {self.interp!r}")
        if self.gather_mode not in ("lod", "exact"):
            raise ConfigError(f"gather mode must be 'lod' or 'exact', got {self.gather_mode!r}")
        if self.tissue_threshold is not None and not 0 < self.tissue_threshold < 1:
            raise ConfigError(f"tissue threshold must be in (0, 1), got {self.tissue_threshold}")
        if self.mpp is not None and not self.mpp > 0:
            raise ConfigError(f"mpp must be positive, got {self.mpp}")

    def resolved(self) -> dict:
        """JSON-able settings that change the outputs (for resume fingerprints)."""
        d = asdict(self)
        for k in ("device", "amp"):  # where it runs does not change what it writes
            d.pop(k)
        return d


def region_sizes(
    height: int, width: int, out_size: tuple[int, int], map_size: tuple[int, int], long_side: int | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Grid and density-map sizes for a region of ``height x width`` level-0 pixels.

    The grid follows the dynamic size rule (paper A.6): short side to the
    model's short side, or long side to ``long_side`` (default 4x the model's
    long side), whichever gives fewer pixels, keeping the region's aspect
    ratio and never more samples than pixels. The density map keeps the
    model's map/grid ratio.

    Returns
    -------
    ((h, w), (hd, wd))
    """
    short, long_ = min(out_size), max(out_size)
    cap = long_side if long_side is not None else 4 * long_
    h, w = dynamic_output_size(height, width, short=short, long=max(cap, short))
    rh, rw = map_size[0] / out_size[0], map_size[1] / out_size[1]
    hd = max(4, min(h, round(h * rh)))
    wd = max(4, min(w, round(w * rw)))
    return (h, w), (hd, wd)


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
) -> RegionResult:
    """Segment one level-0 box of a slide on its own deformed grid.

    Parameters
    ----------
    ms : Multiscale
        The slide.
    box : (x, y, width, height)
        Level-0 region.
    model : LoadedModel
        From :func:`wsiseg.models.io.load_deformseg`.
    options : SegmentOptions
    device : torch.device

    Returns
    -------
    RegionResult
    """
    check_model_for_slides(model)
    net = model.net
    x, y, bw, bh = box
    out_size = options.out_size or tuple(net.out_size)
    (h, w), (hd, wd) = region_sizes(bh, bw, out_size, tuple(net.map_size), options.long_side)
    if options.out_size is not None:
        (h, w) = options.out_size
        hd = max(4, round(h * net.map_size[0] / net.out_size[0]))
        wd = max(4, round(w * net.map_size[1] / net.out_size[1]))
    with torch.no_grad(), _autocast(device, options.amp):
        if net.sampler == "learned":
            x_lr = torch.from_numpy(read_lowres(ms, box, (hd, wd))).permute(2, 0, 1)[None].to(device)
            d = net.density(x_lr)
        else:
            d = uniform_density(1, hd, wd, device=device)
        grid = net.deformed_grid(d.float(), out_size=(h, w))
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


def find_regions(ms: Multiscale, options: SegmentOptions) -> tuple[list[tuple[int, int, int, int]], int | None]:
    """Level-0 boxes to segment (the same regions training uses) and the tissue pixel count.

    The tissue count is ``None`` for whole-slide runs.
    """
    from wsiseg.slide.tissue import detect_tissue, slide_regions

    if options.regions == "whole":
        return [(0, 0, ms.width, ms.height)], None
    tissue = detect_tissue(ms, threshold=options.tissue_threshold)
    regions = slide_regions(ms, "tissue", tissue=tissue)
    tissue_px = int(round(tissue.mask.sum() * tissue.downsample[0] * tissue.downsample[1]))
    return [(r.x, r.y, r.width, r.height) for r in regions], tissue_px


def output_paths(out_dir: Path, name: str, options: SegmentOptions) -> dict[str, Path]:
    """Output kind -> path for one slide."""
    kinds = [k for k in OUTPUT_SUFFIXES if (k != "geojson" or options.geojson) and (k != "qc" or options.qc)]
    return {k: Path(out_dir) / f"{name}{OUTPUT_SUFFIXES[k]}" for k in kinds}


def _reduced_mask_level(mask_path: Path, max_size: int) -> tuple[np.ndarray, tuple[float, float]]:
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
    boxes, tissue_px = find_regions(ms, options)
    timings["regions"] = time.perf_counter() - t

    t = stage("sample+segment")
    results = []
    for i, box in enumerate(boxes):
        results.append(segment_region(ms, box, model, options, device))
        report_progress("sample+segment", (i + 1) / len(boxes))
    timings["sample+segment"] = time.perf_counter() - t

    t = stage("mask")
    tiler = ReverseTiler([r.prediction for r in results], ms.width, ms.height, mode=options.interp)
    write_label_pyramid(paths["mask"], ms.width, ms.height, tiler, tile=options.tile, mpp=ms.mpp, overwrite=True)
    overlay_from_mask(paths["mask"], paths["overlay"], model.classes, overwrite=True)
    write_classes_json(paths["classes"], model.classes, overwrite=True)
    timings["mask"] = time.perf_counter() - t

    if options.geojson:
        t = stage("geojson")
        write_qupath_geojson(
            paths["geojson"], _reduced_mask_level(paths["mask"], 8192), model.classes, mpp=ms.mpp, overwrite=True
        )
        timings["geojson"] = time.perf_counter() - t

    if options.qc:
        t = stage("qc")
        _write_qc(paths["qc"], ms, paths["mask"], results, model, name)
        timings["qc"] = time.perf_counter() - t

    n_samples = sum(r.grid_size[0] * r.grid_size[1] for r in results)
    timings["total"] = time.perf_counter() - t_all
    report = SlideReport(
        slide=str(slide),
        width=ms.width,
        height=ms.height,
        mpp=ms.mpp,
        mpp_source=ms.mpp_source,
        vendor=ms.vendor,
        model=model.path,
        model_hash=model.hash,
        device=str(device),
        regions=[r.box for r in results],
        class_areas=class_areas(tiler.counts, model.classes, ms.mpp, tissue_pixels=tissue_px),
        fraction_sampled=sample_fraction(1, n_samples, ms.height, ms.width) if n_samples else 0.0,
        tissue_pixels=tissue_px,
        gather={
            "mode": options.gather_mode,
            "regions": [
                {"box": list(r.box), "grid": list(r.grid_size), "map": list(r.map_size), **r.gather_stats}
                for r in results
            ],
            "pixels_refined": int(tiler.pixels_refined),
        },
        timings=timings,
        config={"options": options.resolved(), "model": model.metadata.get("net", {})},
        outputs={k: p.name for k, p in paths.items()},
        status="ok",
    )
    write_report_json(paths["report"], report, overwrite=True)
    report_progress("done", 1.0)
    return {k: p.name for k, p in paths.items()}


def _write_qc(path: Path, ms: Multiscale, mask_path: Path, results: list[RegionResult], model: LoadedModel, name: str):
    from wsiseg.output.qc import render_qc

    thumb, (fx, fy) = thumbnail(ms, 1024)
    labels, _ = _reduced_mask_level(mask_path, 2048)
    samples = [np.stack([r.points[..., 0].ravel() * fx, r.points[..., 1].ravel() * fy], axis=-1) for r in results]
    boxes = [(r.box[0] * fx, r.box[1] * fy, r.box[2] * fx, r.box[3] * fy) for r in results]
    density = [(r.density, b) for r, b in zip(results, boxes)]
    render_qc(path, thumb, labels, model.classes, samples, density, boxes, title=name, overwrite=True)


def check_model_for_slides(model: LoadedModel) -> None:
    """Refuse models that cannot segment unlabelled slides, before any work."""
    if model.net.sampler == "edge":
        raise WsisegError(
            "the model uses the edge sampler, an oracle baseline that needs labels; it cannot segment new slides",
            model.path,
        )


def run_segment(
    inputs,
    model_path: str | Path,
    out_dir: str | Path,
    options: SegmentOptions = SegmentOptions(),
    *,
    overwrite: bool = False,
    progress: str = "auto",
    stream=None,
):
    """Segment a batch of slides: the library behind ``wsiseg segment``.

    Every slide is attempted even after failures; ``status.csv``, the resume
    markers and the locks are those of :func:`wsiseg.batch.run_batch`; a
    ``report.csv`` summarises every slide that has a report.

    Parameters
    ----------
    inputs : sequence of str
        Slide files, folders, globs or CSV manifests
        (:func:`wsiseg.batch.expand_inputs`).
    model_path : path-like
        A wsiseg model file.
    out_dir : path-like
        Output folder.
    options : SegmentOptions
    overwrite : bool
        Redo slides that are already done.
    progress : {"auto", "tty", "jsonl", "none"}

    Returns
    -------
    wsiseg.batch.BatchResult

    Raises
    ------
    WsisegError
        Bad model, bad options or inputs that match nothing: before any slide
        is touched.
    """
    from wsiseg.batch import SlideOutcome, expand_inputs, make_fingerprint, run_batch
    from wsiseg.models.io import load_deformseg
    from wsiseg.output.report import read_report_json, write_batch_csv

    out_dir = Path(out_dir)
    device = resolve_device(options.device)
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

    result = run_batch(jobs, out_dir, process, fingerprint=fingerprint, overwrite=overwrite, progress=progress,
                       stream=stream)
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
