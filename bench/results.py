"""Write one benchmark's section of bench/RESULTS.md, leaving the other sections alone."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Optional

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEach section is written by the script named in it; re-run the script to refresh it.\n"


def machine_description() -> str:
    """A one-line description of the machine the numbers come from."""
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
        torch_version = torch.__version__
    except ImportError:  # pragma: no cover
        torch_version = "absent"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU, torch {torch_version}"


def results_path() -> Path:
    """Where sections go: ``SHARDFACE_BENCH_RESULTS`` (set by ``shardface bench --results``), else bench/RESULTS.md."""
    chosen = os.environ.get("SHARDFACE_BENCH_RESULTS")
    return Path(chosen) if chosen else RESULTS


def write_section(title: str, body: str, path: Optional[Path] = None) -> None:
    """Replace (or append) the ``## title`` section of the results file (:func:`results_path`) with ``body``."""
    path = Path(path) if path is not None else results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text.rstrip() + "\n")
    os.replace(tmp, path)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table from a header row and value rows."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
