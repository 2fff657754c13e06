"""Describe an opened slide (``wsiseg info``): plain dicts and text lines."""

from __future__ import annotations

from wsiseg.mpp import IgnoredMpp, format_mpp
from wsiseg.slide.multiscale import Multiscale

__all__ = ["slide_info", "format_slide_info"]


def slide_info(ms: Multiscale) -> dict:
    """JSON-ready summary of a slide's pyramid and metadata.

    Parameters
    ----------
    ms : Multiscale
        An opened slide.

    Returns
    -------
    dict
        ``path``, ``vendor``, ``reader``, ``width``, ``height``, ``mpp``
        (``[x, y]`` or None), ``mpp_source`` (see
        :class:`~wsiseg.slide.multiscale.Multiscale`), ``mpp_ignored``
        (``{"mpp": [x, y], "source": ..., "plausible_range": [lo, hi]}``
        when the file's value was implausible and ignored, else None),
        ``associated`` and ``levels``
        (each ``index``, ``width``, ``height``, ``downsample`` ``[x, y]``,
        ``chunk`` ``[rows, columns]``).
    """
    return {
        "path": ms.path,
        "vendor": ms.vendor,
        "reader": ms.reader,
        "width": ms.width,
        "height": ms.height,
        "mpp": None if ms.mpp is None else [float(ms.mpp[0]), float(ms.mpp[1])],
        "mpp_source": ms.mpp_source,
        "mpp_ignored": None if ms.mpp_ignored is None else ms.mpp_ignored.to_dict(),
        "associated": list(ms.associated),
        "levels": [
            {
                "index": i,
                "width": lv.width,
                "height": lv.height,
                "downsample": [float(lv.downsample[0]), float(lv.downsample[1])],
                "chunk": list(lv.chunk_shape),
            }
            for i, lv in enumerate(ms.levels)
        ],
    }


def _fmt_ds(ds) -> str:
    x, y = ds
    return f"{x:.4g}" if abs(x - y) < 1e-9 else f"{x:.4g} x {y:.4g}"


def format_slide_info(info: dict) -> str:
    """Human-readable text of :func:`slide_info`: a header, then one line per level."""
    ignored = info.get("mpp_ignored")
    if info["mpp"] is None and ignored:
        what = IgnoredMpp(tuple(ignored["mpp"]), ignored["source"]).describe()
        mpp = f"unknown ({info['mpp_source']}: {what}; pass --mpp)"
    elif info["mpp"] is None:
        mpp = "unknown (missing)"
    else:
        mpp = f"{format_mpp(info['mpp'])} um/px ({info['mpp_source']})"
    lines = [
        info["path"],
        f"  vendor: {info['vendor']}   reader: {info['reader']}",
        f"  mpp: {mpp}",
        f"  associated: {', '.join(info['associated']) or '-'}",
        f"  {'level':>5}  {'size (WxH)':>13}  {'downsample':>15}  {'chunk (WxH)':>11}",
    ]
    for lv in info["levels"]:
        size = f"{lv['width']}x{lv['height']}"
        chunk = f"{lv['chunk'][1]}x{lv['chunk'][0]}"
        lines.append(f"  {lv['index']:>5}  {size:>13}  {_fmt_ds(lv['downsample']):>15}  {chunk:>11}")
    return "\n".join(lines)
