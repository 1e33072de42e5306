"""Run a function on W real processes over gloo (loopback) and collect what each returns.

Every call starts new processes, forked from one server process that imported torch and the
package once (see PRELOAD); each takes the caller's environment and working folder.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The processes are forked from a server that imported these once (multiprocessing's
# "forkserver"): each call still gets fresh processes, without paying an interpreter and
# torch start-up (seconds on 2 cores) per rank and per call.  torch._dynamo is imported by
# the first optimiser a process builds.
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "numpy", "partial_fc", "train.trainer"]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adopt(env: dict[str, str], cwd: str) -> None:
    """A process forked by the server has the server's environment and folder: take the caller's,
    as a spawned process would."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str,
            env: dict[str, str], cwd: str) -> None:
    _adopt(env, cwd)
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


def _call(fn: Callable, args: tuple, env: dict[str, str], cwd: str) -> None:
    _adopt(env, cwd)
    fn(*args)


def _context() -> multiprocessing.context.ForkServerContext:
    multiprocessing.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (first use)
    return multiprocessing.get_context("forkserver")


def fresh_process(fn: Callable, *args) -> multiprocessing.process.BaseProcess:
    """A new (not yet started) process that calls ``fn(*args)``, forked from the same server."""
    return _context().Process(target=_call, args=(fn, args, dict(os.environ), os.getcwd()))


def run_distributed(fn: Callable, world_size: int, *args) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return results by rank.

    ``fn`` must be importable (module level) and return picklable / torch.save-able values.
    A failure in any rank raises here with that rank's traceback.
    """
    _context()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, free_port(), fn, args, out_dir, dict(os.environ), os.getcwd()),
                           nprocs=world_size, join=True, start_method="forkserver")
        results = []
        for rank in range(world_size):
            payload = torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False)
            if not payload["ok"]:
                raise RuntimeError(f"rank {rank} failed:\n{payload['error']}")
            results.append(payload["result"])
        return results
