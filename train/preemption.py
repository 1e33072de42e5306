"""Stopping a run on a scheduler's signal: finish the step, save it on every rank, exit 75.

One :class:`PreemptionHandler` per training process.  The first preemption signal
(``preempt.signals``, by default SIGTERM and SIGUSR1) only sets a flag; at the end of
every step the ranks all-reduce that flag (max), so they stop after the same step even
when the signal reached only some of them, write a checkpoint of it and exit with
:data:`PREEMPTED_EXIT_CODE`.  A second signal aborts the process at once.  SIGINT
(Ctrl-C) stops a rank at once with one line instead of a traceback.

Signal handlers are inherited by forked DataLoader workers; they recognise that they are
not in the process that installed them and ignore the signal, so a signal sent to a whole
process group does not kill the loader under a rank that is finishing its step.
"""
from __future__ import annotations

import os
import signal
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # torch stays unimported where only the signal names are checked (the config)
    from .distributed import DistContext

PREEMPTED_EXIT_CODE = 75
"""Exit code of a run stopped by a preemption signal after saving its checkpoint (EX_TEMPFAIL: resume me)."""
INTERRUPTED_EXIT_CODE = 130
"""Exit code of a rank stopped by SIGINT (128 + 2, the shell's convention)."""
REPEAT_WINDOW_S = 2.0
"""A signal repeated within this many seconds of the first counts once: a launcher, torchrun and the
scheduler often deliver the same signal to a rank within milliseconds of each other."""


def signal_numbers(names: list[str], key: str = "preempt.signals") -> list[signal.Signals]:
    """Signals by name (``SIGTERM``, ``TERM`` or ``15``); ValueError naming the one that is unknown."""
    found: list[signal.Signals] = []
    for name in names:
        text = str(name).strip().upper()
        try:
            sig = signal.Signals(int(text)) if text.isdigit() else signal.Signals[
                text if text.startswith("SIG") else "SIG" + text]
        except (KeyError, ValueError):
            raise ValueError(f"{key}: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGINT):
            raise ValueError(f"{key}: {sig.name} cannot be a preemption signal "
                             f"({'it cannot be caught' if sig != signal.SIGINT else 'Ctrl-C stops at once'})")
        found.append(sig)
    return found


def _say(text: str) -> None:
    # os.write is safe inside a signal handler; print() may re-enter a buffered stream.
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


class PreemptionHandler:
    """Per-rank signal handling: a flag set by the first signal, agreed on by all ranks each step."""

    def __init__(self, ctx: "DistContext", signals: list[str],
                 step: Callable[[], Optional[int]] = lambda: None):
        self.ctx = ctx
        self.signals = signal_numbers(signals)
        self.step = step
        """This rank's current step, named in its messages."""
        self.received: Optional[signal.Signals] = None
        self._first_at = 0.0
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}
        self._flag: Optional[Any] = None  # a torch tensor once a vote is needed (torch imported late)

    # ------------------------------------------------------------------ handlers
    def install(self) -> "PreemptionHandler":
        """Install the handlers (main thread only; elsewhere nothing is installed)."""
        import threading
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_preempt)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_preempt(self, signum: int, frame: Optional[FrameType]) -> None:
        if os.getpid() != self._pid:
            return  # a forked loader worker: its rank decides when to stop
        sig = signal.Signals(signum)
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = sig, now
            where = "during start-up" if self.step() is None else f"at step {self.step()}"
            _say(f"rank {self.ctx.rank}: {sig.name} {where}: finishing the step, then saving "
                 f"a checkpoint and exiting with code {PREEMPTED_EXIT_CODE} (send it again to abort)")
            return
        if now - self._first_at < REPEAT_WINDOW_S:
            return
        _say(f"rank {self.ctx.rank}: second {sig.name}: aborting without a checkpoint")
        os._exit(128 + signum)

    def _on_interrupt(self, signum: int, frame: Optional[FrameType]) -> None:
        if os.getpid() != self._pid:
            return
        where = "during start-up" if self.step() is None else f"at step {self.step()}"
        _say(f"rank {self.ctx.rank}: interrupted {where}")
        # Checkpoints are written atomically, so stopping mid-save leaves the previous one.
        os._exit(INTERRUPTED_EXIT_CODE)

    # ------------------------------------------------------------------ agreement
    def should_stop(self) -> bool:
        """True on every rank when any rank received a preemption signal (a collective when world > 1).

        Used once, before the first step (a signal during start-up); during training the flag
        rides in the step's vote instead (``TrainStep(..., stop_requested=...)``), which costs
        no collective of its own.
        """
        local = self.received is not None
        if self.ctx.backend == "none" or self.ctx.world_size == 1 or not self.signals:
            return local
        import torch
        import torch.distributed as dist
        if self._flag is None:
            self._flag = torch.zeros(1, dtype=torch.int32, device=self.ctx.device)
        flag = self._flag
        flag.fill_(int(local))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctx.group)
        return bool(flag.item())


__all__ = ["PREEMPTED_EXIT_CODE", "INTERRUPTED_EXIT_CODE", "PreemptionHandler", "signal_numbers"]
