"""Helpers for tests that check polygons against label rasters."""

from __future__ import annotations

import numpy as np
import shapely


def rasterise(items, shape, downsample, lut) -> np.ndarray:
    """Label raster from level-0 geometries: a pixel takes the class whose geometry holds its centre."""
    out = np.zeros(shape, np.uint8)
    scale = np.array(downsample, dtype=np.float64)
    for name, geom in items:
        g = shapely.transform(geom, lambda xy: xy / scale)
        x0, y0, x1, y1 = g.bounds
        c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        c1, r1 = min(shape[1], int(np.ceil(x1))), min(shape[0], int(np.ceil(y1)))
        yy, xx = np.mgrid[r0:r1, c0:c1] + 0.5
        shapely.prepare(g)
        out[r0:r1, c0:c1][shapely.contains_xy(g, xx, yy)] = lut[name]
    return out


def overlap_areas(items) -> np.ndarray:
    """Intersection areas of all pairs of geometries of different classes that meet."""
    names = np.array([name for name, _ in items])
    geoms = np.array([g for _, g in items], dtype=object)
    a, b = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    pair = (a < b) & (names[a] != names[b])
    return shapely.area(shapely.intersection(geoms[a[pair]], geoms[b[pair]]))
