"""Resumable jobs of a study: each job writes a done marker atomically; a re-run skips marked jobs.

A marker holds the job's settings (``fingerprint``) and its result record.  A marker made
with other settings is refused rather than silently reused or overwritten.  Jobs run one
after another or ``parallel`` at a time (threads that wait on subprocesses); a failed job
leaves no marker, the others go on, and the failures are returned.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from data_pipeline.formats.manifest import atomic_write_bytes

MARKER_FORMAT = 1


class StudyMismatchError(ValueError):
    """A done marker was written with other settings than the ones asked for now."""


@dataclass
class Job:
    """A unit of resumable work."""

    key: str
    """Unique name, e.g. ``main/arcface``."""
    marker: Path
    """The done marker (JSON) written when ``run`` returns."""
    fingerprint: dict[str, Any]
    """Settings that determine the result; a marker with other settings is an error."""
    run: Callable[[], dict[str, Any]]
    """Does the work and returns the record stored in the marker."""
    describe: Callable[[dict[str, Any]], str] = lambda record: ""
    """One-line summary of a record for the progress line."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader sees the old file or the complete new one (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(data, indent=1, allow_nan=True).encode())


def read_marker(job: Job) -> Optional[dict[str, Any]]:
    """The record of a finished job, None if it has not finished; mismatching settings raise."""
    if not job.marker.is_file():
        return None
    data = json.loads(job.marker.read_text())
    if data.get("format") != MARKER_FORMAT or data.get("fingerprint") != job.fingerprint:
        old = data.get("fingerprint", {})
        diff = sorted(k for k in set(old) | set(job.fingerprint) if old.get(k) != job.fingerprint.get(k))
        raise StudyMismatchError(
            f"{job.marker} was written with other settings ({', '.join(diff) or 'format'} differ: "
            f"{', '.join(f'{k}={old.get(k)!r}' for k in diff[:3])}): use another --out, or delete "
            f"{job.marker.parent} to redo that job")
    return data["record"]


def format_seconds(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12.3s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


def run_jobs(jobs: list[Job], parallel: int = 1, stream: TextIO | None = None, title: str = "",
             on_done: Optional[Callable[[Job, dict[str, Any]], None]] = None
             ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Run the jobs not yet marked done; returns (records by key, error messages by key).

    A progress line is printed when each job is skipped, finishes or fails; ``on_done`` is
    called in the calling thread after each finished or skipped job.
    """
    if parallel < 1:
        raise ValueError(f"--parallel={parallel} must be at least 1")
    out = stream if stream is not None else sys.stdout
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate job keys in {keys}")
    records: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    total, counter = len(jobs), [0]

    def report(job: Job, text: str) -> None:
        counter[0] += 1
        print(f"[{title}{counter[0]}/{total}] {job.key}: {text}", file=out, flush=True)

    todo = []
    for job in jobs:
        record = read_marker(job)
        if record is None:
            todo.append(job)
            continue
        records[job.key] = record
        report(job, f"done earlier, skipped ({job.describe(record)})")
        if on_done:
            on_done(job, record)

    def execute(job: Job) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        record = job.run()
        return record, time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        pending: dict[Future, Job] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < parallel:
                job = queue.pop(0)
                pending[pool.submit(execute, job)] = job
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                job = pending.pop(future)
                try:
                    record, seconds = future.result()
                except Exception as err:  # noqa: BLE001 - one failed job must not stop the others
                    errors[job.key] = f"{type(err).__name__}: {err}"
                    report(job, f"FAILED: {errors[job.key]}")
                    continue
                record = dict(record, job_s=seconds)
                write_json_atomic(job.marker, {"format": MARKER_FORMAT, "fingerprint": job.fingerprint,
                                               "record": record})
                records[job.key] = record
                report(job, f"{job.describe(record)} [{format_seconds(seconds)}]")
                if on_done:
                    on_done(job, record)
    return records, errors


def run_logged(cmd: list[str], log_path: Path, env: Optional[dict[str, str]] = None,
               cwd: Optional[Path] = None) -> None:
    """Run ``cmd`` with stdout and stderr into ``log_path``; a non-zero exit raises with the log's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if code != 0:
        raise RuntimeError(f"exit code {code}: {failure_reason(log_path.read_text(errors='replace'))} "
                           f"(full log: {log_path})")


# torchrun's own report of a failed worker: never the reason itself.
_LAUNCHER_NOISE = ("ChildFailedError", "error_file", "torch.distributed.elastic", "errors.html")


def failure_reason(log: str) -> str:
    """The line of a training log that says why it failed (the last error line of a worker)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"(Error|Exception|error:)", ln)
              and not any(noise in ln for noise in _LAUNCHER_NOISE)]
    if errors:
        return errors[-1]
    return lines[-1] if lines else "no output"
