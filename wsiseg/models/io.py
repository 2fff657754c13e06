"""Model files: safetensors weights with wsiseg's JSON metadata in the header.

A model is one ``.safetensors`` file. Its header ``__metadata__`` holds a
single key, ``wsiseg``, whose value is a JSON document: format version,
classes and colours, sizes, sampler settings, normalisation, training config
and data hash, the physical scale it was trained at (``scale``,
:mod:`wsiseg.models.scale`), package versions. Weights are plain tensors; nothing is ever
unpickled, so a hostile file cannot run code.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from wsiseg.atomic import atomic_output
from wsiseg.errors import WsisegError
from wsiseg.hashing import file_hash
from wsiseg.sampling.grid import BORDERS
from wsiseg.limits import (
    MAX_CHANNELS,
    MAX_CLASSES,
    MAX_LAYER_WIDTH,
    MAX_MODEL_SIDE,
    MAX_SIGMA,
    MAX_SPEC_LIST,
    MAX_SUPPORT,
    MAX_GRID_ITERATIONS,
    loads_json,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ModelFileError",
    "save_model",
    "read_metadata",
    "load_model_file",
    "save_deformseg",
    "LoadedModel",
    "load_deformseg",
    "check_net_metadata",
]

FORMAT = "wsiseg-model"
FORMAT_VERSION = 1
_KEY = "wsiseg"


class ModelFileError(WsisegError):
    """A model file is missing, not ours, damaged or from a newer wsiseg."""


def save_model(path: str | os.PathLike, state_dict: dict, metadata: dict, *, overwrite: bool = True) -> Path:
    """Write weights and metadata to one safetensors file, atomically.

    Parameters
    ----------
    path : path-like
        Output file (``.safetensors``).
    state_dict : dict of str -> torch.Tensor
        Weights (and buffers) to store; tensors are made contiguous on CPU.
    metadata : dict
        JSON-serialisable description; ``format`` and ``format_version`` are
        added.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata}
    try:
        text = json.dumps(meta, sort_keys=True)
    except TypeError as exc:
        raise ModelFileError(f"model metadata is not JSON-serialisable: {exc}", path) from exc
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_output(path, overwrite=overwrite) as tmp:
        save_file(tensors, tmp, metadata={_KEY: text})
    return Path(path)


def read_metadata(path: str | os.PathLike) -> dict:
    """Read and check a model file's metadata without loading its weights.

    Raises
    ------
    ModelFileError
        Missing file, not a safetensors file, not a wsiseg model, or a format
        version newer than this wsiseg understands.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise ModelFileError("model file not found" if not p.exists() else "model path is not a file", p)
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"not a readable safetensors model file ({_first_line(exc)})", p) from exc
    if _KEY not in header:
        raise ModelFileError("safetensors file without wsiseg metadata: not a wsiseg model", p)
    try:
        meta = loads_json(header[_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"damaged wsiseg metadata ({exc.msg})", p) from exc
    except ValueError as exc:
        raise ModelFileError(f"damaged wsiseg metadata ({exc})", p) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError("not a wsiseg model (unknown metadata format)", p)
    version = meta.get("format_version")
    # bool is an int in Python: ``true`` must not pass as version 1.
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelFileError(f"invalid model format version {version!r} (expected an integer >= 1)", p)
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"model format version {version!r} is newer than this wsiseg understands ({FORMAT_VERSION}); "
            "upgrade wsiseg",
            p,
        )
    return meta


def load_model_file(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Load ``(state_dict, metadata)`` from a wsiseg model file.

    Raises
    ------
    ModelFileError
        As :func:`read_metadata`, or when the weights are truncated/damaged.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_metadata(path)
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"damaged model weights ({_first_line(exc)})", path) from exc
    return state, meta


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def save_deformseg(
    path: str | os.PathLike,
    net,
    classes,
    *,
    extra: dict | None = None,
    overwrite: bool = True,
) -> Path:
    """Save a :class:`~wsiseg.models.net.DeformSegNet` as a wsiseg model file.

    Parameters
    ----------
    path : path-like
        Output ``.safetensors`` file.
    net : DeformSegNet
        The trained net; its :meth:`config` is stored so it can be rebuilt.
    classes : sequence of ClassInfo
        Class values, names and colours in *channel order*: output channel
        ``i`` predicts label value ``classes[i].value``. Their count must
        match the segmenter's output channels.
    extra : dict, optional
        More metadata (training config, data hash, scores, ...).
    """
    from wsiseg.output.classes import ClassInfo
    from wsiseg.output.report import versions

    classes = [c if isinstance(c, ClassInfo) else ClassInfo(**c) for c in classes]
    _check_classes(net, classes, path)
    meta = {
        "net": net.config(),
        "classes": [{"value": c.value, "name": c.name, "color": list(c.color)} for c in classes],
        "versions": versions(),
        **(extra or {}),
    }
    return save_model(path, net.state_dict(), meta, overwrite=overwrite)


@dataclass
class LoadedModel:
    """A model file loaded for inference.

    Attributes
    ----------
    net : DeformSegNet
        In eval mode on the requested device.
    classes : list of ClassInfo
    metadata : dict
        Everything the file says (training config, scores, versions).
    path : str
    hash : str
        :func:`file_hash` of the file (resume fingerprints, reports).
    """

    net: object
    classes: list
    metadata: dict
    path: str
    hash: str

    @property
    def scale(self):
        """The physical scale the model was trained at (:class:`~wsiseg.models.scale.ModelScale`).

        None for model files without one (written before wsiseg recorded it).

        Raises
        ------
        ModelFileError
            The metadata's ``scale`` entry is malformed.
        """
        from wsiseg.models.scale import ModelScale

        try:
            return ModelScale.from_metadata(self.metadata)
        except ValueError as exc:
            raise ModelFileError(f"model metadata is invalid ({exc})", self.path) from exc


def load_deformseg(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a wsiseg model file into a ready-to-run DeformSegNet.

    Every weight comes from the file: nothing is downloaded and no encoder
    weights file is read (``encoder_init`` in the metadata only records
    where training started from).

    Raises
    ------
    ModelFileError
        Not a wsiseg model, damaged, from a newer version, or its weights
        or classes do not match its own configuration.
    """
    from wsiseg.models.net import DeformSegNet
    from wsiseg.output.classes import ClassInfo

    meta = read_metadata(path)
    check_net_metadata(meta, path)
    seg_spec = meta["net"].get("segmenter")
    if isinstance(seg_spec, dict) and seg_spec.get("encoder_weights") is not None:
        # Trained weights are all in the file: loading never downloads or reads another file.
        raise ModelFileError("model metadata asks for encoder weights to load; a model file holds its weights", path)
    _check_weight_shapes(meta["net"], path)
    state, _ = load_model_file(path, device="cpu")
    try:
        net = DeformSegNet.from_config(meta["net"])
        # ClassInfo checks that the colour has three values
        classes = [
            ClassInfo(int(c["value"]), str(c["name"]), cast(tuple[int, int, int], tuple(int(v) for v in c["color"])))
            for c in meta["classes"]
        ]
    except (KeyError, TypeError, ValueError, WsisegError) as exc:
        raise ModelFileError(f"model metadata is incomplete or invalid ({_first_line(exc)})", path) from exc
    _check_classes(net, classes, path)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"weights do not match the model's configuration ({_first_line(exc)})", path) from exc
    net.to(device).eval()
    model = LoadedModel(net=net, classes=classes, metadata=meta, path=os.fspath(path), hash=file_hash(path))
    model.scale  # noqa: B018 - a malformed scale entry fails here, before any slide is read
    return model


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _spec_value_problem(key: str, v, depth: int = 0) -> str | None:
    """Why a segmenter argument is outside the bounds, or None (ints, floats, strings and short lists only)."""
    if v is None or isinstance(v, (bool, str)) and len(str(v)) <= 200:
        return None
    if _is_int(v):
        return None if 0 <= v <= MAX_LAYER_WIDTH else f"net.segmenter.{key} must be in 0..{MAX_LAYER_WIDTH}"
    if isinstance(v, float):
        return None if math.isfinite(v) and abs(v) <= MAX_LAYER_WIDTH else f"net.segmenter.{key} is out of range"
    if isinstance(v, list) and len(v) <= MAX_SPEC_LIST and depth < 2:
        return next((p for x in v if (p := _spec_value_problem(key, x, depth + 1))), None)
    return f"net.segmenter.{key} must be a number, a string or a list of at most {MAX_SPEC_LIST} of them"


def check_net_metadata(meta: dict, path: str | os.PathLike) -> None:
    """Refuse model metadata whose sizes are outside :mod:`wsiseg.limits`, before anything is built from them.

    Checks the grid and map sizes, kernel sigma, support and edge radius,
    channel and class counts, normalisation and every number of the
    segmenter's specification (decoder channels, depths, ...).

    Parameters
    ----------
    meta : dict
        As :func:`read_metadata` returns it.
    path : path-like
        The model file, for messages.

    Raises
    ------
    ModelFileError
        One line naming the file and the first value out of bounds.
    """
    problem = _net_problem(meta.get("net"), meta.get("classes"))
    if problem:
        raise ModelFileError(f"model metadata is invalid ({problem})", path)


def _net_problem(net, classes) -> str | None:
    if not isinstance(net, dict):
        return "'net' must be a mapping"
    if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES:
        return f"'classes' must be a list of 1..{MAX_CLASSES} classes"
    for key in ("out_size", "map_size"):
        v = net.get(key)
        sides_ok = isinstance(v, list) and len(v) == 2 and all(_is_int(x) and 1 <= x <= MAX_MODEL_SIDE for x in v)
        if v is not None and not sides_ok:
            return f"net.{key} must be two integers in 1..{MAX_MODEL_SIDE}, got {_short(v)}"
    for key in ("sigma", "edge_radius"):
        v = net.get(key)
        if v is not None and not (_is_number(v) and 0 < v <= MAX_SIGMA):
            return f"net.{key} must be a number in (0, {MAX_SIGMA:g}], got {_short(v)}"
    v = net.get("support")
    if v is not None and not (_is_int(v) and 1 <= v <= MAX_SUPPORT and v % 2 == 1):
        return f"net.support must be an odd integer in 1..{MAX_SUPPORT}, got {_short(v)}"
    v = net.get("grid_iterations")
    if v is not None and not (_is_int(v) and 1 <= v <= MAX_GRID_ITERATIONS):
        return f"net.grid_iterations must be an integer in 1..{MAX_GRID_ITERATIONS}, got {_short(v)}"
    v = net.get("grid_border")
    if v is not None and v not in BORDERS:
        return f"net.grid_border must be one of {', '.join(BORDERS)}, got {_short(v)}"
    seg = net.get("segmenter")
    seg = seg if isinstance(seg, dict) else {}
    channels = (
        ("net.in_channels", net.get("in_channels", 3)),
        ("net.segmenter.in_channels", seg.get("in_channels", 3)),
    )
    for where, v in channels:
        if not (_is_int(v) and 1 <= v <= MAX_CHANNELS):
            return f"{where} must be an integer in 1..{MAX_CHANNELS}, got {_short(v)}"
    v = seg.get("num_classes", 2)
    if not (_is_int(v) and 1 <= v <= MAX_CLASSES):
        return f"net.segmenter.num_classes must be an integer in 1..{MAX_CLASSES}, got {_short(v)}"
    for key in ("image_mean", "image_std"):
        v = net.get(key)
        if v is not None and not (isinstance(v, list) and len(v) <= MAX_CHANNELS and all(_is_number(x) for x in v)):
            return f"net.{key} must be at most {MAX_CHANNELS} finite numbers, got {_short(v)}"
    return next((p for k, x in seg.items() if (p := _spec_value_problem(str(k), x))), None)


def _check_weight_shapes(net_config: dict, path: str | os.PathLike) -> None:
    """Build the net on the meta device (no memory) and compare its tensor shapes with the file's header.

    A configuration whose layers do not match the stored weights is refused
    before a single parameter is allocated, whatever sizes it asks for.
    """
    from safetensors import SafetensorError, safe_open

    from wsiseg.errors import ConfigError
    from wsiseg.models.net import DeformSegNet

    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in DeformSegNet.from_config(net_config).state_dict().items()}
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ModelFileError(f"model metadata is incomplete or invalid ({_first_line(exc)})", path) from exc
    except (NotImplementedError, RuntimeError):
        return  # an architecture that cannot be built on the meta device: the strict load below still checks
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"damaged model weights ({_first_line(exc)})", path) from exc
    wrong = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    if wrong:
        k = wrong[0]
        raise ModelFileError(
            f"weights do not match the model's configuration ({len(wrong)} tensors differ, e.g. {k!r}: "
            f"configuration {expected.get(k, 'none')}, file {found.get(k, 'none')})",
            path,
        )


def _check_classes(net, classes, path) -> None:
    k = getattr(net, "num_classes", None)
    if k is not None and k != len(classes):
        raise ModelFileError(f"the model predicts {k} classes but {len(classes)} class names are given", path)
    values = [c.value for c in classes]
    if len(set(values)) != len(values) or any(not 0 <= v <= 255 for v in values):
        raise ModelFileError(f"class values must be unique and in 0..255, got {values}", path)
