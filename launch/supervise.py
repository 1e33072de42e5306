"""``shardface train`` over torchrun: signals reach every rank, none outlives the launcher.

torchrun runs in its own session, so a terminal's Ctrl-C reaches only this launcher,
which then decides what the ranks get:

* a preemption signal (``preempt.signals``: SIGTERM, SIGUSR1 by default) goes to torchrun
  (as SIGUSR1 when that is one of them, see :meth:`Supervisor._relayed`), which sends it to
  every worker and waits ``preempt.grace_s`` for them (torchrun is told to handle these signals
  and to wait that long); the ranks finish their step, save it and exit.
  The launcher then exits with :data:`train.preemption.PREEMPTED_EXIT_CODE` when the
  ranks say so (``preempted`` in the summary.json rank 0 writes).
* SIGINT or SIGHUP goes to torchrun as SIGINT: the ranks stop at once.  After
  :data:`STOP_WAIT_S` everything left is killed; a second Ctrl-C kills at once.

The launcher is a child subreaper (Linux), so a rank whose torchrun died is still its
descendant and is killed rather than orphaned.  It ends with one line naming the last
checkpoint and how to resume.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

STOP_WAIT_S = 15.0
"""Seconds between an interrupt and killing whatever of the run is still alive."""
PREEMPT_EXTRA_S = 30.0
"""Seconds the launcher waits beyond ``preempt.grace_s`` (torchrun's own wait) before it kills."""


def _become_subreaper() -> None:
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):  # not Linux: orphans go to init, as before
        pass


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (read from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def children(pid: int) -> list[int]:
    """The live direct children of ``pid``."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(x) for x in task.read_text().split()]
        except OSError:
            pass
    return kids


def catches(pid: int, signum: int) -> bool:
    """True when process ``pid`` has a handler for ``signum`` (the SigCgt mask in /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _reap() -> None:
    """Collect exited orphans (this process is their subreaper), never the torchrun child itself."""
    for pid in descendants(os.getpid()):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def torchrun_options(signals: list[str], grace_s: int) -> list[str]:
    """Extra torchrun options: handle the preemption signals too, and wait ``grace_s`` for the workers."""
    handled = ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT"]
    from train.preemption import signal_numbers
    handled += [s.name for s in signal_numbers(signals) if s.name not in handled]
    return [f"--signals-to-handle={','.join(handled)}", f"--shutdown-timeout={grace_s}"]


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (``train.checkpoint.find_latest``), None if none."""
    from train.checkpoint import find_latest
    try:
        return find_latest(root)
    except (OSError, ValueError):
        return None


@dataclass
class Supervisor:
    """Runs one torchrun command and relays signals to it."""

    cmd: list[str]
    """The torchrun command (already with :func:`torchrun_options`)."""
    preempt_signals: list[str]
    """Signal names that mean: save and stop."""
    grace_s: int
    """torchrun's wait for the workers after a preemption signal."""
    checkpoint_dir: Path
    """Where the run's checkpoints go (named in the closing line)."""
    summary_path: Optional[Path] = None
    """The run's summary.json, whose ``preempted`` says that the ranks stopped on the signal."""
    env: Optional[dict] = None
    """Environment of torchrun (None: this process's)."""
    proc: Optional[subprocess.Popen] = None
    preempted_by: Optional[signal.Signals] = None
    interrupted: int = 0
    deadline: float = float("inf")
    _started: float = 0.0
    pending: Optional[int] = None
    _preempt_numbers: list[int] = field(default_factory=list)

    def _on_signal(self, signum: int, frame) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if signum in self._preempt_numbers and not self.interrupted:
            if self.preempted_by is None:
                self.preempted_by = signal.Signals(signum)
                self.deadline = time.monotonic() + self.grace_s + PREEMPT_EXTRA_S
                self.pending = self._relayed(signum)
                self._forward_when_ready()
            return
        self.interrupted += 1
        if self.interrupted == 1:
            self.deadline = min(self.deadline, time.monotonic() + STOP_WAIT_S)
            os.kill(proc.pid, signal.SIGINT)
        else:
            self.deadline = 0.0  # a second interrupt: kill now

    def _forward_when_ready(self) -> None:
        """Send the pending preemption signal once torchrun and every rank catch it.

        Until then (torchrun or a rank still starting) the signal would kill the process
        instead of asking it to stop, so it waits here; start-up takes seconds.
        """
        proc = self.proc
        if self.pending is None or proc is None or proc.poll() is not None:
            return
        ranks = children(proc.pid)
        if ranks and all(catches(pid, self.pending) for pid in [proc.pid] + ranks):
            os.kill(proc.pid, self.pending)
            self.pending = None

    def _relayed(self, signum: int) -> int:
        """The signal torchrun gets: SIGUSR1 when it is a preemption signal, else the one received.

        torchrun sends it to each worker's whole process group, DataLoader workers included,
        and torch's own SIGTERM handler in a DataLoader worker ends the worker (unless its rank
        sent it): the rank's step would then fail.  SIGUSR1 is left to the handler the workers
        inherit from their rank, which ignores it there.
        """
        return int(signal.SIGUSR1) if int(signal.SIGUSR1) in self._preempt_numbers else signum

    def _ranks_preempted(self) -> bool:
        """Rank 0 wrote this launch's summary.json saying the ranks stopped on the signal."""
        path = self.summary_path
        try:
            if path is None or path.stat().st_mtime < self._started:
                return False
            import json
            return bool(json.loads(path.read_text()).get("preempted"))
        except (OSError, ValueError):
            return False

    def _kill_all(self) -> None:
        assert self.proc is not None
        for pid in [self.proc.pid] + descendants(self.proc.pid) + descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        """Start torchrun, wait for it (and for every process it started); returns the exit code."""
        from train.preemption import PREEMPTED_EXIT_CODE, signal_numbers
        _become_subreaper()
        self._preempt_numbers = [int(s) for s in signal_numbers(self.preempt_signals)]
        handled = self._preempt_numbers + [int(signal.SIGINT), int(signal.SIGHUP)]
        previous = {s: signal.getsignal(s) for s in handled}
        self._started = time.time()
        for s in handled:
            signal.signal(s, self._on_signal)
        try:
            self.proc = subprocess.Popen(self.cmd, start_new_session=True, env=self.env)
            rc = self._wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        return self._report(rc, PREEMPTED_EXIT_CODE)

    def _wait(self) -> int:
        assert self.proc is not None
        while True:
            try:
                rc = self.proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                self._forward_when_ready()
                if time.monotonic() > self.deadline:
                    self._kill_all()
        # Ranks whose torchrun died (or their loader workers) are ours now: give them a moment, then kill.
        end = time.monotonic() + (STOP_WAIT_S if self.preempted_by is None else self.grace_s)
        if self.interrupted > 1:
            end = 0.0
        while descendants(os.getpid()):
            _reap()
            if time.monotonic() > end:
                self._kill_all()
                time.sleep(0.2)
                _reap()
                break
            time.sleep(0.2)
        return rc

    def _report(self, rc: int, preempted_code: int) -> int:
        if (self.preempted_by is None and not self.interrupted) or (rc == 0 and not self.interrupted):
            return rc  # nothing asked, or the run ended by itself before the signal took effect
        latest = latest_checkpoint(self.checkpoint_dir)
        where = f"last checkpoint {latest}" if latest else f"no checkpoint in {self.checkpoint_dir}"
        resume = "; resume: the same command with --set checkpoint.resume=latest" if latest else ""
        signal_name = self.preempted_by.name if self.preempted_by is not None else "a signal"
        if self.interrupted:
            print(f"shardface: interrupted, every rank stopped; {where}{resume}", file=sys.stderr, flush=True)
            return 130
        if self._ranks_preempted():
            print(f"shardface: preempted by {signal_name}: {where}{resume} (exit {preempted_code})",
                  file=sys.stderr, flush=True)
            return preempted_code
        print(f"shardface: {signal_name} but the ranks did not stop with a checkpoint; {where}{resume}",
              file=sys.stderr, flush=True)
        return rc if rc else 1


def supervised_command(torchrun_cmd: list[str], signals: list[str], grace_s: int) -> list[str]:
    """``torchrun_cmd`` run through :mod:`launch.elastic_agent`, with :func:`torchrun_options` added."""
    head = torchrun_cmd.index("torch.distributed.run")
    return (torchrun_cmd[:head] + ["launch.elastic_agent"] + torchrun_options(signals, grace_s)
            + torchrun_cmd[head + 1:])
