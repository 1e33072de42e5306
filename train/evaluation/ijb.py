"""Template-based 1:1 verification in the IJB-B / IJB-C protocol.

Metadata: ``*_face_tid_mid.txt`` has one line per face image, ``image template_id media_id``,
in the order of the feature rows; ``*_template_pair_label.txt`` has ``t1 t2 label`` per pair.
Pooling: each image feature (plus its flip, optionally weighted by a detector score) is
L2-normalised; features of one media (a still or a video) are averaged; the media features of a
template are summed and the result is L2-normalised.  A pair's score is the cosine of its two
template features.

    shardface eval-ijb --features emb.npy --names emb.txt \
        --faces ijbc_face_tid_mid.txt --pairs ijbc_template_pair_label.txt
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .metrics import far_key, roc_auc, roc_curve, tar_at_far, thin_roc

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def read_face_list(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image names, template ids [N], media ids [N]) from a ``*_face_tid_mid.txt`` file."""
    names, templates, medias = [], [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3:
                raise ValueError(f"{path}:{lineno}: expected 'image template_id media_id', got {line.strip()!r}")
            names.append(parts[0])
            templates.append(int(parts[1]))
            medias.append(int(parts[2]))
    if not names:
        raise ValueError(f"{path} lists no faces")
    return names, np.asarray(templates, dtype=np.int64), np.asarray(medias, dtype=np.int64)


def read_template_pairs(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(template 1 [M], template 2 [M], label bool [M]) from a ``*_template_pair_label.txt`` file."""
    table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    if table.shape[1] != 3 or table.shape[0] == 0:
        raise ValueError(f"{path}: expected lines 't1 t2 label', got a table of shape {table.shape}")
    if not np.isin(table[:, 2], (0, 1)).all():
        raise ValueError(f"{path}: labels must be 0 or 1")
    return table[:, 0], table[:, 1], table[:, 2].astype(bool)


def image_features(features: np.ndarray, flipped: np.ndarray | None = None,
                   face_scores: np.ndarray | None = None) -> np.ndarray:
    """Per-image features: (feature + flip), L2-normalised, times the detector score when given."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {f.shape}")
    if flipped is not None:
        if np.shape(flipped) != f.shape:
            raise ValueError(f"flipped features {np.shape(flipped)} do not match features {f.shape}")
        f = f + np.asarray(flipped, dtype=np.float64)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} image features are all zeros")
    f = f / norms
    if face_scores is not None:
        scores = np.asarray(face_scores, dtype=np.float64).reshape(-1, 1)
        if scores.shape[0] != f.shape[0]:
            raise ValueError(f"{scores.shape[0]} face scores for {f.shape[0]} features")
        f = f * scores
    return f


def pool_templates(features: np.ndarray, templates: np.ndarray, medias: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(template ids [T] sorted, template features [T, D] L2-normalised) by media then template pooling."""
    templates, medias = np.asarray(templates).reshape(-1), np.asarray(medias).reshape(-1)
    if not features.shape[0] == templates.size == medias.size:
        raise ValueError(f"{features.shape[0]} feature rows but {templates.size} template ids and "
                         f"{medias.size} media ids: the face list and the features must align")
    # One group per (template, media): a media shared by two templates counts in each.
    keys = np.stack([templates, medias], axis=1)
    groups, group_of_image = np.unique(keys, axis=0, return_inverse=True)
    media_mean = _group_sums(features, group_of_image.reshape(-1)) / np.bincount(group_of_image.reshape(-1))[:, None]
    template_ids, template_of_group = np.unique(groups[:, 0], return_inverse=True)
    pooled = _group_sums(media_mean, template_of_group.reshape(-1))
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return template_ids, pooled / np.where(norms == 0, 1.0, norms)


def _group_sums(rows: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Float64 sum of the rows of each group 0..G-1 (torch's scatter-add: numpy's add.at is ~10x slower)."""
    sums = torch.zeros(int(group.max()) + 1, rows.shape[1], dtype=torch.float64)
    sums.index_add_(0, torch.from_numpy(np.ascontiguousarray(group, dtype=np.int64)),
                    torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float64)))
    return sums.numpy()


def score_pairs(template_ids: np.ndarray, template_features: np.ndarray, t1: np.ndarray, t2: np.ndarray,
                chunk: int = 100_000) -> np.ndarray:
    """Cosine of the template features of each pair (templates looked up by id)."""
    rows = []
    for t in (t1, t2):
        idx = np.searchsorted(template_ids, t).clip(max=template_ids.size - 1)
        missing = template_ids[idx] != t
        if missing.any():
            raise ValueError(f"{int(missing.sum())} pairs name templates absent from the face list "
                             f"(e.g. {int(np.asarray(t)[missing][0])}): use the face list of the same protocol")
        rows.append(idx)
    feats = template_features.astype(np.float32)  # halves the memory traffic of the row gathers
    scores = np.empty(rows[0].size)
    for start in range(0, scores.size, chunk):  # bounded memory for IJB-C's 15.7M pairs
        a = feats[rows[0][start:start + chunk]]
        b = feats[rows[1][start:start + chunk]]
        scores[start:start + chunk] = np.einsum("ij,ij->i", a, b)
    return scores


def evaluate_ijb(features: np.ndarray, face_list: str | Path, pair_list: str | Path,
                 flipped: np.ndarray | None = None, face_scores: np.ndarray | None = None,
                 fars: Sequence[float] = IJB_FARS) -> dict[str, Any]:
    """TAR at each FAR, AUC and ROC of template 1:1 verification (features in face-list order)."""
    _, templates, medias = read_face_list(face_list)
    t1, t2, labels = read_template_pairs(pair_list)
    feats = image_features(features, flipped, face_scores)
    template_ids, template_feats = pool_templates(feats, templates, medias)
    scores = score_pairs(template_ids, template_feats, t1, t2)
    fpr, tpr, _ = roc_curve(scores, labels)
    result: dict[str, Any] = {far_key(far): tar_at_far(scores, labels, far)[0] for far in fars}
    result.update(auc=roc_auc(scores, labels), num_pairs=int(scores.size),
                  num_templates=int(template_ids.size), roc=thin_roc(fpr, tpr))
    return result


def tar_table(results_by_name: Mapping[str, Mapping[str, Any]], fars: Sequence[float] = IJB_FARS) -> str:
    """Markdown table of TAR (%) at each FAR, one row per result."""
    header = "| method | " + " | ".join(f"{far:.0e}" for far in fars) + " |"
    lines = [header, "|---" * (len(fars) + 1) + "|"]
    for name, result in results_by_name.items():
        cells = [_percent(result.get(far_key(far), math.nan)) for far in fars]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def align_features(features: np.ndarray, names: Sequence[str], face_names: Sequence[str]) -> np.ndarray:
    """Rows of ``features`` (named by ``names``) reordered to follow the face list."""
    index = {Path(n).name: i for i, n in enumerate(names)}
    if len(index) != len(names):
        raise ValueError("feature names repeat a file name in different folders: embed one folder of crops")
    missing = [n for n in face_names if n not in index]
    if missing:
        raise ValueError(f"{len(missing)} faces of the face list have no feature (e.g. {missing[0]!r}): "
                         f"embed the whole IJB loose-crop folder")
    return features[[index[n] for n in face_names]]


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: evaluate features (``embed_folder`` output) on IJB metadata and print the table."""
    parser = argparse.ArgumentParser(description="IJB-B/IJB-C template 1:1 verification")
    parser.add_argument("--features", required=True, help=".npy of image features [N, D]")
    parser.add_argument("--names", help="text file of the image name of each feature row "
                                        "(default: rows already follow the face list)")
    parser.add_argument("--faces", required=True, help="*_face_tid_mid.txt")
    parser.add_argument("--pairs", required=True, help="*_template_pair_label.txt")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (OSError, ValueError) as err:  # a wrong path or a malformed file: one line, not a traceback
        print(f"ijb: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    features = np.load(args.features)
    face_names, _, _ = read_face_list(args.faces)
    if args.names:
        names = Path(args.names).read_text().splitlines()
        features = align_features(features, names, face_names)
    print(f"scoring {len(face_names)} faces against {args.pairs}", file=sys.stderr)
    result = evaluate_ijb(features, args.faces, args.pairs)
    print(tar_table({Path(args.features).stem: result}))
    from .report import format_results
    print(format_results({k: v for k, v in result.items() if k in ("auc", "num_pairs", "num_templates")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
