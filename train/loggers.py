"""Where metrics go: nowhere (other ranks), the console, Weights & Biases, or several at once.

Only rank 0 gets real loggers; the trainer hands every other rank the no-op base class.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO


def format_duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``."""
    seconds = max(int(seconds), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Logger:
    """The no-op base: every hook does nothing (used on ranks other than 0)."""

    run_id: Optional[str] = None

    def log_config(self, config: dict) -> None:
        """Record the resolved configuration."""

    def log_text(self, text: str) -> None:
        """A free-form line (start-up summary, warnings)."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Training metrics of optimiser step ``step``."""

    def progress_tick(self, step: int, loss: float) -> None:
        """A step finished without a metrics line (progress bars redraw)."""

    def log_eval(self, step: int, results: dict[str, dict[str, float]], images: dict[str, Path]) -> None:
        """Evaluation results by verification set, and image files (ROC curves) by name."""

    def finish(self, summary: dict[str, Any]) -> None:
        """End of the run."""


class ConsoleLogger(Logger):
    """A metrics line every ``log.every_steps`` steps, and a progress bar on a terminal."""

    def __init__(self, total_steps: int, progress: bool = True, stream: Optional[TextIO] = None):
        self.total = total_steps
        self.stream = stream or sys.stdout
        self.progress = progress and self.stream.isatty()
        self._bar_shown = False

    def _print(self, text: str) -> None:
        if self._bar_shown:
            self.stream.write("\r\033[K")
            self._bar_shown = False
        print(text, file=self.stream, flush=True)

    def log_text(self, text: str) -> None:
        """Print a line."""
        self._print(text)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """One line: step/total, loss, accuracy, lr, samples/s, ETA, grad norm, loss scale, skipped."""
        m = metrics
        parts = [f"step {step}/{self.total}", f"loss {m['loss']:.4f}"]
        if "accuracy" in m:
            from train.evaluation.report import format_value
            parts.append(f"acc {format_value('accuracy', m['accuracy'])}")  # a percentage, as everywhere on screen
        parts.append(f"lr {m['lr']:.3g}")
        if "samples_per_s" in m:
            parts.append(f"{m['samples_per_s']:.1f} samples/s")
        if "eta_s" in m:
            parts.append(f"eta {format_duration(m['eta_s'])}")
        if m.get("grad_norm") is not None:
            parts.append(f"gnorm {m['grad_norm']:.3g}")
        if "loss_scale" in m:
            parts.append(f"scale {m['loss_scale']:.0f}")
        parts.append(f"skipped {int(m.get('skipped_steps', 0))}")
        if m.get("bad_samples"):
            parts.append(f"bad samples {int(m['bad_samples'])}")
        self._print(" | ".join(parts))

    def progress_tick(self, step: int, loss: float) -> None:
        """Redraw the progress bar (terminal only)."""
        if not self.progress:
            return
        width = 30
        done = int(width * step / max(self.total, 1))
        self.stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{self.total} loss {loss:.4f}")
        self.stream.flush()
        self._bar_shown = True

    def log_eval(self, step: int, results: dict[str, dict[str, float]], images: dict[str, Path]) -> None:
        """A line per verification set."""
        from train.evaluation.report import format_results
        for name, r in results.items():
            self._print(f"eval step {step} | {name} | {format_results(r)}")

    def finish(self, summary: dict[str, Any]) -> None:
        """Print where the results are."""
        if self._bar_shown:
            self.stream.write("\n")
            self._bar_shown = False
        self.stream.flush()


class WandbLogger(Logger):
    """Weights & Biases on rank 0: config, metrics, evaluation, ROC images, system stats.

    ``wandb`` is imported only here.  Without ``WANDB_API_KEY`` (and no ``WANDB_MODE``
    chosen) the run is written offline under the run folder; ``run_id`` continues an
    earlier run (the id is kept in checkpoints so that a resumed run is the same W&B run).
    """

    def __init__(self, project: str, run_name: str, output_dir: Path, config: dict,
                 run_id: Optional[str] = None, entity: str = ""):
        try:
            import wandb
        except ImportError:
            raise ImportError("log.wandb=true needs the wandb package: pip install wandb "
                              "(or set log.wandb=false)") from None
        if "WANDB_API_KEY" not in os.environ and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_DIR", str(output_dir))
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        # quiet: no banner and no ~30-line summary at the end; the console logger and the run
        # folder say where the W&B run is.
        self.run = wandb.init(project=project, name=run_name or None, entity=entity or None, config=config,
                              id=run_id, resume="allow" if run_id else None, dir=os.environ["WANDB_DIR"],
                              settings=wandb.Settings(quiet=True, silent=True))
        self.run_id = getattr(self.run, "id", None) if self.run is not None else None

    def log_config(self, config: dict) -> None:
        """Update the run's config (e.g. derived quantities)."""
        if self.run is not None:
            self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics under ``train/``."""
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in metrics.items() if v is not None}, step=step)

    def log_eval(self, step: int, results: dict[str, dict[str, float]], images: dict[str, Path]) -> None:
        """Scalar results under ``eval/<set>/`` and ROC plots as images."""
        if self.run is None:
            return
        data: dict[str, Any] = {}
        for name, r in results.items():
            data.update({f"eval/{name}/{k}": v for k, v in r.items() if isinstance(v, (int, float))})
        for name, path in images.items():
            data[f"eval/{name}"] = self._wandb.Image(str(path))
        self.run.log(data, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write the summary and close the run."""
        if self.run is None:
            return
        for k, v in summary.items():
            if isinstance(v, (int, float, str)):
                self.run.summary[k] = v
        self.run.finish()


class LoggerGroup(Logger):
    """Fans every call out to several loggers."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    @property
    def run_id(self) -> Optional[str]:  # type: ignore[override]
        """The W&B run id if one of the loggers has it."""
        return next((lg.run_id for lg in self.loggers if lg.run_id), None)

    def log_config(self, config: dict) -> None:
        """Fan out."""
        for lg in self.loggers:
            lg.log_config(config)

    def log_text(self, text: str) -> None:
        """Fan out."""
        for lg in self.loggers:
            lg.log_text(text)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Fan out."""
        for lg in self.loggers:
            lg.log_metrics(step, metrics)

    def progress_tick(self, step: int, loss: float) -> None:
        """Fan out."""
        for lg in self.loggers:
            lg.progress_tick(step, loss)

    def log_eval(self, step: int, results: dict[str, dict[str, float]], images: dict[str, Path]) -> None:
        """Fan out."""
        for lg in self.loggers:
            lg.log_eval(step, results, images)

    def finish(self, summary: dict[str, Any]) -> None:
        """Fan out."""
        for lg in self.loggers:
            lg.finish(summary)


class Throughput:
    """Samples per second and ETA over the steps since the last report."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total, self.t0, self.s0 = total_steps, time.perf_counter(), start_step
        self.samples = 0
        self.paused_s = 0.0
        """Seconds spent in :meth:`paused` blocks since the start (evaluation, checkpoints)."""

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is left out of samples/s and the ETA (it is not training)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.t0 += spent
            self.paused_s += spent

    def add(self, samples: int) -> None:
        """Count samples of a finished step."""
        self.samples += samples

    def report(self, step: int) -> dict[str, float]:
        """samples/s and ETA since the last report, then start a new window."""
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        steps = max(step - self.s0, 1)
        out = {"samples_per_s": self.samples / dt, "eta_s": dt / steps * (self.total - step)}
        self.t0, self.s0, self.samples = now, step, 0
        return out
