"""Models: deformation net, segmenter factory, losses and the combined net.

Checkpoint I/O lives in :mod:`wsiseg.models.io`, initial encoder weights
(ImageNet download, local files) in :mod:`wsiseg.models.pretrained`.
"""

from wsiseg.models.deformation import DeformationNet
from wsiseg.models.losses import CrossEntropyLoss, FocalLoss, JointLoss, JointLossOutput, edge_loss, segmentation_loss
from wsiseg.models.net import SAMPLERS, TTA_FLIPS, DeformSegNet, DeformSegOutput, LowResPrediction, lowres_view
from wsiseg.models.segmenter import (
    ModelConfigError,
    PaddedSegmenter,
    available_architectures,
    available_encoders,
    build_segmenter,
    count_parameters,
)

__all__ = [
    "SAMPLERS",
    "TTA_FLIPS",
    "CrossEntropyLoss",
    "DeformSegNet",
    "DeformSegOutput",
    "DeformationNet",
    "FocalLoss",
    "JointLoss",
    "JointLossOutput",
    "LowResPrediction",
    "ModelConfigError",
    "PaddedSegmenter",
    "available_architectures",
    "available_encoders",
    "build_segmenter",
    "count_parameters",
    "edge_loss",
    "lowres_view",
    "segmentation_loss",
]
