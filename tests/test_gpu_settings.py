"""GPU settings checked on the CPU: local rank rules, compile around DDP, cuDNN autotuning,
generator states that move between kinds of device."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from partial_fc import PartialFC
from partial_fc.generator_state import derived_seed, portable_state, restore_state
from partial_fc.margins import build_margin
from partial_fc.optim import build_head_optimizer
from train import builders, parallel
from train.checkpoint import capture_rng, restore_rng
from train.config import TrainConfig
from train.distributed import DistContext, DistributedSetupError, resolve_device, resolve_local_rank
from train.reshard import classifier_state, restore_classifier

# ---------------------------------------------------------------------- local rank


@pytest.mark.parametrize("env, world, gpus, expected", [
    ({"LOCAL_RANK": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}, 8, 8, (3, "LOCAL_RANK")),
    ({"SLURM_LOCALID": "5", "SLURM_NTASKS": "16"}, 16, 8, (5, "SLURM_LOCALID")),
    # srun starts one torchrun per node: its task count is not the world size, so its id is ignored.
    ({"SLURM_LOCALID": "0", "SLURM_NTASKS": "2"}, 16, 8, (13 % 8, "RANK % 8 visible GPUs")),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"}, 4, 4, (2, "OMPI_COMM_WORLD_LOCAL_RANK")),
    ({"MPI_LOCALRANKID": "1", "PMI_SIZE": "4"}, 4, 2, (1, "MPI_LOCALRANKID")),
    ({"MV2_COMM_WORLD_LOCAL_RANK": "1", "MV2_COMM_WORLD_SIZE": "2"}, 2, 2, (1, "MV2_COMM_WORLD_LOCAL_RANK")),
    ({"LOCAL_WORLD_SIZE": "4"}, 8, 8, (13 % 4, "RANK % LOCAL_WORLD_SIZE")),
    ({}, 16, 0, (0, "default (no GPU, no launcher local rank)")),
])
def test_local_rank_fallbacks(env, world, gpus, expected):
    assert resolve_local_rank(13 % world, world, gpus, env) == expected


def test_local_rank_reads_the_real_environment(monkeypatch):
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_LOCALID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert resolve_local_rank(6, 4, 0) == (2, "SLURM_LOCALID")
    monkeypatch.setenv("SLURM_LOCALID", "two")
    with pytest.raises(DistributedSetupError, match="SLURM_LOCALID='two' is not an integer"):
        resolve_local_rank(0, 4, 0)


def test_local_rank_beyond_the_gpus_names_its_source(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DistributedSetupError, match=r"local rank 3 \(from SLURM_LOCALID\) but only 1 GPU"):
        resolve_device("cuda", 3, "SLURM_LOCALID")
    assert resolve_device("cuda", 0, "SLURM_LOCALID") == torch.device("cuda", 0)


# ---------------------------------------------------------------------- cuDNN


def test_cudnn_benchmark_follows_deterministic():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled())
    try:
        builders.set_deterministic(False)
        assert torch.backends.cudnn.benchmark is True
        builders.set_deterministic(True)
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2])


# ---------------------------------------------------------------------- compile around DDP


@pytest.fixture
def one_process_group(tmp_path):
    """A one-member gloo group: enough for DDP to wrap a module in this process."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def test_compile_wraps_ddp_not_the_module(one_process_group, monkeypatch):
    compiled, real_compile = [], torch.compile

    def eager_compile(module, **kwargs):
        compiled.append(module)  # dynamo only (no inductor build): the wrapping is what is tested
        return real_compile(module, backend="eager", **kwargs)

    monkeypatch.setattr(parallel.torch, "compile", eager_compile)
    cfg = TrainConfig.load("cpu_tiny", ["model.compile=true"])
    # world_size 2 in the context makes the runner use DDP; the group itself has one member.
    ctx = DistContext(0, 2, 0, torch.device("cpu"), one_process_group, "gloo")
    runner = parallel.DDPRunner(_net(), ctx, 0.1, optim=cfg.optim, precision=cfg.precision,
                                parallel=cfg.parallel, compile=cfg.model.compile)
    assert len(compiled) == 1 and isinstance(compiled[0], nn.parallel.DistributedDataParallel)
    assert runner.ddp is compiled[0] and runner.ddp.module is runner.module
    x = torch.randn(5, 6)
    reference = _net()
    reference(x).square().sum().backward()
    with runner.accumulate(last=False):  # DDP's no_sync reaches the wrapped DDP object
        assert runner.ddp.require_backward_grad_sync is False
    runner.forward(x).square().sum().backward()
    for got, want in zip(runner.module.parameters(), reference.parameters()):
        torch.testing.assert_close(got.grad, want.grad)


def test_single_process_compiles_the_module(monkeypatch):
    seen = []
    monkeypatch.setattr(parallel.torch, "compile", lambda m, **kw: seen.append(m) or m)
    cfg = TrainConfig.load("cpu_tiny", ["model.compile=true"])
    net = _net()
    runner = parallel.DDPRunner(net, DistContext(0, 1, 0, torch.device("cpu"), None, "none"), 0.1, optim=cfg.optim,
                                precision=cfg.precision, parallel=cfg.parallel, compile=cfg.model.compile)
    assert seen == [net] and runner.ddp is None


# ---------------------------------------------------------------------- generator states


class FakeCudaGenerator:
    """Stands in for a CUDA generator on a machine without one: a 16-byte Philox state."""

    def __init__(self):
        self.device = torch.device("cuda", 0)
        self._state = torch.zeros(16, dtype=torch.uint8)
        self.seeded = None

    def get_state(self):
        return self._state.clone()

    def set_state(self, state):
        if state.numel() != 16:  # what torch says for a CPU state given to a CUDA generator
            raise RuntimeError(f"RNG state is wrong size: {state.numel()}")
        self._state = state.clone()

    def manual_seed(self, seed):
        self.seeded = seed
        self._state = torch.tensor(list(seed.to_bytes(8, "little")) + [0] * 8, dtype=torch.uint8)
        return self


def test_cpu_generator_state_moves_to_cuda_and_back():
    cpu = torch.Generator().manual_seed(11)
    torch.rand(7, generator=cpu)
    saved = portable_state(cpu)
    cuda = FakeCudaGenerator()
    assert restore_state(cuda, saved) is False  # re-seeded, not a crash
    assert cuda.seeded == derived_seed(saved["state"])
    again = FakeCudaGenerator()
    restore_state(again, saved)
    assert again.seeded == cuda.seeded  # deterministic
    # ... and a GPU state restores exactly on a GPU, deterministically on the CPU.
    gpu_saved = portable_state(cuda)
    other = FakeCudaGenerator()
    assert restore_state(other, gpu_saved) is True and torch.equal(other.get_state(), cuda.get_state())
    back_a, back_b = torch.Generator(), torch.Generator()
    assert restore_state(back_a, gpu_saved) is False
    restore_state(back_b, gpu_saved)
    assert torch.equal(torch.rand(5, generator=back_a), torch.rand(5, generator=back_b))


def test_same_device_state_is_exact_including_the_bare_tensor_form():
    gen = torch.Generator().manual_seed(3)
    torch.rand(4, generator=gen)
    for saved in (portable_state(gen), gen.get_state()):
        fresh = torch.Generator()
        assert restore_state(fresh, saved) is True
        assert torch.equal(torch.rand(6, generator=fresh), torch.rand(6, generator=gen.clone_state()))
    # A bare 16-byte (CUDA) state given to a CPU generator is recognised by its size.
    assert restore_state(torch.Generator(), torch.zeros(16, dtype=torch.uint8)) is False
    with pytest.raises(ValueError, match="a saved generator state"):
        restore_state(torch.Generator(), {"sampler": 1})


def _head(rate=0.5) -> PartialFC:
    return PartialFC(8, 40, build_margin("arcface"), sample_rate=rate, seed=2, param_dtype=torch.bfloat16)


def test_partial_fc_and_row_optimiser_states_load_across_device_kinds():
    head = _head()
    opt = build_head_optimizer(head, "sgd", lr=0.1, seed=4)
    head.sampler()
    saved = classifier_state(head, opt)
    assert saved["extra"]["head"]["sampler"]["device_type"] == "cpu"
    assert saved["extra"]["round_gen"]["device_type"] == "cpu"

    # Same kind: the next draws are the ones the saving run would have made.
    twin = _head()
    twin_opt = build_head_optimizer(twin, "sgd", lr=0.1, seed=99)
    restore_classifier(twin, twin_opt, saved["rows"], saved["extra"])
    assert torch.equal(torch.rand(5, generator=twin.sampler()), torch.rand(5, generator=head.sampler().clone_state()))
    assert torch.equal(twin_opt.rounding_generator.get_state(), opt.rounding_generator.get_state())

    # Another kind (a checkpoint from a GPU, whose generators hold 16-byte Philox states).
    gpu_extra = dict(saved["extra"])
    gpu_extra["head"] = {"sampler": {"device_type": "cuda", "state": torch.arange(16, dtype=torch.uint8)}}
    gpu_extra["round_gen"] = {"device_type": "cuda", "state": torch.arange(16, 32, dtype=torch.uint8)}
    runs = []
    for _ in range(2):
        h = _head()
        o = build_head_optimizer(h, "sgd", lr=0.1)
        restore_classifier(h, o, saved["rows"], gpu_extra)
        runs.append((torch.rand(5, generator=h.sampler()), torch.rand(5, generator=o.rounding_generator)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])

    # And a CPU-saved state given to a (stand-in) CUDA sampler does not raise.
    h = _head()
    cuda_gen = FakeCudaGenerator()
    h._sampler = cuda_gen
    h.sampler = lambda: cuda_gen  # the head's own device check would replace the stand-in
    h.set_extra_state(saved["extra"]["head"])
    assert cuda_gen.seeded == derived_seed(saved["extra"]["head"]["sampler"]["state"])


def test_rng_checkpoint_from_cpu_resumes_on_gpu_and_back(monkeypatch):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    cpu_state = capture_rng(torch.device("cpu"))
    assert "cuda" not in cpu_state and cpu_state["device_type"] == "cpu"
    expected = (random.random(), float(np.random.rand()), torch.rand(3))

    calls = {}
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.setdefault("seed", s))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.setdefault("set", (s, d)))
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: torch.full((16,), 7, dtype=torch.uint8))
    gpu = torch.device("cuda", 1)
    note = restore_rng(cpu_state, gpu)
    assert "without a GPU" in note and calls == {"seed": derived_seed(cpu_state["torch"])}
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])

    gpu_state = capture_rng(gpu)
    assert gpu_state["device_type"] == "cuda" and gpu_state["cuda"].numel() == 16
    calls.clear()
    assert restore_rng(gpu_state, torch.device("cuda", 0)) is None
    assert torch.equal(calls["set"][0], gpu_state["cuda"]) and calls["set"][1] == torch.device("cuda", 0)
    calls.clear()
    assert "unused on the CPU" in restore_rng(gpu_state, torch.device("cpu")) and calls == {}
    assert torch.equal(torch.get_rng_state(), gpu_state["torch"])
