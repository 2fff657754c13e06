"""The built-in demo: a slide built from a real CC0 H&E region, and the shipped demo model.

``cmu1-region.jpg`` is a 1024 x 1024 crop of ``CMU-1-Small-Region.svs``
(Carnegie Mellon University, OpenSlide test data, CC0).

``model.safetensors`` is the demo model (3 classes: background, cellular,
stroma; ~7 MB), rebuilt bit for bit by ``pipelines/demo-model.sh`` from
``pipelines/demo-data.yaml`` and ``pipelines/demo-model.yaml``. It was trained
on texture mosaics built on real BCSS label geometry with real H&E textures
(:mod:`wsiseg.mosaic`), not on real annotated slides: it is a demonstration,
not a diagnostic tool. Its metadata holds the training config, data hash and
validation scores; ``docs/demo-model.md`` records the data, licences,
held-out test scores and limitations.
"""

from __future__ import annotations

from pathlib import Path

from wsiseg.errors import WsisegError

HERE = Path(__file__).resolve().parent
REGION = HERE / "cmu1-region.jpg"
MODEL = HERE / "model.safetensors"


def demo_model() -> Path:
    """Path of the shipped demo model.

    Raises
    ------
    WsisegError
        When the package has no demo model yet.
    """
    if not MODEL.is_file():
        raise WsisegError(
            "no demo model is shipped yet (the package has no demo/model.safetensors); rebuild it with "
            "'pipelines/demo-model.sh --install' or use 'wsiseg segment SLIDES --model YOUR_MODEL --out DIR'",
            MODEL,
        )
    return MODEL


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
