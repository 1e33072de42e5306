"""``shardface demo``: the whole system on a CPU in minutes.

Synthetic faces → WebDataset shards → Partial FC training (ArcFace, sampled negatives) on
two gloo processes → evaluation on identities never seen in training → ONNX export → a
short report.  Every stage is the one a real run uses; only the sizes are small.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .torchrun import LaunchSpec, torchrun_command


@dataclass
class DemoOptions:
    """What the demo does and where."""

    out: Path = Path("runs/demo")
    """Working directory: data/, run/ and the report go here."""
    quick: bool = False
    """Smaller data and fewer steps (for tests and impatient people)."""
    nproc: int = 2
    """Training processes (gloo on CPU, NCCL when there are GPUs)."""
    wandb: bool = True
    """Log to Weights & Biases (offline unless credentials are set)."""


# Sizes chosen so that the full demo finishes in well under 10 minutes on 2 CPU cores.
FULL = dict(identities=1000, images=16, heldout=200, pairs=3000, steps=600, distractors=1000)
QUICK = dict(identities=200, images=16, heldout=100, pairs=1000, steps=60, distractors=200)
IMAGE_SIZE = 56


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _make_data(opts: DemoOptions, sizes: dict) -> Path:
    from data_pipeline.synthetic import SynthConfig
    from data_pipeline.synthetic.dataset import make_synthetic_dataset

    cfg = SynthConfig(num_identities=sizes["identities"], images_per_identity=sizes["images"],
                      heldout_identities=sizes["heldout"], heldout_pairs=sizes["pairs"],
                      image_size=(IMAGE_SIZE, IMAGE_SIZE), seed=0)
    data_dir = opts.out / "data"
    _banner(f"1/4 synthetic faces: {cfg.num_identities} training identities x {cfg.images_per_identity} images, "
            f"{cfg.heldout_identities} held-out identities ({cfg.heldout_pairs} pairs), {IMAGE_SIZE}x{IMAGE_SIZE}")
    make_synthetic_dataset(cfg, data_dir, samples_per_shard=2500, workers=os.cpu_count() or 1)
    return data_dir / "manifest.json"


def _train(opts: DemoOptions, manifest: Path, sizes: dict) -> dict:
    from train.builders import fast_precision
    precision = fast_precision()
    run_dir = opts.out / "run"
    overrides = [f"data.manifest={manifest}", f"output_dir={run_dir}", "overwrite=true", f"max_steps={sizes['steps']}",
                 f"log.wandb={'true' if opts.wandb else 'false'}", f"checkpoint.every_steps={sizes['steps'] // 3}",
                 f"eval.every_steps={sizes['steps']}", f"precision.dtype={precision}"]
    args = ["--config", "cpu_tiny"] + [x for o in overrides for x in ("--set", o)]
    _banner(f"2/4 training: iresnet_tiny + ArcFace Partial FC (r=0.5) on {opts.nproc} processes, "
            f"{sizes['steps']} steps, {precision} autocast")
    env = dict(os.environ)
    if opts.wandb and "WANDB_API_KEY" not in env:
        env.setdefault("WANDB_MODE", "offline")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // opts.nproc)))
    cmd = torchrun_command(LaunchSpec(nproc_per_node=opts.nproc), "train.main", args)
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise RuntimeError(f"training exited with code {code} (see the log above)")
    return json.loads((run_dir / "summary.json").read_text())


def _export(summary: dict) -> tuple[Path, float]:
    from train.export import check_onnx_parity, export_onnx, load_embedding_model

    _banner("3/4 ONNX export (dynamic batch), checked against PyTorch with onnxruntime")
    model = load_embedding_model(summary["export"])
    path = Path(summary["run_dir"]) / "model.onnx"
    export_onnx(model.backbone, path, image_size=model.image_size)
    return path, check_onnx_parity(model.backbone, path)


def _identify(opts: DemoOptions, summary: dict, sizes: dict) -> dict:
    """Rank-1 of the held-out identities (image 0 enrolled, images 1-3 searched), without and with strangers."""
    from data_pipeline.synthetic import SynthConfig
    from data_pipeline.synthetic.dataset import CONFIG_FILE
    from train.evaluation.distractors import plot_cmc, plot_rank1_vs_distractors
    from train.evaluation.synthetic_identification import evaluate_synthetic_identification
    from train.export import load_embedding_model

    cfg = SynthConfig(**json.loads((opts.out / "data" / CONFIG_FILE).read_text()))
    model = load_embedding_model(summary["export"])
    curve = evaluate_synthetic_identification(model, cfg, (0, sizes["distractors"]), probes_per_identity=3,
                                              workers=os.cpu_count() or 1, progress=False)
    eval_dir = Path(summary["run_dir"]) / "eval"
    plot_rank1_vs_distractors({"demo": curve}, eval_dir / "rank1_vs_distractors.png")
    plot_cmc({f"{n} distractors": c for n, c in curve["cmc"].items()}, eval_dir / "cmc.png")
    return {k: v for k, v in curve.items() if k != "cmc"}


def _report(summary: dict, onnx: Path, parity: float, started: float, opts: DemoOptions,
            ident: dict | None = None) -> dict:
    ev = summary["eval"].get("synthetic_heldout", {})
    run_dir = Path(summary["run_dir"])
    roc = sorted(run_dir.glob("eval/roc*.png"))
    wandb_runs = sorted(run_dir.glob("wandb/offline-run-*")) + sorted(run_dir.glob("wandb/run-*"))

    from train.evaluation.report import format_value

    def pct(key: str) -> str:
        return format_value(key, ev.get(key))
    lines = [
        "4/4 report",
        f"held-out verification accuracy (identities never seen in training, 10-fold): {pct('accuracy')}",
        f"TAR @ FAR=1e-2: {pct('tar@far=1e-02')}   TAR @ FAR=1e-3: {pct('tar@far=1e-03')}   "
        f"ROC AUC: {pct('auc')}",
        (f"held-out identification ({ident['num_enrolled']} identities, one image enrolled each, "
         f"{ident['num_probes']} probes): rank-1 {100 * ident['rank1'][0]:.2f}%, "
         f"rank-5 {100 * ident['rank5'][0]:.2f}%; "
         f"with {ident['sizes'][-1]} distractors rank-1 {100 * ident['rank1'][-1]:.2f}%" if ident else
         "held-out identification: n/a"),
        f"training: {summary['steps']} steps, {summary['samples_per_s']:.0f} samples/s, "
        f"final loss {summary['final_loss']:.4f}, skipped steps {summary['skipped_steps']}",
        f"checkpoint: {summary['checkpoint']}",
        f"embedding model: {summary['export']}",
        f"ONNX model: {onnx} (max |onnxruntime - torch| = {parity:.1e})",
        f"ROC curve: {roc[-1] if roc else 'n/a'}",
        f"W&B run: {wandb_runs[-1] if wandb_runs else 'disabled'}"
        + (" (offline: `wandb sync` it to upload)" if wandb_runs and "offline" in wandb_runs[-1].name else ""),
        f"total time: {time.time() - started:.0f} s",
    ]
    _banner(lines[0])
    print("\n".join(lines[1:]), flush=True)
    report = {"heldout": {k: v for k, v in ev.items()}, "identification": ident, "summary": summary, "onnx": str(onnx),
              "onnx_max_abs_diff": parity, "total_s": time.time() - started}
    (opts.out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def run_demo(opts: DemoOptions) -> int:
    """Run every stage; returns 0 when the held-out accuracy clears 95% (full) or 80% (quick)."""
    started = time.time()
    sizes = QUICK if opts.quick else FULL
    opts.out.mkdir(parents=True, exist_ok=True)
    manifest = _make_data(opts, sizes)
    summary = _train(opts, manifest, sizes)
    onnx, parity = _export(summary)
    report = _report(summary, onnx, parity, started, opts, _identify(opts, summary, sizes))
    accuracy = report["heldout"].get("accuracy") or 0.0
    bar = 0.80 if opts.quick else 0.95
    if accuracy < bar:
        print(f"held-out accuracy {accuracy:.4f} is below the demo's bar of {bar:.2f}", flush=True)
        return 1
    return 0
