"""ViTs in insightface arcface_torch's layout, so that its published ViT weights can be imported.

They differ from ``vit.py``'s on purpose and are kept apart: patch 9 (a 12×12 grid from the
top-left 108×108 pixels of a 112×112 face), no qkv bias, a ReLU6 MLP, attention computed in
float32, and a two-layer head over the flattened grid (Linear to the width → BN1d → Linear to
the embedding → BN1d, both BN with eps 2e-5).  Training regularises with stochastic depth
(``drop_path_rate``, linear over the blocks) and random token masking (``mask_ratio``: the
blocks see a random subset of the tokens; the dropped ones come back as a learned mask token
after the final norm).  Module names follow theirs, so their state_dict loads as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import check_dropout, check_images, check_input_size, run_blocks
from .registry import register_backbone

PATCH_SIZE = 9


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        with _no_autocast(x):  # the softmax and its matmuls in float32, as in their code
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, 4 * dim)
        self.drop_path = drop_path

    def _dropped(self, branch: torch.Tensor) -> torch.Tensor:
        """Stochastic depth: the whole branch of a sample dropped with probability drop_path (training)."""
        if not self.training or self.drop_path == 0.0:
            return branch
        keep = 1.0 - self.drop_path
        mask = torch.empty(branch.shape[0], 1, 1, device=branch.device).bernoulli_(keep)
        return branch * mask.to(branch.dtype) / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._dropped(self.attn(self.norm1(x)))
        return x + self._dropped(self.mlp(self.norm2(x)))


class _no_autocast:
    """Autocast off for a block when it is on (a no-op on the meta device and without autocast)."""

    def __init__(self, x: torch.Tensor) -> None:
        kind = x.device.type
        self.ctx = torch.autocast(kind, enabled=False) if kind != "meta" and torch.is_autocast_enabled(kind) else None

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


class InsightfaceViT(nn.Module):
    """arcface_torch-layout ViT: images ``[B,3,S,S]`` in [-1,1] → embeddings ``[B, embedding_size]``."""

    def __init__(self, dim: int, depth: int, num_heads: int = 8, embedding_size: int = 512, dropout: float = 0.0,
                 input_size: int = 112, gradient_checkpointing: bool = False, drop_path_rate: float = 0.1,
                 mask_ratio: float = 0.1) -> None:
        super().__init__()
        check_input_size(input_size, minimum=2 * PATCH_SIZE)
        if not 0.0 <= drop_path_rate < 1.0 or not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"drop_path_rate={drop_path_rate} and mask_ratio={mask_ratio} must be in [0, 1)")
        self.input_size = input_size
        self.gradient_checkpointing = gradient_checkpointing
        self.mask_ratio = mask_ratio
        self.num_patches = (input_size // PATCH_SIZE) ** 2
        self.patch_embed = _PatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # 0 → drop_path_rate
        self.blocks = nn.ModuleList(_Block(dim, num_heads, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(p=check_dropout(dropout))
        self.feature = nn.Sequential(nn.Linear(dim * self.num_patches, dim, bias=False), nn.BatchNorm1d(dim, eps=2e-5),
                                     nn.Linear(dim, embedding_size, bias=False),
                                     nn.BatchNorm1d(embedding_size, eps=2e-5))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self._init_weights()
        if mask_ratio == 0.0:
            self.mask_token.requires_grad_(False)  # never used: DDP would wait for its gradient

    def _init_weights(self) -> None:
        # N(0, 0.02²) for linear weights and the two learned embeddings (truncation at ±2 is 100σ away).
        for p in (self.pos_embed, self.mask_token):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A random subset of each sample's tokens, and the permutation that puts them back."""
        b, n, c = x.shape
        keep = int(n * (1 - self.mask_ratio))
        order = torch.rand(b, n, device=x.device).argsort(dim=1)
        kept = torch.gather(x, 1, order[:, :keep, None].expand(-1, -1, c))
        return kept, order.argsort(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (not normalised) of a batch of images."""
        check_images(x, self.input_size, type(self).__name__)
        b = x.shape[0]
        x = self.patch_embed(x) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = self._mask(x)
        x = run_blocks(self.blocks, x, self.gradient_checkpointing and self.training)
        with _no_autocast(x):
            x = self.norm(x.float())
            if masking:
                fill = self.mask_token.float().expand(b, self.num_patches - x.shape[1], -1)
                x = torch.gather(torch.cat([x, fill], dim=1), 1, restore[:, :, None].expand(-1, -1, x.shape[2]))
            return self.feature(self.dropout(x.reshape(b, -1)))


def _builder(name: str, dim: int, depth: int, drop_path_rate: float, mask_ratio: float, doc: str) -> None:
    def build(embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
              gradient_checkpointing: bool = False, drop_path_rate: float = drop_path_rate,
              mask_ratio: float = mask_ratio) -> InsightfaceViT:
        return InsightfaceViT(dim, depth, 8, embedding_size, dropout, input_size, gradient_checkpointing,
                              drop_path_rate, mask_ratio)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    register_backbone(name)(build)


# Widths, depths and regularisation of arcface_torch's get_model("vit_t" ... "vit_h"); 8 heads throughout.
_builder("vit_t_insightface", 256, 12, 0.1, 0.1, "arcface_torch's vit_t: width 256, 12 blocks, patch 9.")
_builder("vit_s_insightface", 512, 12, 0.1, 0.1, "arcface_torch's vit_s: width 512, 12 blocks, patch 9.")
_builder("vit_b_insightface", 512, 24, 0.1, 0.1, "arcface_torch's vit_b: width 512, 24 blocks, patch 9.")
_builder("vit_l_insightface", 768, 24, 0.05, 0.05, "arcface_torch's vit_l: width 768, 24 blocks, patch 9.")
_builder("vit_h_insightface", 1024, 48, 0.1, 0.0, "arcface_torch's vit_h: width 1024, 48 blocks, patch 9.")
