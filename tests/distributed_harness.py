"""Run a function on W real processes over gloo (loopback) and collect what each returns."""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result: Any = fn(rank, world_size, *args)
        payload = {"ok": True, "result": result}
    except BaseException:  # noqa: BLE001 - re-raised in the parent with the child's traceback
        payload = {"ok": False, "error": traceback.format_exc()}
    torch.save(payload, os.path.join(out_dir, f"rank{rank}.pt"))
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return results by rank.

    ``fn`` must be importable (module level) and return picklable / torch.save-able values.
    A failure in any rank raises here with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, free_port(), fn, args, out_dir),
                           nprocs=world_size, join=True, start_method="spawn")
        results = []
        for rank in range(world_size):
            payload = torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False)
            if not payload["ok"]:
                raise RuntimeError(f"rank {rank} failed:\n{payload['error']}")
            results.append(payload["result"])
        return results
