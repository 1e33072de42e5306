"""What the CLI does with a trained model: evaluate on .bin sets, export to ONNX, embed a folder."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class ModelSource:
    """What ``--model`` named: an embedding export (model.pt) or a training checkpoint (a step_* folder)."""

    path: Path
    """The model.pt file, or the step_* folder of the checkpoint."""
    checkpoint: bool
    """True for a training checkpoint (an interrupted run without model.pt)."""

    @property
    def run_dir(self) -> Path:
        """The run folder it belongs to (where ``eval/`` goes by default)."""
        if not self.checkpoint:
            return self.path.parent
        return self.path.parent.parent if self.path.parent.name == "checkpoints" else self.path

    def load(self) -> Any:
        """The :class:`~train.export.EmbeddingModel` it holds."""
        from train.export import load_checkpoint_model, load_embedding_model
        return load_checkpoint_model(self.path) if self.checkpoint else load_embedding_model(self.path)


def _newest_checkpoint(root: Path) -> Optional[Path]:
    from train.checkpoint import find_latest
    return find_latest(root)


def resolve_model(path: str | Path) -> ModelSource:
    """The model behind ``path``: a model.pt, a run folder (its model.pt, else its newest checkpoint),
    a checkpoints folder or its ``latest`` file (the newest checkpoint), or a step_* folder."""
    from train.checkpoint import LATEST, SHARED
    p = Path(path)
    if p.is_file() and p.name == LATEST:
        p = p.parent
    if p.is_file():
        return ModelSource(p, checkpoint=False)
    if p.is_dir():
        if (p / MODEL_FILE).is_file():
            return ModelSource(p / MODEL_FILE, checkpoint=False)
        if (p / SHARED).is_file():
            return ModelSource(p, checkpoint=True)
        for root in (p, p / "checkpoints"):
            found = _newest_checkpoint(root)
            if found is not None:
                return ModelSource(found, checkpoint=True)
        raise FileNotFoundError(f"no embedding model in {path}: it has no {MODEL_FILE} and no complete "
                                "checkpoint (step_*/shared.pt, here or under checkpoints/)")
    raise FileNotFoundError(f"no embedding model at {path}: give a model.pt written by training, its run "
                            "folder, or a checkpoint folder (checkpoints/, a step_* folder or latest)")


def _load(model_path: str | Path) -> tuple[Any, ModelSource]:
    source = resolve_model(model_path)
    if source.checkpoint:
        print(f"using the backbone of checkpoint {source.path} (no {MODEL_FILE})", flush=True)
    return source.load(), source


def evaluate_model(model_path: str | Path, bins: list[str], out_dir: Optional[str | Path] = None,
                   batch_size: int = 256) -> dict:
    """Verification results of a saved model on each .bin; writes results.json and roc.png."""
    from data_pipeline.verification import load_bin
    from train.evaluation.verification import evaluate_bin, plot_roc, scalars
    model, source = _load(model_path)
    results = {}
    for path in bins:
        vset = load_bin(path, image_size=model.image_size)
        name = Path(path).stem
        results[name] = evaluate_bin(model, vset, batch_size=batch_size)
        values = scalars(results[name])
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    out = Path(out_dir) if out_dir else source.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({k: scalars(v) for k, v in results.items()}, indent=2))
    roc = plot_roc(results, out / "roc.png")
    print(f"results: {out / 'results.json'}; ROC: {roc}")
    return results


def export_model(model_path: str | Path, onnx_path: str | Path, check: bool = True) -> Path:
    """ONNX export (dynamic batch) of a saved model, checked against PyTorch with onnxruntime."""
    from train.export import check_onnx_parity, export_onnx

    model, _ = _load(model_path)
    path = export_onnx(model.backbone, onnx_path, image_size=model.image_size)
    if check:
        diff = check_onnx_parity(model.backbone, path)
        print(f"wrote {path} (max |onnxruntime - torch| = {diff:.2e})")
    else:
        print(f"wrote {path}")
    return path


def embed_images(model_path: str | Path, images: str | Path, out: str | Path,
                 batch_size: int = 128, flip: bool = True) -> tuple[Path, Path]:
    """Embeddings of every image under ``images`` into ``out`` (.npy) with the file names beside it;
    ``flip`` adds the mirrored image's embedding; rows are L2-normalised."""
    from train.export import embed_folder

    if not Path(images).is_dir():
        raise FileNotFoundError(f"image folder {images} does not exist")
    model, _ = _load(model_path)
    array, names = embed_folder(model, images, out, batch_size=batch_size, flip=flip)
    print(f"wrote {array} and {names}")
    return array, names
