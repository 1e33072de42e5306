"""Verification during training: which .bin sets, run on rank 0, a ROC plot into the run folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .config import TrainConfig
from .distributed import DistContext, broadcast_object


class _InputCast(nn.Module):
    """Feeds a backbone whose weights are bf16 (DeepSpeed bf16) with its own dtype; returns float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 embeddings of float images."""
        return self.module(images.to(self.dtype)).float()


def verification_sets(cfg: TrainConfig, manifest: Optional[Any]) -> dict[str, Path]:
    """Name → .bin path: ``eval.bins`` when given, else the manifest's verification sets."""
    if cfg.eval.bins is not None:
        return {Path(p).stem: Path(p) for p in cfg.eval.bins}
    if manifest is None or not getattr(manifest, "verification", None):
        return {}
    return dict(manifest.verification_paths())


class Validator:
    """Evaluates the backbone on the verification sets; sets are loaded once, on rank 0."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, manifest: Optional[Any], run_dir: Path):
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        self.paths = verification_sets(cfg, manifest)
        if ctx.is_main:
            missing = [str(p) for p in self.paths.values() if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"verification set(s) {', '.join(missing)} do not exist: fix eval.bins "
                                        "(or set eval.bins=[] to train without evaluation)")
        self._sets: Optional[dict[str, Any]] = None
        # Evaluate in the training precision where autocast is used (bf16 on GPU is much faster).
        self.autocast_dtype = torch.bfloat16 if cfg.precision.dtype == "bf16" and \
            cfg.parallel.strategy == "ddp" else None

    def _load(self) -> dict[str, Any]:
        if self._sets is None:
            from data_pipeline.formats.verification import load_bin
            self._sets = {name: load_bin(path, self.cfg.data.image_size) for name, path in self.paths.items()}
        return self._sets

    def run(self, runner: Any, step: int) -> tuple[dict[str, dict[str, float]], dict[str, Path]]:
        """(scalar results by set, ROC image paths by set) on every rank; rank 0 computes."""
        if not self.paths:
            return {}, {}
        results: dict[str, dict[str, float]] = {}
        images: dict[str, Path] = {}
        with runner.full_parameters() as module:
            if self.ctx.is_main:
                from train.evaluation import evaluate_bin, plot_roc, scalars
                dtype = next(module.parameters()).dtype
                model = module if dtype == torch.float32 else _InputCast(module, dtype)
                full = {name: evaluate_bin(model, vset, self.cfg.eval.batch_size, self.ctx.device,
                                           autocast_dtype=self.autocast_dtype)
                        for name, vset in self._load().items()}
                results = {name: scalars(r) for name, r in full.items()}
                try:
                    images["roc"] = plot_roc(full, self.run_dir / "eval" / f"roc_step{step:08d}.png",
                                             title=f"verification ROC, step {step}")
                except ImportError:  # matplotlib is optional: the numbers are still logged
                    pass
        results, images = broadcast_object((results, images), self.ctx)  # type: ignore[misc]
        return results, images
