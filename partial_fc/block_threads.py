"""Row blocks spread over Python threads that each run torch ops on one core.

A sparse row update is a few dozen small elementwise ops per cache-sized block of rows.
Run with several intra-op threads, each op is its own OpenMP parallel region ending at a
barrier: thousands of barriers per step, and on a machine with more runnable processes than
cores every one of them waits for whichever thread was descheduled (a scheduler slice,
milliseconds).  Here ``torch.get_num_threads()`` Python threads take the blocks in turn (a
thread that is done takes the next one) and run their ops on one core (ATen and ctypes
release the GIL inside an op, and an op on a cache-sized block lasts far longer than its
Python dispatch).  The blocks
still fit in cache, a step meets one join instead of a barrier per op, and every block's
arithmetic is the one-thread arithmetic, so the result does not depend on the thread count.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import torch

from .rows import Workspace

BlockFn = Callable[[slice, Workspace], None]


class BlockThreads:
    """A pool of Python threads for block loops, with one :class:`Workspace` per thread."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._pool: Optional[ThreadPoolExecutor] = None
        self._size = 0
        self._workspaces: list[Workspace] = [Workspace()]

    def run(self, fn: BlockFn, slices: Sequence[slice], threads: Optional[int] = None) -> None:
        """``fn(slice, workspace)`` for every slice, on ``threads`` threads (None: torch's
        intra-op thread count); blocks must touch disjoint rows of shared tensors."""
        threads = torch.get_num_threads() if threads is None else threads
        threads = max(1, min(threads, len(slices)))
        if threads == 1:
            for sl in slices:
                fn(sl, self._workspaces[0])
            return
        pool = self._executor(threads)
        grad_mode = torch.is_grad_enabled()
        before = torch.get_num_threads()
        # Each thread takes the next block when it is done with one: a thread the scheduler
        # delays holds up one block, not a fixed share.  The blocks are disjoint, so which
        # thread runs which changes nothing in the result.
        queue = iter(slices)
        lock = threading.Lock()

        def take() -> Optional[slice]:
            with lock:
                return next(queue, None)

        futures = [pool.submit(self._share, fn, take, k, grad_mode) for k in range(threads)]
        try:
            for f in futures:
                f.result()
        finally:
            # BLAS keeps one process-wide thread count, which the workers set to one.
            torch.set_num_threads(before)

    def _share(self, fn: BlockFn, take: Callable[[], Optional[slice]], k: int, grad_mode: bool) -> None:
        torch.set_num_threads(1)
        with torch.set_grad_enabled(grad_mode):  # grad mode is per thread
            sl = take()
            while sl is not None:
                fn(sl, self._workspaces[k])
                sl = take()

    def _executor(self, threads: int) -> ThreadPoolExecutor:
        if self._pool is None or self._size < threads:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shardface-rows")
            self._size = threads
        while len(self._workspaces) < threads:
            self._workspaces.append(Workspace())
        return self._pool

    def __getstate__(self) -> dict:
        return {}  # threads and scratch buffers are not state

    def __setstate__(self, state: dict) -> None:
        self._reset()


__all__ = ["BlockThreads"]
