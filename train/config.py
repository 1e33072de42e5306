"""The training configuration: one dataclass per section, a docstring under every field.

A run is described by a preset (``configs/<name>.yaml``) or a YAML file, plus overrides
``section.key=value``.  The docstrings are the help text (``docs/training.md`` and the
command line are generated from them).  Each section checks its own fields when it is
built (its ``__post_init__``, with the helpers of :mod:`train.config_check`); only the rules
that span sections are on :class:`TrainConfig`.  Errors name the key as ``--set`` spells it,
the value and the fix.  A field with a fixed set of values is a ``Literal[...]``: the parser,
the "did you mean" of a wrong value and the generated reference read its choices.

Adding a validated field::

    warmup_steps: int = 0
    '''Steps of linear warm-up from 0 to the peak learning rate.'''
    ...
    def __post_init__(self) -> None:
        super().__post_init__()             # the Literal fields' choices
        self.at_least("warmup_steps", 0)    # -> "optim.warmup_steps=-1 must be >= 0"
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from data_pipeline.kinds import LOADER_ALIASES, EpochMode, LoaderKind

from .config_check import Section
from .config_parse import ConfigError, build_section, coerce, field_types, parse_override, to_plain, unknown_key_error


def _preset_dir() -> Path:
    """``configs/`` of a source checkout, else the copy an installed wheel put under ``<prefix>/share``."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "shardface" / "configs"


PRESET_DIR = _preset_dir()


@dataclass
class DataConfig(Section):
    """Where the training samples come from and how they are batched."""

    PATH = "data"
    ALIASES = {"loader": LOADER_ALIASES}

    manifest: str = ""
    """Path or URL (s3://, gs://, http(s)://) of the dataset's manifest.json (data shards, class count, verification sets), or of an insightface train.rec (or its folder) to train from RecordIO directly."""
    loader: LoaderKind = "webdataset"
    """Loader kind: webdataset (tar shards, PIL), dali (NVIDIA DALI; shards or a .rec), rec (a .rec read in Python, PIL) or random_tensors (random in-memory images and labels; the former name synthetic is deprecated)."""
    batch_size: int = 128
    """Local batch: samples per rank per micro-step (global batch = batch_size x world size x grad_accum)."""
    workers: int = 2
    """Loader worker processes (or DALI threads) per rank."""
    mode: EpochMode = "resampled"
    """resampled: shards drawn with replacement, a fixed number of batches per epoch; exact: every sample once per epoch."""
    image_size: int = 112
    """Side of the square input images in pixels."""
    shuffle_buffer: int = 1000
    """Least samples per shuffle window (shards read whole and permuted together; a shard this big is one window); 0 or 1: no shuffle."""
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
    max_bad_fraction: float = 0.1
    """Stop the run when more than this fraction of the samples read were bad (skipped), judged from the 100th sample on; 1: never stop."""
    retries: int = 5
    """Remote data (URLs): failed attempts in a row, opening or reading, before a shard counts as unreachable (skipped and counted as unreachable_shard; an error with strict)."""
    retry_backoff_s: float = 1.0
    """Remote data: first wait before a retry, doubled after each failure (at most 30 s)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Remote data: fsspec client options per protocol, e.g. {s3: {endpoint_url: "http://host:9000"}}; credentials are best left to the client's own settings (AWS_* variables, ~/.aws)."""
    cache_dir: str = ""
    """Remote data: local folder for staged copies (loader=dali, verification sets); empty: ~/.cache/shardface/remote."""
    cache_gb: float = 50.0
    """Remote data: bound on the staged copies in cache_dir, in GiB (loader=dali refuses a remote dataset larger than this)."""
    dali_verify: Literal["header", "decode"] = "header"
    """loader=dali: what indexing checks per image, header (fast) or decode (every image decoded once with PIL)."""
    epoch_samples: Optional[int] = None
    """Samples per epoch (all ranks together); None: the manifest's num_samples."""
    num_classes: Optional[int] = None
    """Number of identities; None: the manifest's num_classes (must match it when both are given)."""
    num_samples: Optional[int] = None
    """Size of the in-memory dataset of loader=random_tensors without a manifest."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.at_least("batch_size", 1)
        self.at_least("workers", 0)
        self.at_least("image_size", 8)
        self.at_least("shuffle_buffer", 0, "0 or 1 does not shuffle")
        self.at_least("epoch_samples", 1)
        self.at_least("num_classes", 1)
        self.at_least("num_samples", 1)
        self.within("max_bad_fraction", 0.0, 1.0)
        self.at_least("retries", 0)
        self.at_least("retry_backoff_s", 0.0)
        if not self.cache_gb > 0:
            raise ConfigError(f"data.cache_gb={self.cache_gb} must be positive (GiB of staged remote shards)")
        if not isinstance(self.storage_options, dict) or \
                not all(isinstance(v, dict) for v in self.storage_options.values()):
            raise ConfigError(f"data.storage_options={self.storage_options!r} must map a protocol to its options, "
                              "e.g. {s3: {endpoint_url: 'http://host:9000'}}")
        for name in ("crop", "lowres", "blur", "color", "gray", "erase"):
            self.within(f"aug_{name}", 0.0, 1.0, hint="a probability per sample; 0 turns it off")
        if self.epoch_samples is not None and self.mode == "exact":
            raise ConfigError(f"data.epoch_samples={self.epoch_samples} applies to data.mode=resampled only: "
                              "an exact epoch is the whole dataset; drop it or use data.mode=resampled")
        if not self.manifest and self.loader == "random_tensors" and \
                (self.num_classes is None or self.num_samples is None):
            raise ConfigError("data.loader=random_tensors without data.manifest needs data.num_classes and "
                              f"data.num_samples (got {self.num_classes} and {self.num_samples})")
        if not self.manifest and self.loader != "random_tensors":
            raise ConfigError(f"data.manifest is empty: the {self.loader} loader needs a manifest.json "
                              f"{'or a train.rec ' if self.loader in ('rec', 'dali') else ''}"
                              "(or use data.loader=random_tensors)")


@dataclass
class ModelConfig(Section):
    """The backbone that turns a face image into an embedding."""

    PATH = "model"

    backbone: str = "iresnet50"
    """Backbone name from train.backbones (iresnet18/34/50/100/200, mobilefacenet, vit_t/s/b, iresnet_tiny, ...; aliases r18/r34/r50/r100/r200, mbf = mobilefacenet_mbf)."""
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
    init_from: str = ""
    """Embedding model file (model.pt of a run, or written by `shardface import insightface`) whose backbone weights start training (fine-tuning; the classifier starts fresh); a resumed checkpoint takes precedence. Empty: random initialisation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.at_least("embedding_size", 1)
        self.within("dropout", 0.0, 1.0, high_open=True)


@dataclass
class LossConfig(Section):
    """The sharded margin classifier (Partial FC) and an optional metric loss."""

    PATH = "loss"

    margin: str = "arcface"
    """Margin name from partial_fc.margins (arcface, cosface, combined, adaface, ...)."""
    margin_options: dict[str, Any] = field(default_factory=dict)
    """Overrides of the margin's parameters, e.g. {s: 64, m: 0.5}."""
    sample_rate: float = 1.0
    """Fraction in (0, 1] of each rank's classes used per step (Partial FC); 1.0: all classes."""
    head_dtype: Literal["fp32", "bf16"] = "fp32"
    """Storage dtype of the classifier rows and their optimiser state: fp32 or bf16."""
    head_seed: Optional[int] = None
    """Seed of the classifier's initial rows, negative sampling and random margins (ElasticFace); None: the run's seed."""
    metric_loss: Literal["none", "center", "triplet", "circle"] = "none"
    """Additional metric loss: none, center, triplet or circle."""
    metric_weight: float = 0.0
    """Weight of the metric loss added to the classification loss."""
    metric_options: dict[str, Any] = field(default_factory=dict)
    """Overrides of the metric loss's parameters."""
    classifier: bool = True
    """Train with the margin classifier's loss; false: the metric loss alone (its shard is built but never used)."""
    interclass_filtering_threshold: float = 0.0
    """A negative class whose cosine with a sample exceeds this leaves the sample's softmax (its cosine set to 0, no gradient), as insightface's setting of the same name (0.4 in their WebFace12M conflict recipe); 0: off."""
    check_inputs: Literal["deferred", "strict", "off"] = "deferred"
    """Label-range and finiteness checks of the global batch: deferred (device flags read with the step's one host read; the error names the step, sample and rank), strict (at once, one host read per forward) or off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.within("sample_rate", 0.0, 1.0, low_open=True, hint="the fraction of each rank's classes sampled per step")
        self.at_least("metric_weight", 0.0)
        self.within("interclass_filtering_threshold", 0.0, 1.0,
                    hint="a cosine above which negatives are filtered (e.g. 0.4; 0 = off)")
        if self.metric_loss != "none" and self.metric_weight == 0.0:
            raise ConfigError(f"loss.metric_loss={self.metric_loss!r} with loss.metric_weight=0 has no effect: "
                              "set loss.metric_weight > 0 or loss.metric_loss=none")
        if not self.classifier and self.metric_loss == "none":
            raise ConfigError("loss.classifier=false with loss.metric_loss=none leaves no loss to train: "
                              "set loss.metric_loss (center, triplet or circle) or loss.classifier=true")


@dataclass
class OptimConfig(Section):
    """Optimisers (backbone and classifier shard), learning-rate schedule, accumulation, clipping."""

    PATH = "optim"

    name: Literal["sgd", "adamw"] = "sgd"
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
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    """Decay after warm-up: poly (1 - progress)^power, cosine, or constant."""
    poly_power: float = 2.0
    """Power of the polynomial decay."""
    min_lr_ratio: float = 0.0
    """Floor of the decay as a fraction of the peak learning rate."""
    row_decay: Literal["sampled", "lazy_dense"] = "sampled"
    """Weight decay of classifier rows not sampled in a step (loss.sample_rate < 1): sampled (a row decays, like it moves, only in steps that sample it; the default, so that a class's row changes only when data about it is seen) or lazy_dense (the decay dense SGD would have applied over the missed steps, lr schedule included, is applied when the row is next sampled: exact for momentum 0, the momentum itself is not carried over missed steps)."""
    grad_accum: int = 1
    """Micro-steps whose gradients are accumulated into one optimiser step (loss averaged over them)."""
    clip_grad_norm: float = 0.0
    """Clip the backbone's gradient to this global L2 norm; 0: no clipping."""
    max_nonfinite_in_row: int = 10
    """Stop the run after this many consecutive steps with a non-finite loss or gradient (each is skipped; fp16 loss-scale overflows with a finite loss are skipped but not counted here)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        self.at_least("head_lr", 0.0, "None: the same as optim.lr")
        self.at_least("reference_batch", 0, "0 does not scale the learning rate")
        self.at_least("momentum", 0.0)
        self.at_least("weight_decay", 0.0)
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must each be in [0, 1)")
        self.at_least("eps", 0.0)
        self.at_least("warmup_steps", 0)
        self.at_least("poly_power", 0.0)
        self.within("min_lr_ratio", 0.0, 1.0)
        self.at_least("grad_accum", 1)
        self.at_least("clip_grad_norm", 0.0, "0 disables clipping")
        self.at_least("max_nonfinite_in_row", 1)


@dataclass
class ParallelConfig(Section):
    """How the backbone is replicated (the classifier is always sharded over ranks)."""

    PATH = "parallel"

    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """ddp (torch DistributedDataParallel) or deepspeed (ZeRO)."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    """DeepSpeed ZeRO stage 0-3 (strategy=deepspeed only)."""
    deepspeed_config: str = ""
    """Optional DeepSpeed JSON file whose keys override the generated DeepSpeed config."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: auto (nccl on GPU, gloo on CPU), nccl or gloo."""
    bucket_cap_mb: int = 25
    """DDP gradient bucket size in MiB."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.at_least("bucket_cap_mb", 1)
        if self.deepspeed_config and self.strategy != "deepspeed":
            raise ConfigError(f"parallel.deepspeed_config={self.deepspeed_config!r} is set but "
                              f"parallel.strategy={self.strategy!r}: set parallel.strategy=deepspeed")


@dataclass
class PrecisionConfig(Section):
    """Numeric precision of the backbone's forward and backward."""

    PATH = "precision"

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp32, bf16 (autocast) or fp16 (autocast with a dynamic loss scale)."""
    init_scale: float = 65536.0
    """Initial loss scale for fp16."""
    growth_interval: int = 2000
    """Steps without overflow before the fp16 loss scale doubles."""
    classifier: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = "auto"
    """Compute dtype of the classifier's cosine GEMMs (forward and backward; sums, margins, softmax and row updates stay fp32): auto (follows dtype), fp32, tf32 (CUDA), bf16 or fp16 (CUDA)."""
    tf32: bool = False
    """Allow TF32 matmuls and convolutions for the backbone on CUDA (no effect on CPU)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.at_least("init_scale", 1.0)
        self.at_least("growth_interval", 1)


@dataclass
class CheckpointConfig(Section):
    """Periodic checkpoints and resuming."""

    PATH = "checkpoint"

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
    storage: Literal["shared", "node_local"] = "shared"
    """shared (one folder every node sees; checked at start) or node_local (each node keeps its own ranks' files in dir on its own disk)."""
    async_save: bool = False
    """Periodic saves copy the state to host memory and a background thread writes it while training goes on."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.at_least("every_steps", 0, "0 saves only at the end")
        self.at_least("keep_last", 0, "0 keeps all")


@dataclass
class EvalConfig(Section):
    """Verification (1:1) evaluation of the backbone during and after training."""

    PATH = "eval"

    every_steps: int = 0
    """Evaluate every this many steps (and at the end); 0: only at the end."""
    bins: Optional[list[str]] = None
    """Verification .bin files; None: the manifest's verification sets; []: no evaluation."""
    batch_size: int = 256
    """Images per forward during evaluation."""
    at_end: bool = True
    """Evaluate after the last step."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.at_least("every_steps", 0, "0 evaluates only at the end")
        self.at_least("batch_size", 1)


@dataclass
class PreemptConfig(Section):
    """Stopping cleanly on a scheduler's signal (SLURM preemption, the time limit, a node drain)."""

    PATH = "preempt"

    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals after which every rank finishes its step, saves a checkpoint of it and exits with code 75 (resume with checkpoint.resume=latest); a second one aborts; []: the signals act as usual."""
    grace_s: int = 300
    """Seconds torchrun and shardface train give the ranks to finish the step and save after such a signal before they are killed."""

    def __post_init__(self) -> None:
        from .preemption import signal_numbers  # signal names only; torch stays unimported
        super().__post_init__()
        try:
            signal_numbers(self.signals)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.at_least("grace_s", 1)


@dataclass
class LogConfig(Section):
    """Console and Weights & Biases logging (rank 0 only)."""

    PATH = "log"

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

    def __post_init__(self) -> None:
        super().__post_init__()
        self.at_least("every_steps", 1)


@dataclass
class FailureConfig(Section):
    """How fast a failing, hung or vanished rank stops the whole job (see docs/training.md, Failures)."""

    PATH = "failure"

    hang_timeout_s: float = 45.0
    """A rank stuck on one line of code outside a collective this long, with no step done, is reported hung and the job stops."""
    heartbeat_timeout_s: float = 15.0
    """A rank whose heartbeat is silent this long (killed, machine lost) stops the job."""
    startup_timeout_s: float = 900.0
    """The hang limit before the first step: start-up (parallel setup, a first DeepSpeed run's op build, the checkpoint restore) may sit on one line this long."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hang_timeout_s <= 0 or self.heartbeat_timeout_s <= 0:
            raise ConfigError(f"failure.hang_timeout_s={self.hang_timeout_s} and failure.heartbeat_timeout_s="
                              f"{self.heartbeat_timeout_s} must both be > 0")
        if self.startup_timeout_s <= 0:
            raise ConfigError(f"failure.startup_timeout_s={self.startup_timeout_s} must be > 0")


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig,
    "parallel": ParallelConfig, "precision": PrecisionConfig, "checkpoint": CheckpointConfig,
    "eval": EvalConfig, "log": LogConfig,
    "preempt": PreemptConfig, "failure": FailureConfig,
}


@dataclass
class TrainConfig(Section):
    """A whole training run."""

    output_dir: str = "runs/default"
    """Run folder: config.yaml, checkpoints, evaluation plots, export."""
    overwrite: bool = False
    """Start a new run in an output_dir that holds an earlier run (its checkpoints and model.pt are removed first); false: such a start is refused unless checkpoint.resume is set."""
    seed: int = 0
    """Seed of everything random (weights, sampling, data order); a run is deterministic given seed and world size."""
    max_steps: int = 0
    """Optimiser steps to train; 0: derive from epochs."""
    epochs: int = 0
    """Epochs to train when max_steps is 0."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
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
        # Each section checked its own fields when it was built; here: the top-level fields
        # and the rules that span sections.
        super().__post_init__()
        self.at_least("max_steps", 0)
        self.at_least("epochs", 0)
        if self.max_steps == 0 and self.epochs == 0:
            raise ConfigError("max_steps=0 and epochs=0: set one of them (e.g. --set max_steps=1000)")
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"config section '{name}' must be a {cls.__name__}, "
                                  f"got {type(getattr(self, name)).__name__}")
        p, c = self.parallel, self.checkpoint
        if p.strategy == "deepspeed" and (c.async_save or c.storage == "node_local"):
            raise ConfigError("parallel.strategy=deepspeed writes its engine files collectively into one shared "
                              "folder: it takes neither checkpoint.async_save=true nor checkpoint.storage=node_local")

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every value again (after a section was edited in place); raise ConfigError naming the key."""
        for name in SECTIONS:
            getattr(self, name).__post_init__()
        self.__post_init__()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A config from a nested mapping (unknown keys raise ConfigError)."""
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a mapping of sections, got {type(values).__name__}")
        top = {k: v for k, v in field_types(cls).items() if k not in SECTIONS}
        # Every key is known before any section checks its values: a typo is reported as a typo.
        for key, value in values.items():
            if key in SECTIONS and isinstance(value, dict):
                inner = field_types(SECTIONS[key])
                for k in value:
                    if k not in inner:
                        raise unknown_key_error(f"{key}.{k}", [f"{key}.{n}" for n in inner])
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
            raise ConfigError(f"config is not valid YAML: {yaml_error_line(err)}") from err
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
                raise ConfigError(f"{path} is not valid YAML: {yaml_error_line(err)}") from err
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


def yaml_error_line(err: Exception) -> str:
    """A YAML error on one line: ``line 3, column 7: mapping values are not allowed here``."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(err, "context", None)
    return where + str(problem) + (f" ({context})" if context else "")


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
