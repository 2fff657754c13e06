"""Typed geometry of an opened slide: a pyramid of lazy RGB levels."""

from __future__ import annotations

from dataclasses import dataclass, field

import dask.array as da

from wsiseg.mpp import IgnoredMpp

__all__ = [
    "IGNORED_IMPLAUSIBLE",
    "Level",
    "Multiscale",
]

#: ``Multiscale.mpp_source`` when the file's only MPP was implausible and is
#: treated as unknown (see :mod:`wsiseg.mpp`).
IGNORED_IMPLAUSIBLE = "ignored-implausible"


@dataclass(frozen=True)
class Level:
    """One pyramid level.

    Attributes
    ----------
    array : dask.array.Array
        ``(H, W, 3)`` uint8 RGB, lazy; each dask chunk maps to one stored
        tile/chunk of the source, so computing a slice decodes only the
        chunks it touches.
    downsample : (float, float)
        Level-0 pixels per level pixel along ``(x, y)``: ``W0 / W``, ``H0 / H``
        (pyramids are not always power-of-two or isotropic).
    """

    array: da.Array
    downsample: tuple[float, float]

    @property
    def width(self) -> int:
        return int(self.array.shape[1])

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def chunk_shape(self) -> tuple[int, int]:
        """Nominal (rows, columns) of one chunk."""
        return int(self.array.chunksize[0]), int(self.array.chunksize[1])


@dataclass(frozen=True)
class Multiscale:
    """A slide as a pyramid of lazy RGB levels in level-0 pixel space.

    Coordinates follow :mod:`wsiseg.sampling.coords`.

    Attributes
    ----------
    path : str
        The slide file or directory.
    levels : tuple of Level
        Level 0 first, decreasing resolution.
    mpp : (float, float) or None
        Micrometres per level-0 pixel ``(x, y)``; ``None`` when unknown (never
        invented).
    mpp_source : str
        Where the MPP came from: ``"override"`` (``--mpp``), ``"openslide"``
        (OpenSlide's ``openslide.mpp-x/y`` properties), ``"tiff-resolution"``
        (TIFF X/YResolution tags), ``"ome"`` (OME-XML ``PhysicalSizeX/Y``),
        ``"ngff"`` (OME-Zarr scales), ``"ignored-implausible"`` (the file's
        value is outside the plausible range and treated as unknown; see
        ``mpp_ignored``) or ``"missing"``.
    mpp_ignored : IgnoredMpp or None
        The implausible value read from the file and ignored, with its source.
    vendor : str
        Format/vendor name (e.g. ``"aperio"``, ``"generic-tiff"``, ``"ome-zarr"``).
    reader : str
        Which backend provides the chunks (``"tifffile"``, ``"openslide"``,
        ``"zarr"``, ``"memory"``).
    associated : tuple of str
        Names of associated images (label, macro, thumbnail). Never copied to
        outputs.
    properties : dict
        Raw metadata key/values for reports.
    """

    path: str
    levels: tuple[Level, ...]
    mpp: tuple[float, float] | None = None
    mpp_source: str = "missing"
    mpp_ignored: IgnoredMpp | None = None
    vendor: str = "unknown"
    reader: str = "memory"
    associated: tuple[str, ...] = ()
    properties: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def width(self) -> int:
        """Level-0 width in pixels."""
        return self.levels[0].width

    @property
    def height(self) -> int:
        """Level-0 height in pixels."""
        return self.levels[0].height

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``, as OpenSlide reports it."""
        return self.width, self.height

    @classmethod
    def from_arrays(cls, arrays, *, path: str = "<memory>", mpp=None, chunks: int = 256, **kw) -> "Multiscale":
        """Build an in-memory Multiscale from level arrays (tests, synthetic data).

        Parameters
        ----------
        arrays : sequence of array-like
            ``(H, W, 3)`` uint8 levels, level 0 first.
        chunks : int
            Square chunk size of the dask arrays.
        """
        first = arrays[0]
        h0, w0 = first.shape[:2]
        levels = []
        for a in arrays:
            arr = a if isinstance(a, da.Array) else da.from_array(a, chunks=(chunks, chunks, 3))
            levels.append(Level(arr, (w0 / arr.shape[1], h0 / arr.shape[0])))
        kw.setdefault("mpp_source", "missing" if mpp is None else "override")
        return cls(path=path, levels=tuple(levels), mpp=mpp, **kw)

    def level_for_downsample(self, downsample: float) -> int:
        """Index of the coarsest level whose downsample is <= ``downsample``.

        Level 0 when ``downsample < 1``.
        """
        best = 0
        for i, lv in enumerate(self.levels):
            if max(lv.downsample) <= downsample * (1 + 1e-9):
                best = i
        return best
