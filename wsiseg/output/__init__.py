"""Writing results: pyramidal label masks, colour overlays, class tables, QuPath GeoJSON."""

from wsiseg.output.classes import (
    ClassInfo,
    class_colormap,
    default_classes,
    default_palette,
    read_classes_json,
    write_classes_json,
)
from wsiseg.output.geojson import read_qupath_geojson, write_qupath_geojson
from wsiseg.output.mask import LevelGeometry, MaskWriteStats, TileSource, mask_levels, write_label_pyramid
from wsiseg.output.overlay import overlay_from_mask, write_overlay_pyramid

__all__ = [
    "ClassInfo",
    "LevelGeometry",
    "MaskWriteStats",
    "TileSource",
    "class_colormap",
    "default_classes",
    "default_palette",
    "mask_levels",
    "overlay_from_mask",
    "read_classes_json",
    "read_qupath_geojson",
    "write_classes_json",
    "write_label_pyramid",
    "write_overlay_pyramid",
    "write_qupath_geojson",
]
