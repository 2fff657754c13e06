"""wsiseg: fast whole-slide image segmentation by learning where to sample.

Implements "Learning to Downsample for Segmentation of Ultra-High Resolution
Images" (Jin et al., ICLR 2022) as a whole-slide pipeline.

The public API is importable from here; names are loaded on first use, so
``import wsiseg`` stays light (no torch) for tools that only read slides::

    import wsiseg

    ms = wsiseg.open_slide("slide.svs")                  # lazy pyramid
    model = wsiseg.load_model(wsiseg.demo_model("tumour"))
    outputs = wsiseg.segment_slide("slide.svs", model, "out", "slide")

See README, "Python API".
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute); imported lazily by __getattr__
_EXPORTS: dict[str, tuple[str, str]] = {
    # slides
    "open_slide": ("wsiseg.slide.open", "open_slide"),
    "Multiscale": ("wsiseg.slide.multiscale", "Multiscale"),
    # segmentation
    "SegmentOptions": ("wsiseg.segment", "SegmentOptions"),
    "segment_slide": ("wsiseg.segment", "segment_slide"),
    "run_segment": ("wsiseg.segment", "run_segment"),
    # models
    "load_model": ("wsiseg.models.io", "load_deformseg"),
    "LoadedModel": ("wsiseg.models.io", "LoadedModel"),
    "demo_model": ("wsiseg.demo", "demo_model"),
    "demo_slide": ("wsiseg.demo", "demo_slide"),
    # training and evaluation
    "TrainConfig": ("wsiseg.training.config", "TrainConfig"),
    # not "train": that was the name of the training module (now wsiseg.training), whose import rebound it
    "train_model": ("wsiseg.training.loop", "train"),
    "build_dataset": ("wsiseg.training.dataset", "build_dataset"),
    "evaluate_model": ("wsiseg.evaluation.scoring", "evaluate_model"),
    # errors: every refusal of a bad input is a WsisegError
    "WsisegError": ("wsiseg.errors", "WsisegError"),
    "SlideError": ("wsiseg.errors", "SlideError"),
    "ConfigError": ("wsiseg.errors", "ConfigError"),
    "ModelConfigError": ("wsiseg.errors", "ModelConfigError"),
    "ModelFileError": ("wsiseg.models.io", "ModelFileError"),
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from wsiseg.demo import demo_model, demo_slide
    from wsiseg.errors import ConfigError, ModelConfigError, SlideError, WsisegError
    from wsiseg.evaluation.scoring import evaluate_model
    from wsiseg.models.io import LoadedModel, ModelFileError
    from wsiseg.models.io import load_deformseg as load_model
    from wsiseg.segment import SegmentOptions, run_segment, segment_slide
    from wsiseg.slide.multiscale import Multiscale
    from wsiseg.slide.open import open_slide
    from wsiseg.training.dataset import build_dataset
    from wsiseg.training.config import TrainConfig
    from wsiseg.training.loop import train as train_model


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'wsiseg' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
