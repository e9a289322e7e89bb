"""Encoders for 28x28 images, the SimCLR projection head and the NT-Xent loss."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock, conv1x1

__all__ = [
    "ENCODERS",
    "CompactEncoder",
    "SimCLRModel",
    "build_encoder",
    "nt_xent",
    "small_resnet18",
]

logger = logging.getLogger(__name__)

ENCODERS = ("compact", "resnet18")
RESNET18_WIDTH = 64


class CompactEncoder(nn.Module):
    """Three 3x3 conv layers with BatchNorm and global average pooling.

    Maps ``[N, C, H, W]`` to ``[N, 4 * width]`` features. The last two layers halve
    the resolution.
    """

    def __init__(self, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        channels = in_channels
        for index, out_channels in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers += [
                nn.Conv2d(channels, out_channels, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(),
            ]
            channels = out_channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.feature_dim = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return features ``[N, feature_dim]``."""
        return self.net(images)


def small_resnet18(in_channels: int = 1, width: int = RESNET18_WIDTH) -> nn.Module:
    """Build torchvision's ResNet-18 adapted to small images, as a feature extractor.

    The 7x7 stride-2 stem becomes a 3x3 stride-1 convolution and the max pool is
    removed, so 28x28 inputs reach the last stage at 4x4. With ``width`` other than
    64 the four stages are rebuilt from torchvision's ``BasicBlock`` with widths
    ``width * (1, 2, 4, 8)``. The classifier is replaced by the identity; the
    returned module maps ``[N, C, H, W]`` to ``[N, 8 * width]`` and has the
    attribute ``feature_dim``.
    """
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    net = resnet18(weights=None)
    net.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.maxpool = nn.Identity()
    if width != RESNET18_WIDTH:
        channels = width
        for stage, multiple in enumerate((1, 2, 4, 8), start=1):
            stride = 1 if stage == 1 else 2
            layer = _basic_stage(channels, width * multiple, stride)
            setattr(net, f"layer{stage}", layer)
            channels = width * multiple
    net.fc = nn.Identity()
    net.feature_dim = 8 * width
    return net


def _basic_stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Two BasicBlocks, the first with a 1x1 projection shortcut when shapes change."""
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
        )
    return nn.Sequential(
        BasicBlock(in_channels, out_channels, stride, downsample),
        BasicBlock(out_channels, out_channels),
    )


def build_encoder(name: str, in_channels: int = 1, width: int | None = None) -> nn.Module:
    """Build the encoder ``name`` (one of ``ENCODERS``); a ``width`` of None picks its default."""
    if name == "compact":
        return CompactEncoder(in_channels, width or 32)
    if name == "resnet18":
        return small_resnet18(in_channels, width or RESNET18_WIDTH)
    raise ValueError(f"unknown encoder {name!r}, expected one of {ENCODERS}")


class SimCLRModel(nn.Module):
    """Encoder followed by a two-layer projection MLP, as in SimCLR.

    ``encoder`` must have the attribute ``feature_dim``. Downstream heads read
    ``encoder(x)``, and the NT-Xent loss reads ``forward(x)``.
    """

    def __init__(self, encoder: nn.Module, projection_dim: int = 64) -> None:
        super().__init__()
        self.encoder = encoder
        dim = int(encoder.feature_dim)
        self.projector = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, projection_dim)
        )

    @property
    def feature_dim(self) -> int:
        """Width of the encoder features."""
        return int(self.encoder.feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return projections ``[N, projection_dim]`` of ``[N, C, H, W]`` images."""
        return self.projector(self.encoder(images))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Compute the NT-Xent loss of two views, averaged over all ``2N`` anchors.

    Row ``i`` of ``z1`` and row ``i`` of ``z2`` (each ``[N, D]``) are a positive
    pair. Each anchor is classified among the other ``2N - 1`` embeddings by
    cosine similarity divided by ``temperature``.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"z1 and z2 must both be [N, D], got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, positives)
