"""One region on its deformed grid, the slide's tissue regions, and the samples-on-glass measure."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from wsiseg.errors import WsisegError
from wsiseg.models.io import LoadedModel
from wsiseg.sampling.coords import to_pixels, uniform_grid
from wsiseg.sampling.edges import uniform_density
from wsiseg.sampling.geometry import SamplingGeometry
from wsiseg.sampling.tiles import RegionPrediction, coarse_inverse
from wsiseg.slide.gather import gather
from wsiseg.slide.lowres import read_lowres
from wsiseg.slide.multiscale import Multiscale
from wsiseg.segment.options import ScalePlan, SegmentOptions, scale_plan

if TYPE_CHECKING:  # the tissue detector (scikit-image) is imported when regions are found
    from wsiseg.slide.tissue import TissueMask

__all__ = [
    "RegionResult",
    "autocast",
    "segment_region",
    "segment_regions",
    "find_regions",
    "samples_on_glass",
    "check_model_for_slides",
]


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


def autocast(device: torch.device, amp: bool | None):
    """Mixed precision (float16) on CUDA unless ``amp`` is False; a no-op context elsewhere."""
    if device.type == "cuda" and amp is not False:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


#: Most samples in one batch of regions through the nets (bounds the nets' activations, which grow with the
#: batch); a region larger than this is a batch of its own.
BATCH_SAMPLES = 1 << 16


def segment_region(
    ms: Multiscale,
    box: tuple[int, int, int, int],
    model: LoadedModel,
    options: SegmentOptions,
    device: torch.device,
    *,
    plan: ScalePlan | None = None,
    tissue: TissueMask | None = None,
) -> RegionResult:
    """Segment one level-0 box of a slide on its own deformed grid.

    :func:`segment_regions` with one box; see there.
    """
    return segment_regions(ms, [box], model, options, device, plan=plan, tissue=tissue)[0]


def segment_regions(
    ms: Multiscale,
    boxes: Sequence[tuple[int, int, int, int]],
    model: LoadedModel,
    options: SegmentOptions,
    device: torch.device,
    *,
    plan: ScalePlan | None = None,
    progress: Callable[[float], None] | None = None,
    batch_samples: int = BATCH_SAMPLES,
    tissue: TissueMask | None = None,
) -> list[RegionResult]:
    """Segment level-0 boxes of a slide, each on its own deformed grid, the nets run over batches of regions.

    Regions with the same sampling geometry (grid, density map, kernel: the
    many like-sized cores of a TMA) go through the deformation net, the
    grid and the segmentation net together, up to ``batch_samples`` grid
    points a batch: one call per batch instead of per region, which is what
    a GPU needs and saves about half the segmentation net's time on CPU.
    Each region reads its low-resolution view and gathers its samples on
    its own (the gather decodes chunks in parallel already).

    Parameters
    ----------
    ms : Multiscale
        The slide.
    boxes : sequence of (x, y, width, height)
        Level-0 regions; in physical mode ones whose grid fits ``max_grid``
        (the sub-boxes of :meth:`ScalePlan.boxes`).
    model : LoadedModel
        From :func:`wsiseg.models.io.load_deformseg`.
    options : SegmentOptions
    device : torch.device
    plan : ScalePlan, optional
        Default :func:`scale_plan` of the model, the slide's MPP and
        ``options``.
    progress : callable, optional
        Called with the fraction of regions done after each batch.
    batch_samples : int
        Most grid points in one batch.
    tissue : TissueMask, optional
        The slide's tissue mask: with ``options.glass_weight`` below 1 a
        learned sampler's grid is built on a warp away from the map nodes it
        calls glass (:meth:`DeformSegNet.glass_prior`).

    Returns
    -------
    list of RegionResult
        In the order of ``boxes``.

    Raises
    ------
    ValueError
        In physical mode, a box whose grid exceeds ``max_grid``; a glass
        weight below 1 without ``tissue``.
    """
    check_model_for_slides(model)
    if options.glass_weight < 1.0 and tissue is None:
        raise ValueError("a glass weight below 1 needs the slide's tissue mask")
    net = model.net
    plan = plan if plan is not None else scale_plan(model, ms.mpp, options)
    geos = []
    for x, y, bw, bh in boxes:
        # physical mode: the plan's spacing already has --grid-scale in it
        scale = options.grid_scale if plan.physical is None else 1.0
        geo = net.geometry(
            bh, bw, grid=options.out_size, long_side=options.long_side, physical=plan.physical, scale=scale
        )
        if plan.physical is not None and (geo.grid[0] > plan.max_grid[0] or geo.grid[1] > plan.max_grid[1]):
            raise ValueError(
                f"region {(x, y, bw, bh)} needs a {geo.grid} grid, over the cap {plan.max_grid}: "
                "segment the sub-boxes of ScalePlan.boxes"
            )
        if options.grid_iterations is not None:
            geo = dataclasses.replace(geo, iterations=options.grid_iterations)
        geos.append(geo)
    results: list[RegionResult | None] = [None] * len(boxes)
    done = 0
    for batch in _batches(geos, batch_samples):
        got = _segment_batch(ms, [boxes[i] for i in batch], geos[batch[0]], model, options, device, tissue)
        for i, res in zip(batch, got):
            results[i] = res
        done += len(batch)
        if progress is not None:
            progress(done / len(boxes))
    return [r for r in results if r is not None]


def _batches(geos: Sequence[SamplingGeometry], batch_samples: int) -> list[list[int]]:
    """Indices of regions with one geometry, in batches of at most ``batch_samples`` grid points (>= 1 region)."""
    groups: dict[SamplingGeometry, list[int]] = {}
    for i, g in enumerate(geos):
        groups.setdefault(g, []).append(i)
    out = []
    for g, idx in groups.items():
        per = max(1, batch_samples // (g.grid[0] * g.grid[1]))
        out += [idx[k : k + per] for k in range(0, len(idx), per)]
    return out


def _segment_batch(
    ms, boxes, geo: SamplingGeometry, model: LoadedModel, options, device, tissue=None
) -> list[RegionResult]:
    """Regions of one geometry through the nets together (see :func:`segment_regions`)."""
    net = model.net
    (h, w), (hd, wd), b = geo.grid, geo.map, len(boxes)
    with torch.no_grad(), autocast(device, options.amp):
        if net.sampler == "learned":
            views = np.stack([read_lowres(ms, box, (hd, wd)) for box in boxes])
            d = net.density(torch.from_numpy(views).permute(0, 3, 1, 2).to(device))
        else:
            d = uniform_density(b, hd, wd, device=device)
        d, glass = d.float(), None
        if net.uses_glass(options.glass_weight):
            glass = torch.from_numpy(_glass_nodes(tissue, boxes, (hd, wd)))
        grid = net.grid(d, geo, prior=net.glass_prior(d, glass, options.glass_weight))
        points = [
            to_pixels(grid[k].double().cpu().numpy(), bw, bh, origin=(x, y)) for k, (x, y, bw, bh) in enumerate(boxes)
        ]
        gathered = [gather(ms, p, mode=options.gather_mode, bias=options.lod_bias) for p in points]
        image = torch.from_numpy(np.stack([g.image for g in gathered])).permute(0, 3, 1, 2).to(device)
        probs = net.segment_probs(image, tta=options.tta).cpu()
    values = np.array([c.value for c in model.classes], dtype=np.uint8)
    labels = values[probs.argmax(dim=1).numpy()]
    grid_cpu, dens = grid.cpu(), d[:, 0].cpu().numpy()
    out = []
    for k, (x, y, bw, bh) in enumerate(boxes):
        pred = RegionPrediction(
            box=(x, y, bw, bh),
            labels=labels[k],
            inverse=coarse_inverse(grid_cpu[k], (bh, bw)),
            scores=probs[k].numpy() if options.interp == "linear" else None,
            values=values,
        )
        out.append(
            RegionResult(
                box=(x, y, bw, bh),
                grid_size=(h, w),
                map_size=(hd, wd),
                prediction=pred,
                points=points[k],
                density=dens[k],
                gather_stats=_gather_dict(gathered[k].stats),
            )
        )
    return out


def _glass_nodes(tissue: TissueMask, boxes, map_size: tuple[int, int]) -> np.ndarray:
    """``(B, hd, wd)`` bool: the density-map nodes of each box (cell centres) that the tissue mask calls glass."""
    node = uniform_grid(*map_size, dtype=torch.float64).numpy()
    return np.stack([~tissue.tissue_at(to_pixels(node, bw, bh, origin=(x, y))) for x, y, bw, bh in boxes])


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


def check_model_for_slides(model: LoadedModel) -> None:
    """Refuse models that cannot segment unlabelled slides, before any work."""
    if model.net.sampler == "edge":
        raise WsisegError(
            "the model uses the edge sampler, an oracle baseline that needs labels; it cannot segment new slides",
            model.path,
        )
