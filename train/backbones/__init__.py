"""Backbones: images ``[B,3,H,W]`` in [-1,1] → embeddings ``[B, D]`` (not normalised), by name.

``build_backbone("iresnet50", embedding_size=512, dropout=0.0, input_size=112,
gradient_checkpointing=False)``; ``list_backbones()`` names them all.
"""
from . import iresnet, mobilefacenet, vit, vit_insightface  # noqa: F401  (importing registers the builders)
from .registry import ALIASES, backbone_options, build_backbone, canonical_backbone, list_backbones, register_backbone

__all__ = ["ALIASES", "backbone_options", "build_backbone", "canonical_backbone", "list_backbones", "register_backbone"]
