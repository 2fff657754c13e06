"""Edge-loss target and fixed densities (uniform, edge-based baseline).

Edge target (paper eq. 4 and its footnote 4)
--------------------------------------------
The target density for the edge loss is an edge map of the low-resolution
label ``Y_lr``: Gaussian blur (sigma 1), then the 3x3 filter
``[[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]]`` with border values replicated,
then the magnitude.

Multi-class labels: the filter is applied to the *one-hot map of each class*
and the magnitudes are summed over classes and halved. Filtering the label
ids directly would make an edge's strength depend on arbitrary id
differences (``|7 - 1|`` vs ``|2 - 1|``); per-class one-hot maps make every
boundary count the same whatever the ids, and halving makes a two-class
label give exactly the edge map of its binary ``{0, 1}`` mask. Taking the
magnitude counts both sides of a boundary.

The blur is a sum of shifted copies and the filter a sum of the eight
differences ``centre - neighbour`` (the same filter, rearranged), both in
the same order at every pixel: wherever the label is locally constant, and
on a single-class label everywhere, the target is exactly 0 (never NaN,
never a rounding residue).

Ignored and padded pixels
-------------------------
Pixels outside a ``valid`` mask (default: label ``!= 255``, the ignore
value that also pads regions) are no class. Each sample's map is computed
on the bounding box of its valid pixels, whose sides are treated like the
image border (replicated), so region padding leaves the target inside
bit-for-bit unchanged. Invalid pixels inside the box first take the label
of the nearest valid pixel (Euclidean). Invalid pixels get target 0. A
class/ignore boundary is therefore no edge and attracts no samples, while a
boundary between two classes with a thin unlabelled gap between them still
counts. The oracle :func:`edge_density` treats them the same way.

Glass weighting
---------------
:func:`weight_glass` scales a density down on glass (nodes a tissue
detector calls glass) and renormalises it. With a constant density it is
the glass prior of ``segment --glass-weight``: the grid is built on a warp
toward it (:func:`wsiseg.sampling.grid.prior_grid`), which moves samples
from glass to tissue, however far, and leaves regions without glass as the
sampler makes them. It is a prior, not learnt.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

__all__ = [
    "IGNORE_INDEX",
    "blur",
    "check_glass_weight",
    "edge_density",
    "edge_target",
    "label_validity",
    "uniform_density",
    "weight_glass",
]

#: Label of pixels without supervision; the data pipeline pads regions with it
#: (the same value as :data:`wsiseg.training.classmap.IGNORE_INDEX`, kept here so
#: this low-level module needs no annotation readers).
IGNORE_INDEX = 255


def _gauss1d(sigma: float, dtype, device) -> torch.Tensor:
    r = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with replicated borders.

    Parameters
    ----------
    x : torch.Tensor
        Floating point, shape ``(N, C, H, W)``.
    sigma : float
        Standard deviation in pixels (> 0); support ``2 * ceil(3 sigma) + 1``.

    Returns
    -------
    torch.Tensor
        Same shape as ``x``. A constant input is returned bit-for-bit constant
        (the taps are summed in the same order at every pixel).
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    g = _gauss1d(sigma, x.dtype, x.device)
    r = (g.numel() - 1) // 2
    h, w = x.shape[-2:]
    xp = F.pad(x, (r, r, 0, 0), mode="replicate")
    # sum() of tensors is a tensor (its start 0 only types as int)
    y = cast(torch.Tensor, sum(g[t] * xp[..., :, t : t + w] for t in range(2 * r + 1)))
    yp = F.pad(y, (0, 0, r, r), mode="replicate")
    return cast(torch.Tensor, sum(g[t] * yp[..., t : t + h, :] for t in range(2 * r + 1)))


def _laplace8(x: torch.Tensor) -> torch.Tensor:
    """The filter ``[[-1,-1,-1],[-1,8,-1],[-1,-1,-1]]`` with replicated borders."""
    h, w = x.shape[-2:]
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    out = torch.zeros_like(x)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy == 1 and dx == 1:
                continue
            out = out + (x - xp[..., dy : dy + h, dx : dx + w])
    return out


def label_validity(
    labels_lr: torch.Tensor, valid: torch.Tensor | None = None, ignore_index: int | None = IGNORE_INDEX
) -> torch.Tensor:
    """The boolean mask of supervised pixels of a label batch.

    Parameters
    ----------
    labels_lr : torch.Tensor
        Integer labels ``(B, hd, wd)``.
    valid : torch.Tensor, optional
        Explicit mask, broadcastable to ``labels_lr``; wins over ``ignore_index``.
    ignore_index : int or None
        Label of unsupervised pixels; ``None``: every pixel is valid.

    Returns
    -------
    torch.Tensor
        Bool ``(B, hd, wd)`` on the labels' device.
    """
    if valid is not None:
        return valid.to(device=labels_lr.device, dtype=torch.bool).expand(labels_lr.shape)
    if ignore_index is None:
        return torch.ones_like(labels_lr, dtype=torch.bool)
    return labels_lr != ignore_index


def _fill_invalid(labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Give every invalid pixel the label of its nearest valid pixel (per sample).

    Exact Euclidean feature transform (scipy); maps are at the density-map
    size, so the CPU trip is small. A sample without valid pixels is
    returned unchanged (its result is masked to 0 anyway).
    """
    out = labels.clone()
    lab = labels.detach().cpu().numpy()
    val = valid.detach().cpu().numpy()
    for i in range(lab.shape[0]):
        if val[i].all() or not val[i].any():
            continue
        iy, ix = ndi.distance_transform_edt(~val[i], return_distances=False, return_indices=True)
        out[i] = torch.from_numpy(np.ascontiguousarray(lab[i][iy, ix])).to(out.device)
    return out


def _on_valid_boxes(fn, labels: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``fn(labels (1, h, w)) -> (1, 1, h, w)`` on each sample's valid bounding box.

    Invalid pixels are filled from their nearest valid pixel first; the
    result is 0 outside the box and on invalid pixels. Cropping (instead of
    filling the padding too) keeps the border convention of the unpadded map.
    """
    b, hd, wd = labels.shape
    filled = _fill_invalid(labels, valid)
    out = torch.zeros(b, 1, hd, wd, dtype=dtype, device=labels.device)
    rows, cols = valid.any(dim=2).cpu(), valid.any(dim=1).cpu()
    for i in range(b):
        if not rows[i].any():
            continue
        r, c = torch.nonzero(rows[i]).flatten(), torch.nonzero(cols[i]).flatten()
        ys, xs = slice(int(r[0]), int(r[-1]) + 1), slice(int(c[0]), int(c[-1]) + 1)
        out[i, :, ys, xs] = fn(filled[i : i + 1, ys, xs])[0]
    return torch.where(valid.unsqueeze(1), out, torch.zeros_like(out))


def edge_target(
    labels_lr: torch.Tensor,
    sigma: float = 1.0,
    *,
    valid: torch.Tensor | None = None,
    ignore_index: int | None = IGNORE_INDEX,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Edge-loss target density from low-resolution labels.

    Parameters
    ----------
    labels_lr : torch.Tensor
        Integer labels ``(B, hd, wd)`` at the density-map size (any ids).
    sigma : float
        Gaussian blur before the edge filter (the paper uses 1).
    valid : torch.Tensor, optional
        Bool ``(B, hd, wd)``: pixels that carry a class. Default
        ``labels_lr != ignore_index``.
    ignore_index : int or None, default 255
        Label of ignored/padded pixels when ``valid`` is not given;
        ``None`` makes every pixel valid (the ignore value then counts as
        one more class, the behaviour before masks existed).
    dtype : torch.dtype
        Floating type of the result.

    Returns
    -------
    torch.Tensor
        Non-negative, finite, unnormalised map ``(B, 1, hd, wd)``:
        ``0.5 * sum over classes |filter(blur(onehot_c))|`` on each sample's
        valid bounding box (invalid pixels filled from their nearest valid
        pixel), 0 on invalid pixels. All zeros where a sample has a single
        valid class or no valid pixel.
    """
    if labels_lr.dim() != 3:
        raise ValueError(f"labels_lr must have shape (B, hd, wd), got {tuple(labels_lr.shape)}")
    b, hd, wd = labels_lr.shape
    mask = label_validity(labels_lr, valid, ignore_index)
    # Compact the valid ids so arbitrary values (255, -1) need no huge
    # one-hot; ids shared by the whole batch keep a sample's class sum alike
    # with or without padding. Invalid pixels get id 0 until they are filled.
    ids = torch.unique(labels_lr[mask])
    k = ids.numel()
    inv = torch.searchsorted(ids, labels_lr.contiguous()).clamp_max(max(k - 1, 0))
    if k <= 1:
        return torch.zeros(b, 1, hd, wd, dtype=dtype, device=labels_lr.device)

    def response(ids: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(ids, k).permute(0, 3, 1, 2).to(dtype)
        return 0.5 * _laplace8(blur(onehot, sigma)).abs().sum(dim=1, keepdim=True)

    if bool(mask.all()):
        return response(inv)
    return _on_valid_boxes(response, inv, mask, dtype)


def _boundary(labels: torch.Tensor) -> torch.Tensor:
    """True where any of the 8 neighbours (borders replicated) has another label."""
    h, w = labels.shape[-2:]
    # Replicate-pad by clamped indexing: works for any integer dtype exactly.
    rows = torch.arange(-1, h + 1, device=labels.device).clamp(0, h - 1)
    cols = torch.arange(-1, w + 1, device=labels.device).clamp(0, w - 1)
    lp = labels[:, rows][:, :, cols]
    out = torch.zeros_like(labels, dtype=torch.bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= lp[:, dy : dy + h, dx : dx + w] != labels
    return out


def edge_density(
    labels_lr: torch.Tensor,
    radius: float,
    floor: float = 0.05,
    *,
    valid: torch.Tensor | None = None,
    ignore_index: int | None = IGNORE_INDEX,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Edge-based sampling density (baseline of paper A.5, after Marin et al.).

    Label boundaries (pixels with a differently labelled 8-neighbour, both
    sides) are blurred with a Gaussian of standard deviation ``radius``,
    scaled to peak 1, and ``floor`` is added so the density stays positive
    and a single-class label gives the uniform density. Boundaries are
    those between valid classes only (invalid pixels are filled from their
    nearest valid pixel first, as in :func:`edge_target`), and invalid
    pixels get the floor alone.

    Parameters
    ----------
    labels_lr : torch.Tensor
        Integer labels ``(B, hd, wd)`` at the density-map size.
    radius : float
        Blur standard deviation in density-map nodes (> 0).
    floor : float
        Constant added after peak normalisation (> 0).
    valid : torch.Tensor, optional
        Bool ``(B, hd, wd)`` of labelled pixels; default ``labels_lr != ignore_index``.
    ignore_index : int or None, default 255
        See :func:`edge_target`.
    dtype : torch.dtype
        Floating type of the result.

    Returns
    -------
    torch.Tensor
        Density ``(B, 1, hd, wd)``, positive, each sample summing to 1.
    """
    if labels_lr.dim() != 3:
        raise ValueError(f"labels_lr must have shape (B, hd, wd), got {tuple(labels_lr.shape)}")
    if not floor > 0:
        raise ValueError(f"floor must be positive, got {floor}")
    mask = label_validity(labels_lr, valid, ignore_index)

    def blurred_boundary(lab: torch.Tensor) -> torch.Tensor:
        return blur(_boundary(lab).unsqueeze(1).to(dtype), radius)

    e = blurred_boundary(labels_lr) if bool(mask.all()) else _on_valid_boxes(blurred_boundary, labels_lr, mask, dtype)
    peak = e.amax(dim=(1, 2, 3), keepdim=True)
    e = torch.where(peak > 0, e / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(e))
    d = e + floor
    return d / d.sum(dim=(1, 2, 3), keepdim=True)


def uniform_density(b: int, hd: int, wd: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Constant density ``(b, 1, hd, wd)`` summing to 1 per sample (gives the uniform grid)."""
    return torch.full((b, 1, hd, wd), 1.0 / (hd * wd), dtype=dtype, device=device)


def check_glass_weight(weight, name: str = "glass weight") -> None:
    """Raise ``ValueError`` unless ``weight`` is a number in ``(0, 1]`` (1: no weighting)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 < float(weight) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (1: off), got {weight!r}")


def weight_glass(d: torch.Tensor, glass: torch.Tensor, weight: float) -> torch.Tensor:
    """A density scaled by ``weight`` on glass and renormalised to sum 1 per sample.

    Parameters
    ----------
    d : torch.Tensor
        ``(B, 1, hd, wd)`` non-negative density (any positive total).
    glass : torch.Tensor
        ``(B, hd, wd)`` bool: the map nodes on glass.
    weight : float
        In ``(0, 1]``: the factor on glass nodes (1 leaves the density's
        shape as it is).

    Returns
    -------
    torch.Tensor
        ``(B, 1, hd, wd)``, summing to 1 per sample. A map that is all glass
        or all tissue keeps its shape (the factor cancels).

    Examples
    --------
    >>> d = torch.full((1, 1, 1, 4), 0.25)
    >>> glass = torch.tensor([[[True, True, False, False]]])
    >>> [round(v, 6) for v in weight_glass(d, glass, 0.25)[0, 0, 0].tolist()]
    [0.1, 0.1, 0.4, 0.4]
    """
    check_glass_weight(weight)
    if d.ndim != 4 or d.shape[1] != 1 or tuple(glass.shape) != (d.shape[0], *d.shape[2:]):
        raise ValueError(f"need d (B, 1, hd, wd) and glass (B, hd, wd), got {tuple(d.shape)} and {tuple(glass.shape)}")
    on_glass = glass.to(device=d.device, dtype=torch.bool).unsqueeze(1)
    out = torch.where(on_glass, d * float(weight), d)
    total = out.sum(dim=(1, 2, 3), keepdim=True)
    return out / torch.where(total > 0, total, torch.ones_like(total))
