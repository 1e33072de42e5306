"""Exporting a trained backbone: ONNX (dynamic batch) with a parity check, and an embedding-only
checkpoint (weights + builder config) that rebuilds the model anywhere; embedding a folder of images.
"""
from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from data_pipeline.atomic import atomic_path

from .backbones import build_backbone

FORMAT = "shardface-embedding-model"
FORMAT_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain backbone inside DDP / DeepSpeed (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _float32(model: nn.Module) -> nn.Module:
    """``model`` itself when its floating-point weights are float32, else a float32 copy (bf16/fp16 training)."""
    if all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point()):
        return model
    return copy.deepcopy(model).float()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def export_onnx(backbone: nn.Module, path: str | Path, image_size: int = 112, opset: int = 17,
                dynamo: bool = False) -> Path:
    """Write ``backbone`` (eval mode, float32) as ONNX: input ``images`` [batch,3,S,S] → ``embeddings`` [batch,D].

    The TorchScript-based exporter is used by default (it needs only ``onnx``); ``dynamo=True``
    uses the ``torch.export`` exporter, which also needs ``onnxscript``.  A bf16/fp16 backbone is
    exported from a float32 copy.
    """
    model = _float32(unwrap(backbone))
    device = next(model.parameters()).device
    example = (torch.zeros(2, 3, image_size, image_size, device=device),)
    names = dict(input_names=["images"], output_names=["embeddings"], opset_version=opset)
    with _eval_mode(model), atomic_path(path) as tmp, torch.no_grad():
        if dynamo:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(model, example, str(tmp), dynamo=True, dynamic_shapes=({0: batch},),
                              external_data=False, **names)
        else:
            with warnings.catch_warnings():
                # The TorchScript exporter announces its deprecation; it still produces the same graph.
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
                torch.onnx.export(model, example, str(tmp), dynamo=False,
                                  dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}}, **names)
    return Path(path)


def check_onnx_parity(backbone: nn.Module, path: str | Path, batch_sizes: Sequence[int] = (1, 3),
                      atol: float | None = 1e-4, seed: int = 0) -> float:
    """Largest |ONNX Runtime − PyTorch| over random inputs at each batch size; raises above ``atol``."""
    import onnxruntime

    model = _float32(unwrap(backbone))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_meta = session.get_inputs()[0]
    side = input_meta.shape[-1]
    if not isinstance(side, int):
        raise ValueError(f"{path}: the image side is not fixed in the ONNX input shape {input_meta.shape}")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    worst = 0.0
    with _eval_mode(model), torch.no_grad():
        for batch in batch_sizes:
            images = torch.rand(batch, 3, side, side, generator=generator) * 2 - 1
            expected = model(images.to(device)).float().cpu().numpy()
            (got,) = session.run(None, {input_meta.name: images.numpy()})
            if got.shape != expected.shape:
                raise RuntimeError(f"ONNX output shape {got.shape} != PyTorch {expected.shape} at batch {batch}")
            worst = max(worst, float(np.abs(got - expected).max()))
    if atol is not None and worst > atol:
        raise RuntimeError(f"ONNX model {path} differs from PyTorch by up to {worst:.3g} (> atol={atol:g}): "
                           f"re-export it from this backbone, or check for ops the exporter does not support")
    return worst


class EmbeddingModel(nn.Module):
    """A backbone rebuilt from an embedding export, with its name, builder config and input side."""

    def __init__(self, backbone: nn.Module, backbone_name: str, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_name = backbone_name
        self.config = dict(config)
        self.image_size = int(self.config.get("input_size", 112))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (not normalised) of images ``[B,3,S,S]`` in [-1, 1]."""
        return self.backbone(images)


def export_embedding_model(backbone: nn.Module, backbone_name: str, config_dict: Mapping[str, Any],
                           path: str | Path) -> Path:
    """Atomically save the backbone's weights with ``build_backbone(backbone_name, **config_dict)``'s arguments.

    The config is checked against the weights first (by building the model on the meta device),
    so an export that could not be rebuilt is refused at once rather than at load time.
    """
    model = unwrap(backbone)
    config = dict(config_dict)
    with torch.device("meta"):
        rebuilt = build_backbone(backbone_name, **config)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:3]
        raise ValueError(f"the weights do not fit build_backbone({backbone_name!r}, **{config}) "
                         f"(first differences: {diff}): pass the name and options the backbone was built with")
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "backbone": backbone_name, "config": config,
               "state_dict": state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_embedding_model(path: str | Path, device: str | torch.device = "cpu") -> EmbeddingModel:
    """Rebuild an :func:`export_embedding_model` file as an :class:`EmbeddingModel` in eval mode."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a shardface embedding model: give the model.pt a finished run wrote, "
                         "or a checkpoint folder (the run folder, its checkpoints/ or a step_* folder)")
    if payload.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has export version {payload.get('version')}, this code reads {FORMAT_VERSION}")
    backbone = build_backbone(payload["backbone"], **payload["config"])
    backbone.load_state_dict(payload["state_dict"])
    model = EmbeddingModel(backbone, payload["backbone"], payload["config"])
    return model.to(device).eval()


def load_checkpoint_model(folder: str | Path, device: str | torch.device = "cpu") -> EmbeddingModel:
    """The backbone of a training checkpoint (a ``step_*`` folder) as an :class:`EmbeddingModel` in eval mode.

    An interrupted run has checkpoints but no ``model.pt`` yet: its newest checkpoint is
    evaluated, exported or used to embed in the same way.  The backbone is rebuilt from the
    run's config stored in the checkpoint.
    """
    from .builders import backbone_options
    from .checkpoint import read_checkpoint
    from .config import TrainConfig

    folder = Path(folder)
    saved = read_checkpoint(folder)
    cfg = TrainConfig.from_yaml(saved["header"]["config"])
    runner = saved["shared"].get("runner", {})
    if "backbone" not in runner:
        raise ValueError(f"checkpoint {folder} holds a DeepSpeed engine's files, not the backbone's weights: "
                         "let the run finish (it writes model.pt), or resume it with parallel.strategy=deepspeed")
    state = {}
    for key, value in runner["backbone"].items():
        for prefix in ("_orig_mod.", "module."):  # torch.compile / DDP wrappers
            key = key[len(prefix):] if key.startswith(prefix) else key
        state[key] = value
    config = backbone_options(cfg.model, cfg.data.image_size)
    backbone = build_backbone(cfg.model.backbone, **config)
    backbone.load_state_dict(state)
    return EmbeddingModel(backbone, cfg.model.backbone, config).to(device).eval()


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by relative path."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{folder} is not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return files


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """An aligned face image as float ``[3, S, S]`` in [-1, 1] (RGB, resized when its side differs)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32)
    except OSError as err:
        raise ValueError(f"cannot decode image {path} ({err}): remove or re-encode it") from err
    return torch.from_numpy(pixels).permute(2, 0, 1).sub(127.5).div(127.5)


def _print_progress(done: int, total: int) -> None:
    print(f"embedded {done}/{total} images", file=sys.stderr, flush=True)


@torch.no_grad()
def embed_folder(model: nn.Module, folder: str | Path, out_path: str | Path, batch_size: int = 64,
                 device: str | torch.device = "cpu", flip: bool = True, normalize: bool = True,
                 progress: Callable[[int, int], None] | None = _print_progress) -> tuple[Path, Path]:
    """Embed every image under ``folder``: ``out_path`` gets a float32 ``[N, D]`` .npy, and the same
    path with suffix ``.txt`` the relative file names, one per line, in row order.

    With ``flip`` the embedding of the mirrored image is added; with ``normalize`` rows are L2-normalised.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    out_path = Path(out_path)
    if out_path.suffix == ".txt":
        raise ValueError(f"out_path {out_path} would be overwritten by the list of names: use a .npy path")
    image_size = int(getattr(model, "image_size", getattr(unwrap(model), "input_size", 112)))
    files = list_images(folder)
    device = torch.device(device)
    rows: list[np.ndarray] = []
    with _eval_mode(model):
        for start in range(0, len(files), batch_size):
            batch = torch.stack([load_image(f, image_size) for f in files[start:start + batch_size]]).to(device)
            emb = model(batch).float()
            if flip:
                emb = emb + model(torch.flip(batch, dims=[3])).float()
            if normalize:
                emb = torch.nn.functional.normalize(emb, dim=1)
            rows.append(emb.cpu().numpy())
            if progress is not None:
                progress(min(start + batch_size, len(files)), len(files))
    names_path = out_path.with_suffix(".txt")
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.concatenate(rows).astype(np.float32))
    root = Path(folder)
    with atomic_path(names_path) as tmp:
        tmp.write_text("".join(f"{p.relative_to(root).as_posix()}\n" for p in files))
    return out_path, names_path
