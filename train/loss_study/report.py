"""The loss study's results table: ``results.csv`` (every number) and ``results.md`` (a readable table)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from data_pipeline.manifest import atomic_write_bytes

from .losses import StudyLoss

CSV_COLUMNS = ("loss", "trained_as", "verification_set", "accuracy", "accuracy_std", "tar_at_far_1e-3", "auc",
               "intra_angle_deg", "inter_angle_deg", "inter_over_intra", "train_s", "job_s", "final_loss",
               "steps", "paper")


def _number(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def result_row(loss: StudyLoss, record: Optional[dict[str, Any]]) -> dict[str, Any]:
    """One CSV row: the loss's entry and its measured numbers (None where missing)."""
    r = record or {}
    row = {"loss": loss.name, "trained_as": loss.trained_as, "paper": loss.paper,
           "verification_set": r.get("verification_set", "")}
    for key, src in (("accuracy", "accuracy"), ("accuracy_std", "accuracy_std"),
                     ("tar_at_far_1e-3", "tar@far=1e-03"), ("auc", "auc"), ("intra_angle_deg", "intra_angle"),
                     ("inter_angle_deg", "inter_angle"), ("inter_over_intra", "ratio"), ("train_s", "train_s"),
                     ("job_s", "job_s"), ("final_loss", "final_loss"), ("steps", "steps")):
        row[key] = _number(r.get(src))
    return row


def _fmt(value: Optional[float], spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table (percentages, degrees, seconds)."""
    sets = sorted({r["verification_set"] for r in rows if r["verification_set"]})
    where = f" on {', '.join(sets)}" if sets else ""
    lines = [f"| loss | trained as | verification accuracy{where} (%) | TAR@FAR=1e-3 (%) | "
             "intra-class angle (°) | nearest inter-class centre angle (°) | inter / intra | train time (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = _fmt(r["accuracy"], ".2f", 100.0)
        if r["accuracy"] is not None and r["accuracy_std"] is not None:
            acc += f" ± {r['accuracy_std'] * 100:.2f}"
        lines.append(f"| {r['loss']} | {r['trained_as']} | {acc} | {_fmt(r['tar_at_far_1e-3'], '.1f', 100.0)} | "
                     f"{_fmt(r['intra_angle_deg'], '.1f')} | {_fmt(r['inter_angle_deg'], '.1f')} | "
                     f"{_fmt(r['inter_over_intra'], '.2f')} | {_fmt(r['train_s'], '.0f')} |")
    return "\n".join(lines) + "\n"


def write_results(losses: Sequence[StudyLoss], records: dict[str, dict[str, Any]], out_dir: Path,
                  header: str = "") -> tuple[Path, Path]:
    """Write ``results.csv`` and ``results.md`` (rows in ``losses`` order; unfinished losses show —)."""
    rows = [result_row(loss, records.get(loss.name)) for loss in losses]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in CSV_COLUMNS})
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    text = "# Loss study\n\n" + (header.strip() + "\n\n" if header else "") + markdown_table(rows)
    atomic_write_bytes(md_path, text.encode())
    return csv_path, md_path
