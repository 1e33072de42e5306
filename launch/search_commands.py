"""``shardface index build|add`` and ``shardface search``: a gallery of face images in a FAISS index."""
from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from launch.model_commands import _load

OUTPUT_FORMATS = ("csv", "json")


def _model_and_info(model_path: str | Path):
    """The embedding model behind ``--model`` (a model.pt, a run folder or a checkpoint) and what
    identifies it: backbone, config, path, embedding size and, for a file, its sha256."""
    from train.gallery_index import file_digest

    model, source = _load(model_path)
    path = source.path.resolve()
    info = {"backbone": model.backbone_name, "config": model.config, "file": str(path),
            "sha256": file_digest(path) if path.is_file() else None, "dim": embedding_size(model)}
    return model, info


def embedding_size(model) -> int:
    """The size of ``model``'s embeddings, from one blank image (cheap, and true whatever its config says)."""
    import torch

    with torch.no_grad():
        return int(model(torch.zeros(1, 3, model.image_size, model.image_size)).shape[1])


def _check_model_fits(info: dict, gallery, index_path: str | Path) -> None:
    if info["dim"] != gallery.dim:
        raise ValueError(f"the model {info['file']} gives {info['dim']}-d embeddings but the index {index_path} "
                         f"holds {gallery.dim}-d ones: use the model the index was built with")
    built = gallery.model.get("sha256")
    if built and built != info["sha256"]:
        print(f"shardface: warning: {info['file']} is not the model file {index_path} was built with "
              f"({gallery.model.get('file')}); scores mix two embedding spaces unless the weights are the same",
              file=sys.stderr)


def _embed(model, images: str | Path, batch_size: int, flip: bool, label: str) -> tuple[np.ndarray, list[str]]:
    """Embeddings of every image under ``images`` (the same reading and preprocessing as ``shardface embed``)."""
    from data_pipeline.progress import Progress
    from train.export import embed_files, list_images

    if not Path(images).is_dir():
        raise FileNotFoundError(f"image folder {images} does not exist")
    files = list_images(images)
    bar = Progress(label, len(files))
    x = embed_files(model, files, batch_size=batch_size, flip=flip,
                    progress=lambda done, _total: bar.update(done - bar.done))
    bar.close()
    root = Path(images)
    return x, [p.relative_to(root).as_posix() for p in files]


def _adding_progress(n: int):
    from data_pipeline.progress import Progress

    bar = Progress("indexing", n, unit="rows")
    return bar, (lambda done, _total: bar.update(done - bar.done))


def _report(gallery, path: Path, verb: str, added: int) -> None:
    line = f"{verb} {path}: {len(gallery)} {gallery.dim}-d embeddings ({gallery.options.kind}"
    if gallery.options.kind == "ivf":
        line += f", nlist {gallery.options.nlist}, nprobe {gallery.options.nprobe}"
    if gallery.options.kind == "hnsw":
        line += f", M {gallery.options.hnsw_m}, ef_search {gallery.options.ef_search}"
    line += f"), {added} added"
    if gallery.recall:
        r = gallery.recall
        line += f"; recall@{r['k']} against exact search {r['recall']:.4f} ({r['queries']} gallery rows as queries)"
    print(line)


def _prefixed(names: list[str], prefix: str) -> list[str]:
    return [f"{prefix.rstrip('/')}/{n}" for n in names] if prefix else names


def build_index(model_path: str | Path, images: str | Path, out: str | Path, options=None,
                batch_size: int = 128, flip: bool = True, prefix: str = "", append: bool = False):
    """Embed ``images`` and write a new gallery index at ``out`` (or grow it with ``append``)."""
    from train.gallery_index import GalleryIndex, IndexOptions

    if append and Path(out).exists():
        return add_to_index(out, model_path, images, batch_size=batch_size, flip=flip, prefix=prefix)
    options = options or IndexOptions()
    options.validate()
    model, info = _model_and_info(model_path)
    x, names = _embed(model, images, batch_size, flip, "embedding gallery")
    bar, tick = _adding_progress(len(x))
    gallery = GalleryIndex.build(x, _prefixed(names, prefix), options, model=info, progress=tick)
    bar.close()
    path = gallery.save(out)
    _report(gallery, path, "wrote", len(x))
    return gallery


def add_to_index(index_path: str | Path, model_path: str | Path, images: str | Path, batch_size: int = 128,
                 flip: bool = True, prefix: str = ""):
    """Embed ``images`` and append them to the gallery index at ``index_path``."""
    from train.gallery_index import GalleryIndex

    gallery = GalleryIndex.load(index_path)
    model, info = _model_and_info(model_path)
    _check_model_fits(info, gallery, index_path)
    x, names = _embed(model, images, batch_size, flip, "embedding gallery")
    bar, tick = _adding_progress(len(x))
    gallery.add(x, _prefixed(names, prefix), progress=tick)
    bar.close()
    path = gallery.save(index_path)
    _report(gallery, path, "updated", len(x))
    return gallery


def search_folder(index_path: str | Path, model_path: str | Path | None, images: str | Path, top: int = 5,
                  out: str | Path | None = None, fmt: str | None = None, batch_size: int = 128,
                  flip: bool = True, nprobe: int | None = None, ef_search: int | None = None) -> list[dict]:
    """The ``top`` gallery matches of every image under ``images``; written as CSV or JSON to ``out``
    (the format from its suffix unless ``fmt`` is given) or to stdout."""
    from train.gallery_index import GalleryIndex

    if top < 1:
        raise ValueError(f"--top {top} must be at least 1")
    fmt = fmt or (Path(out).suffix.lstrip(".").lower() if out else "csv")
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format {fmt!r} is not one of {', '.join(OUTPUT_FORMATS)} (--format, or an "
                         ".csv/.json --out)")
    gallery = GalleryIndex.load(index_path)
    if model_path is None:
        model_path = gallery.model.get("file")
        if not model_path:
            raise ValueError(f"{index_path} does not record its model: pass --model")
    model, info = _model_and_info(model_path)
    _check_model_fits(info, gallery, index_path)
    x, queries = _embed(model, images, batch_size, flip, "embedding queries")
    scores, ids = gallery.search(x, top, nprobe=nprobe, ef_search=ef_search)
    results = [{"query": q, "matches": [{"name": gallery.names[i], "score": float(s)}
                                        for s, i in zip(srow, irow) if i >= 0]}
               for q, srow, irow in zip(queries, scores, ids)]
    text = format_results(results, fmt)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"wrote the top {top} matches of {len(results)} queries to {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return results


def format_results(results: Sequence[dict], fmt: str) -> str:
    """Search results as CSV (``query,rank,name,score``, one row per match) or JSON."""
    if fmt == "json":
        return json.dumps({"results": list(results)}, indent=1) + "\n"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["query", "rank", "name", "score"])
    for r in results:
        for rank, m in enumerate(r["matches"], start=1):
            writer.writerow([r["query"], rank, m["name"], f"{m['score']:.6f}"])
    return buf.getvalue()
