"""Gallery search: queries/s and recall@10 of FAISS exact, IVF and HNSW against a numpy matmul top-K.

For each gallery size (default 10k, 100k, 1M) and each kind of data, one batch of queries is
searched by:

- ``numpy``: the plain baseline, ``queries @ gallery.T`` over 65,536-row chunks with a running
  top-10 (:func:`train.gallery_index.exact_top_k`); its result is the ground truth;
- ``flat``: FAISS ``IndexFlatIP`` (exact; its recall checks the baseline);
- ``ivf``: ``IndexIVFFlat`` with ``sqrt(N)`` cells trained on ``64·nlist`` gallery rows, at two
  ``nprobe`` settings;
- ``hnsw``: ``IndexHNSWFlat`` with M = 16, efConstruction = 40 (modest, to keep the 1M build
  feasible on a shared 2-core machine), at two ``efSearch`` settings.

Queries/s is the batch size over the batch's wall time (FAISS and numpy both use every core
they are given). Build time covers training and adding. Data:

- ``random``: unit vectors drawn uniformly on the sphere, queries likewise (no structure: the
  hard case for approximate search);
- ``faces``: synthetic-face embeddings. Synthetic faces (data_pipeline/synthetic.py) of
  ``--fit-identities`` identities × ``--fit-images`` images are rendered and embedded by the
  model (``--model``; default a randomly initialised ``iresnet_tiny``), a Gaussian of identity
  centres and one of within-identity offsets are fitted to those embeddings, and the gallery
  is one embedding each of N new identities drawn from them; each query is another embedding
  of a gallery identity (a mated search, as in deployment). This keeps the embeddings'
  anisotropy and identity structure at sizes no one could render on a CPU.

Results go to the "Gallery search" section of bench/RESULTS.md as each row is measured, the
HNSW builds of a size after all its exact and IVF rows, so a run stopped during the largest
size keeps everything finished; ``--keep`` runs sizes apart (``--sizes 1000000 --keep`` adds the
1M rows to an earlier 10k/100k run).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results import machine_description, markdown_table, write_section  # noqa: E402
from train.gallery_index import exact_top_k, recall_at_k  # noqa: E402

K = 10
TITLE = "Gallery search"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def random_data(n: int, q: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return unit(rng.standard_normal((n, dim), dtype=np.float32)), unit(rng.standard_normal((q, dim), dtype=np.float32))


def face_embeddings(model_path: str | None, identities: int, images: int, dim: int,
                    seed: int) -> tuple[np.ndarray, str]:
    """Embeddings ``[identities, images, D]`` of rendered synthetic faces, and the model's description."""
    import torch

    from data_pipeline.synthetic import SynthConfig, SyntheticFaces
    from train.backbones import build_backbone
    from train.export import EmbeddingModel, embed_files, load_embedding_model

    if model_path:
        model = load_embedding_model(model_path)
        what = f"{model.backbone_name} from {model_path} ({model.config.get('embedding_size')}-d)"
    else:
        torch.manual_seed(seed)
        config = {"embedding_size": dim, "input_size": 56}
        model = EmbeddingModel(build_backbone("iresnet_tiny", **config), "iresnet_tiny", config).eval()
        what = f"randomly initialised iresnet_tiny ({dim}-d, seed {seed})"
    cfg = SynthConfig(num_identities=identities, images_per_identity=images, heldout_identities=0,
                      heldout_pairs=0, image_size=model.image_size, seed=seed)
    source = SyntheticFaces(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(len(source)):
            path = Path(tmp) / f"{i:06d}.png"
            source.render(i).save(path)
            files.append(path)
        log(f"rendered {len(files)} synthetic faces; embedding them with {what}")
        emb = embed_files(model, files, batch_size=64, progress=None)
    return emb.reshape(identities, images, -1), what


class FaceModel:
    """Gaussian identity centres plus Gaussian within-identity offsets, fitted to face embeddings."""

    def __init__(self, emb: np.ndarray) -> None:
        r, i, d = emb.shape
        centres = emb.mean(axis=1)
        offsets = (emb - centres[:, None]).reshape(-1, d)
        within = offsets.T @ offsets / (r * (i - 1))
        # A centre averaged over i images still carries within/i of the offsets' spread.
        between = np.cov(centres, rowvar=False) - within / i
        self.mean = centres.mean(axis=0)
        self.between, self.within = self._root(between), self._root(within)
        self.fit_same, self.fit_diff = self._cosines(emb)

    @staticmethod
    def _root(cov: np.ndarray) -> np.ndarray:
        vals, vecs = np.linalg.eigh(cov)
        return (vecs * np.sqrt(np.clip(vals, 0, None))).T.astype(np.float32)

    @staticmethod
    def _cosines(emb: np.ndarray) -> tuple[float, float]:
        e = emb / np.linalg.norm(emb, axis=2, keepdims=True)
        same = float(np.mean(np.sum(e[:, 0] * e[:, 1], axis=1)))
        diff = float(np.mean(np.sum(e[:, 0] * np.roll(e[:, 0], 1, axis=0), axis=1)))
        return same, diff

    def sample(self, n: int, q: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        d = len(self.mean)
        gallery = np.empty((n, d), dtype=np.float32)
        centres_q = np.empty((q, d), dtype=np.float32)
        mated = np.sort(rng.choice(n, size=q, replace=False))
        step = 100_000  # bounded temporaries at 1M
        for s in range(0, n, step):
            c = self.mean + rng.standard_normal((min(step, n - s), d), dtype=np.float32) @ self.between
            gallery[s:s + len(c)] = c + rng.standard_normal((len(c), d), dtype=np.float32) @ self.within
            sel = (mated >= s) & (mated < s + len(c))
            centres_q[sel] = c[mated[sel] - s]
        queries = centres_q + rng.standard_normal((q, d), dtype=np.float32) @ self.within
        return unit(gallery), unit(queries)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_size(name: str, gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray | None, args,
             emit, phase: str) -> np.ndarray:
    """Time the ``exact`` phase (numpy, flat, IVF) or the ``hnsw`` phase on one gallery; each result
    row goes to ``emit`` at once. Returns the exact top-K ids (the ground truth)."""
    import faiss

    n, d = gallery.shape
    q = len(queries)

    def row(method: str, settings: str, build_s, seconds: float, ids) -> None:
        recall = recall_at_k(ids, truth)
        emit([f"{n:,}", name, method, settings, "" if build_s is None else f"{build_s:.1f}",
              f"{q / seconds:,.0f}", f"{recall:.4f}"])
        log(f"  {name} N={n:,} {method} {settings}: {q / seconds:,.0f} queries/s, recall@{K} {recall:.4f}"
            + ("" if build_s is None else f", build {build_s:.1f} s"))

    if phase == "exact":
        (_, truth), sec = timed(lambda: exact_top_k(gallery, queries, K))
        row("numpy matmul", "chunks of 65,536 rows", None, sec, truth)

        flat = faiss.IndexFlatIP(d)
        _, build = timed(lambda: flat.add(gallery))
        (_, ids), sec = timed(lambda: flat.search(queries, K))
        row("flat (exact)", "IndexFlatIP", build, sec, ids)
        del flat

        nlist = max(1, int(round(np.sqrt(n))))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = gallery[np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False)]
        _, build = timed(lambda: (ivf.train(sample), ivf.add(gallery)))
        for nprobe in args.nprobe:
            ivf.nprobe = nprobe
            (_, ids), sec = timed(lambda: ivf.search(queries, K))
            row("ivf", f"nlist {nlist}, nprobe {nprobe}", build, sec, ids)
        del ivf
        return truth

    hnsw = faiss.IndexHNSWFlat(d, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = args.ef_construction
    log(f"  building HNSW over {n:,} {name} rows (M {args.hnsw_m}, efConstruction {args.ef_construction})")

    def add_hnsw():
        step = max(10_000, n // 10)
        for s in range(0, n, step):
            hnsw.add(gallery[s:s + step])
            if n >= 100_000:
                log(f"    HNSW: {min(s + step, n):,}/{n:,} rows added")

    _, build = timed(add_hnsw)
    for ef in args.ef_search:
        hnsw.hnsw.efSearch = ef
        (_, ids), sec = timed(lambda: hnsw.search(queries, K))
        row("hnsw", f"M {args.hnsw_m}, efConstruction {args.ef_construction}, efSearch {ef}", build, sec, ids)
    return truth


def earlier_rows(sizes: list[int]) -> list[list]:
    """Table rows of other gallery sizes in the current RESULTS.md section (for ``--keep``)."""
    from bench.results import results_path

    path = results_path()
    text = path.read_text() if path.exists() else ""
    start = text.find(f"## {TITLE}\n")
    if start < 0:
        return []
    end = text.find("\n## ", start + 1)
    section = text[start:end if end > 0 else None]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| gallery")]
    return [r for r in rows if int(r[0].replace(",", "")) not in sizes]


def shown_command(argv: list[str]) -> str:
    """The command line of this run, its ``--note`` texts left out (they are printed below it)."""
    shown = [a for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")]
    return " ".join(["python", "bench/search_bench.py", *map(shlex.quote, shown)])


def write(rows: list[list], notes: list[str], args) -> None:
    headers = ["gallery", "data", "method", "settings", "build s", "queries/s", f"recall@{K}"]
    body = "\n".join([
        f"`{shown_command(args.argv)}`",
        "",
        f"{machine_description()}; FAISS with {args.threads} threads; {args.queries:,} queries per batch, "
        f"top-{K}; recall@{K} against the numpy result (exact).",
        "",
        *notes,
        "",
        markdown_table(headers, rows),
    ])
    if not args.no_write:
        write_section(TITLE, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--data", nargs="+", choices=["random", "faces"], default=["random", "faces"])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--dim", type=int, default=128, help="random vectors' size (faces: the model's)")
    p.add_argument("--model", default=None, help="embedding model of the faces (default: random iresnet_tiny)")
    p.add_argument("--fit-identities", type=int, default=300)
    p.add_argument("--fit-images", type=int, default=6)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef-search", type=int, nargs="+", default=[32, 128])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--note", action="append", default=[], help="a line added under the settings")
    p.add_argument("--keep", action="store_true",
                   help="keep the rows of other gallery sizes already in RESULTS.md (run the sizes apart)")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    import faiss

    faiss.omp_set_num_threads(args.threads)
    notes = ["- `random`: uniform unit vectors, " f"{args.dim}-d."]
    faces = None
    if "faces" in args.data:
        emb, what = face_embeddings(args.model, args.fit_identities, args.fit_images, args.dim, args.seed)
        faces = FaceModel(emb)
        g, qv = faces.sample(2000, 2000, np.random.default_rng(1))
        notes.append(
            f"- `faces`: {emb.shape[2]}-d embeddings by {what} of {emb.shape[0]} x {emb.shape[1]} rendered synthetic "
            f"faces; identity centres and within-identity offsets fitted as Gaussians, gallery = one draw of N new "
            f"identities, query = another draw of a gallery identity. Mean cosine same / different identity: "
            f"rendered {faces.fit_same:.3f} / {faces.fit_diff:.3f}, drawn "
            f"{float(np.mean(np.sum(g * qv, 1))):.3f} / {float(np.mean(np.sum(g * np.roll(qv, 1, 0), 1))):.3f}.")
        log(notes[-1])
    rows: list[list] = earlier_rows(args.sizes) if args.keep else []
    notes += [f"- {line}" for line in args.note]
    if rows:
        notes.append(f"- Rows of {len({r[0] for r in rows})} other gallery sizes kept from an earlier run "
                     "of this script with the same settings (`--keep`).")

    def emit(r: list) -> None:
        rows.append(r)
        write(rows, notes, args)

    for n in args.sizes:
        data = {}
        for name in args.data:
            rng = np.random.default_rng([args.seed, n])
            log(f"{name}: drawing a gallery of {n:,} and {args.queries:,} queries")
            if name == "random":
                gallery, queries = random_data(n, args.queries, args.dim, rng)
            else:
                gallery, queries = faces.sample(n, args.queries, rng)
            truth = run_size(name, gallery, queries, None, args, emit, "exact")
            data[name] = (gallery, queries, truth)
        # HNSW builds last: the slowest step at 1M, after every exact and IVF figure is written.
        for name in args.data:
            gallery, queries, truth = data.pop(name)
            run_size(name, gallery, queries, truth, args, emit, "hnsw")
            del gallery
    print(markdown_table(["gallery", "data", "method", "settings", "build s", "queries/s", f"recall@{K}"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
