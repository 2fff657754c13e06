"""The ``zarr`` reader: OME-Zarr directories (NGFF 0.4 and 0.5 ``multiscales``, bioformats2raw layouts)."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np

from wsiseg.errors import SlideError, one_line
from wsiseg.slide.common import UNIT_TO_UM, as_rgb, build_multiscale, check_dimensions, resolve_mpp, valid_mpp
from wsiseg.slide.multiscale import Multiscale

__all__ = ["open_ngff"]


# ---------------------------------------------------------------------------
# OME-Zarr


def open_ngff(p: Path, override) -> Multiscale:
    """Open an OME-Zarr (NGFF 0.4/0.5) directory (the ``zarr`` reader).

    Parameters
    ----------
    p : Path
        The zarr directory.
    override : (float, float) or None
        ``--mpp``.
    """
    import zarr

    try:
        group = zarr.open_group(str(p), mode="r")
        attrs = dict(group.attrs)
    except Exception as exc:
        raise SlideError(f"cannot open zarr store ({type(exc).__name__}: {one_line(exc)})", p) from exc
    ms_list = _ngff_multiscales(attrs)
    ome = attrs.get("ome")
    if not ms_list and ("bioformats2raw.layout" in attrs or (isinstance(ome, dict) and "bioformats2raw.layout" in ome)):
        # bioformats2raw puts the first image in the child group "0".
        try:
            image = group["0"]
        except Exception as exc:
            raise SlideError(f"bioformats2raw layout without image '0' ({one_line(exc)})", p) from exc
        if not isinstance(image, zarr.Group):
            raise SlideError("bioformats2raw layout whose '0' is an array, not an image group", p)
        group, attrs = image, dict(image.attrs)
        ms_list = _ngff_multiscales(attrs)
    if not ms_list:
        raise SlideError("zarr store has no OME-NGFF 'multiscales' metadata", p)
    ms = ms_list[0]
    try:
        axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])]
        datasets = ms["datasets"]
        nodes = [group[d["path"]] for d in datasets]
    except Exception as exc:
        raise SlideError(f"invalid OME-NGFF multiscales metadata ({type(exc).__name__}: {one_line(exc)})", p) from exc
    zarrays = [n for n in nodes if isinstance(n, zarr.Array)]
    if not zarrays or len(zarrays) != len(nodes):
        raise SlideError("invalid OME-NGFF multiscales metadata: a dataset path names a group, not an array", p)
    if not axes:  # NGFF < 0.4 wrote no axes: assume the 5-D default
        axes = list("tczyx")[-zarrays[0].ndim :]
    if len(axes) != zarrays[0].ndim or "y" not in axes or "x" not in axes:
        raise SlideError(f"unsupported NGFF axes {axes} for arrays of {zarrays[0].ndim} dimensions", p)
    for za in zarrays:
        if np.dtype(za.dtype) != np.uint8:
            raise SlideError(
                f"refused: {np.dtype(za.dtype).name} data; only 8-bit brightfield RGB slides are supported", p
            )
    cidx = axes.index("c") if "c" in axes else None
    nchan = int(zarrays[0].shape[cidx]) if cidx is not None else 1
    extra = {a: int(n) for a, n in zip(axes, zarrays[0].shape) if a not in ("y", "x", "c") and n > 1}
    if extra:
        raise SlideError(
            f"refused: image has more than one plane ({extra}); only single-plane 2-D slides are supported", p
        )
    if nchan not in (1, 2, 3, 4):
        raise SlideError(f"refused: {nchan} channels; only brightfield RGB(A) or grayscale slides are supported", p)
    gray = nchan in (1, 2)
    alpha = "unassociated" if nchan in (2, 4) else None
    dims = [(int(za.shape[axes.index("x")]), int(za.shape[axes.index("y")])) for za in zarrays]
    check_dimensions(dims, p)
    arrays = []
    try:
        for za in zarrays:
            arr = da.from_zarr(za)
            index = tuple(slice(None) if a in ("y", "x", "c") else 0 for a in axes)
            arr = arr[index]
            kept = [a for a in axes if a in ("y", "x", "c")]
            order = [kept.index(a) for a in ("y", "x", "c") if a in kept]
            arr = arr.transpose(order)
            if cidx is not None and nchan == 1:
                arr = arr[..., 0]
            arrays.append(as_rgb(arr, gray=gray, alpha=alpha))
    except Exception as exc:
        raise SlideError(f"cannot read OME-Zarr arrays ({type(exc).__name__}: {one_line(exc)})", p) from exc
    resolved = resolve_mpp(p, override, [("ngff", lambda: _ngff_mpp(ms, axes))])
    props = {"ngff.version": str(ms.get("version", "")), "ngff.name": str(ms.get("name", ""))}
    return build_multiscale(p, arrays, resolved, "ome-zarr", "zarr", (), props)


def _ngff_multiscales(attrs: dict) -> list:
    """``multiscales`` of NGFF <= 0.4 (top level) or 0.5 (under ``ome``)."""
    return attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales") or []


def _ngff_mpp(ms: dict, axes: list[str]) -> tuple[float, float] | None:
    """Level-0 pixel size in µm from NGFF scale transforms and axis units."""
    units = {}
    for a in ms.get("axes", []):
        if isinstance(a, dict):
            units[a.get("name")] = a.get("unit")
    scale = np.ones(len(axes))
    for transforms in (ms["datasets"][0].get("coordinateTransformations", []), ms.get("coordinateTransformations", [])):
        for t in transforms or []:
            if t.get("type") == "scale" and "scale" in t:
                scale = scale * np.asarray(t["scale"], dtype=float)
    out = []
    for ax in ("x", "y"):
        factor = UNIT_TO_UM.get(str(units.get(ax) or "").lower())
        if factor is None:
            return None  # unitless scales are not physical sizes
        out.append(float(scale[axes.index(ax)]) * factor)
    return valid_mpp(*out)
