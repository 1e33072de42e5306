"""``shardface eval-ijb``: IJB-B/IJB-C template 1:1 verification, or 1:N identification, of embedded faces."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


def _load_features(path: str | Path, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p} does not exist (write it with `shardface embed`)")
    try:
        return np.load(p, allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{what} {p} is not a .npy array ({err})") from None


def read_face_scores(path: str | Path, num_faces: int) -> np.ndarray:
    """Detector scores, one per face in face-list order: a .npy, or text whose last column is the score
    (IJB's ``*_name_5pts_score.txt``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"face scores {p} do not exist")
    if p.suffix == ".npy":
        scores = np.load(p, allow_pickle=False).reshape(-1).astype(np.float64)
    else:
        values = []
        for lineno, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    values.append(float(line.split()[-1]))
                except ValueError:
                    raise ValueError(f"{p}:{lineno}: the last column must be the detector score, "
                                     f"got {line.split()[-1]!r}") from None
        scores = np.asarray(values, dtype=np.float64)
    if scores.size != num_faces:
        raise ValueError(f"{p} has {scores.size} scores for the face list's {num_faces} faces")
    return scores


def _features_in_face_order(features: str, faces: str, names: Optional[str], flipped: Optional[str]
                             ) -> tuple[np.ndarray, Optional[np.ndarray], list[str]]:
    """The features (and flipped ones) in face-list order, and the face list's image names."""
    from train.evaluation.ijb import align_features, read_face_list
    face_names, _, _ = read_face_list(faces)
    feats = _load_features(features, "features")
    flips = _load_features(flipped, "flipped features") if flipped else None
    if names:
        listed = Path(names).read_text().splitlines()
        feats = align_features(feats, listed, face_names)
        if flips is not None:
            flips = align_features(flips, listed, face_names)
    elif feats.shape[0] != len(face_names):
        raise ValueError(f"{features} has {feats.shape[0]} rows but {faces} lists {len(face_names)} faces: "
                         "pass --names (the .txt that `shardface embed` writes beside the .npy)")
    return feats, flips, face_names


def _check_files(*files: tuple[Optional[str], str]) -> None:
    for path, what in files:
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{what} {path} does not exist")


def run_ijb(features: str, faces: str, pairs: str, names: Optional[str] = None, flipped: Optional[str] = None,
            face_scores: Optional[str] = None, out: Optional[str] = None) -> dict:
    """Score the features on the IJB metadata; print the TAR table and write results.json when asked."""
    from train.evaluation.ijb import evaluate_ijb, read_template_pairs, tar_table
    from train.evaluation.report import format_results, json_values, write_json
    _check_files((faces, "face list"), (pairs, "template pair list"))
    read_template_pairs(pairs)  # a bad pair list is found before any scoring
    feats, flips, face_names = _features_in_face_order(features, faces, names, flipped)
    scores = read_face_scores(face_scores, len(face_names)) if face_scores else None
    result = evaluate_ijb(feats, faces, pairs, flipped=flips, face_scores=scores)
    print("TAR (%) at FAR:")
    print(tar_table({Path(features).stem: result}))
    print(format_results({k: v for k, v in result.items() if k in ("auc", "num_pairs", "num_templates")}))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, json_values({k: v for k, v in result.items() if k != "roc"}))
        print(f"results: {out}")
    return result


def run_ijb_1n(features: str, faces: str, galleries: list[str], probes: str, names: Optional[str] = None,
               flipped: Optional[str] = None, face_scores: Optional[str] = None, out: Optional[str] = None) -> dict:
    """Open-set 1:N identification of the probe templates in each gallery; print the rank/TPIR table
    (percentages) and write results.json (fractions, one entry per gallery and ``mean``) when asked."""
    from train.evaluation.ijb_1n import evaluate_ijb_1n, ident_table, read_1n_templates
    from train.evaluation.report import format_results, json_values, write_json
    _check_files((faces, "face list"), (probes, "probe template list"),
                 *((g, "gallery template list") for g in galleries))
    for path in (probes, *galleries):
        read_1n_templates(path)  # a bad template list is found before any searching
    feats, flips, face_names = _features_in_face_order(features, faces, names, flipped)
    scores = read_face_scores(face_scores, len(face_names)) if face_scores else None
    results = evaluate_ijb_1n(feats, faces, galleries, probes, flipped=flips, face_scores=scores)
    print("1:N identification (%): rank-k, and TPIR at FPIR (open set):")
    print(ident_table(results))
    for name, r in results.items():
        counts = {k: r[k] for k in ("num_gallery", "num_mated", "num_nonmated") if k in r}
        if counts:
            print(f"{name}: {format_results(counts)}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json(out, {name: json_values(r) for name, r in results.items()})
        print(f"results: {out}")
    return results
