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
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from data_pipeline.synthetic import SynthConfig
from launch.torchrun import LaunchSpec, torchrun_command

from .data import ensure_synthetic_dataset, heldout_labelled_set, labelled_images, load_manifest, \
    synthetic_config_of
from .jobs import Job, format_seconds, run_jobs, run_logged
from .losses import StudyLoss, study_losses

REPO = Path(__file__).resolve().parents[2]
GEOMETRY_DIMS = (2, 3)


@dataclass
class StudySettings:
    """Everything that defines a loss study (defaults: the documented 2-core CPU study)."""

    out: Path
    """Study folder."""
    losses: list[StudyLoss] = field(default_factory=lambda: study_losses(None))
    """Losses to compare, in table order."""
    steps: int = 1200
    """Optimiser steps of every main run."""
    batch_size: int = 32
    """Local batch per process (global batch = batch_size x nproc)."""
    nproc: int = 2
    """Training processes per run (torchrun when > 1)."""
    parallel: int = 1
    """Runs at the same time."""
    seed: int = 0
    """Seed of every run (weights, data order) and of the study's synthetic data."""
    data: Optional[Path] = None
    """Dataset folder; None: the study renders its own synthetic faces into ``out/data``."""
    geometry_steps: int = 200
    """Steps of each 2-D / 3-D geometry run; 0 skips the geometry pictures."""
    synth: SynthConfig = field(default_factory=lambda: SynthConfig(
        num_identities=300, images_per_identity=30, heldout_identities=100, heldout_pairs=2000, image_size=56))
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
        for name in ("steps", "batch_size", "nproc", "parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be at least 1")
        if self.geometry_steps < 0:
            raise ValueError(f"--geometry-steps={self.geometry_steps} must be >= 0 (0 skips the geometry runs)")
        if not self.losses:
            raise ValueError("--losses is empty: name at least one loss")

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "StudySettings":
        """Settings from the ``shardface study losses`` arguments (options not given keep their defaults)."""
        given = {k: getattr(a, k, None) for k in ("steps", "batch_size", "nproc", "parallel", "seed",
                                                   "geometry_steps")}
        kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        data = getattr(a, "data", None)
        return cls(out=Path(a.out), losses=study_losses(getattr(a, "losses", None)),
                   data=Path(data) if data else None, **kwargs)


def _train_args(overrides: list[str]) -> list[str]:
    return ["--config", "cpu_tiny"] + [x for item in overrides for x in ("--set", item)]


def _train_command(nproc: int, overrides: list[str]) -> list[str]:
    if nproc > 1:
        return torchrun_command(LaunchSpec(nproc_per_node=nproc), "train.main", _train_args(overrides))
    return [sys.executable, "-m", "train.main"] + _train_args(overrides)


def _train_in_process(overrides: list[str], log_path: Path) -> None:
    """``train.main`` in this process (a single-process run), its console output into ``log_path``.

    The small geometry runs take a few seconds each; a new interpreter would spend as long
    importing torch.
    """
    from train.main import main as train_main
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print("$ python -m train.main " + " ".join(_train_args(overrides)), flush=True)
        try:
            train_main(_train_args(overrides))
        except SystemExit as err:  # argparse's way out must not end the study
            raise RuntimeError(f"train.main exited with status {err.code} (see {log_path})") from None


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = str(max(1, threads))  # parallel runs share the cores instead of fighting
    env.setdefault("WANDB_MODE", "disabled")
    return env


def _schedule(s: StudySettings, steps: int) -> list[str]:
    """The training recipe shared by every run: backbone, optimiser, schedule, seed."""
    return [f"seed={s.seed}", f"max_steps={steps}", "epochs=0", "device=auto", "precision.dtype=bf16",
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
                              heldout_identities=0, heldout_pairs=0, image_size=s.geometry_image_size,
                              difficulty=base.difficulty, seed=s.seed)
            ensure_synthetic_dataset(cfg, self.out / "geometry" / "data", samples_per_shard=10 ** 6)
            later = range(s.geometry_train_images, s.geometry_train_images + 24)
            self.geometry_set = labelled_images(cfg, range(s.geometry_identities), list(later),
                                                cfg.image_size, self.out / "geometry" / "images.npz",
                                                f"rendering {s.geometry_identities} identities x 24 unseen images")

    # ------------------------------------------------------------------ main runs
    def _main_overrides(self, loss: StudyLoss, run_dir: Path) -> list[str]:
        size = self.manifest.image_size[0]
        return [f"output_dir={run_dir}", f"data.manifest={self.manifest_path}", "data.loader=webdataset",
                f"data.batch_size={self.s.batch_size}", f"data.image_size={size}", "data.workers=0",
                "model.embedding_size=128", "eval.every_steps=0", "eval.at_end=true"] + \
            _schedule(self.s, self.s.steps) + list(loss.overrides)

    def _run_main(self, loss: StudyLoss, run_dir: Path) -> dict[str, Any]:
        _fresh(run_dir)
        run_logged(_train_command(self.s.nproc, self._main_overrides(loss, run_dir)), run_dir / "train.log",
                   env=_env(self.threads), cwd=REPO)
        summary = json.loads((run_dir / "summary.json").read_text())
        record: dict[str, Any] = {"loss": loss.name, "steps": summary["steps"], "train_s": summary["wall_s"],
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

    def main_jobs(self) -> list[Job]:
        """One job per loss: train, evaluate, measure the held-out geometry."""
        jobs = []
        for loss in self.s.losses:
            run_dir = self.out / "runs" / loss.name
            settings = [o for o in self._main_overrides(loss, run_dir) if not o.startswith("output_dir=")]
            fingerprint = {"kind": "main", "loss": loss.name, "nproc": self.s.nproc, "settings": settings,
                           "data": self.manifest.source, "heldout": self.heldout is not None}
            jobs.append(Job(f"{loss.name}", run_dir / "done.json", fingerprint,
                            lambda loss=loss, run_dir=run_dir: self._run_main(loss, run_dir), _describe_main))
        return jobs

    # ------------------------------------------------------------------ geometry runs
    def _geometry_overrides(self, loss: StudyLoss, dim: int, run_dir: Path) -> list[str]:
        return [f"output_dir={run_dir}", f"data.manifest={(self.out / 'geometry' / 'data').resolve()}",
                "data.loader=webdataset", "data.batch_size=32", f"data.image_size={self.s.geometry_image_size}",
                "data.workers=0", f"model.embedding_size={dim}", "eval.bins=[]", "eval.at_end=false"] + \
            _schedule(self.s, self.s.geometry_steps) + list(loss.overrides)

    def _run_geometry(self, loss: StudyLoss, dim: int, run_dir: Path) -> dict[str, Any]:
        from .geometry import embed_labelled, geometry_metrics, unit_rows
        _fresh(run_dir)
        _train_in_process(self._geometry_overrides(loss, dim, run_dir), run_dir / "train.log")
        assert self.geometry_set is not None
        images, labels = self.geometry_set
        emb = embed_labelled(_load_model(run_dir), images, batch_size=256)
        np.save(run_dir / "features.npy", unit_rows(emb).astype(np.float32))
        summary = json.loads((run_dir / "summary.json").read_text())
        return {"loss": loss.name, "dim": dim, "train_s": summary["wall_s"], "final_loss": summary["final_loss"],
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
                jobs.append(Job(f"{loss.name} ({dim}-D)", run_dir / "done.json", fingerprint,
                                lambda loss=loss, dim=dim, run_dir=run_dir: self._run_geometry(loss, dim, run_dir),
                                _describe_geometry))
        return jobs

    # ------------------------------------------------------------------ outputs
    def write_table(self, records: dict[str, dict[str, Any]]) -> None:
        """results.md and results.csv from the finished main runs."""
        from .report import write_results
        s = self.s
        header = (f"Same backbone (iresnet_tiny, 128-D), data ({self.manifest.num_classes} identities, "
                  f"{self.manifest.num_samples} images, {self.manifest.image_size[0]} px) and budget "
                  f"({s.steps} steps, global batch {s.batch_size * s.nproc} on {s.nproc} processes, SGD lr 0.1, "
                  f"poly decay, seed {s.seed}) for every loss. Angles: held-out identities, never trained on.")
        write_results(s.losses, records, self.out, header)

    def write_figures(self, records: dict[str, dict[str, Any]], geometry: dict[str, dict[str, Any]]) -> list[Path]:
        """angles.png, geometry_2d.png, geometry_3d.png and margin_curves.png (from what has finished)."""
        from .geometry import pair_angles
        from .margin_curves import standard_curves

        from .plots import plot_angle_histograms, plot_geometry, plot_margin_curves
        written = [plot_margin_curves(standard_curves(), self.out / "margin_curves.png")]
        if self.heldout is not None:
            labels = self.heldout[1]
            pairs = {loss.name: pair_angles(np.load(self.out / "runs" / loss.name / "heldout_embeddings.npy"),
                                            labels) for loss in self.s.losses if loss.name in records}
            if pairs:
                written.append(plot_angle_histograms(
                    pairs, self.out / "angles.png",
                    "angles of held-out pairs (same identity: green, different: red)"))
        if self.geometry_set is not None:
            labels = self.geometry_set[1]
            for dim in GEOMETRY_DIMS:
                feats = {loss.name: (np.load(self.out / "geometry" / f"{dim}d" / loss.name / "features.npy"),
                                     labels) for loss in self.s.losses if f"{loss.name} ({dim}-D)" in geometry}
                if feats:
                    written.append(plot_geometry(
                        feats, dim, self.out / f"geometry_{dim}d.png",
                        f"{dim}-D normalised features of {self.s.geometry_identities} identities (unseen images), "
                        f"{self.s.geometry_steps} steps"))
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
        print(f"loss study: {len(s.losses)} losses x {s.steps} steps, global batch {s.batch_size * s.nproc} "
              f"({s.nproc} processes per run, {s.parallel} run(s) at a time), data {self.data_dir}"
              + (f"; geometry: 2-D and 3-D, {s.geometry_identities} identities, {s.geometry_steps} steps"
                 if s.geometry_steps else ""), flush=True)
        done: dict[str, dict[str, Any]] = {}

        def table_so_far(job: Job, record: dict[str, Any]) -> None:
            done[job.key] = record  # the table grows as losses finish
            self.write_table(done)

        records, errors = run_jobs(self.main_jobs(), s.parallel, title="loss ", on_done=table_so_far)
        self.write_table(records)
        # Geometry runs train in this process, one at a time, with the threads of one training process.
        torch.set_num_threads(self.threads)
        geometry, geo_errors = run_jobs(self.geometry_jobs(), 1, title="geometry ")
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


def _describe_geometry(r: dict[str, Any]) -> str:
    return f"intra {r['intra_angle']:.1f}°, inter {r['inter_angle']:.1f}°, trained in {format_seconds(r['train_s'])}"


def run_loss_study(args: argparse.Namespace) -> int:
    """Entry point of ``shardface study losses``."""
    return LossStudy(StudySettings.from_args(args)).run()
