"""Open-set 1:N identification: search a gallery, rank the mate, CMC and TPIR at FPIR.

A *search* compares one probe with every gallery entry (cosine of L2-normalised features).
Gallery entries carry a subject label; at most one entry per subject (IJB-B/C's galleries and
the distractor protocol both enrol one template or one image per subject), and entries labelled
``-1`` are distractors, who are never anyone's mate. A probe is *mated* when its subject is
enrolled and *non-mated* otherwise.

- **Rank** of a mated search: 1 + the number of non-mate entries scoring at least as high as the
  mate (ties count against the mate, so an exact duplicate distractor costs a rank).
- **CMC** at rank r: the fraction of mated searches whose mate has rank <= r (closed-set
  identification rate; non-mated probes do not enter it).
- **FPIR(T)**: the fraction of non-mated searches whose best score is above the threshold T (an
  alarm raised for someone not enrolled).
- **TPIR(T)** at rank r: the fraction of mated searches whose mate has rank <= r and scores above T.
  "TPIR at FPIR f" reads T from the non-mated best scores with the rule of
  :func:`train.evaluation.metrics.tar_at_far`: with N non-mated searches and k = floor(f·N), T is
  the (k+1)-th highest of them, so at most k alarms are raised; NaN when f < 1/N.

Scores are computed in float32 on gallery chunks, so a 1M x 512 gallery needs only the gallery
itself plus one ``probe_chunk`` x ``chunk`` block of scores (256 MiB by default).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

DISTRACTOR = -1
"""Gallery label of an entry that is nobody's mate."""
IDENT_FPIRS = (1e-2, 1e-1)
IDENT_RANKS = (1, 5, 10)


def normalized(features: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    """Float32 L2-normalised rows ``[N, D]``, with a clear error for a wrong shape or a zero row."""
    t = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    if t.dim() != 2 or t.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty [N, D] array, got shape {tuple(t.shape)}")
    t = t.detach().to(torch.float32)
    norms = t.norm(dim=1, keepdim=True)
    if not torch.isfinite(norms).all() or (norms == 0).any():
        raise ValueError(f"{what}: {int((~torch.isfinite(norms) | (norms == 0)).sum())} rows are all zeros, "
                         f"NaN or infinite: check the embeddings")
    return t / norms


class _UnitRows:
    """Rows of a feature matrix, L2-normalised one chunk at a time (a 1M x 512 gallery is not copied)."""

    def __init__(self, features: np.ndarray | torch.Tensor, what: str) -> None:
        if isinstance(features, torch.Tensor):
            t = features
        else:
            with warnings.catch_warnings():  # a read-only memmap is only ever read here
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(np.asarray(features))
        if t.dim() != 2 or t.shape[0] == 0:
            raise ValueError(f"{what} must be a non-empty [N, D] array, got shape {tuple(t.shape)}")
        self.rows = t.detach()
        norms = torch.cat([self.rows[i:i + 65536].to(torch.float32).norm(dim=1)
                           for i in range(0, self.rows.shape[0], 65536)])
        bad = ~torch.isfinite(norms) | (norms == 0)
        if bad.any():
            raise ValueError(f"{what}: {int(bad.sum())} rows are all zeros, NaN or infinite: check the embeddings")
        self.inv_norms = 1.0 / norms
        self.shape = tuple(self.rows.shape)

    def chunk(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        rows = self.rows[start:stop].to(device=device, dtype=torch.float32)
        return rows * self.inv_norms[start:stop, None].to(device)

    def take(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        index = index.cpu()
        return (self.rows[index].to(torch.float32) * self.inv_norms[index, None]).to(device)


def exact_top_k(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor, k: int,
                chunk: int = 16384, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k] descending, gallery indices [Q, k]) of the k best cosine matches of each query.

    Exact: every gallery row is scored. The gallery is visited ``chunk`` rows at a time and the
    running top-k is merged with each chunk's, so memory is O(Q·(chunk + k)).
    """
    q = normalized(queries, "queries").to(device)
    g = _UnitRows(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dimensions but the gallery has {g.shape[1]}")
    if not 1 <= k <= g.shape[0]:
        raise ValueError(f"k={k} must lie in [1, {g.shape[0]}] (the gallery size)")
    best_s = torch.full((q.shape[0], 0), -math.inf, device=q.device)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.int64, device=q.device)
    for start in range(0, g.shape[0], chunk):
        s = q @ g.chunk(start, start + chunk, q.device).T
        s_top, i_top = s.topk(min(k, s.shape[1]), dim=1)
        merged_s = torch.cat([best_s, s_top], dim=1)
        merged_i = torch.cat([best_i, i_top + start], dim=1)
        best_s, pos = merged_s.topk(min(k, merged_s.shape[1]), dim=1)
        best_i = merged_i.gather(1, pos)
    return best_s.cpu().numpy(), best_i.cpu().numpy()


def search(probes: np.ndarray | torch.Tensor, probe_labels: Sequence[int] | np.ndarray,
           gallery: np.ndarray | torch.Tensor, gallery_labels: Sequence[int] | np.ndarray,
           chunk: int = 16384, probe_chunk: int = 4096, device: str | torch.device = "cpu"
           ) -> dict[str, np.ndarray]:
    """Search every probe in the gallery: the mate's score and rank, and the best non-mate score.

    Returns float64/int64 arrays over probes: ``mated`` (bool), ``mate_score`` (NaN when
    non-mated), ``rank`` (0 when non-mated), ``top_score`` (best score over the whole gallery)
    and ``top_nonmate`` (best score over entries that are not the mate).
    """
    p = normalized(probes, "probe features").to(device)
    g = _UnitRows(gallery, "gallery features")
    if p.shape[1] != g.shape[1]:
        raise ValueError(f"probe features have {p.shape[1]} dimensions but gallery features {g.shape[1]}")
    plab = np.asarray(probe_labels, dtype=np.int64).reshape(-1)
    glab = np.asarray(gallery_labels, dtype=np.int64).reshape(-1)
    if plab.size != p.shape[0] or glab.size != g.shape[0]:
        raise ValueError(f"{plab.size} probe labels for {p.shape[0]} probes and {glab.size} gallery labels "
                         f"for {g.shape[0]} gallery entries: give one label per row")
    enrolled = glab[glab != DISTRACTOR]
    if (glab < DISTRACTOR).any():
        raise ValueError(f"gallery label {int(glab.min())} is negative: subjects are >= 0, distractors {DISTRACTOR}")
    uniq, counts = np.unique(enrolled, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"subject {int(uniq[counts > 1][0])} is enrolled {int(counts.max())} times: "
                         f"the gallery holds one entry (template or image) per subject")
    # Index of each probe's mate in the gallery, -1 when its subject is not enrolled.
    order = np.argsort(glab, kind="stable")
    pos = np.searchsorted(glab[order], plab).clip(max=glab.size - 1)
    mate = np.where((glab[order][pos] == plab) & (plab != DISTRACTOR), order[pos], -1)
    mated = mate >= 0
    mate_t = torch.from_numpy(mate).to(p.device)
    mate_score = torch.full((p.shape[0],), math.nan, device=p.device)
    if mated.any():
        rows = torch.from_numpy(np.flatnonzero(mated)).to(p.device)
        mate_score[rows] = (p[rows] * g.take(mate_t[rows], p.device)).sum(dim=1)
    above = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
    top_nonmate = torch.full((p.shape[0],), -math.inf, device=p.device)
    for lo in range(0, p.shape[0], probe_chunk):
        hi = min(lo + probe_chunk, p.shape[0])
        for start in range(0, g.shape[0], chunk):
            s = p[lo:hi] @ g.chunk(start, start + chunk, p.device).T
            cols = torch.arange(start, start + s.shape[1], device=p.device)
            s = s.masked_fill(cols[None, :] == mate_t[lo:hi, None], -math.inf)
            top_nonmate[lo:hi] = torch.maximum(top_nonmate[lo:hi], s.max(dim=1).values)
            # NaN mate scores (non-mated probes) compare False: their count stays 0.
            above[lo:hi] += (s >= mate_score[lo:hi, None]).sum(dim=1)
    mate_np = mate_score.cpu().numpy().astype(np.float64)
    top_nm = top_nonmate.cpu().numpy().astype(np.float64)
    return {
        "mated": mated,
        "mate_score": mate_np,
        "rank": np.where(mated, above.cpu().numpy() + 1, 0).astype(np.int64),
        "top_score": np.where(mated, np.fmax(mate_np, top_nm), top_nm),
        "top_nonmate": top_nm,
    }


def cmc(ranks: np.ndarray, max_rank: int) -> np.ndarray:
    """Identification rate at ranks 1..max_rank over mated searches (``ranks`` >= 1); NaN without any."""
    r = np.asarray(ranks, dtype=np.int64).reshape(-1)
    r = r[r > 0]
    if max_rank < 1:
        raise ValueError(f"max_rank={max_rank} must be >= 1")
    if r.size == 0:
        return np.full(max_rank, math.nan)
    hist = np.bincount(np.minimum(r, max_rank + 1), minlength=max_rank + 2)[1:max_rank + 1]
    return np.cumsum(hist) / r.size


def fpir_threshold(nonmated_top: np.ndarray, fpir: float) -> float:
    """Threshold T such that at most floor(fpir·N) of N non-mated best scores lie above it (NaN if < 1)."""
    if not 0.0 < fpir <= 1.0:
        raise ValueError(f"fpir={fpir!r} is outside (0, 1]: use e.g. 1e-2")
    top = np.sort(np.asarray(nonmated_top, dtype=np.float64))[::-1]
    allowed = math.floor(fpir * top.size + 1e-9)
    if allowed < 1:
        return math.nan
    return float(top[allowed]) if allowed < top.size else -math.inf


def tpir_at_fpir(result: dict[str, np.ndarray], fpir: float, rank: int = 1) -> tuple[float, float]:
    """(TPIR, threshold) at rank ``rank`` where the FPIR of the non-mated searches is at most ``fpir``."""
    mated = result["mated"]
    threshold = fpir_threshold(result["top_score"][~mated], fpir)
    if math.isnan(threshold) or not mated.any():
        return math.nan, threshold
    hit = (result["rank"][mated] <= rank) & (result["mate_score"][mated] > threshold)
    return float(hit.mean()), threshold


def fpir_key(fpir: float, rank: int = 1) -> str:
    """Result key of a TPIR, e.g. ``tpir@fpir=1e-02`` (rank 1) or ``tpir@fpir=1e-02,rank=5``."""
    return f"tpir@fpir={fpir:.0e}" + ("" if rank == 1 else f",rank={rank}")


def rank_key(rank: int) -> str:
    """Result key of a CMC point, e.g. ``rank1``."""
    return f"rank{rank}"


def identification_metrics(result: dict[str, np.ndarray], fpirs: Sequence[float] = IDENT_FPIRS,
                           ranks: Sequence[int] = IDENT_RANKS, cmc_ranks: int = 20) -> dict:
    """Scalars (rank-r rates, TPIR at each FPIR, counts) and the CMC curve of a :func:`search` result."""
    mated = result["mated"]
    curve = cmc(result["rank"][mated], max(max(ranks), cmc_ranks))
    out: dict = {rank_key(r): float(curve[r - 1]) for r in ranks}
    for f in fpirs:
        out[fpir_key(f)] = tpir_at_fpir(result, f)[0]
    out.update(num_mated=float(mated.sum()), num_nonmated=float((~mated).sum()), cmc=curve)
    return out
