"""Training data of the real-tissue demo model (``wsiseg/demo/tumour.safetensors``).

Built from the labelled regions of the shared data that ``wsiseg bench
quality`` uses, keeping its fixed test images as the held-out split; see
``docs/demo-model.md`` and ``pipelines/tumour-model.sh``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from collections.abc import Sequence

from wsiseg.training.regions import QUALITY_SETS, REGIONS_DIR, region_stems
from wsiseg.errors import ConfigError

__all__ = ["DEMO_CLASSES", "IGNORE_LABEL", "prepare_demo_data"]


#: Classes of the real-tissue demo model: glass by the tissue detector, the rest by the tumour masks.
DEMO_CLASSES = (
    "classes:\n  - {value: 0, name: background, color: [0, 0, 0]}\n"
    "  - {value: 1, name: non-tumour, color: [60, 180, 75]}\n  - {value: 2, name: tumour, color: [230, 25, 75]}\n"
)
#: Real slide regions with glass (histolab fixtures in the shared textures): glass labels for the demo model.
# The shared textures with glass and their micrometres per pixel (estimates: a 20x region, and level 2 of one).
_GLASS_TEXTURES = {"no-tissue.png": 0.5, "tissue-level2-3000-7666-7096-11763.png": 2.0}
IGNORE_LABEL = 255


def _glass(rgb, threshold: float):
    """Glass as the tissue detector sees it: low tissue score, in pieces touching the image border.

    Interior holes (lumina, fat) count as tissue, as :func:`wsiseg.slide.tissue.detect_tissue` fills them.
    """
    import numpy as np
    from skimage.measure import label as components

    from wsiseg.slide.tissue import tissue_score

    empty = tissue_score(rgb) <= threshold
    lab = components(empty, connectivity=1)
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    sizes = np.bincount(lab.ravel())
    keep = [k for k in edge if k and sizes[k] >= 4096]
    return np.isin(lab, keep)


def prepare_demo_data(
    data_root: str | os.PathLike,
    out: str | os.PathLike,
    threshold: float = 0.1,
    sets: Sequence[str] | None = None,
) -> Path:
    """Three-class training data for the demo model from every *training* image of the labelled regions.

    ``0 background`` where the tissue score (:func:`wsiseg.slide.tissue.tissue_score`,
    fixed ``threshold``) says glass, in pieces touching the border (:func:`_glass`) and the mask says
    no tumour,
    ``1 non-tumour`` other tissue, ``2 tumour`` the mask. The benchmark's test images keep
    ``split = test`` (training leaves them out; the demo model's held-out scores use them). The shared
    textures with glass (``no-tissue.png``, a level-2 slide region) are added with glass as background
    and their tissue ignored (no tumour labels there).

    ``sets`` keeps only those keys of :data:`~wsiseg.training.regions.QUALITY_SETS` (default all).

    Returns
    -------
    pathlib.Path
        ``out/pairs.csv`` (``image,annotation,split,mpp``; the MPPs of
        :data:`~wsiseg.training.regions.QUALITY_SETS`, partly estimates);
        ``out/classes.yaml`` beside it.
    """
    import numpy as np
    from PIL import Image

    out = Path(out)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    rows = []
    for qs in QUALITY_SETS.values():
        if sets is not None and qs.key not in sets:
            continue
        src = Path(data_root) / REGIONS_DIR / qs.folder
        if not (src / "images").is_dir():
            raise ConfigError(f"labelled regions not found at {src}")
        for stem in region_stems(src):
            with Image.open(src / "images" / f"{stem}.jpg") as im:
                rgb = np.asarray(im.convert("RGB"))
            with Image.open(src / "masks" / f"{stem}.jpg") as im:
                tumour = np.asarray(im.convert("L")) >= 128
            label = np.where(tumour, 2, np.where(_glass(rgb, threshold), 0, 1)).astype(np.uint8)
            path = out / "labels" / f"{qs.key}-{stem}.png"
            Image.fromarray(label).save(path)
            split = "test" if stem in qs.test else "train"
            rows.append((os.path.abspath(src / "images" / f"{stem}.jpg"), os.path.abspath(path), split, qs.mpp))
    for (
        name,
        mpp,
    ) in _GLASS_TEXTURES.items():  # real glass next to unlabelled tissue: glass -> background, tissue ignored
        src = Path(data_root) / "textures" / name
        if not src.is_file():
            continue
        with Image.open(src) as im:
            rgb = np.asarray(im.convert("RGB"))
        label = np.where(_glass(rgb, threshold), 0, IGNORE_LABEL).astype(np.uint8)
        stem = Path(name).stem
        Image.fromarray(rgb).save(out / f"{stem}.png")
        Image.fromarray(label).save(out / "labels" / f"{stem}.png")
        image, labels = os.path.abspath(out / f"{stem}.png"), os.path.abspath(out / "labels" / f"{stem}.png")
        rows.append((image, labels, "train", mpp))
    (out / "classes.yaml").write_text(DEMO_CLASSES, encoding="utf-8")
    with open(out / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "annotation", "split", "mpp"])
        w.writerows(rows)
    return out / "pairs.csv"
