"""The built-in demo: a slide built from a real CC0 H&E region, and the shipped demo models.

``cmu1-region.jpg`` is a 1024 x 1024 crop of ``CMU-1-Small-Region.svs``
(Carnegie Mellon University, OpenSlide test data, CC0).

``tumour.safetensors`` (3 classes: background, non-tumour, tumour; ~7 MB)
was trained on the real H&E tumour masks of ``../shared/data/labelled-regions``
by ``pipelines/tumour-model.sh`` (random encoder weights; see
``docs/demo-model.md`` for its data, licences, held-out scores and limits).

``model.safetensors`` is the mosaic demo model (3 classes: background, cellular,
stroma; ~7 MB), rebuilt bit for bit by ``pipelines/demo-model.sh`` from
``pipelines/demo-data.yaml`` and ``pipelines/demo-model.yaml``. It was trained
on texture mosaics built on real BCSS label geometry with real H&E textures
(:mod:`wsiseg.training.mosaic`), not on real annotated slides: it is a demonstration,
not a diagnostic tool. Its metadata holds the training config, data hash and
validation scores; ``docs/demo-model.md`` records the data, licences,
held-out test scores and limitations.
"""

from __future__ import annotations

from pathlib import Path

from wsiseg.errors import WsisegError

__all__ = [
    "MODEL",
    "TUMOUR_MODEL",
    "MODEL_NAMES",
    "demo_model",
    "demo_slide",
]

HERE = Path(__file__).resolve().parent
REGION = HERE / "cmu1-region.jpg"
MODEL = HERE / "model.safetensors"
TUMOUR_MODEL = HERE / "tumour.safetensors"
#: Shipped models by name: the real-tissue tumour model and the texture-mosaic model.
MODEL_NAMES = ("tumour", "mosaic")
_REBUILD = {"tumour": "pipelines/tumour-model.sh", "mosaic": "pipelines/demo-model.sh --install"}


def demo_model(name: str = "mosaic") -> Path:
    """Path of a shipped demo model.

    Parameters
    ----------
    name : {"tumour", "mosaic"}
        ``"tumour"``: background / non-tumour / tumour, trained on real H&E
        tumour masks (``docs/demo-model.md``); ``"mosaic"``: background /
        cellular / stroma, trained on texture mosaics.

    Raises
    ------
    WsisegError
        An unknown name, or the package does not ship that model.
    """
    if name not in MODEL_NAMES:
        raise WsisegError(f"unknown demo model {name!r}; available: {', '.join(MODEL_NAMES)}")
    path = TUMOUR_MODEL if name == "tumour" else MODEL
    if not path.is_file():
        raise WsisegError(
            f"no demo model is shipped yet (the package has no demo/{path.name}); rebuild it with "
            f"'{_REBUILD[name]}' or use 'wsiseg segment SLIDES --model YOUR_MODEL --out DIR'",
            path,
        )
    return path


def demo_slide(out_dir: str | Path, width: int = 8192, height: int = 6144) -> Path:
    """Build (once) the demo slide: a pyramidal JPEG BigTIFF mirror-tiled from the CC0 region."""
    from wsiseg.slide.synthetic import write_synthetic_slide

    path = Path(out_dir) / f"demo-slide-{width}x{height}.tiff"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        write_synthetic_slide(tmp, width, height, REGION, mpp=0.5)
        tmp.replace(path)
    return path
