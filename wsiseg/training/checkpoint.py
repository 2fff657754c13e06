"""Training checkpoints, safetensors plus a JSON structure and never pickles, and the files of a training folder.

A checkpoint holds everything needed to continue a run exactly (weights, optimizer, scheduler, AMP scaler, RNG
states, counters, history); see "Files in out_dir" in :mod:`wsiseg.training.loop`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiseg.atomic import atomic_output
from wsiseg.errors import WsisegError
from wsiseg.limits import loads_json

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "CHECKPOINT_VERSION",
    "CONFIG_NAME",
    "CURVES_NAME",
    "LOG_NAME",
    "MODEL_NAME",
    "Checkpoint",
    "check_output_dir",
    "load_checkpoint",
    "read_checkpoint_config",
    "save_checkpoint",
    "set_rng_state",
]

MODEL_NAME = "model.safetensors"
CHECKPOINT_NAME = "checkpoint.safetensors"
LOG_NAME = "log.csv"
CURVES_NAME = "curves.png"
CONFIG_NAME = "train_config.yaml"

CHECKPOINT_FORMAT = "wsiseg-checkpoint"
CHECKPOINT_VERSION = 1
_META_KEY = "wsiseg"


# ---------------------------------------------------------------------------
# checkpoints: safetensors + JSON structure, never pickles
# ---------------------------------------------------------------------------

_TENSOR, _TUPLE, _ITEMS, _NDARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"


def _pack(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of ``obj`` with tensors moved to ``tensors`` by name.

    Tuples, non-string dict keys (optimizer state is keyed by int) and
    numpy arrays (numpy's RNG state) are tagged so :func:`_unpack` restores
    them exactly.
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {_NDARRAY: prefix, "dtype": obj.dtype.str}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _pack(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
        if not all(isinstance(k, (str, int, float, bool)) or k is None for k in obj):
            raise TypeError(f"cannot store dict keys of type {sorted({type(k).__name__ for k in obj})}")
        return {_ITEMS: [[k, _pack(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_pack(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_pack(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _unpack(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _NDARRAY in obj:
            return tensors[obj[_NDARRAY]].numpy().astype(np.dtype(obj["dtype"]))
        if _TUPLE in obj:
            return tuple(_unpack(v, tensors) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {k: _unpack(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in cuda])


@dataclass
class Checkpoint:
    """A training checkpoint read back from disk.

    Attributes
    ----------
    meta : dict
        Counters, scores, history, config, classes, data hash.
    model : dict of str -> torch.Tensor
        The net's state dict.
    state : dict
        ``optimizer``, ``scheduler`` (or None), ``scaler`` and ``rng`` states,
        in the form their ``load_state_dict``/setters take.
    """

    meta: dict
    model: dict
    state: dict


def save_checkpoint(
    path: str | os.PathLike,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    meta: dict,
) -> Path:
    """Write a training checkpoint (one safetensors file), atomically.

    Parameters
    ----------
    path : path-like
    net, optimizer, scheduler, scaler
        Their ``state_dict()`` is stored (``scheduler``/``scaler`` may be None).
    meta : dict
        JSON-able counters and provenance (epoch, step, best, history, ...).

    Notes
    -----
    Model weights are stored as ``model/<key>``; optimizer, scheduler,
    scaler and RNG states are walked recursively: their tensors become
    ``state/...`` tensors and the rest (param groups, step counts, Python
    and numpy RNG words) JSON in the header, so loading never unpickles.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {
        f"model/{k}": v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()
    }
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": _rng_state(),
    }
    doc = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        **meta,
        "state": _pack(state, "state", tensors),
    }
    text = json.dumps(doc, sort_keys=True)
    with atomic_output(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: text})
    return Path(path)


def _read_checkpoint_meta(path: Path) -> tuple[dict, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        doc = loads_json(header[_META_KEY])
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise WsisegError(f"not a readable wsiseg training checkpoint ({str(exc).strip()[:200]})", path) from exc
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise WsisegError("not a wsiseg training checkpoint", path)
    version = doc.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:  # bool is an int: refuse true
        raise WsisegError(f"invalid checkpoint format version {version!r} (expected an integer >= 1)", path)
    if version > CHECKPOINT_VERSION:
        raise WsisegError(f"checkpoint format version {version!r} is newer than this wsiseg understands", path)
    return doc, doc.pop("state", None)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (onto the CPU).

    Raises
    ------
    WsisegError
        Missing, damaged, not a checkpoint, or from a newer wsiseg.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise WsisegError("checkpoint not found", p)
    meta, packed = _read_checkpoint_meta(p)
    try:
        tensors = load_file(str(p), device="cpu")
        state = _unpack(packed, tensors) if packed is not None else {}
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
        raise WsisegError(f"damaged training checkpoint ({str(exc).strip()[:200]})", p) from exc
    model = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    return Checkpoint(meta=meta, model=model, state=state)


def check_output_dir(out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> bool:
    """Check that a run may write to ``out_dir``; True when it will resume from a checkpoint there.

    Cheap, so a command line can call it before loading any data.

    Raises
    ------
    WsisegError
        ``out_dir`` holds a previous run (a checkpoint or model) and neither
        ``resume`` nor ``overwrite`` is set, or it is a file.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise WsisegError("output folder is a file", out)
    has_ckpt = (out / CHECKPOINT_NAME).is_file()
    if resume and not has_ckpt and not overwrite and (out / MODEL_NAME).exists():
        raise WsisegError("holds a model but no checkpoint to resume from; use --overwrite to start afresh", out)
    if resume:
        return has_ckpt
    if not overwrite and (has_ckpt or (out / MODEL_NAME).exists()):
        raise WsisegError(
            "holds a previous training run; use --resume to continue it, --overwrite to replace it, "
            "or choose another output folder",
            out,
        )
    return False


def read_checkpoint_config(out_dir: str | os.PathLike) -> dict | None:
    """The training config stored in ``out_dir``'s checkpoint, or None without one.

    Lets ``wsiseg train --resume`` continue with the options of the
    interrupted run when none are given again.
    """
    p = Path(out_dir) / CHECKPOINT_NAME
    if not p.is_file():
        return None
    meta, _ = _read_checkpoint_meta(p)
    cfg = meta.get("config")
    return dict(cfg) if isinstance(cfg, dict) else None
