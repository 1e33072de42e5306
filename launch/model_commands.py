"""What the CLI does with a trained model: evaluate on .bin sets, export to ONNX, embed a folder."""
from __future__ import annotations

import os
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
    if not source.checkpoint:
        check_model_file(source.path)
    if source.checkpoint:
        print(f"using the backbone of checkpoint {source.path} (no {MODEL_FILE})", flush=True)
    return source.load(), source


def check_model_file(path: str | Path) -> None:
    """A file that is plainly not a torch model (ONNX, an image, an array) is named for what it is."""
    from data_pipeline.file_kind import file_kind
    p = Path(path)
    kind = file_kind(p) if p.is_file() else None
    if kind is not None and not kind.startswith("a zip archive"):
        hint = (" (evaluate ONNX models with onnxruntime; `shardface export` writes them from a model.pt)"
                if kind == "an ONNX model" else "")
        raise ValueError(f"{path} is {kind}: --model takes the model.pt written by training, its run folder "
                         f"or a checkpoint{hint}")


def evaluate_model(model_path: str | Path, bins: list[str], out_dir: Optional[str | Path] = None,
                   batch_size: int = 256) -> dict:
    """Verification results of a saved model on each .bin; writes results.json and roc.png."""
    from data_pipeline.verification import check_bin, load_bin
    from train.evaluation.report import format_results, json_values, write_json
    from train.evaluation.verification import evaluate_bin, plot_roc, scalars
    names = [Path(path).stem for path in bins]
    if len(set(names)) != len(names):
        raise ValueError(f"two --bin files share a name ({', '.join(names)}): results are keyed by file name")
    for path in bins:  # every set is readable before the first one costs an evaluation
        check_bin(path)
    model, source = _load(model_path)
    results = {}
    for path, name in zip(bins, names):
        vset = load_bin(path, image_size=model.image_size)
        results[name] = evaluate_bin(model, vset, batch_size=batch_size)
        print(f"{name}: {format_results(scalars(results[name]))}")
    out = Path(out_dir) if out_dir else source.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {k: json_values(scalars(v)) for k, v in results.items()})
    roc = plot_roc(results, out / "roc.png")
    print(f"results: {out / 'results.json'}; ROC: {roc}")
    return results


def identify_model(model_path: str | Path, data_dir: str | Path, out_dir: str | Path | None = None,
                   distractors: list[int] | None = None, probes_per_identity: int = 3,
                   distractor_features: str | Path | None = None, batch_size: int = 256) -> dict:
    """Distractor identification on a synthetic set's held-out identities; writes identification.json and plots."""
    import numpy as np

    from train.evaluation.distractors import DEFAULT_SIZES, curve_table, plot_cmc, plot_rank1_vs_distractors
    from train.evaluation.report import json_tree, write_json
    from train.evaluation.synthetic_identification import evaluate_synthetic_identification, load_synth_config
    cfg = load_synth_config(data_dir)
    model, source = _load(model_path)
    pool = None
    if distractor_features is not None:
        if not Path(distractor_features).is_file():
            raise FileNotFoundError(f"distractor features {distractor_features} do not exist")
        pool = np.load(distractor_features, mmap_mode="r")
    sizes = list(DEFAULT_SIZES if distractors is None else distractors)
    curve = evaluate_synthetic_identification(model, cfg, sizes, probes_per_identity=probes_per_identity,
                                              distractor_features=pool, batch_size=batch_size,
                                              workers=os.cpu_count() or 1)
    print(f"{curve['num_enrolled']} held-out identities enrolled, {curve['num_probes']} probes")
    print(curve_table(curve))
    out = Path(out_dir) if out_dir else source.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in curve.items() if k != "cmc"}
    record["cmc"] = {str(n): [float(x) for x in c] for n, c in curve["cmc"].items()}
    # Strict JSON like results.json: a rank that could not be measured is null, never a bare NaN.
    write_json(out / "identification.json", json_tree(record))
    name = source.run_dir.name or "model"
    rank1 = plot_rank1_vs_distractors({name: curve}, out / "rank1_vs_distractors.png")
    cmc_png = plot_cmc({f"{n} distractors": c for n, c in curve["cmc"].items()}, out / "cmc.png")
    print(f"results: {out / 'identification.json'}; plots: {rank1}, {cmc_png}")
    return curve


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
    from data_pipeline.progress import Progress
    bar: Optional[Progress] = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # one bar for the whole folder: redrawn on a terminal, a line every 15 s in a log
            bar = Progress(f"embedding {images}", total)
        bar.update(done - bar.done)

    array, names = embed_folder(model, images, out, batch_size=batch_size, flip=flip, progress=progress)
    if bar is not None:
        bar.close()
    print(f"wrote {array} and {names}")
    return array, names
