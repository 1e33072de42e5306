"""When one rank fails, every rank stops within seconds and says which rank failed and why.

Each rank runs a :class:`FailureWatch`: a daemon thread talking to the job's c10d store
(the TCPStore every rank already joined).  It

* publishes a heartbeat (a counter, so clocks of different machines never matter);
* on a rank's exception (:meth:`FailureWatch.report`) stores a one-line record
  ``rank R failed at step S: Type: message`` that the first failing rank wins;
* sees another rank's record, prints it and ends this process with
  :data:`EXIT_PEER_FAILED` (a peer blocked in a collective cannot return from it; the
  process ends instead of waiting for the collective timeout);
* sees a peer's heartbeat stop (SIGKILL, ``os._exit``, a lost machine) or loses the store
  (it lives in rank 0's process, or in torchrun's agent) and ends with :data:`EXIT_PEER_LOST`;
* sees its own main thread stuck on the same line of code outside a collective with no
  step finished for ``hang_timeout_s`` and reports this rank as hung (:data:`EXIT_HUNG`).
  Until the trainer says start-up is over (:meth:`FailureWatch.started`: parallel setup,
  ``deepspeed.initialize`` and the checkpoint restore done) the limit is ``startup_timeout_s``:
  start-up does long work of its own on one line (a first DeepSpeed run JIT-builds an op and
  waits on the build's lock file) that is not a hang.

The record also goes to the file ``SHARDFACE_FAILURE_FILE`` names (set by the
``shardface train`` launcher, which prints it as its last line).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional

import torch.distributed as dist

from .distributed import DistContext

EXIT_FAILED = 1
"""This rank raised (its error is the record)."""
EXIT_PEER_FAILED = 3
"""Another rank failed; this one stopped because of it."""
EXIT_HUNG = 4
"""This rank made no progress for ``failure.hang_timeout_s``."""
EXIT_PEER_LOST = 5
"""Another rank vanished without a report (killed), or the job's store is gone."""

FAILURE_FILE_ENV = "SHARDFACE_FAILURE_FILE"
DEBUG_ENV = "SHARDFACE_DEBUG"
# Frames of code that waits for other ranks: a rank stuck there is waiting, not hung.
_WAITING = (os.sep + os.path.join("torch", "distributed") + os.sep,
            os.sep + os.path.join("torch", "nn", "parallel") + os.sep,
            os.sep + os.path.join("torch", "autograd") + os.sep,
            os.sep + "deepspeed" + os.sep)


class RankFailure(RuntimeError):
    """A failure of one rank that every rank raises alike (a collective verdict)."""


@dataclass
class WatchSettings:
    """How quickly failures are noticed."""

    hang_timeout_s: float = 300.0
    """A rank stuck on one line outside a collective this long with no step done is hung."""
    heartbeat_timeout_s: float = 15.0
    """A peer whose heartbeat is silent this long is gone."""
    startup_timeout_s: float = 900.0
    """The hang limit before the first step (start-up: parallel setup, op builds, checkpoint restore)."""
    poll_s: float = 0.5
    """How often the watch thread looks."""


def _is_comm_error(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}"
    return any(w in text for w in ("DistBackendError", "gloo", "Gloo", "NCCL", "Connection", "connection"))


def error_line(err: BaseException) -> str:
    """``Type: first line of the message`` (of the original error for one from a loader worker)."""
    lines = [x for x in str(err).strip().splitlines() if x.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in lines[1]:
        # Re-raised from a DataLoader worker: its own last line is the error itself.
        return f"{lines[-1].strip()} (in a loader worker)"
    message = lines[0] if lines else ""
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def write_failure_file(record: dict) -> None:
    """Write the record where the launcher looks (replaced in one step)."""
    path = os.environ.get(FAILURE_FILE_ENV)
    if not path:
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        Path(tmp).write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError:
        pass


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _prefix() -> str:
    # torchrun may share one store across restarts (its agent's): keys of a killed attempt
    # must not be read by the next one.
    run, restart = os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"shardface_watch/{run}/{restart}/"


class FailureWatch:
    """The failure watch of one rank (see the module docstring); a no-op without a process group."""

    def __init__(self, ctx: DistContext, settings: Optional[WatchSettings] = None,
                 store: Optional["dist.Store"] = None):
        self.ctx, self.settings = ctx, settings or WatchSettings()
        self.step = 0
        self._progress_at = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._main = threading.main_thread().ident
        self._reported = False
        self._reporting = False
        self._starting = True  # start-up: the hang limit is startup_timeout_s
        self.store: Any = store  # a torch.distributed store, or None in a single process
        if self.store is None and ctx.world_size > 1 and dist.is_initialized():
            self.store = _own_store()
        if self.store is not None:
            self.store = dist.PrefixStore(_prefix(), self.store)

    # -- main thread ---------------------------------------------------------------------
    def start(self) -> "FailureWatch":
        """Start the watch thread (nothing to watch in a single process)."""
        if self.store is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shardface-failure-watch", daemon=True)
            self._thread.start()
        return self

    def started(self) -> None:
        """Start-up is over (called by the trainer before its first step): steps get ``hang_timeout_s``."""
        self._progress_at = time.monotonic()
        self._starting = False

    def progress(self, step: int) -> None:
        """A step finished (called by the training loop)."""
        self.step, self._progress_at = step, time.monotonic()

    def stop(self) -> None:
        """Stop watching (a clean end, or after this rank's own report); peers stop watching this rank."""
        self._stop.set()
        if self.store is not None and not self._reported:
            try:
                self.store.set(f"done/{self.ctx.rank}", "1")
            except Exception:  # noqa: BLE001 - the store may be gone at the very end
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def report(self, err: BaseException) -> str:
        """Publish this rank's failure (first failure wins) and return the line to print.

        A communication error is usually the echo of another rank's failure: wait a little
        for that rank's record (or for the watch to see it gone) before blaming this rank.
        """
        line = f"rank {self.ctx.rank} failed at step {self.step + 1}: {error_line(err)}"
        if isinstance(err, RankFailure):
            line = f"{err}"
        if self.store is None:
            return line
        if _is_comm_error(err):
            self._reporting = True  # waiting here is not a hang
            self._blame_peer(3.0)
        self._publish(line, EXIT_FAILED, traceback.format_exc())
        self._publish(line, EXIT_FAILED, traceback.format_exc())
        return line

    def _blame_peer(self, quiet_s: float) -> None:
        """After a communication error: end with a peer's record, or name a silent peer, if any."""
        start = time.monotonic()
        first = self._heartbeats()
        while time.monotonic() - start < quiet_s:
            record = self._peer_record()
            if record is not None:
                self._peer_failed(record)
            time.sleep(self.settings.poll_s)
        now = self._heartbeats()
        for peer, value in first.items():
            if now.get(peer) == value:
                self._peer_lost(f"rank {peer} stopped without a report (no heartbeat for {quiet_s:.0f} s after "
                                f"a communication error on rank {self.ctx.rank}): it was killed or its machine is gone")

    def _heartbeats(self) -> dict[int, str]:
        beats = {}
        for peer in range(self.ctx.world_size):
            key = f"hb/{peer}"
            if peer != self.ctx.rank and self.store.check([key]) and not self.store.check([f"done/{peer}"]):
                beats[peer] = self.store.get(key).decode()
        return beats

    # -- store ---------------------------------------------------------------------------
    def _publish(self, line: str, code: int, trace: str = "") -> None:
        self._reported = True
        record = {"rank": self.ctx.rank, "step": self.step, "line": line, "code": code, "traceback": trace}
        write_failure_file(record)
        try:
            # compare_set: the first rank to fail keeps its record.
            self.store.compare_set("failure", "", json.dumps(record))
            # Wait (briefly) until the peers read it: the store may live in this process.
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and int(self.store.add("seen", 0)) < self.ctx.world_size - 1:
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store may be gone already; the local line still prints
            pass

    def _peer_record(self) -> Optional[dict]:
        if not self.store.check(["failure"]):
            return None
        record = json.loads(self.store.get("failure"))
        return None if record["rank"] == self.ctx.rank else record

    # -- watch thread ----------------------------------------------------------------------
    def _run(self) -> None:
        s, ctx = self.settings, self.ctx
        beats = 0
        seen: dict[int, tuple[int, float]] = {}  # peer -> (last heartbeat value, when it changed)
        stuck_at: tuple[Optional[tuple], float] = (None, time.monotonic())
        while not self._stop.wait(s.poll_s):
            try:
                beats += 1
                self.store.set(f"hb/{ctx.rank}", str(beats))
                record = self._peer_record()
                if record is not None and not self._reported:
                    self._peer_failed(record)
                now = time.monotonic()
                for peer in range(ctx.world_size):
                    if peer == ctx.rank or not self.store.check([f"hb/{peer}"]) or \
                            self.store.check([f"done/{peer}"]):
                        continue
                    value = int(self.store.get(f"hb/{peer}"))
                    last = seen.get(peer)
                    if last is None or last[0] != value:
                        seen[peer] = (value, now)
                    elif now - last[1] > s.heartbeat_timeout_s and not self._reported:
                        self._peer_lost(f"rank {peer} stopped without a report (no heartbeat for "
                                        f"{now - last[1]:.0f} s): it was killed or its machine is gone")
            except Exception as err:  # noqa: BLE001 - a store that went away
                if self._stop.is_set() or self._reported:
                    return
                self._peer_lost(f"lost the job's store ({error_line(err)}): rank 0 or the launcher "
                                f"stopped without a report")
            where = self._main_location()
            if where != stuck_at[0]:
                stuck_at = (where, time.monotonic())
            idle = time.monotonic() - max(self._progress_at, stuck_at[1])
            starting = self._starting
            limit, key = ((s.startup_timeout_s, "startup_timeout_s") if starting
                          else (s.hang_timeout_s, "hang_timeout_s"))
            if where is not None and not where[2] and idle > limit and not (self._reported or self._reporting):
                when = "during start-up" if starting else f"at step {self.step + 1}"
                line = (f"rank {ctx.rank} hung {when}: no progress for {idle:.0f} s "
                        f"(failure.{key}={limit:g}), stuck in {where[0]}:{where[1]}")
                _say(f"shardface: error: {line}")
                self._publish(line, EXIT_HUNG, "".join(traceback.format_stack(self._main_frame())))
                _exit(EXIT_HUNG)

    def _main_frame(self) -> Optional[FrameType]:
        return sys._current_frames().get(self._main) if self._main is not None else None

    def _main_location(self) -> Optional[tuple[str, int, bool]]:
        """(file, line, waiting for peers) of the main thread's innermost Python frame."""
        frame = self._main_frame()
        if frame is None:
            return None
        name = frame.f_code.co_filename
        return name, frame.f_lineno, any(w in name for w in _WAITING)

    def _peer_failed(self, record: dict) -> None:
        try:
            self.store.add("seen", 1)
        except Exception:  # noqa: BLE001
            pass
        write_failure_file(record)
        _say(f"shardface: stopping rank {self.ctx.rank}: {record['line']}")
        _exit(EXIT_PEER_FAILED)

    def _peer_lost(self, line: str) -> None:
        record = {"rank": None, "step": self.step, "line": line, "code": EXIT_PEER_LOST, "traceback": ""}
        write_failure_file(record)
        _say(f"shardface: stopping rank {self.ctx.rank}: {line}")
        _exit(EXIT_PEER_LOST)


def _own_store() -> Optional["dist.Store"]:
    """A connection of our own to the job's store (the default group's is used by the main thread)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=30),
                         wait_for_workers=False)


def gather_objects(obj: Any, ctx: DistContext, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order (over ``group``, default the run's)."""
    if ctx.backend == "none" or ctx.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=group if group is not None else ctx.group)
    return out


def collective_verdict(ctx: DistContext, what: str, work: Callable[[], object], group: Any = None,
                       kind: Optional[type] = None) -> object:
    """Run ``work`` on every rank; if it raised on any rank, every rank raises the same error.

    ``what`` says what was attempted (``"write its checkpoint part of step 40"``); the
    error names the first rank that failed and its error.  ``group``: the process group to
    agree over (default the run's); ``kind``: the error raised (a :class:`RankFailure`).
    """
    error: Optional[str] = None
    result = None
    try:
        result = work()
    except Exception as err:  # noqa: BLE001 - every rank must learn of it, whatever it is
        error = error_line(err)
    failed = [(r, e) for r, e in enumerate(gather_objects(error, ctx, group)) if e is not None]
    if failed:
        rank, message = failed[0]
        others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise (kind or RankFailure)(f"rank {rank} could not {what}: {message}{others}")
    return result


def print_failure(err: BaseException, line: str) -> None:
    """This rank's error: one line, or the traceback with ``SHARDFACE_DEBUG=1``."""
    if os.environ.get(DEBUG_ENV) == "1":
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    _say(f"train.main: error: {line}")


__all__ = ["FailureWatch", "WatchSettings", "RankFailure", "collective_verdict", "print_failure",
           "EXIT_FAILED", "EXIT_PEER_FAILED", "EXIT_HUNG", "EXIT_PEER_LOST", "FAILURE_FILE_ENV"]
