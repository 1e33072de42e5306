"""MobileFaceNet (Chen et al., 2018): inverted-residual depthwise blocks and a global depthwise (GDC) head.

At 112×112 the paper's table is followed: conv3×3/2 (64) → depthwise conv3×3 (64) → bottleneck
stages (expansion t, channels c, repeats n, stride s) → conv1×1 (512) → linear GDConv over the
whole 7×7 map → linear conv1×1 to the embedding → BN.  PReLU is the non-linearity.  The GDC
kernel follows the final map, so other input sizes (e.g. 56 → 4×4) work too.

``mobilefacenet_mbf`` is the same design at insightface arcface_torch's "mbf" widths (a 128-channel
stem whose second conv has 64 groups, 128/256-channel stages with 1-4-6-2 residual blocks), so
that its published weights can be imported (``train.insightface``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .common import check_dropout, check_images, check_input_size, init_conv_bn, run_blocks, strided_size
from .registry import register_backbone

# (expansion t, output channels c, repeats n, stride of the first repeat s), from the paper's Table 1.
# The hidden width of a bottleneck is t x its input channels.
PAPER_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))
TINY_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (2, 32, 2, 2), (4, 64, 1, 2), (2, 64, 2, 1), (4, 64, 1, 2), (2, 64, 1, 1))
# insightface's "mbf" (scale 2, blocks 1-4-6-2): each strided block widens to its group count.
MBF_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 128, 1, 2), (1, 128, 4, 1), (2, 256, 1, 2), (1, 256, 6, 1), (2, 256, 1, 2), (1, 256, 2, 1))


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
            act: bool = True, padding: int | None = None) -> nn.Sequential:
    """Convolution → BN (→ PReLU when ``act``); padding keeps the side for odd kernels by default."""
    pad = kernel // 2 if padding is None else padding
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride, pad, groups=groups, bias=False),
                               nn.BatchNorm2d(out_ch)]
    if act:
        layers.append(nn.PReLU(out_ch))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: 1×1 expand → depthwise 3×3 (stride) → linear 1×1 project, residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.residual = stride == 1 and in_ch == out_ch
        self.body = nn.Sequential(conv_bn(in_ch, hidden, 1),
                                  conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
                                  conv_bn(hidden, out_ch, 1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Projected features, plus the input when the block keeps the shape."""
        out = self.body(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet backbone: images ``[B,3,S,S]`` in [-1,1] → embeddings ``[B, embedding_size]``."""

    def __init__(self, stages: Sequence[tuple[int, int, int, int]] = PAPER_STAGES, stem_channels: int = 64,
                 head_channels: int = 512, embedding_size: int = 512, dropout: float = 0.0,
                 input_size: int = 112, gradient_checkpointing: bool = False,
                 stem_groups: int | None = None) -> None:
        super().__init__()
        check_input_size(input_size, minimum=16)
        self.input_size = input_size
        self.gradient_checkpointing = gradient_checkpointing
        self.stem = nn.Sequential(conv_bn(3, stem_channels, 3, stride=2),
                                  conv_bn(stem_channels, stem_channels, 3, groups=stem_groups or stem_channels))
        blocks: list[nn.Module] = []
        in_ch = stem_channels
        for expansion, out_ch, repeats, stride in stages:
            for i in range(repeats):
                blocks.append(Bottleneck(in_ch, out_ch, stride if i == 0 else 1, expansion))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = conv_bn(in_ch, head_channels, 1)
        side = strided_size(input_size, 1 + sum(1 for *_, s in stages if s == 2))
        # Global depthwise conv: one learned spatial weighting per channel instead of average pooling.
        self.gdc = conv_bn(head_channels, head_channels, side, groups=head_channels, act=False, padding=0)
        self.dropout = nn.Dropout(p=check_dropout(dropout))
        self.embed = nn.Conv2d(head_channels, embedding_size, 1, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (not normalised) of a batch of images."""
        check_images(x, self.input_size, type(self).__name__)
        x = self.stem(x)
        x = run_blocks(self.blocks, x, self.gradient_checkpointing and self.training)
        x = self.dropout(self.gdc(self.conv_head(x)))
        return self.features(torch.flatten(self.embed(x), 1))


@register_backbone("mobilefacenet")
def mobilefacenet(embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
                  gradient_checkpointing: bool = False) -> MobileFaceNet:
    """MobileFaceNet as in the paper (about 1M parameters at embedding_size=128)."""
    return MobileFaceNet(PAPER_STAGES, 64, 512, embedding_size=embedding_size, dropout=dropout,
                         input_size=input_size, gradient_checkpointing=gradient_checkpointing)


@register_backbone("mobilefacenet_tiny")
def mobilefacenet_tiny(embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
                       gradient_checkpointing: bool = False) -> MobileFaceNet:
    """MobileFaceNet at half width with fewer blocks, for CPU runs (use input_size=56 there)."""
    return MobileFaceNet(TINY_STAGES, 32, 256, embedding_size=embedding_size, dropout=dropout,
                         input_size=input_size, gradient_checkpointing=gradient_checkpointing)


@register_backbone("mobilefacenet_mbf")
def mobilefacenet_mbf(embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
                      gradient_checkpointing: bool = False) -> MobileFaceNet:
    """MobileFaceNet at insightface arcface_torch's "mbf" widths (its model-zoo weights import into it)."""
    return MobileFaceNet(MBF_STAGES, 128, 512, embedding_size=embedding_size, dropout=dropout,
                         input_size=input_size, gradient_checkpointing=gradient_checkpointing, stem_groups=64)
