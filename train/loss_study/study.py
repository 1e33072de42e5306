"""``shardface study losses``: one training run per loss on the same data, backbone and budget.

Every loss is trained through the normal training path (``python -m train.main``, under
torchrun with ``--nproc`` processes) with the same steps, batch, learning-rate schedule and
seed; only the ``loss.*`` settings differ (:mod:`train.loss_study.losses`).  After each run the
study embeds a labelled set of held-out identities and measures compactness and separation
(:mod:`train.loss_study.geometry`).  Small 2-D and 3-D runs on a few identities give the
feature pictures.  Each run leaves a done marker, so a killed study continues where it stopped.

Outputs in ``--out``: ``results.md``, ``results.csv``, ``angles.png``, ``geometry_2d.png``,
``geometry_3d.png``, ``margin_curves.png``; the runs under ``runs/`` and ``geometry/``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from data_pipeline.synthetic import SynthConfig
from launch.torchrun import LaunchSpec, torchrun_command
from train.builders import fast_precision

from .data import ensure_synthetic_dataset, heldout_labelled_set, labelled_images, load_manifest, synthetic_config_of
from .jobs import Job, format_seconds, run_jobs, run_logged
from .losses import StudyLoss, study_losses, toy_overrides
from .report import seed_summary

REPO = Path(__file__).resolve().parents[2]
GEOMETRY_DIMS = (2, 3)
PLATEAU_GAIN = 0.005
"""Training-accuracy gain (fraction) below which a geometry measurement counts as no progress."""
QUICK: dict[str, Any] = {
    "steps": 50, "seeds": 2, "geometry_steps": 100,
    "synth": SynthConfig(num_identities=120, images_per_identity=20, heldout_identities=50, heldout_pairs=500,
                         image_size=(32, 32))}
"""``--quick``: a smaller dataset, fewer steps and two seeds (about ten minutes on two cores)."""


@dataclass
class StudySettings:
    """Everything that defines a loss study (defaults: the documented 2-core CPU study)."""

    out: Path
    """Study folder."""
    losses: list[StudyLoss] = field(default_factory=lambda: study_losses(None))
    """Losses to compare, in table order."""
    steps: int = 300
    """Optimiser steps of every main run."""
    batch_size: int = 64
    """Local batch per process (global batch = batch_size x nproc)."""
    nproc: int = 1
    """Training processes per run (torchrun when > 1)."""
    parallel: int = 2
    """Runs at the same time (one per core by default: a run's start-up, a few seconds, then
    overlaps another's training, and one process per core needs no collectives)."""
    seed: int = 0
    """First seed of the main runs (weights, data order) and the seed of the study's data and pictures."""
    seeds: int = 3
    """Main runs per loss, with seeds ``seed``, ``seed + 1``, ...; the table shows mean ± std over them."""
    data: Optional[Path] = None
    """Dataset folder; None: the study renders its own synthetic faces into ``out/data``."""
    geometry_steps: int = 600
    """Most steps of each 2-D / 3-D geometry run (it stops earlier on a plateau); 0 skips the pictures."""
    geometry_check_every: int = 50
    """Steps between two measurements of a geometry run's training accuracy."""
    geometry_patience: int = 4
    """A geometry run stops when this many measurements in a row gained less than
    :data:`PLATEAU_GAIN` over the best before them (or when every training image is right)."""
    synth: SynthConfig = field(default_factory=lambda: SynthConfig(
        num_identities=300, images_per_identity=30, heldout_identities=100, heldout_pairs=2000, image_size=(32, 32)))
    """The study's own dataset when ``data`` is None."""
    heldout_per_identity: int = 10
    """Images per held-out identity in the labelled set used for the angles."""
    geometry_identities: int = 8
    """Identities of the geometry runs."""
    geometry_train_images: int = 40
    """Training images per identity of the geometry runs (the pictures show 24 other images)."""
    geometry_image_size: int = 32
    """Image side of the geometry runs."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "nproc", "parallel", "seeds", "geometry_check_every",
                     "geometry_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be at least 1")
        if self.geometry_steps < 0:
            raise ValueError(f"--geometry-steps={self.geometry_steps} must be >= 0 (0 skips the geometry runs)")
        if not self.losses:
            raise ValueError("--losses is empty: name at least one loss")

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "StudySettings":
        """Settings from the ``shardface study losses`` arguments (options not given keep their defaults)."""
        given = {k: getattr(a, k, None) for k in ("steps", "batch_size", "nproc", "parallel", "seed", "seeds",
                                                   "geometry_steps")}
        kwargs: dict[str, Any] = dict(QUICK) if getattr(a, "quick", False) else {}
        kwargs.update({k: v for k, v in given.items() if v is not None})
        data = getattr(a, "data", None)
        return cls(out=Path(a.out), losses=study_losses(getattr(a, "losses", None)),
                   data=Path(data) if data else None, **kwargs)


def _train_args(overrides: list[str]) -> list[str]:
    return ["--config", "cpu_tiny"] + [x for item in overrides for x in ("--set", item)]


def _train_command(nproc: int, overrides: list[str]) -> list[str]:
    if nproc > 1:
        return torchrun_command(LaunchSpec(nproc_per_node=nproc), "train.main", _train_args(overrides))
    return [sys.executable, "-m", "train.main"] + _train_args(overrides)


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = str(max(1, threads))  # parallel runs share the cores instead of fighting
    env.setdefault("WANDB_MODE", "disabled")
    return env


def _schedule(seed: int, steps: int) -> list[str]:
    """The training recipe shared by every run: backbone, optimiser, schedule, seed."""
    return [f"seed={seed}", f"max_steps={steps}", "epochs=0", "device=auto", f"precision.dtype={fast_precision()}",
            "model.backbone=iresnet_tiny", "model.dropout=0.0", "loss.sample_rate=1.0", "loss.head_dtype=fp32",
            "optim.name=sgd", "optim.lr=0.1", "optim.reference_batch=0", "optim.momentum=0.9",
            "optim.weight_decay=5e-4", "optim.schedule=poly", "optim.poly_power=2.0", "optim.clip_grad_norm=5.0",
            f"optim.warmup_steps={min(30, steps // 10)}", "optim.grad_accum=1", "parallel.strategy=ddp",
            "checkpoint.every_steps=0", "checkpoint.keep_last=1", "checkpoint.resume=none", "checkpoint.export=true",
            "log.progress=false", f"log.every_steps={max(1, steps // 10)}", "log.wandb=false"]


def _load_model(run_dir: Path) -> torch.nn.Module:
    from train.export import load_embedding_model
    return load_embedding_model(run_dir / "model.pt")


def _fresh(run_dir: Path) -> None:
    """An unfinished attempt of this run (killed study) starts over from nothing."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


class LossStudy:
    """Plans and runs the study described by :class:`StudySettings`."""

    def __init__(self, settings: StudySettings):
        self.s = settings
        self.out = settings.out.resolve()
        cores = os.cpu_count() or 1
        # Threads per training process: oversubscribed OpenMP threads spin and slow everything down.
        self.threads = max(1, cores // (settings.parallel * settings.nproc))
        torch.set_num_threads(max(1, cores // settings.parallel))  # the study's own embedding passes
        self.heldout: Optional[tuple[torch.Tensor, np.ndarray]] = None
        self.geometry_set: Optional[tuple[torch.Tensor, np.ndarray]] = None
        self.geometry_train: Optional[tuple[torch.Tensor, np.ndarray]] = None

    # ------------------------------------------------------------------ data
    def prepare(self) -> None:
        """Training data, labelled held-out set and geometry data (each made once, then reused)."""
        s = self.s
        if s.data is None:
            ensure_synthetic_dataset(dataclasses.replace(s.synth, seed=s.seed), self.out / "data",
                                     samples_per_shard=1000)
            self.data_dir = self.out / "data"
        else:
            self.data_dir = s.data if s.data.is_dir() else s.data.parent
        self.manifest_path, self.manifest = load_manifest(self.data_dir)
        self.heldout = heldout_labelled_set(self.data_dir, self.manifest.image_size, s.heldout_per_identity,
                                            self.out / "heldout_labelled.npz")
        if self.heldout is None:
            print(f"note: {self.data_dir} has no synthetic.json with held-out identities: the angle columns "
                  "and angles.png need labelled held-out images and are left empty", flush=True)
        if s.geometry_steps:
            base = synthetic_config_of(self.data_dir) or s.synth
            cfg = SynthConfig(num_identities=s.geometry_identities, images_per_identity=s.geometry_train_images,
                              heldout_identities=0, heldout_pairs=0,
                              image_size=(s.geometry_image_size, s.geometry_image_size),
                              difficulty=base.difficulty, seed=s.seed)
            ensure_synthetic_dataset(cfg, self.out / "geometry" / "data", samples_per_shard=10 ** 6)
            later = range(s.geometry_train_images, s.geometry_train_images + 24)
            self.geometry_set = labelled_images(cfg, range(s.geometry_identities), list(later),
                                                cfg.image_size, self.out / "geometry" / "images.npz",
                                                f"rendering {s.geometry_identities} identities x 24 unseen images")
            # The training images themselves (the same renders as the shards): the plateau is measured on them.
            self.geometry_train = labelled_images(cfg, range(s.geometry_identities),
                                                  list(range(s.geometry_train_images)), cfg.image_size,
                                                  self.out / "geometry" / "train_images.npz",
                                                  f"rendering {s.geometry_identities} identities x "
                                                  f"{s.geometry_train_images} training images")

    # ------------------------------------------------------------------ main runs
    def _main_overrides(self, loss: StudyLoss, seed: int, run_dir: Path) -> list[str]:
        size = self.manifest.image_size[0]
        return [f"output_dir={run_dir}", f"data.manifest={self.manifest_path}", "data.loader=webdataset",
                f"data.batch_size={self.s.batch_size}", f"data.image_size={size}", "data.workers=0",
                "model.embedding_size=128", "eval.every_steps=0", "eval.at_end=true"] + \
            _schedule(seed, self.s.steps) + list(loss.overrides)

    @property
    def seeds(self) -> list[int]:
        """Seeds of the main runs of every loss."""
        return [self.s.seed + k for k in range(self.s.seeds)]

    def _run_main(self, loss: StudyLoss, seed: int, run_dir: Path) -> dict[str, Any]:
        _fresh(run_dir)
        run_logged(_train_command(self.s.nproc, self._main_overrides(loss, seed, run_dir)), run_dir / "train.log",
                   env=_env(self.threads), cwd=REPO)
        summary = json.loads((run_dir / "summary.json").read_text())
        record: dict[str, Any] = {"loss": loss.name, "seed": seed, "steps": summary["steps"],
                                  "train_s": summary["wall_s"],
                                  "final_loss": summary["final_loss"]}
        if summary.get("eval"):
            name = sorted(summary["eval"])[0]
            record["verification_set"] = name
            record.update(summary["eval"][name])
        if self.heldout is not None:
            from .geometry import embed_labelled, geometry_metrics, unit_rows
            images, labels = self.heldout
            emb = embed_labelled(_load_model(run_dir), images, batch_size=256)
            np.save(run_dir / "heldout_embeddings.npy", unit_rows(emb).astype(np.float32))
            record.update(geometry_metrics(emb, labels))
        return record

    def main_dir(self, loss: StudyLoss, seed: int) -> Path:
        """Folder of one main run."""
        return self.out / "runs" / loss.name / f"seed{seed}"

    def main_jobs(self) -> list[Job]:
        """One job per loss and seed: train, evaluate, measure the held-out geometry."""
        jobs = []
        for seed in self.seeds:  # seed-major: a stopped study has every loss at the same number of seeds
            for loss in self.s.losses:
                run_dir = self.main_dir(loss, seed)
                settings = [o for o in self._main_overrides(loss, seed, run_dir) if not o.startswith("output_dir=")]
                fingerprint = {"kind": "main", "loss": loss.name, "seed": seed, "nproc": self.s.nproc,
                               "settings": settings, "data": self.manifest.source,
                               "heldout": self.heldout is not None}
                jobs.append(Job(_main_key(loss.name, seed), run_dir / "done.json", fingerprint,
                                functools.partial(self._run_main, loss, seed, run_dir),
                                _describe_main))
        return jobs

    # ------------------------------------------------------------------ geometry runs
    def _geometry_overrides(self, loss: StudyLoss, dim: int, run_dir: Path) -> list[str]:
        return [f"output_dir={run_dir}", f"data.manifest={(self.out / 'geometry' / 'data').resolve()}",
                "data.loader=webdataset", "data.batch_size=32", f"data.image_size={self.s.geometry_image_size}",
                "data.workers=0", f"model.embedding_size={dim}", "eval.bins=[]", "eval.at_end=false"] + \
            _schedule(self.s.seed, self.s.geometry_steps) + list(loss.overrides) + \
            list(toy_overrides(loss, dim, self.s.geometry_identities))

    def _run_geometry(self, loss: StudyLoss, dim: int, run_dir: Path) -> dict[str, Any]:
        """Train one toy run in this process until its training accuracy plateaus (or the step cap)."""
        from train.config import TrainConfig
        from train.distributed import init_distributed
        from train.trainer import Trainer

        from .geometry import centre_accuracy, embed_labelled, geometry_metrics, unit_rows
        _fresh(run_dir)
        torch.set_num_threads(self.threads * self.s.nproc)  # this run's share of the cores
        assert self.geometry_set is not None and self.geometry_train is not None
        s, overrides = self.s, self._geometry_overrides(loss, dim, run_dir)
        train_images, train_labels = self.geometry_train
        history: list[tuple[int, float]] = []
        t0 = time.perf_counter()
        with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            print("$ python -m train.main " + " ".join(_train_args(overrides)), flush=True)
            cfg = TrainConfig.load("cpu_tiny", overrides)
            ctx = init_distributed(backend=cfg.parallel.backend, device="cpu")
            try:
                trainer = Trainer(cfg, ctx)
                while trainer.step < trainer.total_steps:
                    summary = trainer.fit(stop_at_step=trainer.step + s.geometry_check_every)
                    acc = centre_accuracy(embed_labelled(trainer.runner.module, train_images), train_labels)
                    history.append((trainer.step, acc))
                    print(f"step {trainer.step}: training accuracy (nearest class centre) {100 * acc:.1f}%",
                          flush=True)
                    if plateaued([a for _, a in history], s.geometry_patience, PLATEAU_GAIN):
                        break
                images, labels = self.geometry_set
                emb = embed_labelled(trainer.runner.module, images, batch_size=256)
            finally:
                ctx.shutdown(barrier=False)
        np.save(run_dir / "features.npy", unit_rows(emb).astype(np.float32))
        steps, acc = history[-1]
        return {"loss": loss.name, "dim": dim, "train_s": time.perf_counter() - t0,
                "final_loss": summary["final_loss"], "steps": steps, "train_accuracy": acc,
                "converged": steps < s.geometry_steps or plateaued([a for _, a in history], s.geometry_patience,
                                                                   PLATEAU_GAIN),
                "accuracy_history": history, "test_accuracy": centre_accuracy(emb, labels),
                **geometry_metrics(emb, labels)}

    def geometry_jobs(self) -> list[Job]:
        """Two small runs per loss (2-D and 3-D embeddings) for the pictures."""
        if not self.s.geometry_steps:
            return []
        jobs = []
        for dim in GEOMETRY_DIMS:
            for loss in self.s.losses:
                run_dir = self.out / "geometry" / f"{dim}d" / loss.name
                settings = [o for o in self._geometry_overrides(loss, dim, run_dir) if not o.startswith("output_dir=")]
                fingerprint = {"kind": "geometry", "loss": loss.name, "dim": dim, "settings": settings}
                run = functools.partial(self._run_geometry, loss, dim, run_dir)
                if self.s.parallel > 1:
                    run = functools.partial(_in_fresh_process, run)
                jobs.append(Job(f"{loss.name} ({dim}-D)", run_dir / "done.json", fingerprint, run,
                                _describe_geometry))
        return jobs

    def aggregate(self, records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Mean and spread over the finished seeds of every loss (see :func:`.report.seed_summary`)."""
        return {loss.name: seed_summary([records[k] for k in (_main_key(loss.name, seed) for seed in self.seeds)
                                         if k in records]) for loss in self.s.losses}

    # ------------------------------------------------------------------ outputs
    def write_table(self, records: dict[str, dict[str, Any]]) -> None:
        """results.md and results.csv from the finished main runs."""
        from .report import write_results
        s = self.s
        header = (f"Same backbone (iresnet_tiny, 128-D), data ({self.manifest.num_classes} identities, "
                  f"{self.manifest.num_samples} images, {self.manifest.image_size[0]} px) and budget "
                  f"({s.steps} steps, global batch {s.batch_size * s.nproc} on {s.nproc} process(es), SGD lr 0.1, "
                  f"poly decay) for every loss, {s.seeds} seed(s) each ({', '.join(map(str, self.seeds))}): "
                  "mean ± standard deviation over the seeds (one value: a single seed). "
                  "Angles: held-out identities, never trained on.")
        per_seed = [(loss, records[_main_key(loss.name, seed)]) for seed in self.seeds for loss in s.losses
                    if _main_key(loss.name, seed) in records]
        write_results(s.losses, self.aggregate(records), per_seed, self.out, header)

    def write_figures(self, records: dict[str, dict[str, Any]], geometry: dict[str, dict[str, Any]]) -> list[Path]:
        """angles.png, geometry_2d.png, geometry_3d.png and margin_curves.png (from what has finished)."""
        from .geometry import pair_angles
        from .margin_curves import standard_curves
        from .plots import plot_angle_histograms, plot_geometry, plot_margin_curves
        written = [plot_margin_curves(standard_curves(), self.out / "margin_curves.png")]
        if self.heldout is not None:
            labels = self.heldout[1]
            first = self.seeds[0]  # one seed's pictures: pooling seeds would mix unrelated embedding spaces
            pairs = {loss.name: pair_angles(np.load(self.main_dir(loss, first) / "heldout_embeddings.npy"), labels)
                     for loss in self.s.losses if _main_key(loss.name, first) in records}
            if pairs:
                written.append(plot_angle_histograms(
                    pairs, self.out / "angles.png",
                    "angles of held-out pairs (same identity: green, different: red)"))
        if self.geometry_set is not None:
            labels = self.geometry_set[1]
            for dim in GEOMETRY_DIMS:
                feats = {loss.name: (np.load(self.out / "geometry" / f"{dim}d" / loss.name / "features.npy"),
                                     labels) for loss in self.s.losses if f"{loss.name} ({dim}-D)" in geometry}
                captions = {name: _geometry_caption(geometry[f"{name} ({dim}-D)"]) for name in feats}
                if feats:
                    written.append(plot_geometry(
                        feats, dim, self.out / f"geometry_{dim}d.png",
                        f"{dim}-D normalised features of {self.s.geometry_identities} identities (unseen images); "
                        f"trained until the training accuracy stops rising (at most {self.s.geometry_steps} steps)",
                        captions))
        return written

    def run(self) -> int:
        """Prepare, train every loss (skipping finished ones), write the table and figures; 0 if all succeeded."""
        s, t0 = self.s, time.perf_counter()
        try:
            import matplotlib  # noqa: F401 - checked before hours of training, not after
        except ImportError:
            raise ValueError("the loss study draws its figures with matplotlib, which is not installed: "
                             "pip install 'shardface[plots]'") from None
        self.out.mkdir(parents=True, exist_ok=True)
        self.prepare()
        print(f"loss study: {len(s.losses)} losses x {s.seeds} seed(s) x {s.steps} steps, "
              f"global batch {s.batch_size * s.nproc} "
              f"({s.nproc} process(es) per run, {s.parallel} run(s) at a time), data {self.data_dir}"
              + (f"; geometry: 2-D and 3-D, {s.geometry_identities} identities, up to {s.geometry_steps} steps"
                 if s.geometry_steps else ""), flush=True)
        done: dict[str, dict[str, Any]] = {}

        def table_so_far(job: Job, record: dict[str, Any]) -> None:
            done[job.key] = record  # the table grows as losses finish
            self.write_table(done)

        records, errors = run_jobs(self.main_jobs(), s.parallel, title="run ", on_done=table_so_far)
        self.write_table(records)
        # Geometry runs train in this process, one at a time, with the threads of one training process.
        torch.set_num_threads(self.threads)
        geometry, geo_errors = run_jobs(self.geometry_jobs(), s.parallel, title="geometry ")
        errors.update(geo_errors)
        figures = self.write_figures(records, geometry)
        print(f"wrote {self.out / 'results.md'}, {self.out / 'results.csv'} and "
              f"{', '.join(p.name for p in figures)} in {format_seconds(time.perf_counter() - t0)}", flush=True)
        if errors:
            print(f"{len(errors)} run(s) failed: {', '.join(errors)}; run the same command again to retry them",
                  file=sys.stderr, flush=True)
            return 1
        return 0


def _describe_main(r: dict[str, Any]) -> str:
    parts = []
    if r.get("accuracy") is not None:
        parts.append(f"accuracy {100 * r['accuracy']:.1f}%")
    if r.get("tar@far=1e-03") is not None:
        parts.append(f"TAR@FAR=1e-3 {100 * r['tar@far=1e-03']:.1f}%")
    if r.get("intra_angle") is not None:
        parts.append(f"intra {r['intra_angle']:.1f}°, inter {r['inter_angle']:.1f}°")
    parts.append(f"trained in {format_seconds(r['train_s'])}")
    return ", ".join(parts)


def _main_key(loss: str, seed: int) -> str:
    return f"{loss} seed {seed}"


def _geometry_caption(r: dict[str, Any]) -> str:
    """The line under a geometry panel: how far the run trained and how well it fits its training images."""
    state = "plateau" if r.get("converged") else "cap, no plateau yet"
    return f"train acc {100 * r['train_accuracy']:.1f}% ({r['steps']} steps, {state})"


def _in_fresh_process(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()`` in a spawned process: geometry runs train in-process (a trainer, redirected
    output, torch's thread count), which two at a time cannot share; a fresh interpreter,
    unlike a fork, also starts with no OpenMP threads of this one."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run).result()


def _describe_geometry(r: dict[str, Any]) -> str:
    return (f"train acc {100 * r['train_accuracy']:.1f}% at step {r['steps']}, intra {r['intra_angle']:.1f}°, "
            f"inter {r['inter_angle']:.1f}°, trained in {format_seconds(r['train_s'])}")


def plateaued(accuracies: list[float], patience: int, gain: float) -> bool:
    """True when the last ``patience`` accuracies rose less than ``gain`` above the best before them,
    or the last one is perfect (nothing left to learn)."""
    if accuracies and accuracies[-1] >= 1.0:
        return True
    if len(accuracies) <= patience:
        return False
    return max(accuracies[-patience:]) < max(accuracies[:-patience]) + gain


def run_loss_study(args: argparse.Namespace) -> int:
    """Entry point of ``shardface study losses``."""
    return LossStudy(StudySettings.from_args(args)).run()
