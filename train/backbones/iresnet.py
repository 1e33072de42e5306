"""IResNet, the face-recognition ResNet (ArcFace's "improved residual" design) and a tiny CPU variant.

Layout at 112×112: a stride-1 stem (conv3×3 → BN → PReLU), four stages that each halve the
side (112 → 56 → 28 → 14 → 7), then BN → dropout → flatten → FC → BN1d.  Each block is
BN → conv3×3 → BN → PReLU → conv3×3 (carrying the stride) → BN, plus the shortcut; there is
no activation after the addition.

The embedding head follows insightface's arcface_torch by default: the scale of the last
BatchNorm1d (``features.weight``) is fixed at 1 and not trained, and ``fc`` and ``features``
run in float32 even under autocast (a 25088-wide dot product and a batch statistic are where
fp16/bf16 loses the most).  ``train_feature_scale=True`` and ``fp32_head=False`` turn each off.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .common import check_dropout, check_images, check_input_size, init_conv_bn, run_blocks, strided_size
from .registry import register_backbone

STANDARD_WIDTHS = (64, 128, 256, 512)
TINY_WIDTHS = (16, 32, 64, 128)
TINY_LAYERS = (1, 1, 1, 1)


class IBasicBlock(nn.Module):
    """Pre-BN residual block: BN → conv3×3 → BN → PReLU → conv3×3(stride) → BN, plus the shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual branch plus shortcut."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """IResNet backbone: images ``[B,3,S,S]`` in [-1,1] → embeddings ``[B, embedding_size]``."""

    def __init__(self, layers: Sequence[int], widths: Sequence[int] = STANDARD_WIDTHS, embedding_size: int = 512,
                 dropout: float = 0.0, input_size: int = 112, gradient_checkpointing: bool = False,
                 train_feature_scale: bool = False, fp32_head: bool = True) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4 or min(layers) < 1:
            raise ValueError(f"IResNet needs 4 stages with at least one block each, got layers={list(layers)} "
                             f"widths={list(widths)}")
        check_input_size(input_size, minimum=16)
        self.input_size = input_size
        self.gradient_checkpointing = gradient_checkpointing
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        blocks: list[nn.Module] = []
        in_channels = widths[0]
        for num_blocks, channels in zip(layers, widths):
            blocks.append(IBasicBlock(in_channels, channels, stride=2))
            blocks.extend(IBasicBlock(channels, channels, stride=1) for _ in range(num_blocks - 1))
            in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.bn2 = nn.BatchNorm2d(in_channels)
        self.dropout = nn.Dropout(p=check_dropout(dropout))
        side = strided_size(input_size, 4)
        self.fc = nn.Linear(in_channels * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        self.fp32_head = fp32_head
        init_conv_bn(self)
        if not train_feature_scale:
            # insightface's arcface_torch fixes it at 1, and its published weights were trained so:
            # the per-dimension spread of the embedding is left to fc alone.
            self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (not normalised) of a batch of images."""
        check_images(x, self.input_size, type(self).__name__)
        x = self.stem(x)
        x = run_blocks(self.blocks, x, self.gradient_checkpointing and self.training)
        x = torch.flatten(self.dropout(self.bn2(x)), 1)
        device_type = x.device.type
        if self.fp32_head and device_type != "meta" and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self.features(self.fc(x.float()))
        return self.features(self.fc(x))


def _iresnet(layers: Sequence[int], embedding_size: int, options: dict,
             widths: Sequence[int] = STANDARD_WIDTHS) -> IResNet:
    return IResNet(layers, widths, embedding_size=embedding_size, **options)


# Every builder takes the same options; ``_options`` collects them for ``IResNet``.
def _options(dropout: float, input_size: int, gradient_checkpointing: bool, train_feature_scale: bool,
             fp32_head: bool) -> dict:
    return dict(dropout=dropout, input_size=input_size, gradient_checkpointing=gradient_checkpointing,
                train_feature_scale=train_feature_scale, fp32_head=fp32_head)


@register_backbone("iresnet18")
def iresnet18(embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
              gradient_checkpointing: bool = False, train_feature_scale: bool = False,
              fp32_head: bool = True) -> IResNet:
    """IResNet-18: blocks [2, 2, 2, 2]."""
    return _iresnet((2, 2, 2, 2), embedding_size,
                    _options(dropout, input_size, gradient_checkpointing, train_feature_scale, fp32_head))


@register_backbone("iresnet34")
def iresnet34(embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
              gradient_checkpointing: bool = False, train_feature_scale: bool = False,
              fp32_head: bool = True) -> IResNet:
    """IResNet-34: blocks [3, 4, 6, 3]."""
    return _iresnet((3, 4, 6, 3), embedding_size,
                    _options(dropout, input_size, gradient_checkpointing, train_feature_scale, fp32_head))


@register_backbone("iresnet50")
def iresnet50(embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
              gradient_checkpointing: bool = False, train_feature_scale: bool = False,
              fp32_head: bool = True) -> IResNet:
    """IResNet-50: blocks [3, 4, 14, 3]."""
    return _iresnet((3, 4, 14, 3), embedding_size,
                    _options(dropout, input_size, gradient_checkpointing, train_feature_scale, fp32_head))


@register_backbone("iresnet100")
def iresnet100(embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
               gradient_checkpointing: bool = False, train_feature_scale: bool = False,
               fp32_head: bool = True) -> IResNet:
    """IResNet-100: blocks [3, 13, 30, 3]."""
    return _iresnet((3, 13, 30, 3), embedding_size,
                    _options(dropout, input_size, gradient_checkpointing, train_feature_scale, fp32_head))


@register_backbone("iresnet200")
def iresnet200(embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
               gradient_checkpointing: bool = False, train_feature_scale: bool = False,
               fp32_head: bool = True) -> IResNet:
    """IResNet-200: blocks [6, 26, 60, 6]."""
    return _iresnet((6, 26, 60, 6), embedding_size,
                    _options(dropout, input_size, gradient_checkpointing, train_feature_scale, fp32_head))


@register_backbone("iresnet_tiny")
def iresnet_tiny(embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
                 gradient_checkpointing: bool = False, train_feature_scale: bool = False,
                 fp32_head: bool = True) -> IResNet:
    """IResNet with widths 16-32-64-128 and one block per stage, for CPU runs (use input_size=56 there)."""
    return _iresnet(TINY_LAYERS, embedding_size,
                    _options(dropout, input_size, gradient_checkpointing, train_feature_scale, fp32_head),
                    TINY_WIDTHS)
