"""Training stall per checkpoint save: synchronous vs background (``checkpoint.async_save``).

One process, a realistic state: a Partial FC classifier shard (ArcFace, D = 512, W = 1)
with its SGD-momentum row optimiser, plus a small backbone and its optimiser, passed to
:class:`train.checkpoint.CheckpointManager` as the trainer passes them (``ClassifierState``
in the rank's components, progress and header values in the shared ones).  Checkpoints go
to a temporary folder on the local disk, removed afterwards.  Per configuration:

- ``stall s``: seconds the calling (training) thread is blocked in ``save`` (median of
  ``--saves``); for a synchronous save that is the whole write;
- ``published s``: for a background save, seconds from the call until ``wait()`` returns
  (the checkpoint is on disk and published);
- ``step slowdown``: a training-like workload (fixed matrix products) timed while the
  background write runs, over the same workload without a write, measured in alternation.

The classifier state is cloned on collection (and again for a background save), so the
peak memory is about three times the rows' bytes: the default sizes keep that within a
shared machine (1M classes in bfloat16, 500k classes in float32).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results import machine_description, markdown_table, results_path, write_section  # noqa: E402
from partial_fc import PartialFC, build_head_optimizer  # noqa: E402
from partial_fc.margins import ArcFace  # noqa: E402
from train.checkpoint import CheckpointManager  # noqa: E402
from train.components import ClassifierState  # noqa: E402
from train.distributed import DistContext  # noqa: E402
from train.stateful import TrainingProgress  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _build_state(classes: int, dim: int, dtype: torch.dtype):
    head = PartialFC(dim, classes, ArcFace(s=64.0, m=0.5), sample_rate=0.1, param_dtype=dtype)
    opt = build_head_optimizer(head, "sgd", lr=0.1)
    # Fill every row's momentum (a long-running optimiser has touched them all).
    for _, buf in opt.state_rows().items():
        buf.normal_()
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(64 * 10 * 10, 2048), torch.nn.ReLU(),
                                   torch.nn.Linear(2048, dim))
    bopt = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    backbone(torch.randn(2, 3, 12, 12)).sum().backward()
    bopt.step()
    shared = {"num_classes": classes, "config": "bench", "class_ranges": [(0, classes)],
              "progress": TrainingProgress()}
    local = {"classifier": ClassifierState(head, opt), "backbone": backbone, "backbone_opt": bopt}
    row_bytes = head.weight.numel() * head.weight.element_size() + \
        sum(b.numel() * b.element_size() for b in opt.state_rows().values())
    return shared, local, row_bytes


def _workload(steps: int, a: torch.Tensor, b: torch.Tensor) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        torch.mm(a, b)
    return (time.perf_counter() - t0) / steps


def _measure(classes: int, dim: int, dtype_name: str, saves: int, work_steps: int, root: Path) -> dict:
    shared, local, row_bytes = _build_state(classes, dim, DTYPES[dtype_name])
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), group=None, backend="none")
    a, b = torch.randn(128, dim), torch.randn(dim, 2048)
    out = {"classes": classes, "dtype": dtype_name, "row_gib": row_bytes / 2**30}
    step = 0

    sync = CheckpointManager(root / "sync", ctx, keep_last=1)
    stalls = []
    for _ in range(saves):
        step += 1
        sync.save(step, shared, local)
        sync.wait()
        stalls.append(sync.last_stall_s)
    out["sync_stall"] = statistics.median(stalls)

    bg = CheckpointManager(root / "async", ctx, keep_last=1, asynchronous=True)
    stalls, published, slow = [], [], []
    for _ in range(saves):
        step += 1
        base = _workload(work_steps, a, b)  # the same workload with no write, just before
        t0 = time.perf_counter()
        bg.save(step, shared, local, background=True)
        stalls.append(bg.last_stall_s)
        during, n = [], 0
        while bg.writing:
            during.append(_workload(1, a, b))
            n += 1
        bg.wait()
        published.append(time.perf_counter() - t0)
        if during:
            slow.append(statistics.median(during) / base)
    out["async_stall"] = statistics.median(stalls)
    out["async_published"] = statistics.median(published)
    out["slowdown"] = statistics.median(slow) if slow else float("nan")
    shutil.rmtree(root / "sync", ignore_errors=True)
    shutil.rmtree(root / "async", ignore_errors=True)
    return out


def _default_configs(classes: int) -> list[tuple[int, str]]:
    if classes >= 1_000_000:
        return [(classes, "bf16"), (classes // 2, "fp32")]
    return [(classes, "fp32"), (classes, "bf16")]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=1_000_000,
                   help="classes of the bf16 run; the fp32 run uses half (from 1M up)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--saves", type=int, default=3, help="saves per mode (median)")
    p.add_argument("--work-steps", type=int, default=20, help="matrix products of the no-write baseline")
    p.add_argument("--output", type=Path, default=results_path(), help="RESULTS.md to write the section into")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-", dir=tempfile.gettempdir()) as tmp:
        for classes, dtype in _default_configs(args.classes):
            results.append(_measure(classes, args.dim, dtype, args.saves, args.work_steps, Path(tmp)))
    headers = ["classes", "rows", "state GiB", "mode", "stall s", "published s", "step slowdown"]
    rows = []
    for r in results:
        base = [f"{r['classes']:,}", r["dtype"], f"{r['row_gib']:.2f}"]
        rows.append(base + ["sync", f"{r['sync_stall']:.2f}", f"{r['sync_stall']:.2f}", "-"])
        rows.append(base + ["async", f"{r['async_stall']:.2f}", f"{r['async_published']:.2f}",
                            f"{r['slowdown']:.2f}x"])
    table = markdown_table(headers, rows)
    print(table)
    body = (f"`python bench/checkpoint_bench.py` on {machine_description()}; 1-minute load average "
            f"{load:.2f} at the start (the machine is shared with other work, so timings are noisy). "
            f"One process (W = 1), ArcFace Partial FC shard (D = {args.dim}) with SGD-momentum rows "
            f"(weight + momentum = 'state GiB') plus a small backbone and its optimiser, saved by "
            f"CheckpointManager to a temporary folder on the local disk; median of {args.saves} saves per "
            f"mode. 'stall s': time the training thread is blocked in save; 'published s': until the "
            f"checkpoint is published (wait()); 'step slowdown': a matmul step while the background write "
            f"runs over the same step without a write. The fp32 run uses half the classes because a save "
            f"holds about three copies of the rows in memory.\n\n{table}")
    if not args.no_write:
        write_section("Checkpoint stall", body, args.output)
    return results


if __name__ == "__main__":
    main()
