"""Fault injection for testing how a run fails and restarts (``SHARDFACE_FAULT``).

A testing tool, off unless the environment variable is set; nothing of it reaches the
config or the checkpoints.  The value is one fault or several separated by ``;``::

    SHARDFACE_FAULT="rank=1,step=7,kind=raise"
    SHARDFACE_FAULT="rank=0,step=12,kind=sigkill,once=/tmp/k1;rank=1,step=30,kind=worker_kill,once=/tmp/k2"

``rank`` is the global rank the fault hits (``*``: every rank), ``step`` when it fires:

* a number N: the first time this process is about to run optimiser step N or later
  (for ``enospc``: the first checkpoint save at step N or later; for the worker kinds:
  the first loader batch N or later, counted over epochs, which is step N when
  ``optim.grad_accum`` is 1);
* ``start``: right after the process group is formed (before the model is built);
* ``resume``: right after a checkpoint was loaded (nothing fires when there is none).

``kind`` is what happens: ``raise`` (a RuntimeError), ``hang`` (sleeps forever), ``exit``
(``os._exit(1)`` without any report), ``sigkill`` (SIGKILL to itself), ``enospc`` (an
``OSError(ENOSPC)`` inside this rank's checkpoint write), ``worker_kill`` (a DataLoader
worker SIGKILLs itself) and ``worker_raise`` (a DataLoader worker raises).

``once=PATH`` makes the fault fire once over restarts: it fires only if PATH does not
exist and creates it first (a restarted job finds it and goes on).  Without ``once`` a
fault fires in every process that reaches its moment, also after a restart.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional, Union

ENV = "SHARDFACE_FAULT"
STEP_KINDS = ("raise", "hang", "exit", "sigkill")
KINDS = STEP_KINDS + ("enospc", "worker_kill", "worker_raise")
PHASES = ("start", "resume")


class InjectedFault(RuntimeError):
    """The error a ``kind=raise`` / ``worker_raise`` fault raises."""


@dataclass
class Fault:
    """One planned fault: which rank, when, what."""

    rank: Optional[int]
    """Global rank it hits; None: every rank."""
    step: Union[int, str]
    """Step (or loader batch) number, or a phase: start, resume."""
    kind: str
    """raise, hang, exit, sigkill, enospc, worker_kill, worker_raise."""
    once: str = ""
    """Marker file: the fault fires only if it does not exist (and creates it)."""

    def describe(self) -> str:
        """How the fault reads in messages."""
        return f"injected fault {self.kind} at step {self.step} on rank {'*' if self.rank is None else self.rank}"


def parse_faults(text: str) -> list[Fault]:
    """The faults of a ``SHARDFACE_FAULT`` value; a ValueError names what is wrong."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        fields: dict[str, str] = {}
        for pair in item.split(","):
            key, sep, value = pair.partition("=")
            if not sep or key.strip() not in ("rank", "step", "kind", "once"):
                raise ValueError(f"{ENV}: {pair!r} in {item!r} is not one of rank=, step=, kind=, once=")
            fields[key.strip()] = value.strip()
        kind = fields.get("kind", "")
        if kind not in KINDS:
            raise ValueError(f"{ENV}: kind={kind!r} is not one of {', '.join(KINDS)}")
        rank_text, step_text = fields.get("rank", "*"), fields.get("step", "")
        try:
            rank = None if rank_text == "*" else int(rank_text)
            step: Union[int, str] = step_text if step_text in PHASES else int(step_text)
        except ValueError:
            raise ValueError(f"{ENV}: {item!r} needs rank=<int or *> and step=<int, start or resume>") from None
        faults.append(Fault(rank, step, kind, fields.get("once", "")))
    return faults


def _claim(fault: Fault) -> bool:
    """True when the fault may fire now (its ``once`` marker is created atomically here)."""
    if not fault.once:
        return True
    try:
        os.close(os.open(fault.once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _act(fault: Fault) -> None:
    if fault.kind in ("raise", "worker_raise"):
        raise InjectedFault(fault.describe())
    if fault.kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + f" ({fault.describe()})")
    if fault.kind == "exit":
        os._exit(1)
    if fault.kind in ("sigkill", "worker_kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # hang: a rank stuck in its own code, not in a collective
        time.sleep(3600)


class FaultSwitch:
    """The faults planned for one rank; the training code calls it at its moments."""

    def __init__(self, faults: list[Fault], rank: int):
        self.rank = rank
        self.faults = [f for f in faults if f.rank is None or f.rank == rank]
        self._fired: set[int] = set()

    @classmethod
    def from_env(cls, rank: int) -> "FaultSwitch":
        """The switch ``SHARDFACE_FAULT`` describes for ``rank`` (empty when unset)."""
        return cls(parse_faults(os.environ.get(ENV, "")), rank)

    def __bool__(self) -> bool:
        return bool(self.faults)

    def _fire(self, kinds: tuple[str, ...], at: Union[int, str]) -> None:
        for i, fault in enumerate(self.faults):
            if i in self._fired or fault.kind not in kinds:
                continue
            if isinstance(fault.step, str) or isinstance(at, str):
                due = fault.step == at
            else:
                due = at >= fault.step
            if due:
                self._fired.add(i)  # at most once per process
                if _claim(fault):
                    _act(fault)

    def phase(self, name: str) -> None:
        """At ``start`` or ``resume``: the step kinds planned for that phase."""
        self._fire(STEP_KINDS, name)

    def before_step(self, step: int) -> None:
        """About to run optimiser step ``step`` (1-based)."""
        self._fire(STEP_KINDS, step)

    def on_save(self, step: int) -> None:
        """Inside this rank's checkpoint write of ``step``."""
        self._fire(("enospc",), step)

    def in_worker(self, batch: int) -> None:
        """Inside a DataLoader worker, about to produce loader batch ``batch`` (over epochs)."""
        self._fire(("worker_kill", "worker_raise"), batch)


_worker_switches: dict[int, FaultSwitch] = {}


def worker_switch(rank: int) -> Optional[FaultSwitch]:
    """The switch of a loader worker process (read once per process; None when no fault is set)."""
    if not os.environ.get(ENV):
        return None
    key = os.getpid() * 100003 + rank
    if key not in _worker_switches:
        _worker_switches[key] = FaultSwitch.from_env(rank)
    return _worker_switches[key]
