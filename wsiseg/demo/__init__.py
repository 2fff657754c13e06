"""The built-in demo: a slide built from a real CC0 H&E region, and the shipped demo model.

``cmu1-region.jpg`` is a 1024 x 1024 crop of ``CMU-1-Small-Region.svs``
(Carnegie Mellon University, OpenSlide test data, CC0). ``model.safetensors``
is the demo model trained by ``pipelines/demo-model.yaml`` (see its metadata
for what it was trained on and its held-out scores).
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
            "no demo model is shipped yet: it comes with issue 5 ('wsiseg train' and the demo model); "
            "use 'wsiseg segment SLIDES --model YOUR_MODEL --out DIR' meanwhile",
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
