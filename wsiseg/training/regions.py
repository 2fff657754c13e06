"""The labelled H&E region sets of the shared data (``../shared/data/labelled-regions``).

Their folders, fixed held-out images and descriptions, as the quality benchmark
(:mod:`wsiseg.bench.quality`) and the real-tissue demo model's data
(:mod:`wsiseg.demo.data`) use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["QUALITY_SETS", "QualitySet", "REGIONS_DIR", "region_stems"]

#: Folder of the sets under the shared data folder.
REGIONS_DIR = Path("labelled-regions")


@dataclass(frozen=True)
class QualitySet:
    """One labelled-region set and how the benchmark uses it.

    Attributes
    ----------
    key : str
        Short name (run folders, tables).
    folder : str
        Folder under ``labelled-regions`` (``images/`` + ``masks/``).
    title : str
    hr_size : int
        Working resolution: the long side regions are read at.
    test : tuple of str
        File stems held out for testing (fixed; everything else trains).
    description : str
        One markdown sentence.
    mpp : float, optional
        Micrometres per pixel of the images (the JPEGs carry none): OCDC's
        20x scans 0.5 (its paper), BCSS 0.25 (TCGA 40x), CAMELYON about 1.0
        (no source states it; estimated from its lymphocyte nuclei of about
        7 px). For physical-mode training (``wsiseg train`` needs an MPP
        for every pair).
    """

    key: str
    folder: str
    title: str
    hr_size: int
    test: tuple[str, ...]
    description: str
    mpp: float | None = None


QUALITY_SETS: dict[str, QualitySet] = {
    "camelyon": QualitySet(
        "camelyon",
        "camelyon_lymphnode",
        "CAMELYON lymph-node metastases",
        512,
        # every fourth id of the 32 consecutive tiles: 8 test, 24 train
        ("10073", "10672", "10676", "10680", "10684", "10688", "10692", "10696"),
        "32 real H&E tiles of 512 x 512 with metastasis masks (CAMELYON16/17, CC0; probably 1-2 slides; the "
        "masks are blocky, upsampled from a low-resolution annotation), read at native resolution",
        1.0,
    ),
    "ocdc": QualitySet(
        "ocdc",
        "ocdc_oral_scc",
        "OCDC oral squamous cell carcinoma",
        640,
        ("1009009_r27c10", "1009009_r35c4", "1009009_r41c5"),  # 3 test, 7 train
        "10 real H&E tiles of 640 x 640 at 20x with tumour masks (OCDC, Freire et al. 2022, CC BY 4.0; one "
        "slide), read at native resolution",
        0.5,
    ),
    "bcss": QualitySet(
        "bcss",
        "bcss_mostly_tumor_large",
        "BCSS breast-cancer ROIs (whole regions)",
        1024,
        ("1015",),
        "3 real H&E breast-cancer ROIs of 3072-4096 x 2048-2560 px (~0.25 um/px, TCGA-BRCA via BCSS, CC0) "
        "with 'mostly tumour' masks, each one whole region read at a 1024-px long side (downsample ~3.5)",
        0.25,
    ),
}


def region_stems(folder: Path) -> list[str]:
    """File stems of a labelled-region set's images, sorted."""
    return sorted(p.stem for p in (folder / "images").glob("*.jpg"))
