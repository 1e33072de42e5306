"""One prepared check of a GPU machine: throughput, MFU, the classifier's floor and memory, syncs, NCCL.

    python bench/gpu_check.py                      # on one GPU: writes the "GPU" section of bench/RESULTS.md
    python bench/gpu_check.py --cpu-dry-run --output /tmp/gpu.md   # the same code, tiny sizes, CPU, gloo

Sections (each guarded: one that fails records its error and the others still run; a
global time budget, 7 minutes by default, skips what is left with a note):

- backbone: IResNet-50 at 112x112, bf16 autocast, channels-last, batch 128/256/512; a
  backbone-only step (trivial loss) and a full step with Partial FC at 1M identities
  (r = 0.1 and 1.0): samples/s and MFU.  Training FLOPs are 3x the forward's (forward, and
  backward through inputs and weights), 2 FLOPs per multiply-accumulate of
  ``train/backbones/flops.py``, plus the classifier's three GEMMs;
- classifier: the Partial FC step alone (forward, backward, row SGD) against its floor at
  1M and 10M identities: the three GEMMs in bf16, and those plus one gather and one scatter
  of the sampled rows of weight and momentum (the traffic any sparse update needs);
- capacity: the largest number of identities that trains next to IResNet-50 at batch 128
  with bf16 rows (r = 0.1): doubling, then bisection, each try a real step, OOM caught;
- syncs: host synchronisations per step, counted from ``torch.cuda.set_sync_debug_mode("warn")``
  warnings, and host reads (``item``, ``__bool__``, ``nonzero``, boolean indexing ...) seen by
  a ``TorchFunctionMode``, for this script's step and for ``train.step.TrainStep``;
- nccl: a one-process NCCL group (gloo in the dry run): all-reduce, all-gather, reduce-scatter.

The classifier's GEMMs run in bf16: through ``PartialFC(compute_dtype=torch.bfloat16)`` where
PartialFC takes that argument, else under ``torch.autocast`` (the cosine GEMM follows it).
"""
from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.gpu_parts import (  # noqa: E402
    DRY_SIZES,
    GPU_SIZES,
    PEAK_BF16_TFLOPS,
    Run,
    backbone_macs,
    backbone_step,
    build_backbone_and_optimizer,
    build_classifier,
    classifier_flops,
    classifier_step,
    count_syncs,
    error_text,
    free_memory,
    full_step,
    head_context,  # noqa: E402,F401 - part of what the script offers
    head_takes_compute_dtype,
    images_and_labels,
    is_oom,
    mfu,
    rows_per_step,
    time_ms,
)
from bench.results import RESULTS, markdown_table, write_section  # noqa: E402
from partial_fc import PartialFC  # noqa: E402

TITLE = "GPU"


# ---------------------------------------------------------------------- sections
def section_setup(run: Run) -> str:
    """What ran where, and the assumptions behind MFU."""
    from train.backbones.flops import profile_backbone
    s = run.sizes
    prof = profile_backbone(s.backbone, input_size=s.image_size, embedding_size=s.embedding)
    name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "CPU (dry run)"
    gemm = ("PartialFC(compute_dtype=torch.bfloat16)" if head_takes_compute_dtype()
            else "torch.autocast(bfloat16) around the classifier")
    peak = f"{run.peak_tflops:g} TFLOP/s dense bf16 (data-sheet figure, stated, not measured)" \
        if run.peak_tflops else "unknown for this device: MFU not given (pass --peak-tflops)"
    cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
    rows = [["device", name], ["torch", torch.__version__ + cuda],
            ["backbone", f"{s.backbone} {s.image_size}x{s.image_size}, D = {s.embedding}, "
                         f"{prof.flops / 1e9:.3f} GMAC/image forward, {prof.params / 1e6:.1f}M parameters"],
            ["training FLOPs/image", f"6 x MACs = {6 * prof.flops / 1e9:.2f} GFLOP (+ classifier GEMMs)"],
            ["precision", "bf16 autocast, channels-last, cudnn.benchmark, TF32 for fp32 matmuls" if
             run.device.type == "cuda" else "bf16 autocast on the CPU"],
            ["classifier GEMMs", gemm], ["peak for MFU", peak], ["time budget", f"{run.budget_s:.0f} s"]]
    return markdown_table(["item", "value"], rows)


def section_backbone(run: Run) -> str:
    """Backbone-only and full steps at each batch size."""
    s = run.sizes
    net, opt = build_backbone_and_optimizer(run)
    heads = {}
    rows = []
    train_flops = 6 * backbone_macs(run)
    try:
        for batch in s.batches:
            if run.left() <= 0:
                rows.append([batch, "skipped: time budget spent", "", "", ""])
                continue
            images, labels = images_and_labels(run, batch, s.full_classes)
            ms = time_ms(run, backbone_step(net, opt, images))
            rows.append([batch, "backbone only", f"{ms:.1f}", f"{batch / ms * 1e3:,.0f}",
                         mfu(run, batch * train_flops, ms)])
            for rate in s.rates:
                if run.left() <= 0:
                    rows.append([batch, f"+ Partial FC {s.full_classes:,}, r = {rate}: skipped (budget)", "", "", ""])
                    continue
                try:
                    if rate not in heads:
                        heads[rate] = build_classifier(run, s.full_classes, rate, torch.float32)
                    head, head_opt = heads[rate]
                    ms = time_ms(run, full_step(run, net, opt, head, head_opt, images, labels))
                    flops = batch * train_flops + classifier_flops(batch, s.embedding, rows_per_step(head))
                    rows.append([batch, f"+ Partial FC {s.full_classes:,}, r = {rate}", f"{ms:.1f}",
                                 f"{batch / ms * 1e3:,.0f}", mfu(run, flops, ms)])
                except Exception as err:  # noqa: BLE001 - recorded in the table, the rest goes on
                    rows.append([batch, f"+ Partial FC {s.full_classes:,}, r = {rate}: {error_text(err)}", "", "", ""])
                    heads.pop(rate, None)
                    free_memory(run)
    finally:
        del net, opt, heads
        free_memory(run)
    return markdown_table(["batch", "step", "ms", "samples/s", "MFU"], rows) + (
        "\n\nFull-step MFU counts the backbone's training FLOPs and the classifier's three GEMMs over the rows "
        "it uses (all at r = 1); fp32 row storage, SGD with momentum on both.")


def gemm_floor_ms(run: Run, head: PartialFC, head_opt, batch: int) -> tuple[float, float]:
    """(three bf16 GEMMs, those + gather/scatter of the rows of weight and momentum) in ms."""
    rows, dim = rows_per_step(head), run.sizes.embedding
    dev = run.device
    x = torch.randn(batch, dim, device=dev, dtype=torch.bfloat16)
    w = torch.randn(rows, dim, device=dev, dtype=torch.bfloat16)
    g = torch.randn(batch, rows, device=dev, dtype=torch.bfloat16)

    def gemms() -> None:
        x @ w.t()
        g @ w
        g.t() @ x

    weight = head.weight.data
    momentum = head_opt.state[head.weight]["momentum_buffer"]
    index = torch.randperm(head.num_local, device=dev)[:rows].sort().values

    def traffic() -> None:
        gemms()
        for t in (weight, momentum):
            t.index_copy_(0, index, t.index_select(0, index))

    return time_ms(run, gemms), time_ms(run, traffic)


def section_classifier(run: Run) -> str:
    """The classifier step alone against its floor."""
    s = run.sizes
    rows = []
    cases = [(c, r, d) for c in s.classifier_classes for r, d in
             ((0.1, torch.float32), (0.1, torch.bfloat16))] + [(s.classifier_classes[0], 1.0, torch.float32)]
    for classes, rate, dtype in cases:
        label = [f"{classes:,}", rate, "bf16" if dtype == torch.bfloat16 else "fp32"]
        if run.left() <= 0:
            rows.append(label + ["skipped: time budget spent", "", "", "", ""])
            continue
        head = head_opt = None
        try:
            head, head_opt = build_classifier(run, classes, rate, dtype)
            features = torch.randn(s.classifier_batch, s.embedding, device=run.device, requires_grad=True)
            labels = torch.randint(0, classes, (s.classifier_batch,), device=run.device)
            ms = time_ms(run, classifier_step(run, head, head_opt, features, labels))
            gemm_ms, traffic_ms = gemm_floor_ms(run, head, head_opt, s.classifier_batch)
            rows.append(label + [f"{ms:.2f}", f"{gemm_ms:.2f}", f"{ms / gemm_ms:.2f}x", f"{traffic_ms:.2f}",
                                 f"{ms / traffic_ms:.2f}x"])
        except Exception as err:  # noqa: BLE001
            rows.append(label + [error_text(err), "", "", "", ""])
        finally:
            del head, head_opt
            free_memory(run)
    return markdown_table(["classes", "r", "row storage", "step ms", "GEMM floor ms", "step/GEMM", "GEMM+rows floor ms",
                           "step/(GEMM+rows)"], rows) + (
        f"\n\nGlobal batch {s.classifier_batch} (one rank), D = {s.embedding}, ArcFace, row SGD with momentum. "
        "GEMM floor: the step's three GEMMs in bf16 on the same shapes; GEMM+rows adds one gather and one "
        "scatter of the used rows of weight and momentum.")


def _capacity_try(run: Run, net, opt, classes: int) -> int:
    """Train one step with ``classes`` bf16 rows next to the backbone; returns the peak bytes (0 on CPU)."""
    s = run.sizes
    head = head_opt = None
    free_memory(run)  # what a failed try left in the allocator's cache
    try:
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        head, head_opt = build_classifier(run, classes, s.capacity_rate, torch.bfloat16)
        if s.simulated_memory is not None and head.bytes_per_class("sgd") * classes > s.simulated_memory:
            raise MemoryError(f"simulated out of memory: {classes} classes over {s.simulated_memory} bytes")
        images, labels = images_and_labels(run, s.capacity_batch, classes)
        step = full_step(run, net, opt, head, head_opt, images, labels)
        for _ in range(2):  # the second step holds the optimiser state the first one created
            step()
        run.sync()
        return torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else 0
    finally:
        del head, head_opt
        free_memory(run)


def section_capacity(run: Run) -> str:
    """The largest C that trains next to the backbone at the capacity batch (bf16 rows)."""
    s = run.sizes
    net, opt = build_backbone_and_optimizer(run)
    tries = []
    try:
        images, _ = images_and_labels(run, s.capacity_batch, 1)
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        step = backbone_step(net, opt, images)
        step()
        step()
        run.sync()
        base = torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else 0
        del images, step
        lo, hi, lo_peak = 0, None, 0
        classes = s.capacity_start
        while len(tries) < s.capacity_tries and run.left() > 0:
            try:
                peak = _capacity_try(run, net, opt, classes)
                tries.append((classes, True))
                lo, lo_peak = classes, peak
            except Exception as err:  # noqa: BLE001
                if not is_oom(err):
                    raise
                tries.append((classes, False))
                hi = classes
            if hi is None:
                classes *= 2
            elif lo and hi / lo <= 1.05:
                break
            else:
                classes = (lo + hi) // 2 if lo else hi // 2
                if classes < 1:
                    break
    finally:
        del net, opt
        free_memory(run)
    bytes_line = (f"{(lo_peak - base) / lo:,.0f} bytes/class at the peak (peak allocated {lo_peak / 2**30:.1f} GiB "
                  f"minus {base / 2**30:.1f} GiB of the backbone's own step)" if lo and lo_peak else
                  "bytes/class at the peak: not measured on the CPU")
    head_bytes = 2 * 2 * s.embedding  # bf16 weight + bf16 momentum
    trail = ", ".join(f"{c:,} {'ok' if ok else 'OOM'}" for c, ok in tries)
    ended = "" if hi is not None and lo else " (search ended by its try or time limit before it was bracketed)"
    table = markdown_table(["largest C that trained", "first C that failed", "tries"],
                           [[f"{lo:,}" if lo else "none", f"{hi:,}" if hi else "none", len(tries)]])
    return (f"{table}\n\n{s.backbone} at batch {s.capacity_batch}, bf16 rows and momentum ({head_bytes} B/class "
            f"persistent), r = {s.capacity_rate}, two full steps per try; {bytes_line}{ended}.\n\nTries: {trail}.")


def section_syncs(run: Run) -> str:
    """Host syncs of this script's full step and of the trainer's TrainStep."""
    s = run.sizes
    batch, classes = s.capacity_batch, s.full_classes
    net, opt = build_backbone_and_optimizer(run)
    head, head_opt = build_classifier(run, classes, 0.1, torch.float32)
    images, labels = images_and_labels(run, batch, classes)
    rows = []
    try:
        cuda, reads = count_syncs(run, full_step(run, net, opt, head, head_opt, images, labels))
        rows.append(["this script's step (backbone, Partial FC, both optimisers)", cuda, reads])
        try:
            cuda, reads = count_syncs(run, _train_step(run, net, head, head_opt, images, labels))
            rows.append(["train.step.TrainStep (the trainer's step, clipping at 5)", cuda, reads])
        except Exception as err:  # noqa: BLE001
            rows.append(["train.step.TrainStep", error_text(err), ""])
    finally:
        del net, opt, head, head_opt
        free_memory(run)
    return markdown_table(["step", "CUDA syncs/step", "host reads/step"], rows) + (
        f"\n\nBatch {batch}, {classes:,} classes, r = 0.1, {s.sync_steps} steps counted after one warm-up step. "
        "CUDA syncs: warnings of torch.cuda.set_sync_debug_mode(\"warn\"); host reads: calls seen by a "
        "TorchFunctionMode that turn a tensor into a Python value or give a data-dependent shape.")


def _train_step(run: Run, net, head, head_opt, images, labels) -> Callable[[], None]:
    """The trainer's own step (DDPRunner at world size 1, bf16) around the same modules."""
    import itertools

    from train.config import TrainConfig
    from train.distributed import DistContext
    from train.parallel import DDPRunner
    from train.step import TrainStep
    cfg = TrainConfig.load("cpu_tiny", ["precision.dtype=bf16", "optim.clip_grad_norm=5.0"])
    ctx = DistContext(0, 1, 0, run.device, None, "none")
    runner = DDPRunner(net, ctx, 0.1, optim=cfg.optim, precision=cfg.precision, parallel=cfg.parallel)
    step = TrainStep(runner, head, head_opt, ctx, grad_accum=1, clip_grad_norm=5.0,
                     channels_last=run.device.type == "cuda")
    batches = itertools.repeat((images, labels))
    return lambda: step(batches)


def section_nccl(run: Run) -> str:
    """A one-process group: NCCL on the GPU, gloo in the dry run."""
    import torch.distributed as dist
    backend = "nccl" if run.device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return f"skipped: a process group already exists in this process ({dist.get_backend()})"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 1, True)
    kwargs = {"device_id": run.device} if backend == "nccl" else {}
    t0 = time.perf_counter()
    dist.init_process_group(backend, store=store, rank=0, world_size=1, **kwargs)
    init_s = time.perf_counter() - t0
    rows = []
    try:
        n = 1 << 20
        x = torch.arange(n, dtype=torch.float32, device=run.device)
        # torch >= 2.13 names the one-tensor collectives *_single (the *_tensor names warn).
        gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
        scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
        for name, call in (
                ("all_reduce", lambda: dist.all_reduce(x)),
                ("all-gather (one tensor)", lambda: gather(torch.empty_like(x), x)),
                ("reduce-scatter (one tensor)", lambda: scatter(torch.empty_like(x), x))):
            try:
                ms = time_ms(run, call)
                rows.append([name, "ok", f"{ms * 1e3:.0f}"])
            except Exception as err:  # noqa: BLE001 - gloo has no reduce_scatter_tensor
                rows.append([name, error_text(err), ""])
        out = torch.empty(n, device=run.device)
        gather(out, x)
        run.sync()
        exact = bool(torch.equal(out, x))
    finally:
        dist.destroy_process_group()
    version = torch.cuda.nccl.version() if backend == "nccl" else "gloo"
    version = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return markdown_table(["collective (4 MiB fp32)", "result", "µs"], rows) + (
        f"\n\n{backend} ({version}) at world size 1: group made in {init_s:.2f} s; all-gather returned the "
        f"input {'exactly' if exact else 'WRONGLY'}.")


SECTIONS: list[tuple[str, Callable[[Run], str]]] = [
    ("Setup", section_setup), ("Backbone and full step", section_backbone),
    ("Classifier step against its floor", section_classifier),
    ("Largest classifier next to the backbone", section_capacity),
    ("Host syncs per step", section_syncs), ("NCCL at world size 1", section_nccl)]


def run_sections(run: Run, sections: list[tuple[str, Callable[[Run], str]]],
                 publish: Callable[[str], None]) -> str:
    """Run each section in turn, guarded; publish the body so far after each one."""
    parts: list[str] = []
    for title, fn in sections:
        if run.left() <= 0:
            body = f"skipped: the time budget of {run.budget_s:.0f} s was spent before this section"
        else:
            t0 = time.perf_counter()
            try:
                body = fn(run)
            except Exception as err:  # noqa: BLE001 - one failing section must not stop the others
                traceback.print_exc()
                body = error_text(err)
                free_memory(run)
            body += f"\n\n({time.perf_counter() - t0:.1f} s)"
        parts.append(f"### {title}\n\n{body}")
        print(f"[gpu_check] {title}: done, {run.left():.0f} s of the budget left", flush=True)
        publish("\n\n".join(parts))
    return "\n\n".join(parts)


def main(argv: Optional[list[str]] = None) -> str:
    """Run every section and write the GPU section; returns its body."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="tiny sizes on the CPU (gloo instead of NCCL): checks the script without a GPU")
    p.add_argument("--output", type=Path, default=None,
                   help=f"Markdown file to write (default {RESULTS}; a temporary file in the dry run)")
    p.add_argument("--budget-s", type=float, default=420.0, help="global time budget; later sections are skipped")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this device for MFU")
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        device, sizes = torch.device("cpu"), DRY_SIZES
        output = args.output or Path(tempfile.gettempdir()) / "shardface_gpu_check_dry_run.md"
        peak = args.peak_tflops
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device is visible: run on a GPU machine, or pass --cpu-dry-run")
        device, sizes, output = torch.device("cuda", 0), GPU_SIZES, args.output or RESULTS
        torch.cuda.set_device(device)
        # As the trainer sets them: autotuned convolutions (fixed shapes) and TF32 for fp32 matmuls.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)
    run = Run(device, sizes, args.budget_s, peak)
    header = (f"`python bench/gpu_check.py{' --cpu-dry-run' if args.cpu_dry_run else ''}` (written by "
              f"`bench/gpu_check.py`, `make bench-gpu`); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")

    def publish(body: str) -> None:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_section(TITLE, f"{header}\n\n{body}", output)

    body = run_sections(run, SECTIONS, publish)
    print(f"[gpu_check] wrote the {TITLE} section of {output} in {time.perf_counter() - run.start:.0f} s", flush=True)
    return body


if __name__ == "__main__":
    main()
