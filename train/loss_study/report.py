"""The loss study's results table: ``results.csv`` (every number) and ``results.md`` (a readable table)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from data_pipeline.formats.manifest import atomic_write_bytes

from .losses import StudyLoss

CSV_COLUMNS = ("loss", "seed", "trained_as", "verification_set", "accuracy", "accuracy_std", "tar_at_far_1e-3",
               "auc", "intra_angle_deg", "inter_angle_deg", "inter_over_intra", "train_s", "job_s", "final_loss",
               "steps", "paper")
"""``results.csv``: one row per run (loss and seed); ``accuracy_std`` is the spread over the 10 folds."""

SUMMARY_COLUMNS = ("loss", "seeds", "accuracy", "accuracy_seed_std", "tar_at_far_1e-3", "tar_at_far_1e-3_seed_std",
                   "intra_angle_deg", "intra_angle_deg_seed_std", "inter_angle_deg", "inter_angle_deg_seed_std",
                   "inter_over_intra", "inter_over_intra_seed_std", "train_s")
"""``results_summary.csv``: one row per loss, means and standard deviations over the seeds."""

_AGGREGATED = (("accuracy", "accuracy"), ("tar_at_far_1e-3", "tar@far=1e-03"), ("intra_angle_deg", "intra_angle"),
               ("inter_angle_deg", "inter_angle"), ("inter_over_intra", "ratio"), ("train_s", "train_s"))


def _number(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def seed_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1) over the seeds' records, per measured number.

    ``<column>`` holds the mean, ``<column>_seed_std`` the spread (None with fewer than two seeds),
    ``seeds`` how many records went in; numbers missing from a record are left out of its column.
    """
    out: dict[str, Any] = {"seeds": len(records),
                           "verification_set": next((r["verification_set"] for r in records
                                                     if r.get("verification_set")), "")}
    for column, src in _AGGREGATED:
        values = [v for v in (_number(r.get(src)) for r in records) if v is not None]
        mean = sum(values) / len(values) if values else None
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) \
            if mean is not None and len(values) > 1 else None
        out[column], out[f"{column}_seed_std"] = mean, std
    return out


def indistinguishable_from_best(summary: dict[str, dict[str, Any]], column: str = "accuracy") -> list[str]:
    """Losses whose mean ± std interval of ``column`` overlaps the best mean's interval (best first).

    With one seed there is no interval and only the best itself is returned.
    """
    rows = {k: v for k, v in summary.items() if v.get(column) is not None}
    if not rows:
        return []
    best = max(rows, key=lambda k: rows[k][column])
    spread = rows[best].get(f"{column}_seed_std") or 0.0
    low = rows[best][column] - spread
    close = [k for k, v in rows.items() if k != best and v[column] + (v.get(f"{column}_seed_std") or 0.0) >= low]
    return [best] + sorted(close, key=lambda k: -rows[k][column])


def result_row(loss: StudyLoss, record: Optional[dict[str, Any]]) -> dict[str, Any]:
    """One CSV row: the loss's entry and one run's measured numbers (None where missing)."""
    r = record or {}
    row = {"loss": loss.name, "seed": r.get("seed"), "trained_as": loss.trained_as, "paper": loss.paper,
           "verification_set": r.get("verification_set", "")}
    for key, src in (("accuracy", "accuracy"), ("accuracy_std", "accuracy_std"),
                     ("tar_at_far_1e-3", "tar@far=1e-03"), ("auc", "auc"), ("intra_angle_deg", "intra_angle"),
                     ("inter_angle_deg", "inter_angle"), ("inter_over_intra", "ratio"), ("train_s", "train_s"),
                     ("job_s", "job_s"), ("final_loss", "final_loss"), ("steps", "steps")):
        row[key] = _number(r.get(src))
    return row


def _fmt(value: Optional[float], spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def _with_spread(mean: Optional[float], std: Optional[float], spec: str, scale: float = 1.0) -> str:
    text = _fmt(mean, spec, scale)
    return text if mean is None or std is None else f"{text} ± {format(std * scale, spec)}"


def markdown_table(losses: Sequence[StudyLoss], summary: dict[str, dict[str, Any]]) -> str:
    """The results as a Markdown table: mean ± std over the seeds (percentages, degrees, seconds)."""
    sets = sorted({v["verification_set"] for v in summary.values() if v.get("verification_set")})
    where = f" on {', '.join(sets)}" if sets else ""
    lines = [f"| loss | trained as | seeds | verification accuracy{where} (%) | TAR@FAR=1e-3 (%) | "
             "intra-class angle (°) | nearest inter-class centre angle (°) | inter / intra | train time (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for loss in losses:
        r = summary.get(loss.name) or {}
        cells = [_with_spread(r.get("accuracy"), r.get("accuracy_seed_std"), ".2f", 100.0),
                 _with_spread(r.get("tar_at_far_1e-3"), r.get("tar_at_far_1e-3_seed_std"), ".1f", 100.0),
                 _with_spread(r.get("intra_angle_deg"), r.get("intra_angle_deg_seed_std"), ".1f"),
                 _with_spread(r.get("inter_angle_deg"), r.get("inter_angle_deg_seed_std"), ".1f"),
                 _with_spread(r.get("inter_over_intra"), r.get("inter_over_intra_seed_std"), ".2f"),
                 _fmt(r.get("train_s"), ".0f")]
        lines.append(f"| {loss.name} | {loss.trained_as} | {r.get('seeds', 0)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ranking_note(summary: dict[str, dict[str, Any]]) -> str:
    """One sentence on which losses lead the verification accuracy, following the seed intervals."""
    leaders = indistinguishable_from_best(summary)
    if not leaders:
        return ""
    best = leaders[0]
    if summary[best].get("accuracy_seed_std") is None:
        return (f"Highest verification accuracy: {best} (a single seed: no interval, so no ranking "
                "claim beyond this run).")
    if len(leaders) == 1:
        return f"Highest verification accuracy: {best}, its mean ± std interval clear of every other loss's."
    return (f"Highest mean verification accuracy: {best}; indistinguishable from it (mean ± std intervals "
            f"overlap): {', '.join(leaders[1:])}.")


def _csv(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    return buf.getvalue().encode()


def write_results(losses: Sequence[StudyLoss], summary: dict[str, dict[str, Any]],
                  runs: Sequence[tuple[StudyLoss, dict[str, Any]]], out_dir: Path,
                  header: str = "") -> tuple[Path, Path]:
    """Write ``results.csv`` (one row per run), ``results_summary.csv`` and ``results.md`` (one row per
    loss, in ``losses`` order; unfinished losses show —)."""
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    atomic_write_bytes(csv_path, _csv(CSV_COLUMNS, [result_row(loss, r) for loss, r in runs]))
    atomic_write_bytes(out_dir / "results_summary.csv",
                       _csv(SUMMARY_COLUMNS, [{"loss": loss.name, **summary.get(loss.name, {})} for loss in losses]))
    note = ranking_note(summary)
    text = "# Loss study\n\n" + (header.strip() + "\n\n" if header else "") + markdown_table(losses, summary) + \
        ("\n" + note + "\n" if note else "")
    atomic_write_bytes(md_path, text.encode())
    return csv_path, md_path
