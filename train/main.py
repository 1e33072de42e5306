"""Entry point of a training process: ``python -m train.main --config PRESET_OR_YAML --set key=value ...``.

The same command runs as one plain process or as every worker under torchrun
(``python -m torch.distributed.run --nproc_per_node=N -m train.main ...``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

from .config import TrainConfig, all_keys, list_presets


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``train.main``."""
    p = argparse.ArgumentParser(prog="python -m train.main", description="Train a face-embedding model.",
                                epilog=f"presets: {', '.join(list_presets())}; keys: {', '.join(all_keys())}")
    p.add_argument("--config", default="cpu_tiny", help="preset name (configs/*.yaml) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=0.05 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _json_safe(value: Any) -> Any:
    """NaN/inf as None and unknown objects as strings, so summary.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (int, str, bool)):
        return value
    return str(value)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Train as configured; returns the run's summary (final loss, evaluation, throughput, paths)."""
    args = build_parser().parse_args(argv)
    from .quiet import quiet_libraries
    quiet_libraries()
    cfg = TrainConfig.load(args.config, args.set)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return {"config": cfg.to_dict()}
    from .distributed import init_distributed
    from .failure import FailureWatch, WatchSettings
    from .faults import FaultSwitch
    from .trainer import Trainer
    ctx = init_distributed(backend=cfg.parallel.backend, device=cfg.device,
                           force_group=cfg.parallel.strategy == "deepspeed")
    # Installed before the trainer is built: a preemption during start-up still ends with exit 75.
    from .preemption import PreemptionHandler
    preemption = PreemptionHandler(ctx, cfg.preempt.signals).install()
    settings = WatchSettings(cfg.failure.hang_timeout_s, cfg.failure.heartbeat_timeout_s,
                             startup_timeout_s=cfg.failure.startup_timeout_s)
    watch = FailureWatch(ctx, settings).start()
    faults = FaultSwitch.from_env(ctx.rank)
    ok = False
    try:
        faults.phase("start")
        summary = Trainer(cfg, ctx, watch=watch, faults=faults).fit(preemption=preemption)
        if ctx.is_main:
            path = Path(cfg.output_dir) / "summary.json"
            path.write_text(json.dumps(_json_safe(summary), indent=2))
            summary["summary_path"] = str(path)
        ok = True
        return summary
    except Exception as err:
        # Every rank learns of the failure through the watch, and stops within seconds.
        err.failure_line = watch.report(err)  # type: ignore[attr-defined]  # what run_cli prints
        raise
    finally:
        watch.stop()
        # After a failure other ranks may be gone: no barrier then, only release the group.
        ctx.shutdown(barrier=ok)


def run_cli(argv: list[str]) -> int:
    """``python -m train.main``: a mistake in the config or the setup is one line, not a traceback."""
    from .config import ConfigError
    from .distributed import DistributedSetupError
    from .preemption import PREEMPTED_EXIT_CODE
    try:
        summary = main(argv)
    except (ConfigError, DistributedSetupError, FileNotFoundError) as err:
        print(f"train.main: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - one line naming the rank (the traceback with SHARDFACE_DEBUG=1)
        from .failure import EXIT_FAILED, error_line, print_failure
        print_failure(err, getattr(err, "failure_line", error_line(err)))
        return EXIT_FAILED
    return PREEMPTED_EXIT_CODE if summary.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:]))
