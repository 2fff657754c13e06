"""The deformation module: a low-resolution view -> a sampling density.

The network is deliberately tiny (Jin et al., ICLR 2022, Sec. 3): it sees
only the low-resolution view ``X_lr`` and its output ``d`` is turned into a
sampling grid by the fixed Gaussian attraction of
:class:`wsiseg.sampling.grid.DeformedGrid`. All of its cost is on
``hd x wd`` pixels, so it is negligible next to the segmenter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DeformationNet"]


class DeformationNet(nn.Module):
    """Predict a sampling density ``d`` from a low-resolution image.

    Three ``3x3`` convolutions (``{24, 24, 3}`` output channels by default),
    each followed by BatchNorm and ReLU, then a ``1x1`` convolution to one
    channel and a softmax over all spatial positions of each sample. The
    output is therefore strictly positive and sums to 1 over ``hd x wd`` for
    every sample.

    Parameters
    ----------
    in_channels : int, default 3
        Channels of the low-resolution view.
    channels : sequence of int, default (24, 24, 3)
        Output channels of the ``3x3`` layers.

    Notes
    -----
    Weights are He-initialised (``kaiming_normal_``, ``fan_in``, ReLU gain),
    BatchNorm starts as the identity. The convolutions have no bias: a bias
    before BatchNorm is cancelled by its mean subtraction, and a bias on the
    last ``1x1`` layer is cancelled by the spatial softmax. At initialisation
    the density is random, not uniform (max/min ratio ~5-500 on H&E tiles in
    training mode); the edge loss shapes it from the first steps.

    Examples
    --------
    >>> net = DeformationNet()
    >>> d = net(torch.rand(2, 3, 16, 20))
    >>> d.shape
    torch.Size([2, 1, 16, 20])
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (24, 24, 3)):
        super().__init__()
        if in_channels < 1 or not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"invalid DeformationNet sizes: in_channels={in_channels}, channels={channels}")
        self.in_channels = int(in_channels)
        self.channels = tuple(int(c) for c in channels)
        layers: list[nn.Module] = []
        prev = self.in_channels
        for c in self.channels:
            layers += [nn.Conv2d(prev, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            prev = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(prev, 1, 1, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-initialise the convolutions; BatchNorm to the identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                m.reset_running_stats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Density of the low-resolution view.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, C, hd, wd)`` low-resolution image (normalised as the
            caller's pipeline does; see :class:`wsiseg.models.net.DeformSegNet`).

        Returns
        -------
        torch.Tensor
            ``(B, 1, hd, wd)`` float32 density, positive, summing to 1 per sample.
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, hd, wd), got {tuple(x.shape)}")
        logits = self.head(self.features(x))
        b, _, h, w = logits.shape
        # Softmax in float32 even under autocast: hd*wd terms underflow in half precision.
        d = torch.softmax(logits.float().reshape(b, h * w), dim=1)
        return d.reshape(b, 1, h, w)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channels={self.channels}"
