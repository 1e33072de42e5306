"""The data-parallel backbone: plain DDP (with autocast and an fp16 loss scaler) or a DeepSpeed engine.

Both runners offer the same small interface to the training step, so the step reads the
same for both.  The classifier shard is never given to either: it is model-parallel (its
rows differ per rank) and must not be averaged or partitioned as a replicated weight.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import OptimConfig, ParallelConfig, PrecisionConfig, TrainConfig
from .distributed import DistContext
from .optim import build_backbone_optimizer, param_groups

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class BackboneRunner:
    """Forward, backward and optimiser step of the replicated backbone (interface)."""

    module: nn.Module
    """The backbone itself (not wrapped)."""
    optimizer: torch.optim.Optimizer
    """The optimiser whose param groups the LR schedule sets."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of a local batch (under autocast when configured)."""
        raise NotImplementedError

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-step; gradients are synchronised only when ``last``."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        """Backward of one micro-step's loss; the step's gradient is the mean over ``accum`` micro-steps."""
        raise NotImplementedError

    def check_grads(self, clip: float) -> tuple[bool, Optional[float]]:
        """(gradients finite, global norm before clipping) after the last micro-step; clips in place."""
        raise NotImplementedError

    def step(self, apply: bool) -> bool:
        """Apply the update unless ``apply`` is False; clear gradients; True when weights moved."""
        raise NotImplementedError

    @property
    def loss_scale(self) -> float:
        """Current loss scale (1 without fp16)."""
        return 1.0

    def grad_norm_after_step(self) -> Optional[float]:
        """Gradient norm measured by the engine during ``step`` (DeepSpeed), else None."""
        return None

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[nn.Module]:
        """The backbone with all of its parameters present on this rank (ZeRO-3 gathers them)."""
        yield self.module

    def state_dict(self) -> dict:
        """What rank 0 saves of the backbone side (weights, optimiser, scaler)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict, folder: Path, same_world: bool) -> list[str]:
        """Restore a checkpoint; returns notes about what could not be restored exactly."""
        raise NotImplementedError

    def engine_save(self, folder: Path) -> None:
        """Write engine-owned files into a checkpoint folder (DeepSpeed only)."""


class DDPRunner(BackboneRunner):
    """torch DistributedDataParallel (or the bare module in one process), autocast, GradScaler."""

    def __init__(self, module: nn.Module, ctx: DistContext, lr: float, *, optim: OptimConfig,
                 precision: PrecisionConfig, parallel: ParallelConfig, compile: bool = False):
        self.module, self.ctx = module, ctx
        self.device_type = ctx.device.type
        self.autocast_dtype = AUTOCAST[precision.dtype]
        self.optimizer = build_backbone_optimizer(param_groups(module, optim.weight_decay), optim, lr)
        forward_module: nn.Module = module
        self.ddp: Optional[DistributedDataParallel] = None
        if ctx.world_size > 1:
            self.ddp = DistributedDataParallel(
                module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                process_group=ctx.group, bucket_cap_mb=parallel.bucket_cap_mb,
                # Gradients live in the all-reduce buckets: no second copy, and no stride mismatch
                # warnings for 1x1 convolutions whose weights have ambiguous strides.
                gradient_as_bucket_view=True)
            forward_module = self.ddp
        if compile:  # model.compile
            # Compile the DDP wrapper, not the module inside it.  DDP hooks each parameter's
            # gradient to launch a bucket's all-reduce as soon as the bucket is full; inside a
            # compiled module the whole backward is one graph, so every hook would fire at its
            # end and no all-reduce would overlap the backward.  Given the DDP module, dynamo's
            # DDPOptimizer splits the graph at the bucket boundaries (bucket_cap_mb), so each
            # bucket's all-reduce starts while the earlier layers' backward still runs.
            forward_module = torch.compile(forward_module)
        self.model = forward_module
        fp16 = precision.dtype == "fp16"
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=fp16, init_scale=precision.init_scale,
                                           growth_interval=precision.growth_interval)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings under autocast (bf16/fp16) or in fp32."""
        if self.autocast_dtype is None:
            return self.model(images)
        with torch.autocast(self.device_type, dtype=self.autocast_dtype):
            return self.model(images)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP's no_sync on every micro-step but the last."""
        if not last and self.ddp is not None:
            return self.ddp.no_sync()  # the DDP object itself, also when self.model is its compiled wrapper
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        """Scaled backward of loss / accum."""
        self.scaler.scale(loss / accum).backward()

    def check_grads(self, clip: float) -> tuple[bool, Optional[float]]:
        """Unscale (fp16), then the global norm (and clipping) of the backbone's gradients."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return True, 0.0
        total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
        if clip > 0 or total_norm is None:
            norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        else:
            norm = total_norm([p.grad for p in params])
        value = float(norm)
        return math.isfinite(value), value

    def step(self, apply: bool) -> bool:
        """Optimiser step (through the scaler under fp16), or a skip that also backs the scale off."""
        if self.scaler.is_enabled():
            if apply:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        elif apply:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return apply

    @property
    def loss_scale(self) -> float:
        """The GradScaler's scale (1 without fp16)."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def state_dict(self) -> dict:
        """Backbone weights, optimiser and scaler."""
        return {"backbone": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict, folder: Path, same_world: bool) -> list[str]:
        """Weights, optimiser and scaler (the same at any world size: the backbone is replicated)."""
        if "backbone" not in state:
            raise ValueError(f"checkpoint {folder} holds a DeepSpeed backbone; "
                             "resume it with parallel.strategy=deepspeed")
        self.module.load_state_dict(state["backbone"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return []


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config of a run: generated values, overridden by ``parallel.deepspeed_config``.

    A value ``"auto"`` in the user's JSON takes the generated value.
    """
    generated = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.optim.grad_accum * world_size,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": cfg.optim.clip_grad_norm,
        "bf16": {"enabled": cfg.precision.dtype == "bf16"},
        "fp16": {"enabled": cfg.precision.dtype == "fp16",
                 "initial_scale_power": int(round(math.log2(cfg.precision.init_scale))),
                 "loss_scale_window": cfg.precision.growth_interval},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if not cfg.parallel.deepspeed_config:
        return generated
    return _merge(generated, json.loads(resolve_deepspeed_config(cfg.parallel.deepspeed_config).read_text()))


def resolve_deepspeed_config(value: str) -> Path:
    """The file of ``parallel.deepspeed_config``: the path itself, or a relative path looked up
    beside the installed packages (``launch/deepspeed_zero2.json`` works outside a checkout)."""
    path = Path(value)
    if path.is_file():
        return path
    # The packages sit side by side (a checkout or site-packages): launch/*.json is package data.
    packaged = Path(__file__).resolve().parent.parent / path
    if not path.is_absolute() and packaged.is_file():
        return packaged
    raise FileNotFoundError(f"parallel.deepspeed_config={value!r} does not exist (relative paths are also looked "
                            f"up in the installed package, e.g. launch/deepspeed_zero2.json)")


def _merge(base: dict, user: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in user.items():
        if value == "auto":
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class DeepSpeedRunner(BackboneRunner):
    """A DeepSpeed engine (ZeRO 0-3) around the backbone and a client torch optimiser.

    DeepSpeed accumulates and synchronises gradients itself, and (ZeRO 1-3) skips an update
    whose gradients are not finite (``was_step_applied``).  The training step's own vote
    (classifier gradients, loss; stage 0, which checks nothing) reaches the engine through
    the client optimiser: every stage updates the weights by calling its ``step``, which is
    made a no-op for a skipped step.
    """

    def __init__(self, module: nn.Module, cfg: TrainConfig, ctx: DistContext, lr: float):
        try:
            import deepspeed
        except ImportError:
            raise ImportError("parallel.strategy=deepspeed needs the deepspeed package: "
                              "pip install deepspeed") from None
        self.ctx, self.cfg = ctx, cfg
        # DeepSpeed reads the local rank from the environment (torchrun sets it; a plain or
        # externally initialised process group may not have).
        os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))
        self.bf16 = cfg.precision.dtype == "bf16"
        if self.bf16:
            # DeepSpeed's bf16 mode expects bf16 weights already (BatchNorm fails otherwise).
            module = module.to(torch.bfloat16)
        client = build_backbone_optimizer(param_groups(module, cfg.optim.weight_decay), cfg.optim, lr)
        self._skip = False
        client_step = client.step

        def guarded_step(*args, **kwargs):
            """The client optimiser's step, or nothing while a skipped step is being applied."""
            return None if self._skip else client_step(*args, **kwargs)

        client.step = guarded_step
        self.config = deepspeed_config(cfg, ctx.world_size)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=client, config=self.config,
                                                    dist_init_required=False)
        self.module = self.engine.module
        self.optimizer = client
        self.zero_stage = cfg.parallel.zero_stage
        self._deepspeed = deepspeed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings from the engine (bf16 inputs in bf16 mode)."""
        return self.engine(images.to(torch.bfloat16) if self.bf16 else images)

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        """engine.backward (which divides by the accumulation steps itself); a no-op engine step between."""
        self.engine.backward(loss)
        if not last:
            self.engine.step()  # not a boundary: DeepSpeed only advances its micro-step counter

    def check_grads(self, clip: float) -> tuple[bool, Optional[float]]:
        """DeepSpeed checks finiteness and clips inside its step; nothing to do here."""
        return True, None

    def step(self, apply: bool) -> bool:
        """The engine's boundary step (the client update suppressed unless ``apply``); True when applied."""
        self._skip = not apply
        try:
            self.engine.step()
        finally:
            self._skip = False
        return apply and bool(self.engine.was_step_applied())

    def grad_norm_after_step(self) -> Optional[float]:
        """DeepSpeed's global gradient norm of the last step."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    @property
    def loss_scale(self) -> float:
        """DeepSpeed's fp16 loss scale (1 otherwise)."""
        if self.cfg.precision.dtype != "fp16":
            return 1.0
        return float(getattr(self.engine.optimizer, "cur_scale", getattr(self.engine.optimizer, "loss_scale", 1.0)))

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[nn.Module]:
        """Gather ZeRO-3 partitions for the duration (a collective); other stages hold full weights."""
        if self.zero_stage == 3:
            with self._deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield self.module
        else:
            yield self.module

    def state_dict(self) -> dict:
        """Nothing in shared.pt: the engine writes its own files (see engine_save)."""
        return {"deepspeed": True}

    def engine_save(self, folder: Path) -> None:
        """DeepSpeed's collective save into ``<folder>/deepspeed``."""
        self.engine.save_checkpoint(str(folder), tag="deepspeed", client_state={}, save_latest=False)

    def load_state_dict(self, state: dict, folder: Path, same_world: bool) -> list[str]:
        """The engine's files: everything at the same world size, weights only at another."""
        if not (Path(folder) / "deepspeed").is_dir():
            raise ValueError(f"checkpoint {folder} was written without DeepSpeed; resume it with parallel.strategy=ddp")
        self.engine.load_checkpoint(str(folder), tag="deepspeed", load_optimizer_states=same_world,
                                    load_lr_scheduler_states=False, load_module_only=not same_world)
        if same_world:
            return []
        return ["DeepSpeed partitions the backbone optimiser state by world size: the backbone weights were "
                "restored, its optimiser state starts afresh (the classifier shards were re-sliced exactly)"]


def build_runner(module: nn.Module, cfg: TrainConfig, ctx: DistContext, lr: float) -> BackboneRunner:
    """The runner for ``parallel.strategy``."""
    if cfg.parallel.strategy == "deepspeed":
        return DeepSpeedRunner(module, cfg, ctx, lr)
    return DDPRunner(module, ctx, lr, optim=cfg.optim, precision=cfg.precision, parallel=cfg.parallel,
                     compile=cfg.model.compile)
