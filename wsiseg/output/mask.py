"""Streaming pyramidal TIFF writer for full-resolution label masks.

The whole-slide segmenter produces its mask tile by tile; this module turns
such a *tile source* into a pyramidal BigTIFF without ever holding a level in
memory.

File layout (opens in OpenSlide as ``generic-tiff``, in QuPath, tifffile and
zarr):

* BigTIFF, square tiles (512 by default), uint8 samples, lossless Deflate. A
  level smaller than one tile (the last level, or level 0 of a small slide)
  gets the smallest multiple of 16 that covers it instead
  (:meth:`LevelGeometry.tile_edge`): libvips (8.18) refuses to open a TIFF
  whose tiles are far larger than the image ("tile size out of range", e.g.
  512 tiles on 128 x 128 pixels or less), and a smaller tile pads less.
* One IFD per level in the *main* IFD chain, level 0 first, reduced levels
  marked NewSubfileType=1 (OpenSlide ignores SubIFD pyramids).
* Level 0 has exactly the slide's level-0 size; each next level is
  ``ceil(/2)`` of the previous one until a level fits in one tile
  (:func:`mask_levels`).
* With ``mpp``, X/YResolution in pixels per centimetre, scaled per level,
  which OpenSlide reports as ``openslide.mpp-x/y``.

Tile sources
------------
``tile_source(level, x0, y0, w, h)`` returns the labels of the region
``[x0, x0 + w) x [y0, y0 + h)`` of ``level`` (a :class:`LevelGeometry`, in
that level's own pixels) as a ``(h, w)`` uint8 array, or a plain ``int``
meaning "every pixel has this label". Levels are *not* computed from level 0
here, and no level is ever held: wsiseg's sources (the reverse sampler, the
sliding-window label store) return for a reduced level exactly level 0
subsampled at the level's pixel centres
(:func:`wsiseg.sampling.coords.reduce_nearest`: pixel ``j`` is level-0 pixel
``floor((j + 0.5) * W0 / Wk)``; at 2x the lower-right pixel of each 2 x 2
block), evaluating just those level-0 pixels. The pyramid is thus consistent
(the labels a viewer shows do not change with zoom) and the reduced levels
cost a third of level 0 at most.

Constant tiles (an ``int``, or an array with a single value) are written as
one encoded tile per label value, compressed once and reused, so large
background or single-class areas cost no per-pixel work.

It stays one module (some 620 lines): the file layout, the tile encoders
(constant tiles included) and the streaming writer are one file format, and
the writer's batching depends on both.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import imagecodecs
import numpy as np
import tifffile

from wsiseg import __version__
from wsiseg.atomic import atomic_output
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.mpp import mpp_pair

__all__ = [
    "LevelGeometry",
    "MaskWriteStats",
    "TileSource",
    "mask_levels",
    "write_label_pyramid",
    "COMPRESSIONS",
    "write_pyramid",
]

TileSource = Callable[["LevelGeometry", int, int, int, int], Union[np.ndarray, int]]
"""``tile_source(level, x0, y0, w, h) -> (h, w) uint8 array | int``."""

SOFTWARE = f"wsiseg {__version__}"


@dataclass(frozen=True)
class LevelGeometry:
    """Size and scale of one pyramid level.

    Attributes
    ----------
    index : int
        Level number, 0 for full resolution.
    width, height : int
        Level size in pixels.
    downsample : (float, float)
        Level-0 pixels per level pixel along ``(x, y)``: ``W0 / Wk``,
        ``H0 / Hk``. Not exactly ``2**k`` when a size was rounded up: level
        ``k`` covers the level-0 extent edge to edge (see
        :mod:`wsiseg.sampling.coords`), so its pixel ``j`` has centre
        ``(j + 0.5) * downsample[0]`` in level-0 coordinates.
    """

    index: int
    width: int
    height: int
    downsample: tuple[float, float]

    def tile_grid(self, tile: int) -> tuple[int, int]:
        """Number of tiles ``(across, down)`` at tile size ``tile``."""
        return math.ceil(self.width / tile), math.ceil(self.height / tile)

    def n_tiles(self, tile: int) -> int:
        """Number of tiles at tile size ``tile``."""
        across, down = self.tile_grid(tile)
        return across * down

    def tile_edge(self, tile: int) -> int:
        """TIFF tile edge of this level in a pyramid tiled ``tile``.

        Parameters
        ----------
        tile : int
            The pyramid's tile edge, a positive multiple of 16.

        Returns
        -------
        int
            ``tile``, or for a level smaller than one tile the smallest
            multiple of 16 that covers its longer side: still one tile, which
            libvips accepts (it refuses tiles far larger than the image) and
            which pads less.

        Examples
        --------
        >>> LevelGeometry(0, 16, 16, (1.0, 1.0)).tile_edge(512)
        16
        >>> LevelGeometry(3, 278, 371, (8.0, 8.0)).tile_edge(512)
        384
        """
        return min(int(tile), -(-max(self.width, self.height) // 16) * 16)


def _check_tile(tile: int) -> int:
    if not isinstance(tile, (int, np.integer)) or tile < 16 or tile % 16:
        raise ConfigError(f"tile size must be a positive multiple of 16 (TIFF), got {tile!r}")
    return int(tile)


def mask_levels(width: int, height: int, tile: int = 512) -> list[LevelGeometry]:
    """Pyramid geometry of a mask: halve (rounding up) until one tile holds a level.

    Parameters
    ----------
    width, height : int
        Level-0 size in pixels (the slide's exact level-0 size).
    tile : int
        Tile edge in pixels, a positive multiple of 16.

    Returns
    -------
    list of LevelGeometry
        Level 0 first. Level ``k`` is ``ceil(W / 2**k) x ceil(H / 2**k)``; the
        last level is the first with both sides ``<= tile``.

    Examples
    --------
    >>> [(g.width, g.height) for g in mask_levels(1234, 777, tile=256)]
    [(1234, 777), (617, 389), (309, 195), (155, 98)]
    """
    tile = _check_tile(tile)
    if int(width) < 1 or int(height) < 1:
        raise WsisegError(f"mask size must be positive, got {width}x{height}")
    width, height = int(width), int(height)
    levels = []
    w, h = width, height
    while True:
        levels.append(LevelGeometry(len(levels), w, h, (width / w, height / h)))
        if w <= tile and h <= tile:
            return levels
        w, h = -(-w // 2), -(-h // 2)


@dataclass(frozen=True)
class MaskWriteStats:
    """What a pyramid write did.

    Attributes
    ----------
    path : pathlib.Path
        The file written.
    width, height : int
        Level-0 size.
    levels : int
        Number of pyramid levels.
    tiles : int
        Tiles written over all levels.
    constant_tiles : int
        Of those, tiles written from the constant-tile cache (no per-pixel
        encoding). 0 when tiles were copied (:func:`overlay_from_mask`).
    seconds : float
        Wall time of the whole write, rename included.
    file_bytes : int
        Size of the file.
    """

    path: Path
    width: int
    height: int
    levels: int
    tiles: int
    constant_tiles: int
    seconds: float
    file_bytes: int

    @property
    def megapixels(self) -> float:
        """Level-0 megapixels."""
        return self.width * self.height / 1e6

    @property
    def megapixels_per_second(self) -> float:
        """Level-0 megapixels written per second (the mask write rate)."""
        return self.megapixels / self.seconds if self.seconds > 0 else float("inf")


# ---------------------------------------------------------------------------
# Encoders: tiles are compressed here, not by tifffile, so that constant tiles
# are encoded once and reused, and the speed/size trade-off is ours to pick.


@dataclass(frozen=True)
class _Codec:
    tiff: str | None  # tifffile compression name for the Compression tag
    encode: Callable[[np.ndarray, int | None], bytes]
    fast_level: int | None  # default for data tiles (speed matters)
    best_level: int | None  # for the few cached constant tiles (size matters)


def _deflate(data: np.ndarray, level: int | None) -> bytes:
    # zlib-ng writes standard zlib streams (TIFF Adobe Deflate) several times
    # faster than zlib at low levels; label tiles compress well at any level.
    if imagecodecs.ZLIBNG.available:
        return imagecodecs.zlibng_encode(data, level=level)
    return zlib.compress(data, 6 if level is None else level)


def _zstd(data: np.ndarray, level: int | None) -> bytes:
    return imagecodecs.zstd_encode(data, level=level)


def _lzw(data: np.ndarray, level: int | None) -> bytes:
    return imagecodecs.lzw_encode(data)


def _raw(data: np.ndarray, level: int | None) -> bytes:
    return data.tobytes()


COMPRESSIONS: dict[str, _Codec] = {
    # level 2: measured on label tiles, half the size of level 1 for +30% time
    "deflate": _Codec("adobe_deflate", _deflate, 2, 9),
    "zstd": _Codec("zstd", _zstd, 1, 19),
    "lzw": _Codec("lzw", _lzw, None, None),
    "none": _Codec(None, _raw, None, None),
}
"""Lossless compressions the writer accepts. Lossy codecs (JPEG, WebP) are
refused: they would invent label values at class boundaries."""


def _codec(name: str) -> _Codec:
    try:
        return COMPRESSIONS[str(name).lower()]
    except KeyError:
        raise ConfigError(f"mask compression must be one of {sorted(COMPRESSIONS)} (lossless), got {name!r}") from None


# ---------------------------------------------------------------------------
# The shared writer


@dataclass
class _Counter:
    tiles: int = 0
    constant: int = 0


class _ConstantTiles:
    """Encoded constant tiles, one per label value and tile edge.

    TIFF tiles always have the full tile size; the padding beyond the image
    edge is unspecified, so it is filled with the tile's own value and one
    encoded blob serves every constant tile of that edge, edge tiles included.
    """

    def __init__(self, codec: _Codec):
        self._codec = codec
        self._cache: dict[tuple[int, int], bytes] = {}

    def get(self, value: int, tile: int) -> bytes:
        blob = self._cache.get((value, tile))
        if blob is None:
            full = np.full((tile, tile), value, np.uint8)
            blob = self._cache[value, tile] = self._codec.encode(full, self._codec.best_level)
        return blob


def _as_label_tile(out, level: LevelGeometry, x0: int, y0: int, w: int, h: int) -> np.ndarray | int:
    """Validate one tile_source result; return an int for constant tiles."""
    if isinstance(out, (int, np.integer)) and not isinstance(out, (bool, np.bool_)):
        value = int(out)
        if not 0 <= value <= 255:
            raise ValueError(
                f"tile_source returned label {value} outside 0..255 (level {level.index}, x0={x0}, y0={y0})"
            )
        return value
    arr = np.asarray(out)
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if arr.dtype != np.uint8:
        raise TypeError(
            f"tile_source must return uint8 labels or an int, got {arr.dtype} (level {level.index}, x0={x0}, y0={y0})"
        )
    if arr.shape != (h, w):
        raise ValueError(
            f"tile_source returned shape {arr.shape}, expected {(h, w)} (level {level.index}, x0={x0}, y0={y0})"
        )
    # one cheap pass catches sources that do not flag constant tiles themselves (after a look at every
    # 32nd pixel of every 32nd row, which settles most data tiles at a 1000th of the cost)
    first = arr.flat[0]
    if not (arr[::32, ::32] != first).any() and not (arr != first).any():
        return int(first)
    return arr


def _encode_data_tile(arr: np.ndarray, tile: int, codec: _Codec, level: int | None) -> bytes:
    h, w = arr.shape
    if (h, w) != (tile, tile):
        # edge tile: TIFF stores full tiles; zero padding compresses best
        full = np.zeros((tile, tile), np.uint8)
        full[:h, :w] = arr
        arr = full
    return codec.encode(np.ascontiguousarray(arr), level)


# Data tiles per pool task: one 512 x 512 label tile encodes in ~0.2 ms, the
# same order as handing a task to a thread, so tiles travel in small batches.
_BATCH = 8


class _Batch:
    """Data tiles waiting for, or being, encoded on the pool."""

    __slots__ = ("arrays", "future")

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] | None = []
        self.future: Future | None = None


def _encode_batch(arrays: list[np.ndarray], tile: int, codec: _Codec, level: int | None) -> list[bytes]:
    return [_encode_data_tile(a, tile, codec, level) for a in arrays]


def _level_tiles(
    level: LevelGeometry,
    tile_source: TileSource,
    tile: int,
    codec: _Codec,
    level_arg: int | None,
    constants: _ConstantTiles,
    pool: ThreadPoolExecutor | None,
    max_pending: int,
    counter: _Counter,
    bar,
) -> Iterator[bytes]:
    """Encoded tiles of one level in TIFF order (row-major), streamed.

    Data tiles are encoded on ``pool`` in batches while the calling thread
    evaluates the next tiles; a bounded number of tiles is in flight, so
    memory stays at a few tiles whatever the level size. ``tile`` is the
    pyramid's; the level is tiled at :meth:`LevelGeometry.tile_edge`.
    """
    tile = level.tile_edge(tile)
    # entries in file order: encoded bytes, or (batch, index in batch)
    pending: deque[bytes | tuple[_Batch, int]] = deque()
    batch: _Batch | None = None

    def submit(b: _Batch) -> None:
        nonlocal batch
        b.future = pool.submit(_encode_batch, b.arrays, tile, codec, level_arg)
        b.arrays = None  # the task holds them; freed once encoded
        if b is batch:
            batch = None  # flushed early: later tiles start a new batch

    def ready(final: bool) -> Iterator[bytes]:
        # hand over the head while it is ready; wait only when too far ahead
        while pending:
            head = pending[0]
            if not isinstance(head, bytes):
                b, i = head
                must = final or len(pending) > max_pending
                if b.future is None:
                    if not must:
                        return
                    submit(b)
                if not (must or b.future.done()):
                    return
                head = b.future.result()[i]
            pending.popleft()
            counter.tiles += 1
            bar.update(1)
            yield head

    across, down = level.tile_grid(tile)
    try:
        for ty in range(down):
            y0 = ty * tile
            h = min(tile, level.height - y0)
            for tx in range(across):
                x0 = tx * tile
                w = min(tile, level.width - x0)
                res = _as_label_tile(tile_source(level, x0, y0, w, h), level, x0, y0, w, h)
                if isinstance(res, int):
                    counter.constant += 1
                    pending.append(constants.get(res, tile))
                elif pool is None:
                    pending.append(_encode_data_tile(res, tile, codec, level_arg))
                else:
                    if batch is None:
                        batch = _Batch()
                    pending.append((batch, len(batch.arrays)))
                    # a copy: sources may reuse their output buffer for the next tile
                    batch.arrays.append(np.array(res, copy=True))
                    if len(batch.arrays) == _BATCH:
                        submit(batch)
                yield from ready(final=False)
        yield from ready(final=True)
    finally:
        # on error, do not leave encodes of a dead write queued
        for item in pending:
            if not isinstance(item, bytes) and item[0].future is not None:
                item[0].future.cancel()


def _resolution(mpp: tuple[float, float] | None, level: LevelGeometry) -> dict:
    if mpp is None:
        return {}
    # pixels per centimetre of this level: 1e4 um/cm / (um per level pixel)
    return {
        "resolution": (1e4 / (mpp[0] * level.downsample[0]), 1e4 / (mpp[1] * level.downsample[1])),
        "resolutionunit": "CENTIMETER",
    }


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm  # imported only when asked for: tqdm's import is slow

    return tqdm(total=total, unit="tile", desc="mask")


def write_pyramid(
    path: str | os.PathLike,
    width: int,
    height: int,
    tile_source: TileSource,
    *,
    tile: int,
    mpp,
    compression: str,
    compression_level: int | None,
    overwrite: bool,
    progress: bool,
    workers: int,
    description: str,
    photometric: str,
    colormap: np.ndarray | None,
) -> MaskWriteStats:
    """One writer for masks and palette overlays (they differ only in tags)."""
    t0 = time.perf_counter()
    levels = mask_levels(width, height, tile)
    codec = _codec(compression)
    mpp = mpp_pair(mpp)
    level_arg = codec.fast_level if compression_level is None else int(compression_level)
    workers = max(0, int(workers))
    counter = _Counter()
    constants = _ConstantTiles(codec)
    total = sum(lv.n_tiles(tile) for lv in levels)
    # enough queued batches to keep every worker busy, few enough to bound memory
    max_pending = (2 * workers + 1) * _BATCH
    with atomic_output(path, overwrite=overwrite) as tmp:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsiseg-mask") if workers else None
        try:
            with _progress_bar(total, progress) as bar, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
                for lv in levels:
                    tw.write(
                        _level_tiles(
                            lv, tile_source, tile, codec, level_arg, constants, pool, max_pending, counter, bar
                        ),
                        shape=(lv.height, lv.width),
                        dtype=np.uint8,
                        tile=(lv.tile_edge(tile),) * 2,
                        compression=codec.tiff,
                        photometric=photometric,
                        colormap=colormap,
                        subfiletype=1 if lv.index else 0,
                        description=description if lv.index == 0 else None,
                        software=SOFTWARE,
                        metadata=None,
                        **_resolution(mpp, lv),
                    )
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        file_bytes = tmp.stat().st_size
    return MaskWriteStats(
        path=Path(path),
        width=levels[0].width,
        height=levels[0].height,
        levels=len(levels),
        tiles=counter.tiles,
        constant_tiles=counter.constant,
        seconds=time.perf_counter() - t0,
        file_bytes=file_bytes,
    )


def write_label_pyramid(
    path: str | os.PathLike,
    width: int,
    height: int,
    tile_source: TileSource,
    *,
    tile: int = 512,
    mpp: float | tuple[float, float] | None = None,
    compression: str = "deflate",
    compression_level: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    workers: int = 0,
) -> MaskWriteStats:
    """Write a full-resolution label mask as a pyramidal BigTIFF, tile by tile.

    Parameters
    ----------
    path : path-like
        Output file (``.tiff``). Written under a temporary sibling name and
        renamed when complete.
    width, height : int
        Level-0 size: the slide's exact level-0 size.
    tile_source : callable
        ``tile_source(level, x0, y0, w, h)`` with ``level`` a
        :class:`LevelGeometry` and the region in that level's pixels; returns
        a ``(h, w)`` uint8 label array or an ``int`` (the whole region has
        that label). Called once per tile, row-major within each level, level
        0 first, always from the calling thread. Reduced levels come from
        the source as they are, nothing is downsampled here; wsiseg's sources
        return level 0 subsampled (:func:`wsiseg.sampling.coords.reduce_nearest`).
    tile : int
        Tile edge in pixels (multiple of 16); a level smaller than one tile
        is one tile of :meth:`LevelGeometry.tile_edge`.
    mpp : float or (float, float), optional
        Micrometres per level-0 pixel ``(x, y)``. Written as X/YResolution in
        pixels per centimetre, scaled by each level's downsample.
    compression : {"deflate", "zstd", "lzw", "none"}
        Lossless tile compression. Deflate opens everywhere.
    compression_level : int, optional
        Codec level for data tiles; default a fast one (deflate 2, zstd 1).
        Constant tiles are encoded once at a high level regardless.
    overwrite : bool
        Replace an existing ``path``; otherwise it is refused before any work.
    progress : bool
        Show a tile progress bar on stderr.
    workers : int
        Threads encoding data tiles (in batches) while the source computes
        the next ones; 0 (default) encodes in the calling thread. Deflate
        level 2 takes ~0.15 ms of CPU per 512 x 512 label tile (~1200
        level-0 MP per CPU-second when no tile is constant), so on a few
        cores the thread hand-off cost more than it saved in our
        measurements; threads can pay off with slower codecs or levels on
        many cores. The file is byte-identical either way.

    Returns
    -------
    MaskWriteStats

    Raises
    ------
    WsisegError
        If ``path`` exists (without ``overwrite``) or cannot be written, or
        the size is not positive.
    ConfigError
        On an unknown compression or invalid tile size / mpp.
    TypeError, ValueError
        If ``tile_source`` returns a wrong dtype, shape or label; whatever
        ``tile_source`` raises propagates. Either way no file is left behind.

    Notes
    -----
    Memory is bounded by a few tiles (plus one offset/bytecount per tile that
    the TIFF directory needs), independent of the slide area.
    """
    return write_pyramid(
        path,
        width,
        height,
        tile_source,
        tile=tile,
        mpp=mpp,
        compression=compression,
        compression_level=compression_level,
        overwrite=overwrite,
        progress=progress,
        workers=workers,
        description="wsiseg label mask: uint8 class values (see the classes JSON sidecar)",
        photometric="minisblack",
        colormap=None,
    )
