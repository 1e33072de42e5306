"""Template-based open-set 1:N identification in the IJB-B / IJB-C protocol.

Metadata, in the NIST layout (one CSV row per image of a template, with a header naming the
columns; only ``TEMPLATE_ID`` and ``SUBJECT_ID`` are read):

- ``ijbc_1N_gallery_G1.csv`` and ``ijbc_1N_gallery_G2.csv`` (IJB-B: ``ijbb_1N_gallery_S1.csv``,
  ``..._S2.csv``): two disjoint galleries, one template per subject;
- ``ijbc_1N_probe_mixed.csv``: the probe templates (stills and video frames), of subjects of
  either gallery.

Template features are pooled exactly as for 1:1 verification (:mod:`train.evaluation.ijb`),
from the image features in the order of ``*_face_tid_mid.txt``. Each probe template is searched
in each gallery: probes of the other gallery's subjects are the non-mated searches that set the
FPIR threshold. Reported per gallery: rank-1/5/10 (CMC over mated probes) and TPIR at FPIR
1e-2 and 1e-1 (definitions in :mod:`train.evaluation.identification`), and their mean over the
galleries.

    python -m train.evaluation.ijb_1n --features emb.npy --names emb.txt --faces ijbc_face_tid_mid.txt \
        --gallery ijbc_1N_gallery_G1.csv ijbc_1N_gallery_G2.csv --probes ijbc_1N_probe_mixed.csv
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .identification import (
    IDENT_FPIRS,
    IDENT_RANKS,
    fpir_key,
    identification_metrics,
    rank_key,
    search,
)
from .ijb import align_features, image_features, pool_templates, read_face_list


def read_1n_templates(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(template ids [T] sorted, subject ids [T]) of a 1:N gallery or probe CSV (one row per image)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty: expected a header with TEMPLATE_ID and SUBJECT_ID")
        columns = {name.strip().upper(): i for i, name in enumerate(header)}
        if "TEMPLATE_ID" not in columns or "SUBJECT_ID" not in columns:
            raise ValueError(f"{path}: the header {header[:4]} lacks TEMPLATE_ID or SUBJECT_ID "
                             f"(a 1:N gallery/probe CSV of the NIST IJB layout)")
        t_col, s_col = columns["TEMPLATE_ID"], columns["SUBJECT_ID"]
        subject_of: dict[int, int] = {}
        for lineno, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                template, subject = int(row[t_col]), int(row[s_col])
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{lineno}: TEMPLATE_ID and SUBJECT_ID must be integers, "
                                 f"got {row[:max(t_col, s_col) + 1]}") from None
            if subject < 0:
                raise ValueError(f"{path}:{lineno}: SUBJECT_ID {subject} is negative")
            known = subject_of.setdefault(template, subject)
            if known != subject:
                raise ValueError(f"{path}:{lineno}: template {template} is listed with subjects {known} "
                                 f"and {subject}; a template shows one subject")
    if not subject_of:
        raise ValueError(f"{path} lists no templates")
    ids = np.array(sorted(subject_of), dtype=np.int64)
    return ids, np.array([subject_of[t] for t in ids.tolist()], dtype=np.int64)


def template_rows(template_ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Rows of ``wanted`` templates in the sorted ``template_ids``, with an error naming a missing one."""
    idx = np.searchsorted(template_ids, wanted).clip(max=template_ids.size - 1)
    missing = template_ids[idx] != wanted
    if missing.any():
        raise ValueError(f"{int(missing.sum())} templates of {what} are absent from the face list "
                         f"(e.g. {int(wanted[missing][0])}): use the face list of the same protocol")
    return idx


def evaluate_ijb_1n(features: np.ndarray, face_list: str | Path,
                    galleries: Sequence[str | Path] | Mapping[str, str | Path],
                    probes: str | Path, flipped: np.ndarray | None = None, face_scores: np.ndarray | None = None,
                    fpirs: Sequence[float] = IDENT_FPIRS, ranks: Sequence[int] = IDENT_RANKS) -> dict[str, Any]:
    """Per-gallery 1:N results (and ``mean`` over galleries) of features in face-list order.

    ``galleries`` maps a name to a gallery CSV; a plain list is named by the files' last ``_`` field
    (``ijbc_1N_gallery_G1.csv`` -> ``G1``).
    """
    if not isinstance(galleries, Mapping):
        galleries = {Path(g).stem.rsplit("_", 1)[-1]: g for g in galleries}
    if not galleries:
        raise ValueError("give at least one gallery CSV")
    _, templates, medias = read_face_list(face_list)
    feats = image_features(features, flipped, face_scores)
    template_ids, template_feats = pool_templates(feats, templates, medias)
    probe_ids, probe_subjects = read_1n_templates(probes)
    probe_feats = template_feats[template_rows(template_ids, probe_ids, Path(probes).name)]
    results: dict[str, Any] = {}
    for name, path in galleries.items():
        gallery_ids, gallery_subjects = read_1n_templates(path)
        overlap = np.intersect1d(gallery_ids, probe_ids)
        if overlap.size:
            raise ValueError(f"template {int(overlap[0])} is both in gallery {Path(path).name} and a probe: "
                             f"galleries and probes must be disjoint")
        gallery_feats = template_feats[template_rows(template_ids, gallery_ids, Path(path).name)]
        found = search(probe_feats, probe_subjects, gallery_feats, gallery_subjects)
        results[name] = identification_metrics(found, fpirs, ranks)
        results[name]["num_gallery"] = float(gallery_ids.size)
    if len(results) > 1:
        keys = [rank_key(r) for r in ranks] + [fpir_key(f) for f in fpirs]
        results["mean"] = {k: float(np.mean([results[n][k] for n in galleries])) for k in keys}
    return results


def ident_table(results: Mapping[str, Mapping[str, Any]], fpirs: Sequence[float] = IDENT_FPIRS,
                ranks: Sequence[int] = IDENT_RANKS) -> str:
    """Markdown table (%): one row per gallery, rank-r rates then TPIR at each FPIR."""
    header = ("| gallery | " + " | ".join(f"rank-{r}" for r in ranks) + " | "
              + " | ".join(f"TPIR@FPIR={f:.0e}" for f in fpirs) + " |")
    lines = [header, "|---" * (1 + len(ranks) + len(fpirs)) + "|"]
    for name, result in results.items():
        values = [result.get(rank_key(r), math.nan) for r in ranks] + [result.get(fpir_key(f), math.nan) for f in fpirs]
        lines.append(f"| {name} | " + " | ".join("n/a" if math.isnan(v) else f"{100 * v:.2f}" for v in values) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: 1:N identification of features (``embed_folder`` output) on IJB metadata."""
    parser = argparse.ArgumentParser(description="IJB-B/IJB-C template 1:N identification (open set)")
    parser.add_argument("--features", required=True, help=".npy of image features [N, D]")
    parser.add_argument("--names", help="text file of the image name of each feature row "
                                        "(default: rows already follow the face list)")
    parser.add_argument("--faces", required=True, help="*_face_tid_mid.txt (the pooling of templates)")
    parser.add_argument("--gallery", nargs="+", required=True, help="gallery CSVs, e.g. ijbc_1N_gallery_G1.csv G2.csv")
    parser.add_argument("--probes", required=True, help="probe CSV, e.g. ijbc_1N_probe_mixed.csv")
    args = parser.parse_args(argv)
    features = np.load(args.features)
    face_names, _, _ = read_face_list(args.faces)
    if args.names:
        features = align_features(features, Path(args.names).read_text().splitlines(), face_names)
    print(f"searching the probes of {args.probes} in {len(args.gallery)} galleries", file=sys.stderr)
    results = evaluate_ijb_1n(features, args.faces, args.gallery, args.probes)
    print(ident_table(results))
    for name, r in results.items():
        if "num_mated" in r:
            print(f"{name}: {int(r['num_gallery'])} gallery templates, {int(r['num_mated'])} mated and "
                  f"{int(r['num_nonmated'])} non-mated probe templates")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
