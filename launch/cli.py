"""The ``shardface`` command: data, training, evaluation, export, benchmarks and the demo.

Every user mistake ends in one line on stderr and a non-zero exit; ``--debug`` (or
``SHARDFACE_DEBUG=1``) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from .torchrun import LaunchSpec, failure_file, torchrun_command, under_torchrun

REPO = Path(__file__).resolve().parent.parent


class UsageError(Exception):
    """A mistake in what the user asked for (reported as one line)."""


# --------------------------------------------------------------------------- data
def _cmd_data_synth(a: argparse.Namespace) -> int:
    from data_pipeline.progress import quantity
    from data_pipeline.synthetic import SynthConfig
    from data_pipeline.synthetic.dataset import make_synthetic_dataset
    chosen = dict(num_identities=a.identities, images_per_identity=a.images_per_identity,
                  heldout_identities=a.heldout_identities, heldout_pairs=a.pairs,
                  image_size=a.image_size, difficulty=a.difficulty, seed=a.seed)
    # Options left unset take the generator's own defaults.
    cfg = SynthConfig(**{k: v for k, v in chosen.items() if v is not None})
    from data_pipeline.sources.remote_output import write_dataset_to
    # To a URL: written into a local staging folder, then uploaded (the manifest last).
    manifest = write_dataset_to(a.out, lambda out, _: make_synthetic_dataset(
        cfg, out, samples_per_shard=a.samples_per_shard, workers=a.workers))
    print(f"wrote {manifest.num_samples} images of {manifest.num_classes} identities in "
          f"{quantity(len(manifest.shards), 'shard')} to {a.out} (held-out pairs and contact_sheet.png beside them)")
    return 0


def _cmd_data_convert(a: argparse.Namespace) -> int:
    if not Path(a.src).exists():
        raise UsageError(f"input {a.src} does not exist")
    from data_pipeline.convert import convert
    from data_pipeline.progress import quantity
    extra: dict[str, Any] = {}
    if a.skip_bad:
        if a.source != "folder":
            raise UsageError("--skip-bad applies to --from folder only (a .rec is checked record by record)")
        extra["skip_bad"] = True
    manifest = convert(a.source, a.src, a.out, samples_per_shard=a.samples_per_shard, seed=a.seed,
                       workers=a.workers, **extra)
    print(f"wrote {manifest.num_samples} images of {manifest.num_classes} classes in "
          f"{quantity(len(manifest.shards), 'shard')} to {a.out}")
    skipped = Path(a.out) / "skipped_images.txt"
    if a.skip_bad and skipped.is_file():
        count = len(skipped.read_text(encoding="utf-8").splitlines())
        print(f"left out {count} unreadable image(s), listed in {skipped}")
    return 0


def _cmd_data_inspect(a: argparse.Namespace) -> int:
    from data_pipeline.inspect import inspect_dataset
    report = inspect_dataset(a.path, verify=not a.no_verify, deep=a.deep)
    print(report.format())
    return 0 if report.ok else 1


# --------------------------------------------------------------------------- train
def _launch_spec(a: argparse.Namespace) -> LaunchSpec:
    return LaunchSpec(nproc_per_node=a.nproc_per_node, nnodes=a.nnodes, node_rank=a.node_rank,
                      rdzv_endpoint=a.rdzv_endpoint, rdzv_id=a.rdzv_id, max_restarts=a.max_restarts)


def _check_launch(cfg, spec: LaunchSpec) -> None:
    """Mistakes that would otherwise surface inside every worker: no GPU, too many ranks."""
    if cfg.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UsageError("device=cuda was asked for but torch sees no CUDA GPU: use --set device=cpu "
                             "(or device=auto), or install a CUDA build of torch")
    world = spec.nproc_per_node * spec.nnodes
    classes = cfg.data.num_classes
    # (A remote manifest is read by the training processes; its class count is checked there.)
    if cfg.data.manifest and Path(cfg.data.manifest).exists():
        from data_pipeline.sources.rec_dataset import open_dataset
        from train.builders import check_image_size
        # A .rec without header or property file would need every label read: not checked here.
        dataset = open_dataset(cfg.data.manifest, scan_labels=False)
        check_image_size(cfg.data, dataset)
        classes = dataset.num_classes if classes is None else classes
    from launch.start_checks import check_before_launch
    check_before_launch(cfg)
    if classes is not None and classes < world:
        raise UsageError(f"{world} processes ({spec.nproc_per_node} per node x {spec.nnodes} nodes) but only "
                         f"{classes} classes: every rank must hold at least one class of the classifier")


def _overrides(a: argparse.Namespace) -> list[str]:
    sets = list(a.set or [])
    if a.max_restarts:  # a restarted worker must pick up where the killed one stopped
        sets.append("checkpoint.resume=latest")
    if a.no_wandb:
        sets.append("log.wandb=false")
    return sets


def _cmd_train(a: argparse.Namespace) -> int:
    spec = _launch_spec(a)
    spec.validate()
    overrides = _overrides(a)
    # Validate the configuration here, so that a mistake is one line before any process starts.
    from train.config import TrainConfig
    from train.preemption import PREEMPTED_EXIT_CODE
    cfg = TrainConfig.load(a.config, overrides)
    if a.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    _check_launch(cfg, spec)
    from train.run_folder import check_run_folder
    check_run_folder(cfg)  # before torchrun starts or anything is written
    train_args = ["--config", a.config] + [x for item in overrides for x in ("--set", item)]
    if spec.needs_torchrun and not under_torchrun():
        from .supervise import Supervisor, supervised_command
        cmd = supervised_command(torchrun_command(spec, "train.main", train_args), cfg.preempt.signals,
                                 cfg.preempt.grace_s)
        print("launching: " + " ".join(cmd), flush=True)
        folder = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.output_dir) / "checkpoints"
        with failure_file() as (env, read_failure):
            if a.debug:
                env["SHARDFACE_DEBUG"] = "1"
            # torchrun sets 1 thread per worker when unset, with a banner saying so; the same choice as the
            # demo's (the cores shared by this node's workers), made here, keeps it quiet.
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.nproc_per_node)))
            code = Supervisor(cmd, cfg.preempt.signals, cfg.preempt.grace_s, folder,
                              Path(cfg.output_dir) / "summary.json", env=env).run()
            if code not in (0, 130, PREEMPTED_EXIT_CODE):
                # The failing rank's error, last: not a timeout or a kill of some other rank.
                unreported = ("a training process ended without a report (killed by a signal or exited by itself); "
                              "torchrun names it above")
                print(f"shardface: error: {read_failure() or unreported}", file=sys.stderr)
        return code
    from train.main import main as train_main
    return PREEMPTED_EXIT_CODE if train_main(train_args).get("preempted") else 0


# --------------------------------------------------------------------------- model use
def _cmd_eval(a: argparse.Namespace) -> int:
    if not a.bin and not a.identification:
        raise UsageError("nothing to evaluate: give --bin SETS (verification) and/or --identification DATA_DIR")
    if (a.distractors is not None or a.distractor_features) and not a.identification:
        raise UsageError("--distractors and --distractor-features belong to --identification DATA_DIR")
    if a.bin:
        from launch.model_commands import evaluate_model
        evaluate_model(a.model, a.bin, out_dir=a.out, batch_size=a.batch_size)
    if a.identification:
        from launch.model_commands import identify_model
        identify_model(a.model, a.identification, out_dir=a.out, distractors=a.distractors,
                       probes_per_identity=a.probes_per_identity, distractor_features=a.distractor_features,
                       batch_size=a.batch_size)
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from launch.model_commands import export_model
    export_model(a.model, a.onnx, check=not a.no_check)
    return 0


def _cmd_embed(a: argparse.Namespace) -> int:
    from launch.model_commands import embed_images
    embed_images(a.model, a.images, a.out, batch_size=a.batch_size, flip=a.flip)
    return 0


def _index_options(a: argparse.Namespace):
    from train.gallery_index import IndexOptions
    return IndexOptions(kind=a.kind, nlist=a.nlist, nprobe=a.nprobe, hnsw_m=a.hnsw_m,
                        ef_construction=a.ef_construction, ef_search=a.ef_search)


def _cmd_index_build(a: argparse.Namespace) -> int:
    from launch.search_commands import build_index
    build_index(a.model, a.images, a.out, _index_options(a), batch_size=a.batch_size, flip=a.flip,
                prefix=a.prefix or "", append=a.append)
    return 0


def _cmd_index_add(a: argparse.Namespace) -> int:
    from launch.search_commands import add_to_index
    add_to_index(a.index, a.model, a.images, batch_size=a.batch_size, flip=a.flip, prefix=a.prefix or "")
    return 0


def _cmd_search(a: argparse.Namespace) -> int:
    from launch.search_commands import search_folder
    search_folder(a.index, a.model, a.images, top=a.top, out=a.out, fmt=a.format, batch_size=a.batch_size,
                  flip=a.flip, nprobe=a.nprobe, ef_search=a.ef_search)
    return 0


def _cmd_import_insightface(a: argparse.Namespace) -> int:
    from train.insightface import import_insightface
    path, ours = import_insightface(a.weights, a.backbone, a.out)
    print(f"wrote {path}: insightface {a.backbone} as {ours} (fine-tune with --set model.backbone={ours} "
          f"--set model.init_from={path})")
    return 0


def _cmd_eval_ijb(a: argparse.Namespace) -> int:
    from launch.ijb_command import run_ijb, run_ijb_1n
    one_to_one, one_to_n = a.pairs is not None, bool(a.gallery) or a.probes is not None
    if one_to_one == one_to_n or (one_to_n and not (a.gallery and a.probes)):
        raise ValueError("eval-ijb needs either --pairs (1:1 verification) or both --gallery and --probes "
                         "(1:N identification)")
    if one_to_n:
        run_ijb_1n(a.features, a.faces, a.gallery, a.probes, names=a.names, flipped=a.flipped,
                   face_scores=a.face_scores, out=a.out)
    else:
        run_ijb(a.features, a.faces, a.pairs, names=a.names, flipped=a.flipped, face_scores=a.face_scores, out=a.out)
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    script = REPO / "bench" / f"{a.which}_bench.py"
    results = Path(a.results).resolve()
    print(f"results go to {results}", flush=True)
    # bench/results.py writes there instead of the checkout's bench/RESULTS.md.
    env = dict(os.environ, SHARDFACE_BENCH_RESULTS=str(results))
    return subprocess.call([sys.executable, str(script)] + a.args, env=env)


def _cmd_demo(a: argparse.Namespace) -> int:
    from launch.demo import DemoOptions, run_demo
    return run_demo(DemoOptions(out=Path(a.out), quick=a.quick, nproc=a.nproc, wandb=not a.no_wandb))


def _cmd_study(a: argparse.Namespace) -> int:
    from train.loss_study.study import run_loss_study
    return run_loss_study(a)


# --------------------------------------------------------------------------- parser
def _add_launch_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launch (torchrun)")
    g.add_argument("--nproc-per-node", type=int, default=1, help="processes on this node")
    g.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    g.add_argument("--node-rank", type=int, default=None, help="this node's rank")
    g.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the first node (multi-node)")
    g.add_argument("--rdzv-id", default="shardface", help="job id shared by the nodes")
    g.add_argument("--max-restarts", type=int, default=0, help="elastic restarts, resuming from the last checkpoint")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` where a default says something (not for flags, unset options or texts naming one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or "default" in text \
                or not action.option_strings:
            return text
        return super()._get_help_string(action) or text


def _debug_option() -> argparse.ArgumentParser:
    """``--debug`` for every subcommand too (``shardface train --debug`` as well as ``shardface --debug train``)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    return parent


def _command(sub: "argparse._SubParsersAction", name: str, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=_HelpFormatter, parents=[_debug_option()], **kw)


def _synth_defaults() -> tuple[Any, int]:
    """The generator's own defaults (one source of truth for the CLI, the docs and the API)."""
    import inspect as _inspect

    from data_pipeline.synthetic import SynthConfig
    from data_pipeline.synthetic.dataset import make_synthetic_dataset
    return SynthConfig(), _inspect.signature(make_synthetic_dataset).parameters["samples_per_shard"].default


def _add_embedding_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="folder of aligned face images (searched recursively)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="embed each image alone (default: add the mirrored image's embedding)")


def _add_search_parsers(sub) -> None:
    idx = _command(sub, "index", help="a FAISS gallery index of face images (build, add)").add_subparsers(
        dest="index_command", required=True, metavar="INDEX_COMMAND")
    ib = _command(idx, "build", help="embed a folder into a new gallery index (names beside it)")
    ib.add_argument("--model", required=True, help="embedding model file or run directory")
    _add_embedding_options(ib)
    ib.add_argument("--out", required=True, help="index file to write (names go to OUT.json)")
    ib.add_argument("--kind", choices=["flat", "ivf", "hnsw"], default="flat",
                    help="flat: exact; ivf, hnsw: approximate, for large galleries")
    ib.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4*sqrt(N), >= 39 rows per cell)")
    ib.add_argument("--nprobe", type=int, default=16, help="IVF cells visited per query")
    ib.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node")
    ib.add_argument("--ef-construction", type=int, default=80, help="HNSW build candidate list")
    ib.add_argument("--ef-search", type=int, default=64, help="HNSW search candidate list")
    ib.add_argument("--prefix", default=None, help="prefix of the stored names (PREFIX/relative/path.jpg)")
    ib.add_argument("--append", action="store_true", help="add to OUT if it exists instead of replacing it")
    ib.set_defaults(func=_cmd_index_build)
    ia = _command(idx, "add", help="embed a folder and append it to an existing gallery index")
    ia.add_argument("--index", required=True)
    ia.add_argument("--model", required=True, help="the model the index was built with")
    _add_embedding_options(ia)
    ia.add_argument("--prefix", default=None, help="prefix of the stored names (keeps them unique)")
    ia.set_defaults(func=_cmd_index_add)

    se = _command(sub, "search", help="the top-K gallery matches (names, scores) of each image in a folder")
    se.add_argument("--index", required=True, help="gallery index from `shardface index build`")
    se.add_argument("--model", default=None, help="embedding model (default: the one the index records)")
    _add_embedding_options(se)
    se.add_argument("--top", type=int, default=5, help="matches per query")
    se.add_argument("--out", default=None, help="results file, .csv or .json (default: CSV on stdout)")
    se.add_argument("--format", choices=["csv", "json"], default=None, help="override the format --out implies")
    se.add_argument("--nprobe", type=int, default=None, help="IVF: cells visited (default: the index's)")
    se.add_argument("--ef-search", type=int, default=None, help="HNSW: candidate list (default: the index's)")
    se.set_defaults(func=_cmd_search)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``shardface``."""
    p = argparse.ArgumentParser(prog="shardface", description="Distributed face-recognition training.",
                                formatter_class=_HelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = _command(sub, "data", help="make, convert and check WebDataset shards").add_subparsers(
        dest="data_command", required=True, metavar="DATA_COMMAND")
    synth, synth_per_shard = _synth_defaults()
    s = _command(data, "synth", help="generate synthetic faces: training shards + held-out pairs")
    s.add_argument("--out", required=True, help="output directory or URL (s3://bucket/prefix, gs://...)")
    s.add_argument("--identities", type=int, default=synth.num_identities, help="training identities")
    s.add_argument("--images-per-identity", type=int, default=synth.images_per_identity,
                   help="images rendered per identity")
    s.add_argument("--heldout-identities", type=int, default=synth.heldout_identities,
                   help="identities never seen in training")
    s.add_argument("--pairs", type=int, default=synth.heldout_pairs, help="held-out verification pairs (half same)")
    s.add_argument("--image-size", type=int, default=synth.image_size[0], help="image side in pixels")
    s.add_argument("--difficulty", type=float, default=synth.difficulty, help="0 (easy) .. 1 (hard)")
    s.add_argument("--seed", type=int, default=synth.seed, help="seed of every identity and image")
    s.add_argument("--samples-per-shard", type=int, default=synth_per_shard, help="images per tar shard")
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="rendering processes")
    s.set_defaults(func=_cmd_data_synth)
    c = _command(data, "convert", help="insightface .rec/.idx or an image folder → shards")
    c.add_argument("--from", dest="source", choices=["recordio", "folder"], required=True, help="input format")
    c.add_argument("src", help="train.rec (with train.idx beside it) or a folder root/<identity>/<image>")
    c.add_argument("--out", required=True, help="output directory or URL (s3://bucket/prefix, gs://...): "
                   "shards are uploaded as they are written, the manifest last")
    c.add_argument("--samples-per-shard", type=int, default=10000, help="images per tar shard")
    c.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    c.add_argument("--workers", type=int, default=1, help="encoding processes")
    c.add_argument("--skip-bad", action="store_true",
                   help="--from folder: leave out unreadable images (listed in OUT/skipped_images.txt)")
    c.set_defaults(func=_cmd_data_convert)
    i = _command(data, "inspect", help="summarise a manifest and check its shards")
    i.add_argument("path", help="dataset directory or manifest.json, local or a URL (http(s)://, s3://, gs://)")
    i.add_argument("--deep", action="store_true", help="also decode every JPEG")
    i.add_argument("--no-verify", action="store_true",
                   help="only check that the shard files exist (no checksums, counts or labels)")
    i.set_defaults(func=_cmd_data_inspect)

    t = _command(sub, "train", help="train (plain process, or torchrun with --nproc-per-node/--nnodes)")
    t.add_argument("--config", default="cpu_tiny", help="preset name (configs/*.yaml) or a YAML file")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. optim.lr=0.05")
    t.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    _add_launch_options(t)
    t.set_defaults(func=_cmd_train)

    e = _command(sub, "eval", help="verification (TAR@FAR, ROC) and 1:N identification of a saved model")
    e.add_argument("--model", required=True, help="embedding model file or checkpoint directory")
    e.add_argument("--bin", nargs="+", default=None, help="insightface .bin verification sets")
    e.add_argument("--identification", metavar="DATA_DIR", default=None,
                   help="1:N: search the held-out identities of a `data synth` set among distractors")
    e.add_argument("--distractors", type=int, nargs="+", default=None, metavar="N",
                   help="gallery distractor counts for --identification (default 0 10 100 1000)")
    e.add_argument("--probes-per-identity", type=int, default=3, help="probe images per held-out identity")
    e.add_argument("--distractor-features", default=None,
                   help=".npy of distractor embeddings (e.g. `shardface embed` of a photo folder) "
                        "instead of rendered ones")
    e.add_argument("--out", default=None, help="where to write results.json, roc.png and the identification plots "
                                               "(default: eval/ beside the model)")
    e.add_argument("--batch-size", type=int, default=256, help="images per forward")
    e.set_defaults(func=_cmd_eval)

    x = _command(sub, "export", help="ONNX export of the backbone (dynamic batch), checked with onnxruntime")
    x.add_argument("--model", required=True, help="model.pt written by training (or its run folder)")
    x.add_argument("--onnx", required=True, help="output .onnx path")
    x.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    x.set_defaults(func=_cmd_export)

    m = _command(sub, "embed", help="embeddings of every image in a folder (.npy + names)")
    m.add_argument("--model", required=True, help="model.pt written by training (or its run folder)")
    m.add_argument("--images", required=True, help="folder of face crops (searched recursively)")
    m.add_argument("--out", required=True, help="output .npy path")
    m.add_argument("--batch-size", type=int, default=128, help="images per forward")
    m.add_argument("--no-flip", dest="flip", action="store_false",
                   help="embed each image alone (default: add the mirrored image's embedding)")
    m.set_defaults(func=_cmd_embed)

    _add_search_parsers(sub)

    j = _command(sub, "eval-ijb", help="IJB-B/IJB-C templates of embedded faces: 1:1 verification (TAR@FAR table, "
                                       "--pairs) or 1:N identification (rank-k and TPIR@FPIR, --gallery/--probes)")
    j.add_argument("--features", required=True, help=".npy of face features [N, D] (`shardface embed` output)")
    j.add_argument("--names", default=None, help="image name of each feature row (the .txt beside the .npy); "
                                                 "without it the rows must follow the face list")
    j.add_argument("--faces", required=True, help="*_face_tid_mid.txt: image, template id, media id per face")
    j.add_argument("--pairs", default=None, help="1:1: *_template_pair_label.txt: template 1, template 2, label")
    j.add_argument("--gallery", nargs="+", default=None, help="1:N: gallery CSVs, e.g. ijbc_1N_gallery_G1.csv "
                   "ijbc_1N_gallery_G2.csv (one result each, and their mean)")
    j.add_argument("--probes", default=None, help="1:N: probe CSV, e.g. ijbc_1N_probe_mixed.csv")
    j.add_argument("--flipped", default=None, help=".npy of the mirrored faces' features, added to --features "
                                                   "(leave out when `embed` already added the flip)")
    j.add_argument("--face-scores", default=None, help="detector score per face (.npy, or text whose last "
                                                       "column is the score, e.g. *_name_5pts_score.txt)")
    j.add_argument("--out", default=None, help="results.json to write (fractions)")
    j.set_defaults(func=_cmd_eval_ijb)

    im = _command(sub, "import", help="import another project's weights as an embedding model").add_subparsers(
        dest="import_source", required=True, metavar="SOURCE")
    ii = _command(im, "insightface", help="arcface_torch backbone.pth (r18-r200, mbf, vit_t/s/b/l/h) → model.pt")
    ii.add_argument("--backbone", required=True, help="their network name (r50, mbf, ...) or ours (iresnet50, ...)")
    ii.add_argument("weights", help="arcface_torch's backbone.pth (or a checkpoint_gpu_*.pt)")
    ii.add_argument("--out", required=True, help="embedding model file to write (model.pt)")
    ii.set_defaults(func=_cmd_import_insightface)

    b = _command(sub, "bench", help="run a benchmark from bench/ and record its table in a Markdown file")
    b.add_argument("which", choices=["partial_fc", "data", "train", "search"], help="which benchmark")
    b.add_argument("--results", default="bench_results.md",
                   help="Markdown file the table is written into (relative to the current folder)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    b.set_defaults(func=_cmd_bench)

    d = _command(sub, "demo", help="synthetic faces → shards → 2-process training → held-out evaluation")
    d.add_argument("--out", default="runs/demo", help="working directory")
    d.add_argument("--quick", action="store_true", help="a smaller, faster run")
    d.add_argument("--nproc", type=int, default=2, help="training processes")
    d.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    d.set_defaults(func=_cmd_demo)

    st = _command(sub, "study", help="studies: compare losses on the same data and budget")
    st_sub = st.add_subparsers(dest="study", required=True, metavar="STUDY")
    sl = _command(st_sub, "losses", help="train once per loss; table, feature geometry and margin curves")
    sl.add_argument("--out", default="runs/loss_study",
                    help="study folder: results, figures, runs (default runs/loss_study)")
    sl.add_argument("--losses", nargs="+", default=None, help="default: every margin and metric loss")
    sl.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 300)")
    sl.add_argument("--seeds", type=int, default=None,
                    help="runs per loss with seeds SEED, SEED+1, ...; the table shows mean ± std (default 3)")
    sl.add_argument("--quick", action="store_true",
                    help="smaller data, 50 steps, 2 seeds, geometry capped at 100 steps (about 10 minutes)")
    sl.add_argument("--parallel", type=int, default=None, help="runs trained at the same time (default 2)")
    sl.add_argument("--data", default=None,
                    help="dataset directory (default: render 300 synthetic identities into OUT/data)")
    sl.add_argument("--batch-size", type=int, default=None, help="local batch per process (default 64)")
    sl.add_argument("--nproc", type=int, default=None, help="training processes per run (default 1; torchrun when > 1)")
    sl.add_argument("--seed", type=int, default=None, help="first seed of the runs; seed of the study's data "
                    "(default 0)")
    sl.add_argument("--geometry-steps", type=int, default=None,
                    help="most steps of each 2-D/3-D picture run, which stops on a plateau "
                         "(default 600; 0: no geometry pictures)")
    sl.set_defaults(func=_cmd_study)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``shardface`` console script."""
    from .openmp_env import short_openmp_spin
    short_openmp_spin()  # before anything loads torch (and its OpenMP runtime)
    from train.quiet import quiet_libraries
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("SHARDFACE_DEBUG") == "1"
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("shardface: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line unless --debug
        if debug:
            raise
        name = "" if isinstance(exc, (UsageError, ValueError, FileNotFoundError)) else f"{type(exc).__name__}: "
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"shardface: error: {name}{message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
