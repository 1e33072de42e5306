"""What the CLI does with a trained model: evaluate on .bin sets, export to ONNX, embed a folder."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

MODEL_FILE = "model.pt"


def resolve_model(path: str | Path) -> Path:
    """The embedding export for ``path``: the file itself, or ``model.pt`` in a run directory."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no embedding model at {path}: pass a model.pt written by training "
                                "(or its run directory)")
    return p


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
    from train.export import load_embedding_model

    check_model_file(model_path)
    names = [Path(path).stem for path in bins]
    if len(set(names)) != len(names):
        raise ValueError(f"two --bin files share a name ({', '.join(names)}): results are keyed by file name")
    for path in bins:  # every set is readable before the first one costs an evaluation
        check_bin(path)
    model = load_embedding_model(resolve_model(model_path))
    results = {}
    for path, name in zip(bins, names):
        vset = load_bin(path, image_size=model.image_size)
        results[name] = evaluate_bin(model, vset, batch_size=batch_size)
        print(f"{name}: {format_results(scalars(results[name]))}")
    out = Path(out_dir) if out_dir else resolve_model(model_path).parent / "eval"
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
    from train.evaluation.synthetic_identification import evaluate_synthetic_identification, load_synth_config
    from train.export import load_embedding_model

    cfg = load_synth_config(data_dir)
    model = load_embedding_model(resolve_model(model_path))
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
    out = Path(out_dir) if out_dir else resolve_model(model_path).parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in curve.items() if k != "cmc"}
    record["cmc"] = {str(n): [float(x) for x in c] for n, c in curve["cmc"].items()}
    (out / "identification.json").write_text(json.dumps(record, indent=2))
    name = Path(resolve_model(model_path)).parent.name or "model"
    rank1 = plot_rank1_vs_distractors({name: curve}, out / "rank1_vs_distractors.png")
    cmc_png = plot_cmc({f"{n} distractors": c for n, c in curve["cmc"].items()}, out / "cmc.png")
    print(f"results: {out / 'identification.json'}; plots: {rank1}, {cmc_png}")
    return curve


def export_model(model_path: str | Path, onnx_path: str | Path, check: bool = True) -> Path:
    """ONNX export (dynamic batch) of a saved model, checked against PyTorch with onnxruntime."""
    from train.export import check_onnx_parity, export_onnx, load_embedding_model

    check_model_file(model_path)
    model = load_embedding_model(resolve_model(model_path))
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
    from train.export import embed_folder, load_embedding_model

    if not Path(images).is_dir():
        raise FileNotFoundError(f"image folder {images} does not exist")
    check_model_file(model_path)
    model = load_embedding_model(resolve_model(model_path))
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
