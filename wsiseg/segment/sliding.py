"""The sliding-window baseline: the segmentation net on every level-0 window, labels in a file-backed store."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from wsiseg.models.io import LoadedModel
from wsiseg.sampling.coords import level_source_index
from wsiseg.slide.multiscale import Multiscale
from wsiseg.segment.options import SegmentOptions
from wsiseg.segment.regions import autocast, check_model_for_slides

__all__ = [
    "SW_WINDOW",
    "SW_MARGIN",
    "SW_BATCH",
    "sliding_window",
    "LabelStore",
]


#: Sliding-window mode: side of the level-0 windows whose labels are kept, the
#: context read around them on each side (its predictions are cropped away),
#: and windows per forward pass.
SW_WINDOW, SW_MARGIN, SW_BATCH = 512, 32, 4


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
        with torch.no_grad(), autocast(device, options.amp):
            x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
            scores = net.segment_probs(x, tta=True) if options.tta else net.segmenter(net.standardise(x))
        best = scores.float().argmax(dim=1)[:, m : m + SW_WINDOW, m : m + SW_WINDOW].cpu().numpy()
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
