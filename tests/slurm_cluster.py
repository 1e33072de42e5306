"""A one-host SLURM for tests: munged, slurmctld and slurmd in the foreground, state in a temporary folder.

Debian's ``slurm-wlm`` and ``munge`` are installed with apt-get when missing (root only).
No systemd: the daemons are children of the test and are stopped by their PIDs.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

PACKAGES = ("slurm-wlm", "munge")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be brought up here (no apt, not root); the message says why."""


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt-get if their daemons are missing."""
    if all(shutil.which(x) for x in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm and munge are not installed and apt-get cannot install them "
                               "(needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        done = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], env=env,
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-300:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, host: str, cpus: int) -> str:
    """slurm.conf of a one-node cluster whose files all live under ``root``."""
    return "\n".join([
        "ClusterName=shardfacetest", f"SlurmctldHost={host}",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "SlurmUser=root", "AuthType=auth/munge",
        # A requeued job waits for its old credential to expire (120 s by default, 5 s at least).
        "AuthInfo=cred_expire=5",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "SchedulerParameters=bf_interval=2,sched_interval=2",
        "JobRequeue=1", "KillWait=5", "MailProg=/bin/true", "ReturnToService=2", "MpiDefault=none",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        f"NodeName={host} CPUs={cpus} RealMemory=20000 State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


class SlurmCluster:
    """``with SlurmCluster(tmp) as c: c.sbatch(...)``; every daemon it started is stopped on exit."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.host = socket.gethostname()
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ daemons
    def __enter__(self) -> "SlurmCluster":
        ensure_installed()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, cmd: list[str], log: str) -> subprocess.Popen:
        out = open(self.root / log, "ab")
        proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.daemons.append(proc)
        return proc

    def start(self, timeout: float = 60.0) -> None:
        """munged (unless one answers already), slurmctld and slurmd; returns when the node is idle."""
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(slurm_conf(self.root, self.host, self.cpus))
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
            shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
            self._spawn(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "-F"], "munged.out")
            self._wait(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, 20, "munged")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout, "slurmctld")
        self._spawn(["slurmd", "-D", "-f", str(self.conf)], "slurmd.out")
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%t", check=False).stdout, timeout, "slurmd")

    def _wait(self, ready, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not ready():
            for proc in self.daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} while starting {what}:\n"
                                       + self.logs())
            if time.monotonic() > end:
                raise RuntimeError(f"{what} not ready after {timeout:.0f} s:\n{self.logs()}")
            time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM every daemon started here (reverse order), SIGKILL what is left after 10 s."""
        for proc in reversed(self.daemons):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 10
        for proc in reversed(self.daemons):
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.daemons.clear()

    def logs(self, tail: int = 2000) -> str:
        """The end of every daemon's log, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out", "munged.out"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ clients
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        done = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def sbatch(self, script: Path, *args: str, options: tuple[str, ...] = (), env: Optional[dict] = None) -> int:
        """Submit ``script`` with sbatch ``options`` and script ``args``; returns the job id."""
        done = subprocess.run(["sbatch", "--parsable", *options, str(script), *args], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch failed: {done.stderr.strip()}")
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a mapping (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_job(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait until the job has ended (completed, failed, cancelled...); returns its record."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s")
