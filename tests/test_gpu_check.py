"""bench/gpu_check.py: the dry run on the CPU writes every section; sections are guarded and budgeted."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from partial_fc import PartialFC

REPO = Path(__file__).resolve().parent.parent


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^### (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


@pytest.mark.slow
def test_cpu_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu-dry-run", "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert text.count("## GPU\n") == 1
    sections = _sections(text)
    assert list(sections) == [title for title, _ in gpu_check.SECTIONS]
    for title, body in sections.items():
        assert not body.strip().startswith(("error", "skipped")), (title, body[:300])
    assert "CPU (dry run)" in sections["Setup"]
    rows = [ln for ln in sections["Backbone and full step"].splitlines() if ln.startswith("| ")][1:]
    sizes = gpu_check.DRY_SIZES
    assert len(rows) == len(sizes.batches) * (1 + len(sizes.rates))
    assert all(re.search(r"\| [\d,]+ \|", r) and "error" not in r for r in rows)
    floor = sections["Classifier step against its floor"]
    assert floor.count("x |") >= 5 and "error" not in floor
    # The simulated memory holds 3000 classes of bf16 rows + momentum: the search must bracket it.
    capacity = sections["Largest classifier next to the backbone"]
    found = int(re.search(r"^\| ([\d,]+) \|", capacity, re.M).group(1).replace(",", ""))
    assert 3000 / 1.05 <= found <= 3000
    syncs = sections["Host syncs per step"]
    assert "this script's step" in syncs and "TrainStep" in syncs and "error" not in syncs
    assert "all-gather" in sections["NCCL at world size 1"] and "exactly" in sections["NCCL at world size 1"]


def _run(budget: float) -> gpu_check.Run:
    return gpu_check.Run(torch.device("cpu"), gpu_check.DRY_SIZES, budget, None)


def test_a_failing_section_is_recorded_and_the_rest_runs():
    published = []

    def broken(run):
        raise ValueError("no such thing")

    body = gpu_check.run_sections(_run(60.0), [("first", broken), ("second", lambda run: "fine")],
                                  published.append)
    sections = _sections(body)
    assert sections["first"].strip().startswith("error: ValueError: no such thing")
    assert sections["second"].strip().startswith("fine")
    assert len(published) == 2 and "### first" in published[0] and "### second" not in published[0]


def test_the_time_budget_skips_what_is_left():
    calls = []
    body = gpu_check.run_sections(_run(0.0), [("only", lambda run: calls.append(1) or "ran")], lambda _: None)
    assert calls == [] and "skipped: the time budget of 0 s" in body


def test_compute_dtype_is_passed_when_partial_fc_takes_it(monkeypatch):
    run = _run(60.0)
    seen = {}
    real_init = PartialFC.__init__

    def init(self, *args, compute_dtype=None, **kwargs):
        seen["compute_dtype"] = compute_dtype
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(PartialFC, "__init__", init)
    assert gpu_check.head_takes_compute_dtype()
    head, _ = gpu_check.build_classifier(run, 100, 0.5, torch.bfloat16)
    assert seen["compute_dtype"] == torch.bfloat16 and head.weight.dtype == torch.bfloat16
    assert isinstance(gpu_check.head_context(run), contextlib.nullcontext)  # no autocast around it then
