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

The room's modules, in the order they build on each other: :mod:`~wsiseg.segment.options`
(options, output files, scale plan), :mod:`~wsiseg.segment.regions` (one region on its grid,
the tissue regions), :mod:`~wsiseg.segment.sliding` (the sliding-window baseline),
:mod:`~wsiseg.segment.slide` (one slide end to end) and :mod:`~wsiseg.segment.runner`
(many slides). Their public names are importable from ``wsiseg.segment``.
"""

from __future__ import annotations

from wsiseg.segment.options import (
    BACKGROUNDS,
    MAX_GRID,
    MODES,
    NO_MODEL_SCALE,
    NO_SLIDE_MPP,
    OUTPUT_SUFFIXES,
    ScalePlan,
    SegmentOptions,
    scale_plan,
)
from wsiseg.segment.regions import (
    RegionResult,
    autocast,
    check_model_for_slides,
    find_regions,
    samples_on_glass,
    segment_region,
    segment_regions,
)
from wsiseg.segment.sliding import LabelStore, SW_BATCH, SW_MARGIN, SW_WINDOW, sliding_window
from wsiseg.segment.slide import output_paths, reduced_mask_level, segment_slide
from wsiseg.segment.runner import SlideSegmenter, run_segment

__all__ = [  # the public names of the modules above, in their order
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
    "autocast",
    "segment_region",
    "segment_regions",
    "find_regions",
    "samples_on_glass",
    "check_model_for_slides",
    "SW_WINDOW",
    "SW_MARGIN",
    "SW_BATCH",
    "sliding_window",
    "LabelStore",
    "output_paths",
    "reduced_mask_level",
    "segment_slide",
    "SlideSegmenter",
    "run_segment",
]
