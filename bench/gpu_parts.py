"""Building blocks of ``bench/gpu_check.py``: sizes, the steps it times, timing, FLOPs, sync counting."""
from __future__ import annotations

import contextlib
import gc
import inspect
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.overrides import TorchFunctionMode

from partial_fc import PartialFC, build_head_optimizer
from partial_fc.margins import build_margin

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of
# torch.cuda.get_device_name(); the first match wins.  MFU is left out for other devices
# unless --peak-tflops says the figure.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A10G", 70.0))
HOST_READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "nonzero",
              "unique", "unique_consecutive", "masked_select", "argwhere", "nonzero_static"}


@dataclass
class Sizes:
    """What one run measures."""

    backbone: str
    image_size: int
    embedding: int
    batches: list[int]
    full_classes: int
    rates: tuple[float, ...]
    classifier_classes: list[int]
    classifier_batch: int
    capacity_batch: int
    capacity_start: int
    capacity_rate: float
    warmup: int
    steps: int
    sync_steps: int
    capacity_tries: int = 12
    simulated_memory: Optional[int] = None
    """Dry run only: bytes that a try may hold before it counts as out of memory."""


GPU_SIZES = Sizes("iresnet50", 112, 512, [128, 256, 512], 1_000_000, (0.1, 1.0), [1_000_000, 10_000_000],
                  512, 128, 4_000_000, 0.1, warmup=3, steps=10, sync_steps=3)
DRY_SIZES = Sizes("iresnet_tiny", 56, 128, [4, 8], 1000, (0.1, 1.0), [1000, 4000], 16, 4, 500, 0.1,
                  warmup=1, steps=2, sync_steps=2, simulated_memory=3000 * 512)


@dataclass
class Run:
    """The state shared by the sections: device, sizes, clock, and what was found."""

    device: torch.device
    sizes: Sizes
    budget_s: float
    peak_tflops: Optional[float]
    start: float = field(default_factory=time.perf_counter)
    cache: dict = field(default_factory=dict)

    def left(self) -> float:
        """Seconds of the budget still left."""
        return self.budget_s - (time.perf_counter() - self.start)

    def sync(self) -> None:
        """Wait for the device's queue (no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------------- building blocks
def head_takes_compute_dtype() -> bool:
    """True when this PartialFC accepts ``compute_dtype`` (the GEMM dtype of the classifier)."""
    return "compute_dtype" in inspect.signature(PartialFC.__init__).parameters


class _DeviceInitPartialFC(PartialFC):
    """PartialFC whose initial rows are drawn on the target device: 10M rows in milliseconds.

    The timing does not depend on the initial values; the reproducible chunked CPU
    initialisation of the real class would take minutes at this size.
    """

    init_device = torch.device("cpu")

    def _initial_rows(self, std: float, dtype: torch.dtype, *args, **kwargs) -> torch.Tensor:
        width = self.num_centers * self.embedding_size
        return torch.empty(self.num_local, width, dtype=dtype, device=self.init_device).normal_(0.0, std)


def build_classifier(run: Run, classes: int, rate: float,
                     rows: torch.dtype) -> tuple[PartialFC, torch.optim.Optimizer]:
    """A one-rank Partial FC (ArcFace) with bf16 GEMMs and its row SGD."""
    cls = type("_Head", (_DeviceInitPartialFC,), {"init_device": run.device})
    kwargs = {"compute_dtype": torch.bfloat16} if head_takes_compute_dtype() else {}
    head = cls(run.sizes.embedding, classes, build_margin("arcface"), sample_rate=rate,
               param_dtype=rows, **kwargs).to(run.device)
    return head, build_head_optimizer(head, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)


def head_context(run: Run) -> contextlib.AbstractContextManager:
    """Autocast for the classifier when PartialFC cannot be told its GEMM dtype."""
    if head_takes_compute_dtype():
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=torch.bfloat16)


def build_backbone_and_optimizer(run: Run) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The backbone (channels-last on GPU) and torch SGD with momentum."""
    from train.backbones import build_backbone
    torch.manual_seed(0)
    net = build_backbone(run.sizes.backbone, embedding_size=run.sizes.embedding,
                         input_size=run.sizes.image_size).to(run.device)
    if run.device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def images_and_labels(run: Run, batch: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch on the device (the loader is not measured)."""
    s = run.sizes.image_size
    images = torch.rand(batch, 3, s, s, device=run.device) * 2 - 1
    if run.device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, classes, (batch,), device=run.device)


def backbone_step(net, opt, images) -> Callable[[], None]:
    """Forward under bf16 autocast, a trivial loss, backward, SGD."""
    def step() -> None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            emb = net(images)
        emb.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def full_step(run: Run, net, opt, head, head_opt, images, labels) -> Callable[[], None]:
    """Backbone (bf16 autocast) + Partial FC + both optimisers."""
    def step() -> None:
        with torch.autocast(run.device.type, dtype=torch.bfloat16):
            emb = net(images)
        with head_context(run):
            loss = head(emb.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        head_opt.step()
        head_opt.zero_grad()
    return step


def classifier_step(run: Run, head, head_opt, features, labels) -> Callable[[], None]:
    """The Partial FC step alone on fixed features: forward, backward, row SGD."""
    def step() -> None:
        with head_context(run):
            loss = head(features, labels)
        loss.backward()
        head_opt.step()
        head_opt.zero_grad()
        features.grad = None
    return step


def time_ms(run: Run, fn: Callable[[], None], steps: Optional[int] = None) -> float:
    """Mean ms per call over ``steps`` calls after the warm-up (queued back to back, one sync at the end)."""
    for _ in range(run.sizes.warmup):
        fn()
    run.sync()
    steps = steps or run.sizes.steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    run.sync()
    return (time.perf_counter() - t0) * 1e3 / steps


def rows_per_step(head: PartialFC) -> int:
    """Rows the classifier multiplies per step (sampled, or all at r = 1)."""
    return head.num_local if head.num_sample >= head.num_local else head.num_sample


def classifier_flops(batch: int, dim: int, rows: int) -> int:
    """FLOPs of the classifier's three GEMMs (logits, grad of features, grad of rows)."""
    return 3 * 2 * batch * dim * rows


def backbone_macs(run: Run) -> int:
    """Multiply-accumulates of one image's forward (``train/backbones/flops.py``), counted once per run."""
    if "macs" not in run.cache:
        from train.backbones.flops import profile_backbone
        s = run.sizes
        run.cache["macs"] = profile_backbone(s.backbone, input_size=s.image_size, embedding_size=s.embedding).flops
    return run.cache["macs"]


def mfu(run: Run, flops: float, ms: float) -> str:
    """Model FLOPs utilisation against the stated peak (``n/a`` without one)."""
    if run.peak_tflops is None:
        return "n/a"
    return f"{flops / (ms / 1e3) / (run.peak_tflops * 1e12):.1%}"


def free_memory(run: Run) -> None:
    """Return cached blocks to the device between sections."""
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(err: BaseException) -> bool:
    """An out-of-memory failure (CUDA's, or the dry run's simulated one)."""
    if isinstance(err, MemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


class HostReads(TorchFunctionMode):
    """Counts the Python-level calls that turn a tensor into a host value (or a data-sized shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.names.append(name)
        elif name == "__getitem__" and len(args) > 1 and torch.is_tensor(args[1]) and args[1].dtype == torch.bool:
            self.names.append("boolean index")
        return func(*args, **(kwargs or {}))


def count_syncs(run: Run, step: Callable[[], None]) -> tuple[str, str]:
    """(CUDA sync warnings per step, host reads per step with their names) over sync_steps steps."""
    n = run.sizes.sync_steps
    step()  # warm-up: lazy initialisation syncs are not the step's
    run.sync()
    cuda = "n/a (CPU)"
    if run.device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(n):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        cuda = f"{len(syncs) / n:g}"
    with HostReads() as reads:
        for _ in range(n):
            step()
    run.sync()
    names: dict[str, int] = {}
    for name in reads.names:
        names[name] = names.get(name, 0) + 1
    detail = ", ".join(f"{k} x{v / n:g}" for k, v in sorted(names.items()))
    return cuda, f"{len(reads.names) / n:g}" + (f" ({detail})" if detail else "")


def error_text(err: BaseException) -> str:
    """One line for a table: the error's type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"error: {type(err).__name__}: {text[0][:200] if text else ''}".replace("|", "/")
