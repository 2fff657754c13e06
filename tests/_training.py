"""A tiny training setup on real NuCLS tiles, shared by the training tests (tests/training, test_pretrained)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wsiseg.output.classes import default_classes

__all__ = ["CLASSES", "HR", "TINY", "NuclsTiles"]

HR = (128, 128)
# A tiny segmenter (about 0.4 M parameters) keeps every run to a second or two on a CPU.
TINY = {
    "arch": "unet",
    "encoder": "tu-resnet10t",
    "encoder_depth": 3,
    "decoder_channels": (32, 16, 8),
    "out_size": (32, 32),
    "map_size": (16, 16),
    "hr_size": HR,
    "batch_size": 2,
    "flips": False,
    "device": "cpu",
    "seed": 3,
}
CLASSES = default_classes(["background", "non-tumour nucleus", "tumour nucleus"])


class NuclsTiles(torch.utils.data.Dataset):
    """Real NuCLS tiles in the data set item format of wsiseg.training.dataset (resized to HR)."""

    def __init__(self, folder: Path, n: int, size=HR):
        self.files = sorted((folder / "images").glob("*.png"))[:n]
        assert len(self.files) == n
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        f = self.files[i]
        wh = (self.size[1], self.size[0])
        image = Image.open(f).convert("RGB").resize(wh, Image.BILINEAR)
        labels = Image.open(f.parent.parent / "labels" / f.name).resize(wh, Image.NEAREST)
        return {
            "image": torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous(),
            "labels": torch.from_numpy(np.array(labels).astype(np.int64)),
            "name": f.stem,
            "box": None,
            "downsample": 1.0,
        }
