"""Golden losses: the first logged losses of a fixed, tiny ``cpu_tiny`` run on 1 and 2 processes.

A change of the training numbers (initialisation, data order, augmentation, the margin,
the optimiser, the reduction over ranks...) shows up here even when every unit test still
passes.  When a change of the numbers is intended, regenerate the file and review its diff
with the change that caused it::

    python -m tests.golden --update      # rewrites tests/golden/cpu_tiny_losses.json
    git diff tests/golden/

``python -m tests.golden`` (without --update) prints the fresh losses next to the stored ones.
The run is ``cpu_tiny`` (iresnet_tiny, ArcFace, Partial FC at sample rate 0.5, SGD) shrunk to a
few seconds: a small synthetic-face dataset written on the fly, batch 8 per rank, loader in-process,
one thread per process, no evaluation, checkpoints or export.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).resolve().parent / "golden" / "cpu_tiny_losses.json"
STEPS = 6
"""Optimiser steps of the run; every step's loss is logged (log.every_steps=1) and compared."""
RTOL, ATOL = 1e-3, 1e-4
"""A loss matches within RTOL x |golden| + ATOL.  Reruns on one machine are bit-identical; the
margin is for another CPU's SIMD width and library builds (float32 sums in another order),
and is far below what a change of the method moves (a different margin or init: > 1e-2)."""
SYNTH = dict(num_identities=16, images_per_identity=4, heldout_identities=2, heldout_pairs=4, image_size=56, seed=0)
"""The synthetic-face dataset of the run (``data_pipeline.synthetic.SynthConfig``)."""
OVERRIDES = [f"max_steps={STEPS}", "data.batch_size=8", "data.workers=0", "data.shuffle_buffer=32",
             "optim.warmup_steps=2", "log.every_steps=1", "log.progress=false", "log.wandb=false",
             "eval.bins=[]", "eval.at_end=false", "checkpoint.every_steps=0", "checkpoint.export=false"]
"""What the golden run changes in the ``cpu_tiny`` preset (besides output_dir and data.manifest)."""
WORLD_SIZES = (1, 2)


def write_dataset(root: Path) -> Path:
    """The run's dataset under ``root``; returns its manifest.json."""
    from data_pipeline.synthetic import SynthConfig
    from data_pipeline.synthetic_dataset import make_synthetic_dataset
    make_synthetic_dataset(SynthConfig(**SYNTH), root, samples_per_shard=32, workers=1, progress=False)
    return root / "manifest.json"


def _train(rank: int, world_size: int, manifest: str, out_dir: str) -> list[float]:
    """One rank of the golden run: its per-step losses (equal on every rank)."""
    import torch

    from train.config import TrainConfig
    from train.distributed import init_distributed
    from train.trainer import Trainer
    torch.set_num_threads(1)
    cfg = TrainConfig.load("cpu_tiny", [*OVERRIDES, f"output_dir={out_dir}", f"data.manifest={manifest}"])
    ctx = init_distributed(backend="gloo", device="cpu")
    trainer = Trainer(cfg, ctx)
    losses: list[float] = []
    step = trainer.train_step

    def recorded(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        losses.append(float(result.loss))
        return result

    trainer.train_step = recorded  # type: ignore[assignment]
    trainer.fit()
    return losses


def run(world_size: int, root: Path) -> list[float]:
    """The losses of the golden run on ``world_size`` processes (rank 0's), data written under ``root``."""
    manifest = root / "data" / "manifest.json"
    if not manifest.is_file():
        write_dataset(root / "data")
    out = str(root / f"run_w{world_size}")
    if world_size == 1:
        import torch
        threads = torch.get_num_threads()
        try:
            return _train(0, 1, str(manifest), out)
        finally:
            torch.set_num_threads(threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from distributed_harness import run_distributed
    results = run_distributed(_train, world_size, str(manifest), out)
    if any(r != results[0] for r in results):
        raise AssertionError(f"ranks logged different losses: {results}")
    return results[0]


def load() -> dict[str, Any]:
    """The stored golden file."""
    return json.loads(GOLDEN.read_text())


def mismatches(got: list[float], want: list[float]) -> list[str]:
    """One line per step whose loss is off the golden one (empty: they match)."""
    if len(got) != len(want):
        return [f"{len(got)} losses logged, {len(want)} stored"]
    return [f"step {i + 1}: loss {g!r}, golden {w!r} (off by {abs(g - w):.3g})"
            for i, (g, w) in enumerate(zip(got, want))
            if not (math.isfinite(g) and abs(g - w) <= RTOL * abs(w) + ATOL)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="compare (or with --update, rewrite) the golden losses of cpu_tiny")
    p.add_argument("--update", action="store_true", help="rewrite tests/golden/cpu_tiny_losses.json")
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    stored = load() if GOLDEN.is_file() else {"losses": {}}
    fresh: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in WORLD_SIZES:
            fresh[str(world)] = run(world, Path(tmp))
    bad = 0
    for world, losses in fresh.items():
        problems = mismatches(losses, stored["losses"].get(world, []))
        bad += bool(problems)
        print(f"{world} process(es): {'matches' if not problems else 'DIFFERS'}")
        for line in problems:
            print(f"  {line}")
    if args.update:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        doc = {"about": "first logged losses of the cpu_tiny golden run (tests/golden.py); "
                        "regenerate with: python -m tests.golden --update, then review the diff",
               "preset": "cpu_tiny", "overrides": OVERRIDES, "synthetic_faces": SYNTH,
               "rtol": RTOL, "atol": ATOL, "losses": fresh}
        GOLDEN.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
