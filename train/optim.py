"""Optimisers: the backbone's (parameter groups, SGD or AdamW) and the classifier shard's.

The backbone is data-parallel and its optimiser is an ordinary torch optimiser.  The
classifier shard is model-parallel: its weight is never in the backbone optimiser, and
its own row optimiser (``partial_fc.optim``) updates only the rows sampled in a step.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .config import OptimConfig

# Modules whose parameters are scales, shifts or slopes rather than weights to shrink.
_NO_DECAY_MODULES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.PReLU)
if hasattr(nn, "RMSNorm"):
    _NO_DECAY_MODULES = _NO_DECAY_MODULES + (nn.RMSNorm,)


def split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters with weight decay, parameters without): norms, biases and PReLU slopes get none.

    Besides those module types, any 1-D parameter (a per-channel scale or shift of a custom
    layer, a ViT's class token is 3-D and keeps decay) is treated as a norm or bias.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, _NO_DECAY_MODULES) or name.endswith("bias") or param.ndim <= 1:
                no_decay.append(param)
            else:
                decay.append(param)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The two parameter groups of :func:`split_decay` (empty groups left out)."""
    decay, no_decay = split_decay(model)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_backbone_optimizer(params: Iterable[dict], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over ``params`` (param groups), peak learning rate ``lr``."""
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r} is not one of sgd, adamw")


def build_classifier_optimizer(head: nn.Module, cfg: OptimConfig, lr: float, seed: int) -> torch.optim.Optimizer:
    """The classifier shard's row optimiser (partial_fc.optim) with the same hyper-parameters."""
    from partial_fc.optim import build_head_optimizer
    return build_head_optimizer(head, cfg.name, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                betas=tuple(cfg.betas), eps=cfg.eps, seed=seed, row_decay=cfg.row_decay)


def scaled_lrs(cfg: OptimConfig, global_batch: int) -> tuple[float, float]:
    """(backbone peak lr, classifier peak lr) after the linear scaling to the global batch."""
    factor = global_batch / cfg.reference_batch if cfg.reference_batch > 0 else 1.0
    head = cfg.lr if cfg.head_lr is None else cfg.head_lr
    return cfg.lr * factor, head * factor
