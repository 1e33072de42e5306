"""Vision Transformers (ViT-T/S/B) for 112×112 faces, with patch 8 (a 14×14 token grid).

Patch 8 tiles 112 (and 56) exactly, so no border pixels are dropped (patch 9 would use only
108 of the 112 pixels).  Blocks are pre-norm (x + attn(LN x), x + MLP(LN x)); there is no class
token.  Faces are aligned, so the head keeps token positions: each token is projected to a
few channels, the grid is flattened and a linear layer maps it to the embedding, then BN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import check_dropout, check_images, check_input_size, run_blocks
from .registry import register_backbone

PATCH_SIZE = 8


class Attention(nn.Module):
    """Multi-head self-attention over tokens ``[B, N, C]``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output, same shape as the input."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after attention and MLP residual updates."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FaceViT(nn.Module):
    """ViT backbone: images ``[B,3,S,S]`` in [-1,1] → embeddings ``[B, embedding_size]``."""

    def __init__(self, dim: int, depth: int, num_heads: int, embedding_size: int = 512, dropout: float = 0.0,
                 input_size: int = 112, gradient_checkpointing: bool = False, token_channels: int = 64) -> None:
        super().__init__()
        check_input_size(input_size, minimum=2 * PATCH_SIZE, multiple_of=PATCH_SIZE)
        self.input_size = input_size
        self.gradient_checkpointing = gradient_checkpointing
        num_tokens = (input_size // PATCH_SIZE) ** 2
        self.patch_embed = nn.Conv2d(3, dim, PATCH_SIZE, stride=PATCH_SIZE)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.blocks = nn.Sequential(*(Block(dim, num_heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        # A per-token projection keeps the flattened head small (ViT-B: 196·64 inputs, not 196·768).
        self.token_proj = nn.Linear(dim, token_channels, bias=False)
        self.dropout = nn.Dropout(p=check_dropout(dropout))
        self.fc = nn.Linear(num_tokens * token_channels, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        # N(0, 0.02²); the customary truncation at ±2 (absolute) would be 100σ away, so it is skipped.
        nn.init.normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (not normalised) of a batch of images."""
        check_images(x, self.input_size, type(self).__name__)
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        x = run_blocks(self.blocks, x, self.gradient_checkpointing and self.training)
        x = self.token_proj(self.norm(x))
        return self.features(self.fc(self.dropout(torch.flatten(x, 1))))


@register_backbone("vit_t")
def vit_t(embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
          gradient_checkpointing: bool = False) -> FaceViT:
    """ViT-Tiny: width 192, 12 blocks, 3 heads, patch 8."""
    return FaceViT(192, 12, 3, embedding_size, dropout, input_size, gradient_checkpointing)


@register_backbone("vit_s")
def vit_s(embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
          gradient_checkpointing: bool = False) -> FaceViT:
    """ViT-Small: width 384, 12 blocks, 6 heads, patch 8."""
    return FaceViT(384, 12, 6, embedding_size, dropout, input_size, gradient_checkpointing)


@register_backbone("vit_b")
def vit_b(embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
          gradient_checkpointing: bool = False) -> FaceViT:
    """ViT-Base: width 768, 12 blocks, 12 heads, patch 8."""
    return FaceViT(768, 12, 12, embedding_size, dropout, input_size, gradient_checkpointing)
