"""A searchable gallery of face embeddings: a FAISS index with the gallery's names beside it.

Embeddings are L2-normalised, so the inner product is the cosine similarity and the best match
is the largest score. Three index kinds:

- ``flat``: exact search (``IndexFlatIP``), every query against every gallery row;
- ``ivf``: an inverted file (``IndexIVFFlat``): k-means cells, a query visits ``nprobe`` of them;
- ``hnsw``: a navigable small-world graph (``IndexHNSWFlat``), ``ef_search`` candidates per query.

The two approximate kinds report their recall@K against exact search when they are built or
grown (:func:`leave_one_out_recall`). On disk, ``gallery.index`` is FAISS's own file (any FAISS
can read it) and ``gallery.index.json`` holds the names, in row order, and how the index was made.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "shardface-gallery-index"
FORMAT_VERSION = 1
INDEX_KINDS = ("flat", "ivf", "hnsw")
# FAISS warns below 39 training points per k-means cell; the default cell count stays above it.
_MIN_POINTS_PER_CELL = 39


def _faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - the extra is installed in tests
        raise ImportError("gallery search needs FAISS: pip install 'shardface[search]' (faiss-cpu)") from err
    return faiss


@dataclass
class IndexOptions:
    """How a gallery index is built and searched."""

    kind: str = "flat"
    """One of ``flat`` (exact), ``ivf`` or ``hnsw`` (approximate, for large galleries)."""
    nlist: int | None = None
    """IVF: k-means cells; default ``4·sqrt(N)``, at most one cell per 39 gallery rows."""
    nprobe: int = 16
    """IVF: cells visited per query (more: slower, closer to exact)."""
    hnsw_m: int = 32
    """HNSW: graph neighbours per node (more: better recall, more memory and build time)."""
    ef_construction: int = 80
    """HNSW: candidate list while building (more: better graph, slower build)."""
    ef_search: int = 64
    """HNSW: candidate list per query (more: slower, closer to exact)."""
    recall_k: int = 10
    """K of the recall@K against exact search measured when an approximate index is built or grown."""
    recall_queries: int = 500
    """Gallery rows used as queries for that recall measurement."""

    def validate(self) -> None:
        """Raise ValueError naming the first option out of range."""
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind {self.kind!r} is not one of {', '.join(INDEX_KINDS)}")
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search", "recall_k", "recall_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"nlist={self.nlist} must be at least 1")


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` gallery rows: ``4·sqrt(n)``, but no fewer than 39 rows per cell to train on."""
    return max(1, min(int(4 * math.sqrt(n)), n // _MIN_POINTS_PER_CELL))


def normalized(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` as contiguous float32 with unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [rows, dim], got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def exact_top_k(gallery: np.ndarray, queries: np.ndarray, k: int,
                chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy top-``k`` by inner product: (scores, ids) ``[Q, k]``, best first.

    The gallery is scored ``chunk`` rows at a time, so memory stays ``Q × (chunk + k)`` floats.
    """
    n = len(gallery)
    k = min(k, n)
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, n, chunk):
        scores = queries @ gallery[start:start + chunk].T
        take = min(k, scores.shape[1])
        part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, part, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, keep, axis=1), np.take_along_axis(cand_i, keep, axis=1)
    return best_s, best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (rows of ids; -1 in ``found`` is no result)."""
    if truth.size == 0:
        return 1.0
    hits = [len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.sum(hits) / truth.size)


def _create(dim: int, opts: IndexOptions, n: int):
    faiss = _faiss()
    if opts.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if opts.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, opts.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = opts.ef_construction
        return index
    nlist = opts.nlist or default_nlist(n)
    if n < nlist:
        raise ValueError(f"an IVF index with nlist={nlist} cells needs at least {nlist} gallery rows to train "
                         f"on, got {n}: lower --nlist or use --kind flat")
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    return index


def _set_search_params(index, kind: str, on_gpu: bool, nprobe: int, ef_search: int) -> None:
    faiss = _faiss()
    if kind == "ivf":
        # A parameter space reaches nprobe through GPU copies and replicas too.
        space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
        space.set_index_parameter(index, "nprobe", nprobe)
    elif kind == "hnsw":
        index.hnsw.efSearch = ef_search


def _gpu_count() -> int:
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def file_digest(path: str | Path) -> str:
    """sha256 of a file (identifies the model an index was built with)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def meta_path(path: str | Path) -> Path:
    """The names-and-settings file beside an index file."""
    return Path(f"{path}.json")


@dataclass
class GalleryIndex:
    """A FAISS index of L2-normalised embeddings and the name of each row."""

    index: Any
    """The FAISS index (always held on the CPU; searched on GPUs when FAISS has them)."""
    names: list[str]
    """Name of each gallery row, in row order."""
    options: IndexOptions
    """How it was built; the search defaults."""
    model: dict = field(default_factory=dict)
    """What made the embeddings (backbone, config, file digest), checked when the index is grown or searched."""
    recall: dict | None = None
    """Last recall@K against exact search of an approximate index (k, value, queries, settings)."""
    use_gpu: bool = True
    """Search flat and IVF indexes on every GPU FAISS sees (HNSW has no GPU version)."""
    _gpu_index: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def dim(self) -> int:
        """Embedding size."""
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @classmethod
    def build(cls, embeddings: np.ndarray, names: Sequence[str], options: IndexOptions | None = None,
              model: dict | None = None, progress: Callable[[int, int], None] | None = None) -> GalleryIndex:
        """A new index of ``embeddings`` (normalised here) named by ``names``; IVF cells are trained on them."""
        opts = options or IndexOptions()
        opts.validate()
        x = normalized(embeddings)
        if len(x) == 0:
            raise ValueError("no gallery embeddings to index")
        index = _create(x.shape[1], opts, len(x))
        if opts.kind == "ivf":
            opts.nlist = index.nlist
            index.train(x)
        gallery = cls(index, [], opts, dict(model or {}))
        gallery.add(x, names, progress=progress)
        return gallery

    def add(self, embeddings: np.ndarray, names: Sequence[str],
            progress: Callable[[int, int], None] | None = None, chunk: int = 20000) -> None:
        """Append rows (normalised here) with their names; an approximate index re-measures its recall."""
        x = normalized(embeddings)
        names = [str(n) for n in names]
        if len(names) != len(x):
            raise ValueError(f"{len(x)} embeddings but {len(names)} names")
        if x.shape[1] != self.dim:
            raise ValueError(f"the embeddings are {x.shape[1]}-d but the index holds {self.dim}-d embeddings: "
                             "use the model the index was built with")
        clash = set(self.names).intersection(names)
        if clash or len(set(names)) != len(names):
            which = min(clash) if clash else Counter(names).most_common(1)[0][0]
            raise ValueError(f"the gallery would hold the name {which!r} twice: give the new images "
                             "another prefix (--prefix)")
        for start in range(0, len(x), chunk):
            self.index.add(x[start:start + chunk])
            if progress is not None:
                progress(min(start + chunk, len(x)), len(x))
        self.names.extend(names)
        self._gpu_index = None
        if self.options.kind != "flat":
            self.recall = self.measure_recall()

    def _searcher(self):
        if self._gpu_index is None and self.use_gpu and self.options.kind != "hnsw" and _gpu_count() > 0:
            self._gpu_index = _faiss().index_cpu_to_all_gpus(self.index)
        return self._gpu_index if self._gpu_index is not None else self.index

    def search(self, queries: np.ndarray, k: int, nprobe: int | None = None,
               ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, row ids) ``[Q, k]`` of the best ``k`` rows per query (normalised here), best first;
        id -1 where the gallery has fewer than ``k`` rows."""
        if k < 1:
            raise ValueError(f"top k={k} must be at least 1")
        q = normalized(queries)
        if q.shape[1] != self.dim:
            raise ValueError(f"the queries are {q.shape[1]}-d but the index holds {self.dim}-d embeddings: "
                             "use the model the index was built with")
        index = self._searcher()
        _set_search_params(index, self.options.kind, index is not self.index,
                           nprobe or self.options.nprobe, ef_search or self.options.ef_search)
        scores, ids = index.search(q, k)
        return scores, ids

    def vectors(self) -> np.ndarray:
        """Every stored row, ``[N, dim]`` (an IVF index gets a direct map for it)."""
        if self.options.kind == "ivf":
            self.index.make_direct_map()
        return self.index.reconstruct_n(0, len(self))

    def measure_recall(self, k: int | None = None, queries: int | None = None,
                       seed: int = 0) -> dict:
        """Leave-one-out recall@K of this index against exact search (see :func:`leave_one_out_recall`)."""
        k = k or self.options.recall_k
        queries = queries or self.options.recall_queries
        value, used, k = leave_one_out_recall(self, self.vectors(), k, queries, seed)
        settings = {"nprobe": self.options.nprobe} if self.options.kind == "ivf" else \
            {"ef_search": self.options.ef_search} if self.options.kind == "hnsw" else {}
        return {"k": k, "recall": value, "queries": used, **settings}

    def save(self, path: str | Path) -> Path:
        """Write the FAISS file at ``path`` and names/settings at ``path.json``, each atomically."""
        faiss = _faiss()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "dim": self.dim, "count": len(self),
                "options": asdict(self.options), "model": self.model, "recall": self.recall,
                "names": self.names}
        # The names go last: a crash between the two leaves counts that disagree, which load reports.
        _write_atomic(path, lambda tmp: faiss.write_index(self.index, str(tmp)))
        _write_atomic(meta_path(path), lambda tmp: tmp.write_text(json.dumps(meta)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> GalleryIndex:
        """Read an index written by :meth:`save`."""
        faiss = _faiss()
        path, meta_file = Path(path), meta_path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no gallery index at {path}: build one with `shardface index build`")
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} (the names of {path}'s rows) is missing: rebuild the index")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_file} is not valid JSON ({err}): rebuild the index") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file} is not a shardface gallery index description")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has gallery index version {meta.get('version')}, "
                             f"this code reads {FORMAT_VERSION}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise ValueError(f"{path} is not a FAISS index file: rebuild it") from err
        if index.ntotal != meta["count"] or len(meta["names"]) != meta["count"]:
            raise ValueError(f"{path} holds {index.ntotal} rows but {meta_file} names {len(meta['names'])}: "
                             "an interrupted write; rebuild the index")
        return cls(index, list(meta["names"]), IndexOptions(**meta["options"]), meta.get("model") or {},
                   meta.get("recall"))


def leave_one_out_recall(gallery: GalleryIndex, vectors: np.ndarray, k: int, queries: int,
                         seed: int = 0) -> tuple[float, int, int]:
    """Recall@``k`` of ``gallery``'s search against exact search, queried with its own rows.

    ``queries`` rows drawn at random are searched for their ``k + 1`` best matches, by the index
    and by :func:`exact_top_k`; each query's own row is dropped from both lists, and the index's
    remaining ids are compared with the exact ``k`` nearest other rows. Returns (recall, queries used,
    k used: at most the number of other rows).
    """
    n = len(vectors)
    k = min(k, n - 1)
    if k < 1:
        return 1.0, 0, 0
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    q = vectors[picked]
    _, truth = exact_top_k(vectors, q, k + 1)
    _, found = gallery.search(q, k + 1)
    truth_rows = [t[t != i][:k] for t, i in zip(truth, picked)]
    found_rows = [f[f != i][:k] for f, i in zip(found, picked)]
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found_rows, truth_rows))
    return hits / (k * len(picked)), len(picked), k
