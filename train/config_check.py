"""The rules a training configuration must satisfy (called from ``TrainConfig.validate``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from .config_parse import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def _at_least(key: str, value: Optional[float], low: float, hint: str = "") -> None:
    if value is not None and value < low:
        raise ConfigError(f"{key}={value!r} must be >= {low}{': ' + hint if hint else ''}")


def check_config(cfg: "TrainConfig") -> None:
    """Raise ConfigError for the first value out of range, naming the key, the value and the fix."""
    d, m, lo, o = cfg.data, cfg.model, cfg.loss, cfg.optim
    p, pr, c, e, lg = cfg.parallel, cfg.precision, cfg.checkpoint, cfg.eval, cfg.log
    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    _at_least("max_steps", cfg.max_steps, 0)
    _at_least("epochs", cfg.epochs, 0)
    if cfg.max_steps == 0 and cfg.epochs == 0:
        raise ConfigError("max_steps=0 and epochs=0: set one of them (e.g. --set max_steps=1000)")
    _choice("data.loader", d.loader, ("webdataset", "dali", "synthetic"))
    _choice("data.mode", d.mode, ("resampled", "exact"))
    _choice("data.dali_verify", d.dali_verify, ("header", "decode"))
    _at_least("data.batch_size", d.batch_size, 1)
    _at_least("data.workers", d.workers, 0)
    _at_least("data.image_size", d.image_size, 8)
    _at_least("data.epoch_samples", d.epoch_samples, 1)
    _at_least("data.num_classes", d.num_classes, 1)
    _at_least("data.num_samples", d.num_samples, 1)
    for name in ("crop", "lowres", "blur", "color", "gray", "erase"):
        prob = getattr(d, f"aug_{name}")
        if not 0.0 <= prob <= 1.0:
            raise ConfigError(f"data.aug_{name}={prob} is not a probability in [0, 1] (0 turns it off)")
    if not d.manifest and d.loader == "synthetic" and (d.num_classes is None or d.num_samples is None):
        raise ConfigError("data.loader=synthetic without data.manifest needs data.num_classes and data.num_samples "
                          f"(got {d.num_classes} and {d.num_samples})")
    if not d.manifest and d.loader != "synthetic":
        raise ConfigError(f"data.manifest is empty: the {d.loader} loader needs a manifest.json "
                          "(or use data.loader=synthetic)")
    _at_least("model.embedding_size", m.embedding_size, 1)
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if not 0.0 < lo.sample_rate <= 1.0:
        raise ConfigError(f"loss.sample_rate={lo.sample_rate} must be in (0, 1]: the fraction of "
                          "each rank's classes sampled per step")
    _choice("loss.head_dtype", lo.head_dtype, ("fp32", "bf16"))
    _choice("loss.metric_loss", lo.metric_loss, ("none", "center", "triplet", "circle"))
    _at_least("loss.metric_weight", lo.metric_weight, 0.0)
    if lo.metric_loss != "none" and lo.metric_weight == 0.0:
        raise ConfigError(f"loss.metric_loss={lo.metric_loss!r} with loss.metric_weight=0 has no effect: "
                          "set loss.metric_weight > 0 or loss.metric_loss=none")
    if not lo.classifier and lo.metric_loss == "none":
        raise ConfigError("loss.classifier=false with loss.metric_loss=none leaves no loss to train: "
                          "set loss.metric_loss (center, triplet or circle) or loss.classifier=true")
    _choice("optim.name", o.name, ("sgd", "adamw"))
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be > 0")
    if o.head_lr is not None and o.head_lr < 0:
        raise ConfigError(f"optim.head_lr={o.head_lr} must be >= 0 (None: same as optim.lr)")
    _at_least("optim.reference_batch", o.reference_batch, 0)
    _at_least("optim.momentum", o.momentum, 0.0)
    _at_least("optim.weight_decay", o.weight_decay, 0.0)
    if not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={list(o.betas)} must each be in [0, 1)")
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    _choice("optim.schedule", o.schedule, ("poly", "cosine", "constant"))
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _at_least("optim.grad_accum", o.grad_accum, 1)
    _at_least("optim.clip_grad_norm", o.clip_grad_norm, 0.0, "0 disables clipping")
    _at_least("optim.max_nonfinite_in_row", o.max_nonfinite_in_row, 1)
    _choice("parallel.strategy", p.strategy, ("ddp", "deepspeed"))
    _choice("parallel.zero_stage", p.zero_stage, (0, 1, 2, 3))
    _choice("parallel.backend", p.backend, ("auto", "nccl", "gloo"))
    if p.deepspeed_config and p.strategy != "deepspeed":
        raise ConfigError(f"parallel.deepspeed_config={p.deepspeed_config!r} is set but "
                          f"parallel.strategy={p.strategy!r}: set parallel.strategy=deepspeed")
    _at_least("parallel.bucket_cap_mb", p.bucket_cap_mb, 1)
    _choice("precision.dtype", pr.dtype, ("fp32", "bf16", "fp16"))
    _choice("precision.classifier", pr.classifier, ("auto", "fp32", "tf32", "bf16", "fp16"))
    _choice("loss.check_inputs", lo.check_inputs, ("deferred", "strict", "off"))
    _at_least("precision.init_scale", pr.init_scale, 1.0)
    _at_least("precision.growth_interval", pr.growth_interval, 1)
    _at_least("checkpoint.every_steps", c.every_steps, 0, "0 saves only at the end")
    _at_least("checkpoint.keep_last", c.keep_last, 0, "0 keeps all")
    _choice("checkpoint.storage", c.storage, ("shared", "node_local"))
    if p.strategy == "deepspeed" and (c.async_save or c.storage == "node_local"):
        raise ConfigError("parallel.strategy=deepspeed writes its engine files collectively into one shared folder: "
                          "it takes neither checkpoint.async_save=true nor checkpoint.storage=node_local")
    _at_least("eval.every_steps", e.every_steps, 0, "0 evaluates only at the end")
    _at_least("eval.batch_size", e.batch_size, 1)
    _at_least("log.every_steps", lg.every_steps, 1)
    _check_preempt(cfg)


def _check_preempt(cfg: "TrainConfig") -> None:
    from .preemption import signal_numbers
    try:
        signal_numbers(cfg.preempt.signals)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _at_least("preempt.grace_s", cfg.preempt.grace_s, 1)
