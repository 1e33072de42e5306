"""The training loop: data-parallel backbone, model-parallel classifier shard, checkpoints, evaluation.

One :class:`Trainer` per process.  Every rank builds the same backbone (same seed) and
its own classifier shard; the loop is the same on one CPU process and on many GPUs.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from torch import nn

from .builders import (
    apply_precision_settings,
    build_backbone_module,
    build_data,
    build_head,
    build_loggers,
    build_metric,
    check_image_size,
    load_manifest,
    rank_seed,
    resolve_num_classes,
    seed_everything,
    set_deterministic,
)
from .checkpoint import CheckpointManager, checkpoint_name
from .components import ClassifierState, LoaderState, RngState, RunnerState, ScheduleState
from .config import TrainConfig
from .distributed import DistContext, check_world_size
from .failure import FailureWatch
from .faults import FaultSwitch
from .loggers import Logger, Throughput, format_duration
from .optim import build_classifier_optimizer, scaled_lrs
from .parallel import build_runner
from .preemption import PREEMPTED_EXIT_CODE, PreemptionHandler
from .schedule import LRSchedule
from .stateful import TrainingProgress
from .step import Batch, StepResult, TrainStep
from .validation import Validator


def _loss_text(loss: Optional[float]) -> str:
    """A loss for a log line: four decimals, or n/a when no step ran."""
    return "n/a" if loss is None else f"{loss:.4f}"


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class Trainer:
    """Builds a run from its config and trains it (:meth:`fit`).

    ``loader`` and ``backbone`` may be given to replace the ones the config describes
    (benchmarks, tests); they must follow the same contracts.
    """

    def __init__(self, cfg: TrainConfig, ctx: DistContext, loader: Any = None, backbone: Optional[nn.Module] = None,
                 watch: Optional[FailureWatch] = None, faults: Optional[FaultSwitch] = None):
        self.cfg, self.ctx = cfg, ctx
        self.watch = watch  # told of every finished step (hang detection)
        self.faults = faults if faults is not None else FaultSwitch([], ctx.rank)  # testing only
        self.run_dir = Path(cfg.output_dir)
        set_deterministic(cfg.deterministic)
        apply_precision_settings(cfg.precision, ctx.device)
        seed_everything(cfg.seed)
        self.manifest = load_manifest(cfg.data)
        check_image_size(cfg.data, self.manifest)
        self.loader = loader if loader is not None else build_data(cfg.data, ctx, self.manifest, cfg.seed)
        self.num_classes = resolve_num_classes(cfg.data, self.manifest, self.loader)
        o = cfg.optim
        self.local_batch = int(getattr(self.loader, "batch_size", cfg.data.batch_size))
        self.samples_per_step = self.local_batch * ctx.world_size * o.grad_accum
        check_world_size(ctx, self.num_classes, self.local_batch * ctx.world_size)
        self.steps_per_epoch = max(len(self.loader) // o.grad_accum, 1)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch

        seed_everything(cfg.seed)  # the same initial backbone on every rank
        self.injected_backbone = backbone is not None
        module = backbone.to(ctx.device) if backbone is not None else \
            build_backbone_module(cfg.model, cfg.data.image_size, ctx.device)
        self.lr, self.head_lr = scaled_lrs(o, self.samples_per_step)
        self.runner = build_runner(module, cfg, ctx, self.lr)
        self.head = build_head(cfg, ctx, self.num_classes)
        self.head_optimizer = build_classifier_optimizer(self.head, o, self.head_lr, cfg.seed)
        self.metric_loss = build_metric(cfg.loss, cfg.model.embedding_size, ctx, self.num_classes)
        self.schedule = LRSchedule([self.runner.optimizer, self.head_optimizer], self.total_steps,
                                   o.warmup_steps, o.schedule, o.poly_power, o.min_lr_ratio)
        self.train_step = TrainStep(self.runner, self.head, self.head_optimizer, ctx, o.grad_accum,
                                    o.clip_grad_norm, self.metric_loss, cfg.loss.metric_weight,
                                    cfg.model.channels_last,
                                    use_classifier=cfg.loss.classifier,
                                    equal_batches=bool(getattr(self.loader, "equal_batches", False)))
        c = cfg.checkpoint
        self.checkpoints = CheckpointManager(self.checkpoint_dir, ctx, c.keep_last, c.storage, c.async_save,
                                             faults=self.faults)
        self.validator = Validator(cfg, ctx, self.manifest, self.run_dir)
        seed_everything(rank_seed(cfg.seed, ctx.rank))
        self.progress = TrainingProgress()
        self.resumed_from: Optional[Path] = None
        self.logger: Logger = Logger()
        self.eval_results: dict[str, dict[str, float]] = {}
        self._batch_iter: Optional[Iterator[Batch]] = None
        self._claimed = False  # the run folder was checked (and cleared with overwrite) by fit()

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints go (``checkpoint.dir`` or ``<output_dir>/checkpoints``; ``{node}``: the node index)."""
        c = self.cfg.checkpoint
        if not c.dir:
            return self.run_dir / "checkpoints"
        from .checkpoint import node_of
        return Path(c.dir.replace("{node}", str(node_of(self.ctx)[0])))

    # The run's position lives in ``progress``; these names are the loop's vocabulary.
    step = property(lambda self: self.progress.step, lambda self, v: setattr(self.progress, "step", v))
    epoch = property(lambda self: self.progress.epoch, lambda self, v: setattr(self.progress, "epoch", v))
    skipped_steps = property(lambda self: self.progress.skipped_steps,
                             lambda self, v: setattr(self.progress, "skipped_steps", v))
    skipped_in_row = property(lambda self: self.progress.skipped_in_row,
                              lambda self, v: setattr(self.progress, "skipped_in_row", v))
    wandb_run_id = property(lambda self: self.progress.wandb_run_id,
                            lambda self, v: setattr(self.progress, "wandb_run_id", v))
    _fresh_epoch = property(lambda self: self.progress.fresh_epoch,
                            lambda self, v: setattr(self.progress, "fresh_epoch", v))

    # ------------------------------------------------------------------ checkpoints
    def shared_state(self) -> dict[str, Any]:
        """The components (and header values) a checkpoint stores once: the same on every rank."""
        return {"num_classes": self.num_classes, "config": self.cfg.to_yaml(), "class_ranges": self._class_ranges(),
                "progress": self.progress, "schedule": ScheduleState(self.schedule), "runner": RunnerState(self.runner)}

    def rank_state(self) -> dict[str, Any]:
        """The components every rank stores of its own."""
        return {"classifier": ClassifierState(self.head, self.head_optimizer, self.metric_loss),
                "rng": RngState(self.ctx.device), "loader": LoaderState(self.loader)}

    def save_checkpoint(self, background: bool = False) -> Path:
        """Write a checkpoint of the current state (a collective: every rank calls it).

        Returns once the checkpoint is published, unless ``background`` (with
        ``checkpoint.async_save``): then once its state is copied to host memory.
        """
        engine_save = self.runner.engine_save if self.cfg.parallel.strategy == "deepspeed" else None
        background = background and self.cfg.checkpoint.async_save
        folder = self.checkpoints.save(self.step, self.shared_state(), self.rank_state(), engine_save, background)
        if not background:
            self.checkpoints.wait()
        return folder

    def _class_ranges(self) -> list[tuple[int, int]]:
        from partial_fc.sharding import class_range
        return [class_range(self.num_classes, r, self.ctx.world_size) for r in range(self.ctx.world_size)]

    def _check_checkpoint(self, folder: Path, header: dict) -> None:
        if header["num_classes"] != self.num_classes:
            raise ValueError(f"checkpoint {folder} has {header['num_classes']} classes, this run has "
                             f"{self.num_classes}: it belongs to another dataset")

    def resume(self, folder: Path) -> list[str]:
        """Restore the state saved in ``folder``; returns notes on anything not restored exactly."""
        report = self.checkpoints.load(folder, self.shared_state(), self.rank_state(),
                                       check=lambda header: self._check_checkpoint(folder, header))
        notes = report.notes
        if report.skipped:
            # Another world size: the per-rank loader positions and RNG streams do not map.
            seed_everything(rank_seed(self.cfg.seed + self.step, self.ctx.rank))
            self._fresh_epoch = True
            notes.append(f"data order restarts at epoch {self.epoch} (the per-rank loader positions of world "
                         f"size {report.header['world_size']} do not map to {self.ctx.world_size} ranks)")
        self.resumed_from = Path(folder)
        return notes

    # ------------------------------------------------------------------ loop
    def _batches(self) -> Iterator[Batch]:
        """Batches forever, epoch after epoch (a resumed epoch continues where it stopped)."""
        while True:
            if self._fresh_epoch:
                self.loader.set_epoch(self.epoch)
            self._fresh_epoch = False
            yield from self.loader
            self.epoch += 1
            self._fresh_epoch = True

    def _describe(self) -> str:
        cfg, ctx, head = self.cfg, self.ctx, self.head
        bytes_per_class = head.bytes_per_class(cfg.optim.name) if hasattr(head, "bytes_per_class") else 0
        zero = f" ZeRO-{cfg.parallel.zero_stage}" if cfg.parallel.strategy == "deepspeed" else ""
        parallel = f"{cfg.parallel.strategy}{zero}"
        # One process has no process group and nothing to replicate: say so instead of "(none) | ddp".
        layout = ("single process (no process group)" if ctx.backend == "none"
                  else f"world size {ctx.world_size} ({ctx.backend}) | {parallel}")
        lines = [
            f"run: {self.run_dir} | device {ctx.device} | {layout} | precision {cfg.precision.dtype}",
            f"global batch {self.local_batch * ctx.world_size} = {self.local_batch} x {ctx.world_size} ranks; "
            f"samples/step {self.samples_per_step} (grad_accum {cfg.optim.grad_accum})",
            f"steps {self.total_steps} ({self.steps_per_epoch} per epoch, "
            f"{self.total_steps / self.steps_per_epoch:.2f} epochs); "
            f"lr {self.lr:.4g} backbone / {self.head_lr:.4g} classifier (peak, {cfg.optim.schedule}, "
            f"warm-up {cfg.optim.warmup_steps}; {self._lr_scaling()})",
            f"classes {self.num_classes}: {head.num_local} on rank {ctx.rank} (~{self.num_classes / ctx.world_size:.0f}"
            f" per rank), sampled per step {getattr(head, 'num_sample', head.num_local)}; "
            f"{bytes_per_class} bytes/class ({cfg.loss.head_dtype}, {cfg.optim.name})",
        ]
        if self.resumed_from:
            lines.append(f"resumed from {self.resumed_from} at step {self.step}")
        return "\n".join(lines)

    def _lr_scaling(self) -> str:
        """How the peak learning rate was derived: the linear scaling by optim.reference_batch, or none."""
        o = self.cfg.optim
        if o.reference_batch <= 0:
            return "optim.lr as given, optim.reference_batch=0: no batch scaling"
        return (f"effective lr = optim.lr {o.lr:g} x samples/step {self.samples_per_step} / "
                f"optim.reference_batch {o.reference_batch}")

    def _record(self, result: StepResult) -> None:
        self.step += 1
        if result.applied:
            self.skipped_in_row = 0
            return
        self.skipped_steps += 1
        if math.isfinite(result.loss) and result.loss_scale > 1.0:
            # fp16: a finite loss whose scaled gradients overflowed.  The scaler backs off and
            # the next steps usually fit; this is not the divergence the counter below detects.
            self.logger.log_text(f"step {self.step}: gradients overflowed at loss scale {result.loss_scale:g}, "
                                 f"step skipped ({self.skipped_steps} skipped in total)")
            return
        self.skipped_in_row += 1
        self.logger.log_text(f"step {self.step}: non-finite loss or gradient (loss {result.loss}), step skipped "
                             f"({self.skipped_in_row} in a row, {self.skipped_steps} in total)")
        limit = self.cfg.optim.max_nonfinite_in_row
        if self.skipped_in_row >= limit:
            raise NonFiniteTrainingError(
                f"{self.skipped_in_row} steps in a row had a non-finite loss or gradient (step {self.step}, "
                f"optim.max_nonfinite_in_row={limit}): the run diverged; lower optim.lr, raise "
                f"optim.warmup_steps, enable optim.clip_grad_norm or use precision.dtype=bf16, and resume "
                f"from the last checkpoint")

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0 and self.step < self.total_steps

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Verification metrics of the current backbone (a collective; rank 0 computes)."""
        results, images = self.validator.run(self.runner, self.step)
        if results:
            self.logger.log_eval(self.step, results, images)
            self.eval_results = results
        return results

    def _start(self) -> Optional[Path]:
        """Resume if configured, write config.yaml, start the loggers, print the derived quantities."""
        cfg, ctx = self.cfg, self.ctx
        cleared = self._claim_run_folder()
        self.checkpoints.check_storage()
        self.checkpoints.clean_stale()
        folder = self.checkpoints.resolve(cfg.checkpoint.resume)
        notes = self.resume(folder) if folder is not None else []
        if folder is not None:
            self.faults.phase("resume")
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self.logger = build_loggers(cfg, ctx, self.total_steps, self.wandb_run_id)
        self.wandb_run_id = self.logger.run_id or self.wandb_run_id
        self.logger.log_text(self._describe())
        if cleared:
            self.logger.log_text(f"overwrite=true: removed the earlier run's {', '.join(cleared)} from {self.run_dir}")
        for note in notes:
            self.logger.log_text(f"note: {note}")
        self.logger.log_config({"derived": {"samples_per_step": self.samples_per_step, "total_steps": self.total_steps,
                                            "num_classes": self.num_classes, "world_size": ctx.world_size}})
        return folder

    def _claim_run_folder(self) -> list[str]:
        """Refuse to start over an earlier run (unless resuming), or clear it with ``overwrite``; before any write."""
        if self._claimed:  # fit() called again on this trainer: the folder is already this run's
            return []
        self._claimed = True
        from .config_parse import ConfigError
        from .distributed import broadcast_object
        from .run_folder import clear_checkpoints, clear_export, refusal
        error: Any = refusal(self.cfg, self.checkpoint_dir) if self.ctx.is_main else None
        error = broadcast_object(error, self.ctx)
        if error:
            raise ConfigError(error)
        cleared: list[str] = []
        if self.cfg.overwrite and self.cfg.checkpoint.resume in ("none", ""):
            if self.checkpoints.publisher:
                cleared += clear_checkpoints(self.checkpoint_dir)
            if self.ctx.is_main:
                cleared += clear_export(self.run_dir)
        return cleared

    def fit(self, stop_at_step: Optional[int] = None,
            preemption: Optional[PreemptionHandler] = None) -> dict[str, Any]:
        """Train to ``total_steps`` (resuming if configured); returns the run's summary.

        ``stop_at_step`` ends this process's work early, with a checkpoint and without the
        final evaluation and export (a time-limited job that a later job resumes).
        ``preemption``: handlers installed before the trainer was built (``train.main``), so
        that a signal during start-up also ends in a checkpoint; by default fit installs them.
        """
        cfg = self.cfg
        folder = self._start()
        if folder is not None and self.step >= self.total_steps:
            if preemption is not None:
                preemption.uninstall()
            return self._already_finished(folder)
        end = self.total_steps if stop_at_step is None else min(stop_at_step, self.total_steps)
        start_step, t_start = self.step, time.perf_counter()
        meter = Throughput(self.total_steps, self.step)
        if self._batch_iter is None:
            self._batch_iter = self._batches()
        batches = self._batch_iter
        last: Optional[StepResult] = None
        last_saved = self.step if folder is not None else -1
        self.runner.module.train()
        self.head.train()
        # Installed before the first batch, so forked loader workers inherit handlers that ignore the signal.
        if preemption is None:
            preemption = PreemptionHandler(self.ctx, cfg.preempt.signals).install()
        preemption.step = lambda: self.step
        preempted = preemption.should_stop() and self.step < self.total_steps  # a signal during start-up
        if self.watch is not None:
            self.watch.started()  # set-up and restore are done: from here steps get failure.hang_timeout_s
        try:
            while self.step < end and not preempted:
                self.schedule.set_step(self.step)
                self.faults.before_step(self.step + 1)
                logs = (self.step + 1) % cfg.log.every_steps == 0 or self.step + 1 == self.total_steps
                last = self.train_step(batches, log=logs, step=self.step + 1,
                                       stop_requested=preemption.received is not None)
                meter.add(last.samples)
                self._record(last)
                if self.watch is not None:
                    self.watch.progress(self.step)
                if self.step % cfg.log.every_steps == 0 or self.step == self.total_steps:
                    self.logger.log_metrics(self.step, self._metrics(last, meter))
                else:
                    self.logger.progress_tick(self.step, last.loss)
                # Evaluation and checkpoints are not training: samples/s leaves their time out.
                if self._due(cfg.eval.every_steps):
                    with meter.paused():
                        self.evaluate()
                if self._due(cfg.checkpoint.every_steps):
                    with meter.paused():
                        self.save_checkpoint(background=True)
                    last_saved = self.step
                # Every rank stops after the same step when any of them was signalled (the step's vote).
                preempted = last.stop and self.step < self.total_steps
        except BaseException as err:
            preemption.uninstall()
            self._settle_writer()
            self.logger.finish({"error": f"{type(err).__name__}: {err}", "steps": self.step})
            raise
        if preempted:
            self.logger.log_text(f"preempted: checkpoint of step {self.step}, then stopping (exit code "
                                 f"{PREEMPTED_EXIT_CODE}; resume with "
                                 f"--set checkpoint.resume=latest)")
        elapsed = time.perf_counter() - t_start
        train_s = max(elapsed - meter.paused_s, 1e-9)  # the steps alone, as the samples/s of the log lines
        final_ckpt = self.save_checkpoint() if last_saved != self.step else \
            self.checkpoint_dir / checkpoint_name(self.step)
        self.checkpoints.wait()  # a background save of the last step lands before the run ends
        preemption.uninstall()  # after the save: a signal during it still aborts only on a second one
        finished = self.step >= self.total_steps
        if finished and cfg.eval.at_end:
            self.evaluate()
        export = self._export() if finished else None
        steps_run = self.step - start_step
        summary = {
            "steps": self.step, "finished": finished, "steps_this_run": steps_run,
            "skipped_steps": self.skipped_steps,
            "final_loss": last.loss if last else None, "final_accuracy": last.accuracy if last else None,
            "samples_per_s": steps_run * self.samples_per_step / train_s if steps_run else None,
            "wall_s": elapsed, "train_s": train_s, "eval": self.eval_results, "run_dir": str(self.run_dir),
            "checkpoint": str(final_ckpt), "export": str(export) if export else None,
            "wandb_run_id": self.wandb_run_id, "preempted": preempted,
        }
        self.logger.log_text(f"{'done' if finished else 'stopped'}: step {self.step}/{self.total_steps}, "
                             f"{steps_run} steps in {format_duration(elapsed)}, "
                             f"final loss {_loss_text(summary['final_loss'])}, "
                             f"skipped {self.skipped_steps}; run folder {self.run_dir}")
        self.logger.finish(summary)
        return summary

    def _already_finished(self, folder: Path) -> dict[str, Any]:
        """A resumed run that had reached its last step: say so, and neither train nor evaluate again."""
        import json
        previous: dict[str, Any] = {}
        path = self.run_dir / "summary.json"
        if path.is_file():
            try:
                previous = json.loads(path.read_text())
            except ValueError:
                previous = {}
        summary = {**previous, "steps": self.step, "finished": True, "steps_this_run": 0, "already_finished": True,
                   "checkpoint": str(folder), "run_dir": str(self.run_dir), "preempted": False}
        summary.setdefault("eval", {})
        self.logger.log_text(f"already finished: {folder.name} is step {self.step}/{self.total_steps}; nothing to "
                             f"train or evaluate (final loss {_loss_text(summary.get('final_loss'))}). Raise "
                             f"max_steps to train on, or give a new output_dir for a new run")
        self.logger.finish(summary)
        return summary

    def _settle_writer(self) -> None:
        """On the way out after an error: let a background save finish (its own failure is logged)."""
        try:
            self.checkpoints.wait()
        except Exception as err:  # noqa: BLE001 - the error being raised matters more
            self.logger.log_text(f"background checkpoint failed too: {err}")

    def _metrics(self, result: StepResult, meter: Throughput) -> dict[str, Any]:
        m: dict[str, Any] = {"loss": result.loss, "accuracy": result.accuracy,
                             "lr": self.runner.optimizer.param_groups[0]["lr"],
                             "grad_norm": result.grad_norm, "skipped_steps": self.skipped_steps,
                             "epoch": self.epoch}
        if self.cfg.precision.dtype == "fp16":
            m["loss_scale"] = result.loss_scale
        bad = sum(getattr(self.loader, "stats", {}).values())
        if bad:
            m["bad_samples"] = bad  # undecodable or invalid samples the loader skipped (this rank)
        m.update(meter.report(self.step))
        return m

    def _export(self) -> Optional[Path]:
        """The embedding-only model (backbone weights + builder config) at the end, via train.export."""
        if not self.cfg.checkpoint.export:
            return None
        if self.injected_backbone:
            self.logger.log_text("note: no embedding export: the backbone was not built from model.backbone")
            return None
        from .backbones import canonical_backbone
        from .builders import backbone_options
        from .export import export_embedding_model
        path = self.run_dir / "model.pt"
        with self.runner.full_parameters() as module:
            if self.ctx.is_main:
                # The export names the registered backbone, not an alias.
                name = canonical_backbone(self.cfg.model.backbone)
                options = backbone_options(self.cfg.model, self.cfg.data.image_size)
                export_embedding_model(module, name, options, path)
        self.ctx.barrier()
        return path
