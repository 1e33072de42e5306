"""Building a run's components from its config: data, backbone, classifier shard, losses, loggers."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .config import ConfigError, DataConfig, LossConfig, ModelConfig, PrecisionConfig, TrainConfig
from .distributed import DistContext
from .loggers import ConsoleLogger, Logger, LoggerGroup, WandbLogger

HEAD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CLASSIFIER_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def classifier_precision(precision: PrecisionConfig, device: torch.device) -> str:
    """precision.classifier resolved: auto follows precision.dtype (fp16 off CUDA: fp32); an
    explicit fp16 needs CUDA, and tf32 means fp32 off CUDA."""
    name: str = precision.classifier
    if name == "auto":
        name = precision.dtype
        if name == "fp16" and device.type != "cuda":
            name = "fp32"  # fp16 GEMMs are a CUDA feature; off CUDA auto keeps the classifier fp32
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision.classifier=fp16 needs a CUDA device (this run is on {device}): "
                          "use bf16 or fp32 there")
    if name == "tf32" and device.type != "cuda":
        name = "fp32"  # TF32 is a CUDA tensor-core mode; on other devices fp32 is what runs
    return name


def fast_precision() -> str:
    """The autocast dtype that speeds this machine up: bf16 on CUDA and on CPUs with bf16
    instructions (AVX512-BF16, AMX), fp32 elsewhere, where bf16 is emulated (4.4x slower per
    step than fp32 on an AVX2 core, measured with ``iresnet_tiny``)."""
    if torch.cuda.is_available():
        return "bf16"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 path either
        native = False
    return "bf16" if native else "fp32"


def apply_precision_settings(precision: PrecisionConfig, device: torch.device) -> None:
    """Process-wide matmul settings where the run starts (CUDA only; nothing changes on CPU).

    ``precision.tf32`` lets the backbone's float32 matmuls and convolutions use TF32.  A
    bf16/fp16 classifier asks cuBLAS for float32 sums throughout (no reduced-precision
    split-K reductions).
    """
    if device.type != "cuda":
        return
    if precision.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if classifier_precision(precision, device) in ("bf16", "fp16"):
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (cuBLAS workspace, cuDNN, torch's deterministic mode) when ``enabled``.

    Otherwise cuDNN's autotuner is switched on: the input shape is fixed (one image size,
    one local batch), so each convolution's fastest algorithm is measured once and reused.
    """
    if not enabled:
        torch.backends.cudnn.benchmark = True
        return
    import os
    # cuBLAS needs a fixed workspace to be reproducible; it must be set before the first matmul.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed (dropout and other per-process randomness differ between ranks)."""
    return seed + 1_000_003 * (rank + 1)


def load_manifest(data: DataConfig) -> Optional[Any]:
    """The dataset manifest, or None when the config names none (random tensors)."""
    if not data.manifest:
        return None
    from data_pipeline.formats.manifest import Manifest
    from data_pipeline.storage.byte_streams import is_url
    if is_url(data.manifest):  # s3://, gs://, http(s)://: read through fsspec with retries
        return Manifest.load(data.manifest, remote_options(data))
    from data_pipeline.sources.rec_dataset import find_rec, open_dataset
    path = Path(data.manifest)
    if find_rec(path) is not None:  # insightface RecordIO, read directly
        return open_dataset(path, num_classes=data.num_classes)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"data.manifest={data.manifest!r} does not exist: give the manifest.json "
                                "written by `shardface data synth|convert` (or its folder), or a train.rec")
    manifest = open_dataset(path)
    if isinstance(manifest, Manifest):  # its shards may be URLs
        manifest.remote = remote_options(data)
    return manifest


def remote_options(d: DataConfig) -> Any:
    """How remote manifests and shards are read (``data.retries``, ``data.storage_options``...)."""
    from data_pipeline.storage.byte_streams import RemoteOptions
    return RemoteOptions(retries=d.retries, backoff_s=d.retry_backoff_s, storage_options=dict(d.storage_options),
                         cache_dir=d.cache_dir, cache_gb=d.cache_gb)


def check_image_size(data: DataConfig, manifest: Optional[Any]) -> None:
    """data.image_size must be the manifest's image size: the loader does not resize."""
    size = getattr(manifest, "image_size", None)
    if size is None:
        return
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    if (h, w) != (data.image_size, data.image_size):
        raise ConfigError(f"data.image_size={data.image_size} but the images of data.manifest={data.manifest!r} "
                          f"are {h}x{w}: set data.image_size={h}"
                          + ("" if h == w else " (the backbone needs square images)"))


def build_data(d: DataConfig, ctx: DistContext, manifest: Optional[Any], seed: int) -> Any:
    """The loader of this rank (``data_pipeline.loaders.build_loader``); ``seed``: the run's."""
    from data_pipeline.loaders import build_loader
    kwargs: dict[str, Any] = dict(rank=ctx.rank, world_size=ctx.world_size, batch_size=d.batch_size,
                                  workers=d.workers, seed=seed, mode=d.mode, shuffle_buffer=d.shuffle_buffer,
                                  flip=d.flip, strict=d.strict, device=str(ctx.device),
                                  epoch_samples=d.epoch_samples)
    if d.loader in ("webdataset", "dali", "rec"):
        from data_pipeline.loaders.augment import Augment
        kwargs["augment"] = Augment.from_config(d)
    if d.loader == "dali":
        # Index files are written once per node (local rank 0) while the other ranks wait.
        kwargs.update(local_rank=ctx.local_rank, barrier=ctx.barrier, any_rank=ctx.any_rank,
                      dali_verify=d.dali_verify)
    if d.loader == "random_tensors" and manifest is None:
        # In-memory data without shards: its shape comes from the config.
        kwargs.update(num_classes=d.num_classes, num_samples=d.num_samples, image_size=(d.image_size, d.image_size))
    loader = build_loader(d.loader, manifest, **kwargs)
    loader.max_bad_fraction = d.max_bad_fraction
    return loader


def resolve_num_classes(data: DataConfig, manifest: Optional[Any], loader: Any) -> int:
    """Number of identities: config, manifest and loader must agree where they are given."""
    found = {"data.num_classes": data.num_classes,
             "the manifest": getattr(manifest, "num_classes", None),
             "the loader": getattr(loader, "num_classes", None)}
    given = {k: v for k, v in found.items() if v is not None}
    if not given:
        raise ConfigError("the number of classes is unknown: set data.num_classes or data.manifest")
    if len(set(given.values())) > 1:
        raise ConfigError("class counts disagree: " + ", ".join(f"{k}={v}" for k, v in given.items()) +
                          ": fix data.num_classes or point data.manifest at the right dataset")
    return int(next(iter(given.values())))


def backbone_options(m: ModelConfig, image_size: int) -> dict[str, Any]:
    """Keyword arguments of ``build_backbone`` (also stored in the embedding export);
    ``image_size``: data.image_size."""
    options: dict[str, Any] = dict(embedding_size=m.embedding_size, dropout=m.dropout, input_size=image_size)
    if m.gradient_checkpointing:
        options["gradient_checkpointing"] = True
    options.update(m.options)
    return options


def build_backbone_module(m: ModelConfig, image_size: int, device: torch.device) -> nn.Module:
    """The backbone of ``model.backbone`` for ``image_size`` inputs on ``device`` (channels-last when configured)."""
    from train.backbones import build_backbone
    try:
        module = build_backbone(m.backbone, **backbone_options(m, image_size))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.backbone={m.backbone!r}: {err}") from err
    if m.init_from:
        from .init_from import load_init_weights
        load_init_weights(module, m.init_from, m.backbone)
    module = module.to(device)
    if m.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def build_head(cfg: TrainConfig, ctx: DistContext, num_classes: int) -> nn.Module:
    """This rank's classifier shard: PartialFC with the configured margin."""
    from partial_fc import PartialFC
    from partial_fc.margins import MarginOptionError, build_margin, margin_parameters
    lo = cfg.loss
    seed = cfg.seed if lo.head_seed is None else lo.head_seed
    options = dict(lo.margin_options)
    try:
        if "seed" in margin_parameters(lo.margin) and "seed" not in options:
            options["seed"] = seed  # a random margin (ElasticFace) follows the run's seed unless told otherwise
        margin = build_margin(lo.margin, **options)
    except MarginOptionError as err:
        raise ConfigError(f"loss.margin_options.{err}") from None
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"loss.margin={lo.margin!r} with loss.margin_options={lo.margin_options}: {err}") from err
    precision = classifier_precision(cfg.precision, ctx.device)
    # At least the global (micro-)batch of rows per step, so that every positive fits in a
    # static number of sampled rows (no host read); the description line shows the count.
    head = PartialFC(cfg.model.embedding_size, num_classes, margin, sample_rate=lo.sample_rate,
                     group=ctx.group, seed=seed, param_dtype=HEAD_DTYPES[lo.head_dtype],
                     check_inputs=lo.check_inputs, compute_dtype=CLASSIFIER_DTYPES[precision],
                     tf32=precision == "tf32", min_sample=cfg.data.batch_size * ctx.world_size,
                     interclass_filtering_threshold=lo.interclass_filtering_threshold)
    return head.to(ctx.device)


def build_metric(lo: LossConfig, embedding_size: int, ctx: DistContext, num_classes: int) -> Optional[nn.Module]:
    """The optional metric loss (center, triplet, circle) over ``embedding_size``-wide embeddings, or None."""
    if lo.metric_loss == "none":
        return None
    from partial_fc.metric_losses import build_metric_loss
    try:
        # Metric losses check strictly (one host read) unless loss.check_inputs is off.
        options = {"check_inputs": lo.check_inputs != "off", **lo.metric_options}
        loss = build_metric_loss(lo.metric_loss, num_classes, embedding_size, ctx.group, **options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"loss.metric_loss={lo.metric_loss!r} with loss.metric_options="
                          f"{lo.metric_options}: {err}") from err
    return loss.to(ctx.device)


def build_loggers(cfg: TrainConfig, ctx: DistContext, total_steps: int, run_id: Optional[str]) -> Logger:
    """Console (+ W&B) on rank 0; the no-op logger elsewhere."""
    if not ctx.is_main:
        return Logger()
    loggers: list[Logger] = [ConsoleLogger(total_steps, progress=cfg.log.progress)]
    if cfg.log.wandb:
        out = Path(cfg.output_dir)
        loggers.append(WandbLogger(cfg.log.project, cfg.log.run_name or out.name, out, cfg.to_dict(),
                                   run_id=run_id, entity=cfg.log.entity))
    return LoggerGroup(loggers)
