"""Checks of a training config that the launcher makes before any process, W&B run or step starts.

Each one repeats a check the trainer also makes, so a mistake is one line at once instead of
one traceback per worker after start-up.
"""
from __future__ import annotations

from typing import Any


def check_before_launch(cfg: Any) -> None:
    """Raise ConfigError/FileNotFoundError for mistakes found without building the run."""
    from partial_fc.margins import MarginOptionError, build_margin, margin_parameters
    from train.config import ConfigError
    lo = cfg.loss
    options = dict(lo.margin_options)
    try:
        if "seed" in margin_parameters(lo.margin) and "seed" not in options:
            options["seed"] = cfg.seed
        build_margin(lo.margin, **options)
    except MarginOptionError as err:
        raise ConfigError(f"loss.margin_options.{err}") from None
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"loss.margin={lo.margin!r} with loss.margin_options={lo.margin_options}: {err}") from None
    if cfg.parallel.deepspeed_config:
        from train.parallel import resolve_deepspeed_config
        resolve_deepspeed_config(cfg.parallel.deepspeed_config)
