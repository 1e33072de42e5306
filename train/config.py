"""The training configuration: one dataclass per section, a docstring under every field.

A run is described by a preset (``configs/<name>.yaml``) or a YAML file, plus overrides
``section.key=value``.  The docstrings are the help text (``docs/training.md`` and the
command line are generated from them).  Everything is validated once, when the
:class:`TrainConfig` is built, and errors name the key, the value and the fix.
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .config_parse import (ConfigError, build_section, coerce, field_types, parse_override, to_plain,
                           unknown_key_error)



def _preset_dir() -> Path:
    """``configs/`` of a source checkout, else the copy an installed wheel put under ``<prefix>/share``."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "shardface" / "configs"


PRESET_DIR = _preset_dir()


@dataclass
class DataConfig:
    """Where the training samples come from and how they are batched."""

    manifest: str = ""
    """Path of the dataset's manifest.json (data shards, class count, verification sets)."""
    loader: str = "webdataset"
    """Loader kind: webdataset (tar shards, PIL), dali (NVIDIA DALI) or synthetic (in-memory tensors)."""
    batch_size: int = 128
    """Local batch: samples per rank per micro-step (global batch = batch_size x world size x grad_accum)."""
    workers: int = 2
    """Loader worker processes (or DALI threads) per rank."""
    mode: str = "resampled"
    """resampled: shards drawn with replacement, a fixed number of batches per epoch; exact: every sample once per epoch."""
    image_size: int = 112
    """Side of the square input images in pixels."""
    shuffle_buffer: int = 1000
    """Samples held in the shuffle buffer of the webdataset loader."""
    flip: bool = True
    """Random horizontal flip of training images."""
    aug_crop: float = 0.0
    """Probability per sample of a random resized crop (64-100% of the area, aspect 3/4-4/3, resized back); 0: off."""
    aug_lowres: float = 0.0
    """Probability per sample of a low-resolution resize (down to 50-80% of the side and back up, as insightface's dali_aug); 0: off."""
    aug_blur: float = 0.0
    """Probability per sample of a Gaussian blur (sigma 0.5-1.5 px); 0: off."""
    aug_color: float = 0.0
    """Probability per sample of a brightness, contrast and saturation jitter (each factor 0.8-1.2); 0: off."""
    aug_gray: float = 0.0
    """Probability per sample of conversion to grayscale (BT.601 luma in all three channels); 0: off."""
    aug_erase: float = 0.0
    """Probability per sample of random erasing: a mid-gray rectangle over 2-20% of the area (occlusion); 0: off."""
    strict: bool = False
    """Stop on an undecodable sample instead of skipping and counting it."""
    dali_verify: str = "header"
    """loader=dali: what indexing checks per image, header (fast) or decode (every image decoded once with PIL)."""
    epoch_samples: Optional[int] = None
    """Samples per epoch (all ranks together); None: the manifest's num_samples."""
    num_classes: Optional[int] = None
    """Number of identities; None: the manifest's num_classes (must match it when both are given)."""
    num_samples: Optional[int] = None
    """Size of the in-memory dataset of loader=synthetic without a manifest."""


@dataclass
class ModelConfig:
    """The backbone that turns a face image into an embedding."""

    backbone: str = "iresnet50"
    """Backbone name from train.backbones (iresnet18/34/50/100/200, mobilefacenet, vit_t/s/b, iresnet_tiny, ...)."""
    embedding_size: int = 512
    """Width D of the embedding."""
    dropout: float = 0.0
    """Dropout before the embedding layer."""
    channels_last: bool = False
    """Store images and convolution weights in channels-last memory format (faster on recent GPUs)."""
    compile: bool = False
    """Compile the backbone with torch.compile."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (backbones that support it)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the backbone builder."""


@dataclass
class LossConfig:
    """The sharded margin classifier (Partial FC) and an optional metric loss."""

    margin: str = "arcface"
    """Margin name from partial_fc.margins (arcface, cosface, combined, adaface, ...)."""
    margin_options: dict[str, Any] = field(default_factory=dict)
    """Overrides of the margin's parameters, e.g. {s: 64, m: 0.5}."""
    sample_rate: float = 1.0
    """Fraction in (0, 1] of each rank's classes used per step (Partial FC); 1.0: all classes."""
    head_dtype: str = "fp32"
    """Storage dtype of the classifier rows and their optimiser state: fp32 or bf16."""
    head_seed: Optional[int] = None
    """Seed of the classifier's initial rows, negative sampling and random margins (ElasticFace); None: the run's seed."""
    metric_loss: str = "none"
    """Additional metric loss: none, center, triplet or circle."""
    metric_weight: float = 0.0
    """Weight of the metric loss added to the classification loss."""
    metric_options: dict[str, Any] = field(default_factory=dict)
    """Overrides of the metric loss's parameters."""
    classifier: bool = True
    """Train with the margin classifier's loss; false: the metric loss alone (its shard is built but never used)."""
    check_inputs: str = "deferred"
    """Label-range and finiteness checks of the global batch: deferred (device flags read with the step's one host read; the error names the step, sample and rank), strict (at once, one host read per forward) or off."""


@dataclass
class OptimConfig:
    """Optimisers (backbone and classifier shard), learning-rate schedule, accumulation, clipping."""

    name: str = "sgd"
    """Optimiser of backbone and classifier: sgd (momentum) or adamw."""
    lr: float = 0.1
    """Peak learning rate at the reference global batch (see reference_batch)."""
    reference_batch: int = 1024
    """Global batch for which lr is given; the lr is scaled linearly to the actual global batch. 0: no scaling."""
    head_lr: Optional[float] = None
    """Learning rate of the classifier shard (before scaling); None: the same as lr."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """Weight decay (L2 for SGD, decoupled for AdamW); never applied to norms, biases or PReLU slopes."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to the peak learning rate."""
    schedule: str = "poly"
    """Decay after warm-up: poly (1 - progress)^power, cosine, or constant."""
    poly_power: float = 2.0
    """Power of the polynomial decay."""
    min_lr_ratio: float = 0.0
    """Floor of the decay as a fraction of the peak learning rate."""
    grad_accum: int = 1
    """Micro-steps whose gradients are accumulated into one optimiser step (loss averaged over them)."""
    clip_grad_norm: float = 0.0
    """Clip the backbone's gradient to this global L2 norm; 0: no clipping."""
    max_nonfinite_in_row: int = 10
    """Stop the run after this many consecutive steps with a non-finite loss or gradient (each is skipped; fp16 loss-scale overflows with a finite loss are skipped but not counted here)."""


@dataclass
class ParallelConfig:
    """How the backbone is replicated (the classifier is always sharded over ranks)."""

    strategy: str = "ddp"
    """ddp (torch DistributedDataParallel) or deepspeed (ZeRO)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage 0-3 (strategy=deepspeed only)."""
    deepspeed_config: str = ""
    """Optional DeepSpeed JSON file whose keys override the generated DeepSpeed config."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl on GPU, gloo on CPU), nccl or gloo."""
    bucket_cap_mb: int = 25
    """DDP gradient bucket size in MiB."""


@dataclass
class PrecisionConfig:
    """Numeric precision of the backbone's forward and backward."""

    dtype: str = "fp32"
    """fp32, bf16 (autocast) or fp16 (autocast with a dynamic loss scale)."""
    init_scale: float = 65536.0
    """Initial loss scale for fp16."""
    growth_interval: int = 2000
    """Steps without overflow before the fp16 loss scale doubles."""
    classifier: str = "auto"
    """Compute dtype of the classifier's cosine GEMMs (forward and backward; sums, margins, softmax and row updates stay fp32): auto (follows dtype), fp32, tf32 (CUDA), bf16 or fp16 (CUDA)."""
    tf32: bool = False
    """Allow TF32 matmuls and convolutions for the backbone on CUDA (no effect on CPU)."""


@dataclass
class CheckpointConfig:
    """Periodic checkpoints and resuming."""

    dir: str = ""
    """Checkpoint folder; empty: <output_dir>/checkpoints."""
    every_steps: int = 1000
    """Save every this many steps (and at the end); 0: only at the end."""
    keep_last: int = 3
    """Keep this many most recent checkpoints; 0: keep all."""
    resume: str = "none"
    """none, latest (the newest checkpoint in dir, if any) or the path of a checkpoint folder."""
    export: bool = True
    """Write an embedding-only export (backbone weights + config) at the end."""
    storage: str = "shared"
    """shared (one folder every node sees; checked at start) or node_local (each node keeps its own ranks' files in dir on its own disk)."""
    async_save: bool = False
    """Periodic saves copy the state to host memory and a background thread writes it while training goes on."""


@dataclass
class EvalConfig:
    """Verification (1:1) evaluation of the backbone during and after training."""

    every_steps: int = 0
    """Evaluate every this many steps (and at the end); 0: only at the end."""
    bins: Optional[list[str]] = None
    """Verification .bin files; None: the manifest's verification sets; []: no evaluation."""
    batch_size: int = 256
    """Images per forward during evaluation."""
    at_end: bool = True
    """Evaluate after the last step."""


@dataclass
class PreemptConfig:
    """Stopping cleanly on a scheduler's signal (SLURM preemption, the time limit, a node drain)."""

    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals after which every rank finishes its step, saves a checkpoint of it and exits with code 75 (resume with checkpoint.resume=latest); a second one aborts; []: the signals act as usual."""
    grace_s: int = 300
    """Seconds torchrun and shardface train give the ranks to finish the step and save after such a signal before they are killed."""


@dataclass
class LogConfig:
    """Console and Weights & Biases logging (rank 0 only)."""

    every_steps: int = 50
    """Print and log a metrics line every this many steps."""
    wandb: bool = False
    """Log to Weights & Biases (offline unless WANDB_API_KEY is set)."""
    project: str = "shardface"
    """W&B project."""
    run_name: str = ""
    """W&B run name; empty: the output folder's name."""
    entity: str = ""
    """W&B entity (team); empty: the default of the API key."""
    progress: bool = True
    """Show a progress bar when the console is a terminal."""


@dataclass
class FailureConfig:
    """How fast a failing, hung or vanished rank stops the whole job (see docs/training.md, Failures)."""

    hang_timeout_s: float = 45.0
    """A rank stuck on one line of code outside a collective this long, with no step done, is reported hung and the job stops."""
    heartbeat_timeout_s: float = 15.0
    """A rank whose heartbeat is silent this long (killed, machine lost) stops the job."""


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig,
    "parallel": ParallelConfig, "precision": PrecisionConfig, "checkpoint": CheckpointConfig,
    "eval": EvalConfig, "log": LogConfig,
    "preempt": PreemptConfig, "failure": FailureConfig,
}


@dataclass
class TrainConfig:
    """A whole training run."""

    output_dir: str = "runs/default"
    """Run folder: config.yaml, checkpoints, evaluation plots, export."""
    seed: int = 0
    """Seed of everything random (weights, sampling, data order); a run is deterministic given seed and world size."""
    max_steps: int = 0
    """Optimiser steps to train; 0: derive from epochs."""
    epochs: int = 0
    """Epochs to train when max_steps is 0."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""
    deterministic: bool = False
    """Use deterministic GPU kernels (slower; CPU runs are bitwise reproducible without it)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data section."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model section."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss section."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimisation section."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallelism section."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Precision section."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint section."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation section."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging section."""
    preempt: PreemptConfig = field(default_factory=PreemptConfig)
    """Preemption section."""
    failure: FailureConfig = field(default_factory=FailureConfig)
    """Failure-handling section."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every value; raise ConfigError naming the key, the value and the fix."""
        from .config_check import check_config
        check_config(self)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A config from a nested mapping (unknown keys raise ConfigError)."""
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a mapping of sections, got {type(values).__name__}")
        top = {k: v for k, v in field_types(cls).items() if k not in SECTIONS}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in SECTIONS:
                kwargs[key] = build_section(SECTIONS[key], value, key)
            elif key in top:
                kwargs[key] = coerce(value, top[key], key)
            else:
                raise unknown_key_error(str(key), all_keys())
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, text: str) -> "TrainConfig":
        """A config from YAML text."""
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config is not valid YAML: {err}") from err
        return cls.from_dict(values)

    def to_yaml(self) -> str:
        """The whole config as YAML (every key, so a run folder's config.yaml is complete)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_dict(self) -> dict:
        """The whole config as nested built-in types."""
        return to_plain(self)

    @classmethod
    def load(cls, preset_or_path: Optional[str] = None, overrides: Optional[list[str]] = None) -> "TrainConfig":
        """A preset name (``configs/<name>.yaml``) or a YAML path, then ``section.key=value`` overrides."""
        values: dict = {}
        if preset_or_path:
            path = resolve_preset(preset_or_path)
            try:
                values = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path} is not valid YAML: {err}") from err
            if not isinstance(values, dict):
                raise ConfigError(f"{path} must hold a mapping of config sections")
        for text in overrides or []:
            parts, value = parse_override(text)
            apply_override(values, parts, value, text)
        return cls.from_dict(values)

    def replace(self, **sections: Any) -> "TrainConfig":
        """A copy with top-level fields or whole sections replaced (validated again)."""
        return dataclasses.replace(self, **sections)


def all_keys() -> list[str]:
    """Every valid key, dotted (``optim.lr``), for suggestions and documentation."""
    keys = [k for k in field_types(TrainConfig) if k not in SECTIONS]
    for name, section in SECTIONS.items():
        keys += [f"{name}.{k}" for k in field_types(section)]
    return keys


def apply_override(values: dict, parts: list[str], value: str, text: str) -> None:
    """Set ``values[section][key] = value`` after checking that the key exists."""
    key = ".".join(parts)
    known = all_keys()
    if key in SECTIONS:
        raise ConfigError(f"'{key}' is a config section, not a value: set one of its keys "
                          f"(e.g. {key}.{next(iter(field_types(SECTIONS[key])))}=...)")
    if key not in known:
        # ``loss.margin_options.m=0.4`` reaches into a dict-valued field.
        section_type = SECTIONS.get(parts[0])
        inner = field_types(section_type).get(parts[1]) if section_type and len(parts) > 2 else None
        if typing.get_origin(inner) is not dict:
            raise unknown_key_error(key, known)
        section = values.get(parts[0]) or {}
        values[parts[0]] = section
        target = section.get(parts[1]) or {}
        section[parts[1]] = target
        for p in parts[2:-1]:
            target = target.setdefault(p, {})
        target[parts[-1]] = yaml.safe_load(value)
        return
    if len(parts) == 1:
        values[parts[0]] = value
    else:
        if parts[0] not in SECTIONS or len(parts) != 2:
            raise unknown_key_error(key, known)
        section = values.get(parts[0]) or {}
        values[parts[0]] = section
        section[parts[1]] = value


def list_presets() -> list[str]:
    """Names of the presets in ``configs/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_preset(preset_or_path: str) -> Path:
    """The YAML file of a preset name or a path; ConfigError when neither exists."""
    path = Path(preset_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    preset = PRESET_DIR / f"{preset_or_path}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(f"config {preset_or_path!r} is neither a YAML file nor a preset "
                      f"(presets: {', '.join(list_presets()) or 'none found in ' + str(PRESET_DIR)})")


__all__ = ["ConfigError", "TrainConfig", "DataConfig", "ModelConfig", "LossConfig", "OptimConfig",
           "ParallelConfig", "PrecisionConfig", "CheckpointConfig", "EvalConfig", "LogConfig", "PreemptConfig",
           "SECTIONS", "all_keys", "list_presets", "resolve_preset"]
