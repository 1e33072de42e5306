"""Build the torchrun command line that starts ``python -m train.main`` on one or many nodes."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional


@dataclass
class LaunchSpec:
    """Where and how many processes to start (torchrun's own options, named as users know them)."""

    nproc_per_node: int = 1
    """Processes on this node (one per GPU; on CPU, 2 is a good test of the sharded path)."""
    nnodes: int = 1
    """Number of nodes; > 1 needs ``rdzv_endpoint``."""
    node_rank: Optional[int] = None
    """This node's rank (optional with c10d rendezvous)."""
    rdzv_endpoint: Optional[str] = None
    """host:port of the rendezvous (the first node), for multi-node runs."""
    rdzv_id: str = "shardface"
    """Job id shared by all nodes of one run."""
    max_restarts: int = 0
    """Elastic restarts: torchrun restarts the workers, which resume from the last checkpoint."""

    def validate(self) -> None:
        """Check the numbers agree before anything is started."""
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError(f"--nproc-per-node={self.nproc_per_node} and --nnodes={self.nnodes} must be >= 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"--nnodes={self.nnodes} needs --rdzv-endpoint HOST:PORT (the first node's address)")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank={self.node_rank} is outside [0, {self.nnodes})")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts={self.max_restarts} must be >= 0")

    @property
    def needs_torchrun(self) -> bool:
        """True unless this is a single plain process."""
        return self.nproc_per_node > 1 or self.nnodes > 1 or self.max_restarts > 0


def under_torchrun() -> bool:
    """True inside a process started by torchrun."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def torchrun_command(spec: LaunchSpec, module: str, args: list[str]) -> list[str]:
    """argv for ``python -m torch.distributed.run ... -m <module> <args>``."""
    spec.validate()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec.nproc_per_node}"]
    if spec.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={spec.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={spec.rdzv_endpoint}",
                f"--rdzv_id={spec.rdzv_id}"]
        if spec.node_rank is not None:
            cmd.append(f"--node_rank={spec.node_rank}")
    if spec.max_restarts:
        cmd.append(f"--max_restarts={spec.max_restarts}")
    return cmd + ["-m", module] + list(args)


@contextlib.contextmanager
def failure_file() -> Iterator[tuple[dict[str, str], Callable[[], Optional[str]]]]:
    """The environment for torchrun and a reader of the failing rank's one-line record.

    The ranks write the record of the first failure into ``SHARDFACE_FAILURE_FILE``
    (train/failure.py).  ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` gives every restart a
    fresh c10d store: with torchrun's shared store a restarted rank can read the gloo
    addresses of the killed attempt and fail with "connectFullMesh failed ... Connection
    refused".
    """
    with tempfile.TemporaryDirectory(prefix="shardface-failure-") as folder:
        path = Path(folder) / "failure.json"
        env = dict(os.environ, SHARDFACE_FAILURE_FILE=str(path), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")

        def read() -> Optional[str]:
            try:
                return json.loads(path.read_text())["line"]
            except (OSError, ValueError, KeyError):
                return None
        yield env, read
