"""Starting torch.distributed from the launcher's environment (torchrun, SLURM via torchrun, or none).

This is the only module that reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (and the local-rank
variables of SLURM and MPI when no ``LOCAL_RANK`` is set); everything else
receives a :class:`DistContext` (and its process group) explicitly.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist


class DistributedSetupError(RuntimeError):
    """The requested device/backend/world size cannot work; the message says what to change."""


@dataclass
class DistContext:
    """Where this process sits: rank and world size of ``group``, its device and backend."""

    rank: int
    """Rank in ``group``."""
    world_size: int
    """Number of processes in ``group``."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    device: torch.device
    """The device this rank computes on."""
    group: Optional["dist.ProcessGroup"]
    """Process group of the run; None in a single process without torch.distributed."""
    backend: str
    """nccl, gloo, or "none" without torch.distributed."""
    owns_group: bool = False
    """True when init_distributed created the process group (and shutdown destroys it)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes shared files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.backend != "none" and self.world_size > 1:
            dist.barrier(group=self.group)

    def any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is True on any rank (a collective: every rank calls it; set-up time only)."""
        if self.backend == "none" or self.world_size == 1:
            return flag
        vote = torch.tensor([1.0 if flag else 0.0], device=self.device if self.backend == "nccl" else "cpu")
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group)
        return bool(vote.item() > 0)

    def shutdown(self, barrier: bool = True) -> None:
        """Destroy the process group if this context created it (after a barrier when ``barrier``)."""
        if self.owns_group and dist.is_initialized():
            if barrier:
                dist.barrier(group=self.group)
            dist.destroy_process_group()
            self.owns_group = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={value!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Where a launcher other than torchrun says which process of the node this is, with the variable
# that says how many processes it started in all: (local rank variable, task count variable).
# Open MPI, MPICH/Intel MPI (Hydra) and MVAPICH2 name theirs differently.
LOCAL_RANK_SOURCES: tuple[tuple[str, str], ...] = (
    ("SLURM_LOCALID", "SLURM_NTASKS"),
    ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("MPI_LOCALRANKID", "PMI_SIZE"),
    ("MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_SIZE"),
)


def resolve_local_rank(rank: int, world_size: int, gpu_count: int,
                       env: Optional[Mapping[str, str]] = None) -> tuple[int, str]:
    """This process's rank on its node and where that came from, for any launcher.

    In order: ``LOCAL_RANK`` (torchrun, the DeepSpeed launcher); a scheduler's own local rank
    (``SLURM_LOCALID``, ``OMPI_COMM_WORLD_LOCAL_RANK``, ``MPI_LOCALRANKID``,
    ``MV2_COMM_WORLD_LOCAL_RANK``), trusted only when that scheduler started exactly
    ``world_size`` tasks (one task per rank: under ``srun torchrun`` every worker sees the
    node's single task, local id 0, and must not use it); ``rank % LOCAL_WORLD_SIZE``; and
    last ``rank % gpu_count`` (ranks fill the nodes in order, one per GPU; 0 without GPUs).
    """
    env = os.environ if env is None else env

    def read(name: str) -> Optional[int]:
        value = env.get(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise DistributedSetupError(f"environment variable {name}={value!r} is not an integer") from None

    found = read("LOCAL_RANK")
    if found is not None:
        return found, "LOCAL_RANK"
    for local_name, size_name in LOCAL_RANK_SOURCES:
        local, size = read(local_name), read(size_name)
        if local is not None and size == world_size:
            return local, local_name
    per_node = read("LOCAL_WORLD_SIZE")
    if per_node:
        return rank % per_node, "RANK % LOCAL_WORLD_SIZE"
    if gpu_count > 0:
        return rank % gpu_count, f"RANK % {gpu_count} visible GPUs"
    return 0, "default (no GPU, no launcher local rank)"


def resolve_device(device: str, local_rank: int, source: str = "LOCAL_RANK") -> torch.device:
    """torch.device for "auto"/"cpu"/"cuda" on this rank; a clear error when cuda is missing."""
    if device not in ("auto", "cpu", "cuda"):
        raise DistributedSetupError(f"device={device!r} is not one of auto, cpu, cuda")
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise DistributedSetupError("device=cuda was requested but no CUDA GPU is visible to torch "
                                    f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                                    f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                                    "use device=cpu or device=auto, or install a CUDA build of torch")
    if device == "cpu" or not has_cuda:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedSetupError(f"local rank {local_rank} (from {source}) but only {count} GPU(s) are "
                                    "visible: start at most one process per GPU (--nproc_per_node), or set "
                                    "LOCAL_RANK when the scheduler binds one GPU per task")
    return torch.device("cuda", local_rank)


def init_distributed(backend: str = "auto", device: str = "auto", force_group: bool = False,
                     timeout_s: float = 1800.0) -> DistContext:
    """Join the run started by torchrun (or run as one plain process) and pick device and backend.

    ``backend="auto"`` is NCCL on GPU and gloo on CPU.  A process group is created when
    ``WORLD_SIZE > 1`` or ``force_group`` (DeepSpeed needs one even for a single process);
    an already initialised default group (e.g. made by a test harness) is adopted.
    """
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank, source = resolve_local_rank(rank, world, gpus)
        dev = resolve_device(device, local_rank, source)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(rank, world, local_rank, dev, dist.group.WORLD, dist.get_backend(), False)
    if world < 1 or not 0 <= rank < world:
        raise DistributedSetupError(f"RANK={rank} and WORLD_SIZE={world} are inconsistent: "
                                    "launch with torchrun, which sets both")
    local_rank, source = resolve_local_rank(rank, world, gpus)
    dev = resolve_device(device, local_rank, source)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend not in ("nccl", "gloo"):
        raise DistributedSetupError(f"backend={backend!r} is not one of auto, nccl, gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise DistributedSetupError("backend=nccl needs CUDA GPUs; this rank runs on the CPU: use backend=gloo")
    if world == 1 and not force_group:
        return DistContext(0, 1, local_rank, dev, None, "none", False)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        # A single plain process still gets a (one-member) group, on a free local port.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistContext(rank, world, local_rank, dev, dist.group.WORLD, backend, True)


def check_world_size(ctx: DistContext, num_classes: int, global_batch: int) -> None:
    """Raise when the run cannot use this many ranks (every rank needs classes and samples)."""
    if num_classes < ctx.world_size:
        raise DistributedSetupError(
            f"num_classes={num_classes} is smaller than the world size {ctx.world_size}: every rank holds "
            "at least one class of the sharded classifier; use fewer processes")
    if global_batch < ctx.world_size:
        raise DistributedSetupError(f"global batch {global_batch} is smaller than the world size "
                                    f"{ctx.world_size}: raise data.batch_size")


def broadcast_object(obj: object, ctx: DistContext, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (e.g. the checkpoint path that rank 0 found)."""
    if ctx.backend == "none" or ctx.world_size == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=ctx.group)
    return holder[0]


__all__ = ["DistContext", "DistributedSetupError", "init_distributed", "resolve_device", "resolve_local_rank",
           "check_world_size", "broadcast_object"]
