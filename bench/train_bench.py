"""Samples/s of a full training step (backbone + sharded classifier + both optimisers) vs. the backbone alone.

The loader is left out: every step reuses tensors already in memory.  Each world size runs
in fresh gloo processes, with the machine's cores split evenly between them.  Columns:

- ``full step``: ``train.step.TrainStep`` as the trainer runs it (DDP backbone, Partial FC
  classifier shard, margin, the finiteness vote, both optimisers, BatchNorm snapshot);
- ``backbone only``: the same backbone under the same DDP wrapper and optimiser with a
  trivial loss (mean square of the embeddings): what the classifier side adds is the gap.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results import machine_description, markdown_table, write_section  # noqa: E402
from launch.openmp_env import short_openmp_spin  # noqa: E402


def _config(args, out_dir: str, precision: str):
    from train.config import TrainConfig
    return TrainConfig.load(None, [
        f"output_dir={out_dir}", "max_steps=1000", "device=cpu", "data.loader=random_tensors",
        f"data.num_classes={args.classes}", f"data.num_samples={args.batch * 8}", f"data.batch_size={args.batch}",
        f"data.image_size={args.image_size}", f"model.backbone={args.backbone}",
        f"model.embedding_size={args.dim}", f"loss.sample_rate={args.rate}", f"precision.dtype={precision}",
        "optim.warmup_steps=0", "optim.clip_grad_norm=5.0", "eval.bins=[]", "checkpoint.export=false",
        "log.progress=false"])


def _timed(step) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _alternating_medians(first, second, steps: int, warmup: int = 2) -> tuple[float, float]:
    """Median ms of two step functions timed in alternation, so that both see the same machine load."""
    for _ in range(warmup):
        first()
        second()
    a, b = [], []
    for _ in range(steps):
        a.append(_timed(first))
        b.append(_timed(second))
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


def _worker(rank: int, args, precision: str, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    from train.distributed import init_distributed
    from train.parallel import DDPRunner
    from train.trainer import Trainer
    ctx = init_distributed(device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(args, tmp, precision)
        trainer = Trainer(cfg, ctx)
        g = torch.Generator().manual_seed(rank)
        images = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g) * 2 - 1
        labels = torch.randint(0, args.classes, (args.batch,), generator=g)
        batches = itertools.repeat((images, labels))

        from train.builders import build_backbone_module
        torch.manual_seed(0)
        runner = DDPRunner(build_backbone_module(cfg.model, cfg.data.image_size, ctx.device), ctx, 0.1,
                           optim=cfg.optim, precision=cfg.precision, parallel=cfg.parallel)

        def backbone_step() -> None:
            emb = runner.forward(images)
            runner.backward(emb.float().square().mean(), 1, True)
            runner.check_grads(5.0)
            runner.step(True)
        full_ms, backbone_ms = _alternating_medians(lambda: trainer.train_step(batches), backbone_step, args.steps)
    out.put((rank, full_ms, backbone_ms))
    dist.barrier()
    dist.destroy_process_group()


def run(args, precision: str) -> tuple[float, float]:
    """(full step ms, backbone-only ms) of the slowest rank."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29500 + (os.getpid() + int(time.time() * 1000)) % 3000
    procs = [ctx.Process(target=_worker, args=(r, args, precision, port, out)) for r in range(args.world_size)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return max(r[1] for r in results), max(r[2] for r in results)


def main(argv=None) -> None:
    """Run the table and write the "Training step" section of bench/RESULTS.md."""
    short_openmp_spin()  # the workers are spawned: they load torch with it, as `shardface` runs them
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--backbone", default="iresnet_tiny")
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=20_000)
    p.add_argument("--rate", type=float, default=0.2, help="Partial FC sample rate")
    p.add_argument("--batch", type=int, default=64, help="samples per rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    args = p.parse_args(argv)

    load = os.getloadavg()[0]
    rows = []
    for world in args.worlds:
        for precision in args.precisions:
            cfg = argparse.Namespace(**{**vars(args), "world_size": world})
            print(f"running W={world} {precision} ...", flush=True)
            full_ms, backbone_ms = run(cfg, precision)
            global_batch = args.batch * world
            rows.append([world, precision, f"{full_ms:.0f}", f"{global_batch / full_ms * 1e3:.0f}",
                         f"{backbone_ms:.0f}", f"{global_batch / backbone_ms * 1e3:.0f}",
                         f"{(full_ms - backbone_ms) / full_ms:.0%}"])
    table = markdown_table(["W", "precision", "full step ms", "samples/s", "backbone-only ms", "samples/s",
                            "classifier + rest"], rows)
    body = (f"`python bench/train_bench.py` on {machine_description()}; gloo, {args.backbone} at "
            f"{args.image_size}×{args.image_size}, D = {args.dim}, {args.classes:,} classes, sample rate "
            f"{args.rate}, {args.batch} samples per rank, SGD, clipping at 5, median of {args.steps} steps, "
            f"loader excluded (tensors reused); cores split evenly between the W processes; the two steps "
            f"are timed in alternation; load average {load:.1f} when the run started.\n\n{table}\n\n"
            "samples/s counts the global batch (W × samples per rank). \"classifier + rest\" is the share of "
            "the full step not spent in the backbone's own forward, backward and update: the Partial FC "
            "forward/backward (all-gather of embeddings, sampled logits, sharded softmax), the row optimiser, "
            "the non-finite vote and the BatchNorm snapshot.")
    print(body)
    if not args.no_write:
        write_section("Training step", body)


if __name__ == "__main__":
    main()
