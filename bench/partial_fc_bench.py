"""One classifier step (forward, backward, SGD step) of Partial FC vs. its floor and a replicated FC.

Two tables.  The first compares one rank's step with its floor, for float32 and bfloat16
row storage; the second is the step at scale (W ranks, up to 1M classes) next to the
replicated layout.  Each configuration runs in fresh processes (gloo, W ranks on this
machine) so that the peak resident memory of a rank belongs to that configuration alone.

The floor is the traffic and arithmetic any sparse step needs: the step's three matrix
products (logits, grad of features, grad of the weight rows) into preallocated outputs,
plus one gather and one scatter of the sampled rows of the weight and of the momentum in
their storage dtype (bfloat16 rows moved as 4-byte words, as the step moves them).  Step and
floor are timed in alternation, so load from other work on
the machine falls on both alike.  Columns:

- ``step ms``: median wall time of one step per rank;
- ``floor ms``: the floor above, on the same shapes (median, same run);
- ``peak MiB/rank``: peak RSS above the process's baseline after warm-up allocation-free
  imports, i.e. what the classifier costs;
- ``B/class``: that peak divided by the classes this rank holds.
"""
from __future__ import annotations

import argparse
import os
import queue
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results import machine_description, markdown_table, write_section  # noqa: E402
from launch.openmp_env import short_openmp_spin  # noqa: E402
from partial_fc import PartialFC, build_head_optimizer  # noqa: E402
from partial_fc.margins import ArcFace  # noqa: E402
from partial_fc.rows import as_words  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _partial_fc_step(args, rank):
    head = PartialFC(args.dim, args.classes, ArcFace(s=64.0, m=0.5), sample_rate=args.rate,
                     param_dtype=torch.bfloat16 if args.bf16 else torch.float32)
    opt = build_head_optimizer(head, "sgd", lr=0.1)
    x = torch.randn(args.batch, args.dim, requires_grad=True)
    y = torch.randint(0, args.classes, (args.batch,))

    def step():
        opt.zero_grad()
        head(x, y).backward()
        opt.step()
    return step, head, opt


def _replicated_step(args, rank):
    # The naive layout: every rank holds all C rows and all-reduces their dense gradient.
    w = torch.nn.Parameter(torch.randn(args.classes, args.dim) * 0.01)
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch, args.dim, requires_grad=True)
    y = torch.randint(0, args.classes, (args.batch,))

    def step():
        opt.zero_grad()
        cos = F.linear(F.normalize(x), F.normalize(w))
        logits = cos * 64.0
        F.cross_entropy(logits, y).backward()
        dist.all_reduce(w.grad)
        w.grad /= dist.get_world_size()
        opt.step()
    return step, args.classes, args.classes


def _floor(args, columns: int, weight: torch.Tensor, momentum: torch.Tensor):
    """The step's three matrix products and one gather + scatter of weight and momentum rows."""
    n = args.batch * args.world_size
    x = torch.randn(n, args.dim)
    rows = torch.randn(columns, args.dim)
    g = torch.randn(n, columns)
    logits, grad_x, grad_rows = torch.empty(n, columns), torch.empty(n, args.dim), torch.empty(columns, args.dim)
    gen = torch.Generator().manual_seed(1)
    w_rows = torch.empty(columns, weight.shape[1], dtype=weight.dtype)
    m_rows = torch.empty(columns, momentum.shape[1], dtype=momentum.dtype)
    # bfloat16 rows move as int32 words, the fastest index kernels (as the step moves them).
    weight, momentum, w_rows, m_rows = (as_words(t) for t in (weight, momentum, w_rows, m_rows))

    def step():
        # Index drawing is not part of the floor; the rows are written back unchanged.
        index = torch.randperm(weight.shape[0], generator=gen)[:columns].sort().values
        t0 = time.perf_counter()
        torch.mm(x, rows.t(), out=logits)
        torch.mm(g, rows, out=grad_x)
        torch.mm(g.t(), x, out=grad_rows)
        torch.index_select(weight, 0, index, out=w_rows)
        torch.index_select(momentum, 0, index, out=m_rows)
        weight.index_copy_(0, index, w_rows)
        momentum.index_copy_(0, index, m_rows)
        return time.perf_counter() - t0
    return step


def _time_pair(step, floor, repeats: int) -> tuple[float, float, float]:
    """Median ms of ``step`` and of ``floor`` (which times itself), run in alternation, and the
    median of the pairs' ratios (robust to load that changes between pairs)."""
    steps, floors = [], []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        steps.append(time.perf_counter() - t0)
        dist.barrier()
        floors.append(floor())
    ratio = statistics.median(s / f for s, f in zip(steps, floors))
    return statistics.median(steps) * 1e3, statistics.median(floors) * 1e3, ratio


def _storage_rounds(args) -> dict:
    """fp32 and bf16 row storage in one process, round after round: each round times one step and
    one floor of each, so that both storages meet the same machine (whose speed drifts by tens of
    percent between minutes) and their ratio is taken within a round."""
    runs = {}
    for label, bf16 in (("fp32", False), ("bf16", True)):
        step, head, opt = _partial_fc_step(argparse.Namespace(**{**vars(args), "bf16": bf16}), 0)
        step()  # warm-up: allocates optimiser state and the reusable row buffers
        step()
        momentum = opt.state_rows()["weight.momentum_buffer"]
        runs[label] = (step, _floor(args, head.num_sample, head.weight.detach(), momentum))
    times: dict = {label: ([], []) for label in runs}
    for _ in range(args.steps):
        for label, (step, floor) in runs.items():
            t0 = time.perf_counter()
            step()
            times[label][0].append(time.perf_counter() - t0)
            times[label][1].append(floor())
    out = {}
    for label, (steps, floors) in times.items():
        out[label] = dict(ms=statistics.median(steps) * 1e3, floor=statistics.median(floors) * 1e3,
                          ratio=statistics.median(s / f for s, f in zip(steps, floors)),
                          vs_fp32=statistics.median(s / f for s, f in zip(steps, times["fp32"][0])))
    return out


def _worker(rank, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    threads = getattr(args, "threads", None) or max(1, (os.cpu_count() or 1) // args.world_size)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    torch.manual_seed(rank)
    base = _peak_rss_mib()
    if args.layout == "storage_rounds":
        out.put((rank, _storage_rounds(args)))
        dist.destroy_process_group()
        return
    if args.layout == "replicated":
        step, rows, columns = _replicated_step(args, rank)
        step()  # warm-up: allocates optimiser state
        ms, floor_ms, ratio = _time(step, args.steps), float("nan"), float("nan")
        peak = _peak_rss_mib() - base
    else:
        step, head, opt = _partial_fc_step(args, rank)
        rows, columns = head.num_local, head.num_sample
        step()  # warm-up: allocates optimiser state and the reusable row buffers
        step()
        peak = _peak_rss_mib() - base
        momentum = opt.state_rows()["weight.momentum_buffer"]
        ms, floor_ms, ratio = _time_pair(step, _floor(args, columns, head.weight.detach(), momentum), args.steps)
    out.put((rank, ms, floor_ms, peak, rows, ratio))
    dist.barrier()
    dist.destroy_process_group()


def run_config(args) -> dict:
    """Run one layout/size in fresh processes; the slowest rank's figures."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    args.port = 29500 + (os.getpid() + int(time.time())) % 2000
    procs = [ctx.Process(target=_worker, args=(r, args, out)) for r in range(args.world_size)]
    for p in procs:
        p.start()
    results = []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=5))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:  # e.g. killed for memory: the other ranks would wait forever
                for p in procs:
                    p.kill()
                return dict(failed=f"a rank exited with code {dead[0]}")
    for p in procs:
        p.join()
    ms = max(r[1] for r in results)
    floor_ms = max(r[2] for r in results)
    peak = max(r[3] for r in results)
    rows = results[0][4]
    ratio = max(r[5] for r in results)
    return dict(ms=ms, floor=floor_ms, ratio=ratio, peak=peak, bytes_per_class=peak * 2 ** 20 / rows)


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) / 2 ** 20
    return float("inf")


def _floor_table(args) -> tuple[str, list]:
    """One rank's step against its floor, float32 and bfloat16 storage side by side, per thread count."""
    rows = []
    for threads in args.floor_threads:
        cfg = argparse.Namespace(**{**vars(args), "classes": args.floor_classes, "rate": args.floor_rate,
                                    "layout": "storage_rounds", "world_size": 1, "batch": args.floor_batch,
                                    "steps": args.floor_steps, "threads": threads})
        print(f"running floor comparison C={args.floor_classes:,} r={args.floor_rate} fp32 and bf16 "
              f"{threads} thread(s) ...", flush=True)
        result = _run_storage_rounds(cfg)
        if isinstance(result, str):
            rows.append([threads, "fp32, bf16", result, "", "", ""])
            continue
        for label, r in result.items():
            rows.append([threads, label, f"{r['ms']:.1f}", f"{r['floor']:.1f}", f"{r['ratio']:.2f}×",
                         f"{r['vs_fp32']:.2f}×"])
    return markdown_table(["threads", "row storage", "step ms", "floor ms", "step/floor", "step vs fp32"], rows), rows


def _run_storage_rounds(args):
    """The storage rounds in a fresh process (one rank): their figures, or why it failed."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    args.port = 29500 + (os.getpid() + int(time.time())) % 2000
    proc = ctx.Process(target=_worker, args=(0, args, out))
    proc.start()
    while True:
        try:
            _, result = out.get(timeout=5)
            break
        except queue.Empty:
            if proc.exitcode not in (None, 0):
                return f"the rank exited with code {proc.exitcode}"
    proc.join()
    return result


def main(argv=None) -> None:
    """Run the tables and write them into bench/RESULTS.md."""
    short_openmp_spin()  # the workers are spawned: they load torch with it, as `shardface` runs them
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=64, help="samples per rank")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--floor-classes", type=int, default=500_000, help="classes of the one-rank floor table")
    p.add_argument("--floor-rate", type=float, default=0.1)
    p.add_argument("--floor-batch", type=int, default=128, help="global batch of the floor table")
    p.add_argument("--floor-steps", type=int, default=15,
                   help="rounds timed (each: one step and one floor of fp32, then of bf16 storage)")
    p.add_argument("--floor-threads", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                   help="torch threads of the one-rank floor table (each count is one pair of rows)")
    p.add_argument("--skip-scale", action="store_true",
                   help="only the floor table (its own section of RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    args = p.parse_args(argv)

    load = os.getloadavg()[0]
    floor_table, _ = _floor_table(args)
    rows = []
    for classes in ([] if args.skip_scale else args.classes):
        for layout, rate, bf16 in ([("replicated", 1.0, False)] + [("partial_fc", r, False) for r in args.rates]
                                   + [("partial_fc", min(args.rates), True)]):
            cfg = argparse.Namespace(**{**vars(args), "classes": classes, "rate": rate,
                                        "layout": layout, "bf16": bf16})
            # Replicated: weight, its normalised copy, gradient, momentum and step temporaries on
            # every rank; Partial FC: the shard's weight and momentum plus the sampled rows.
            copies = 6 * args.world_size if layout == "replicated" else 3
            need = classes * args.dim * 4 * copies
            name = {"replicated": "replicated FC (all-reduce)", "partial_fc": "Partial FC"}[layout]
            label = f"{name}{' bf16' if bf16 else ''}"
            if need / 2 ** 30 > 0.8 * _mem_available_gib():
                rows.append([f"{classes:,}", label, rate, "skipped: needs "
                             f"{need / 2 ** 30:.1f} GiB", "", "", "", ""])
                continue
            print(f"running C={classes:,} {label} r={rate} ...", flush=True)
            r = run_config(cfg)
            if "failed" in r:
                rows.append([f"{classes:,}", label, rate, r["failed"], "", "", "", ""])
                continue
            ratio = r["ratio"]
            rows.append([f"{classes:,}", label, rate, f"{r['ms']:.1f}",
                         "" if r["floor"] != r["floor"] else f"{r['floor']:.1f}",
                         "" if ratio != ratio else f"{ratio:.2f}×", f"{r['peak']:.0f}",
                         f"{r['bytes_per_class']:.0f}"])
    end_load = os.getloadavg()[0]
    where = (f"`python bench/partial_fc_bench.py` on {machine_description()}; 1-minute load average "
             f"{load:.1f} at the start and {end_load:.1f} at the end (it counts this benchmark's own "
             "processes; anything above them is other work on the same cores).")
    floor_body = (f"{where} One rank, {args.floor_classes:,} classes, r = {args.floor_rate}, global batch "
                  f"{args.floor_batch}, D = {args.dim}, ArcFace, SGD with momentum; {args.floor_steps} rounds, each "
                  "one step and one floor measurement of fp32 then of bf16 storage, in one process; medians."
                  f"\n\n{floor_table}\n\n"
                  "The floor is the step's three matrix products (logits, grad of features, grad of the rows) "
                  "into preallocated outputs plus one gather and one scatter of the sampled rows of weight and "
                  "momentum in their storage dtype: the traffic any sparse update needs (the bf16 floor moves "
                  "half the bytes, as 4-byte words like the step). Step and floor alternate, so load from other "
                  "work falls on both alike; step/floor is the median of the pairs' ratios, step vs fp32 the median of "
                  "each round's bf16 step over its fp32 step. With several threads the "
                  "step's row gather and row update run cache-sized blocks on Python threads of one core each "
                  "(partial_fc.block_threads), the GEMMs and index kernels of both on torch's threads; the workers "
                  "start with GOMP_SPINCOUNT=10000, as the shardface command starts its processes "
                  "(launch/openmp_env.py).")
    print(floor_body)
    if not args.no_write:
        write_section("Partial FC step against its floor", floor_body)
    if not rows:
        return
    table = markdown_table(["classes", "layout", "r", "step ms", "floor ms", "step/floor", "peak MiB/rank",
                            "B/class"], rows)
    body = (f"{where} gloo, W = {args.world_size}, D = {args.dim}, {args.batch} samples per rank, ArcFace, "
            f"median of {args.steps} steps; floor as in the section above, per rank.\n\n{table}\n\n"
            "B/class is the peak resident memory a rank gains for the step (weight, optimiser state, "
            "logits, the sampled rows' buffer and gradient, allocator slack) divided by the classes it "
            "holds. The persistent part is the weight and its momentum: 4096 B/class in fp32, 2048 B/class "
            "with bf16 storage; the rest is proportional to r. For scale: PLSC's published 92M classes on "
            "8 × 32 GB is about 2.8 KB/class. The replicated layout holds all C rows, their normalised "
            "copy, gradient and momentum on every rank; at 1M classes it does not fit this 24 GiB machine. "
            "At r = 1 in fp32 the rows are updated where they live, with no gather or scatter.")
    print(body)
    if not args.no_write:
        write_section("Partial FC classifier step", body)


if __name__ == "__main__":
    main()
