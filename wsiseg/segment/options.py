"""How a slide is segmented: the options, the output files and the scale plan (physical or pixel rule)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from wsiseg.errors import ConfigError
from wsiseg.limits import GRID_SCALES, MAX_GRID_ITERATIONS, mpp_problem
from wsiseg.models.io import LoadedModel
from wsiseg.output.ome import (
    FORMAT_SUFFIXES,
    MAX_MEGAPIXELS,
    parse_formats,
)
from wsiseg.sampling.edges import check_glass_weight
from wsiseg.sampling.geometry import PhysicalScale, split_region
from wsiseg.sampling.grid import check_iterations

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
]


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
    tta : bool
        Test-time augmentation: the segmentation net's class probabilities
        averaged over the image it sees and its three flips (4x its time;
        :meth:`wsiseg.models.net.DeformSegNet.segment_probs`).
    glass_weight : float
        In ``(0, 1]``: a learned sampler's grid is built on a warp toward a
        prior that is this on the map nodes the tissue detector calls glass
        and 1 elsewhere (:func:`wsiseg.sampling.grid.prior_grid`), so samples
        move from glass onto tissue; a region without glass is sampled as
        trained. 1 (the default): the model's own grid.
    grid_iterations : int, optional
        Attraction steps of the grid (``iterations`` of
        :func:`wsiseg.sampling.grid.density_to_grid`, 1-64) instead of the
        model's own.
    grid_scale : float
        Sample every region this many times as densely per axis as the
        model's scale says (within :data:`wsiseg.limits.GRID_SCALES`): physical mode at the
        model's sample spacing divided by it, the pixel rule with its grid's
        sides times it (``scale`` of
        :func:`wsiseg.sampling.geometry.region_geometry`; ``evaluate
        --grid-scale`` measures the same on labelled regions). Unused with
        ``out_size``.
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
    tta: bool = False
    glass_weight: float = 1.0
    grid_iterations: int | None = None
    grid_scale: float = 1.0
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
        try:
            check_glass_weight(self.glass_weight)
            if self.grid_iterations is not None:
                check_iterations(self.grid_iterations, "grid iterations", most=MAX_GRID_ITERATIONS)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        lo, hi = GRID_SCALES
        if not lo <= self.grid_scale <= hi:
            raise ConfigError(f"grid scale must be in [{lo:g}, {hi:g}], got {self.grid_scale}")
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
        if not d["tta"]:
            d.pop("tta")  # and for --tta
        if d["glass_weight"] == 1.0:
            d.pop("glass_weight")  # and for --glass-weight
        if d["grid_iterations"] is None:
            d.pop("grid_iterations")  # and for --grid-iterations
        if d["grid_scale"] == 1.0:
            d.pop("grid_scale")  # and for --grid-scale
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
    # --grid-scale here rather than in each region's geometry, so the sub-boxes are cut for the grid sampled
    return ScalePlan(PhysicalScale(mpp, scale.sample_spacing_um / options.grid_scale), None, options.max_grid)
