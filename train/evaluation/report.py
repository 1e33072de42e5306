"""One number format for verification results, wherever they are printed or written.

Human output (console, logs, tables): accuracies, TAR@FAR and AUC as percentages with two
decimals (``accuracy 98.25%``), counts as integers (``num_pairs 2000``), thresholds with four
decimals.  JSON files and W&B keep fractions; a metric that could not be measured (a TAR at a
FAR too small for the number of impostor pairs) is ``null`` in JSON and ``n/a`` on screen.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

COUNT_KEYS = frozenset({"num_pairs", "num_templates", "num_faces",
                        "num_gallery", "num_mated", "num_nonmated", "num_probes", "num_enrolled"})
"""Result keys that count things: shown and stored as integers."""


def is_fraction(key: str) -> bool:
    """Whether ``key`` is a rate in [0, 1] (shown as a percentage): accuracy, AUC, TAR, rank-k, TPIR."""
    return (key in ("accuracy", "accuracy_std", "auc") or key.startswith(("tar@", "tpir@"))
            or (key.startswith("rank") and key[4:].isdigit()))


def format_value(key: str, value: Any) -> str:
    """One value in the human format."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if key in COUNT_KEYS:
        return f"{int(value)}"
    if is_fraction(key):
        return f"{100 * float(value):.2f}%"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{float(value):.4f}"


def format_results(values: Mapping[str, Any]) -> str:
    """``accuracy 98.25%, accuracy_std 0.40%, threshold 0.3120, ..., num_pairs 2000``."""
    return ", ".join(f"{k} {format_value(k, v)}" for k, v in values.items()
                     if v is None or isinstance(v, (int, float)))


def json_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar entries for a JSON file: fractions as fractions, counts as ints, NaN/inf as None."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if k in COUNT_KEYS:
            out[k] = int(v)
        else:
            out[k] = float(v) if math.isfinite(v) else None
    return out


def json_tree(doc: Any) -> Any:
    """``doc`` (nested dicts, lists, numbers, numpy scalars) with every NaN/inf as None, for :func:`write_json`."""
    if isinstance(doc, Mapping):
        return {str(k): json_tree(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [json_tree(v) for v in doc]
    if hasattr(doc, "tolist") and not isinstance(doc, (str, bytes)):  # numpy scalars and arrays
        return json_tree(doc.tolist())
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    return doc


def write_json(path: str | Path, doc: Any) -> Path:
    """Write ``doc`` as strict JSON (``allow_nan=False``: a NaN left in it is a bug, not a file)."""
    path = Path(path)
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return path
