"""The training system end to end: data-parallel backbone + model-parallel classifier, skips, CLI."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_harness import run_distributed
from train.distributed import init_distributed
from train.optim import split_decay
from train.schedule import lr_multiplier
from train.trainer import NonFiniteTrainingError, Trainer
from train_fixtures import SplitLoader, backbone_snapshot, bn_net, classifier_snapshot, plain_net, tiny_config

REPO = Path(__file__).resolve().parent.parent
# Settings under which two ranks with a local batch of 4 must equal one process with 8:
# no negative sampling (its generators are per rank) and no batch statistics (plain_net).
EQUAL = ("loss.sample_rate=1.0", "max_steps=4")
OPTIMISERS = {"sgd": ("optim.name=sgd",), "adamw": ("optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0.05")}


def _train(rank, world, out, extra, grad_accum=1):
    cfg = tiny_config(f"{out}/r{world}", *EQUAL, f"optim.grad_accum={grad_accum}", *extra)
    trainer = Trainer(cfg, init_distributed(device="cpu"), loader=SplitLoader(rank, world), backbone=plain_net())
    summary = trainer.fit()
    ddp = cfg.parallel.strategy == "ddp"  # DeepSpeed owns (and partitions) its optimiser state
    return {"backbone": backbone_snapshot(trainer, optimizer=ddp), "head": classifier_snapshot(trainer),
            "loss": summary["final_loss"]}


def _reference(tmp_path, extra):
    """One process, two micro-steps of 4 samples per step: the same samples as two ranks of 4."""
    return _train(0, 1, tmp_path, extra, grad_accum=2)


def _assert_matches_reference(results, ref):
    for rank_result in results:
        assert rank_result["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        for key, value in ref["backbone"].items():
            if key.startswith("model."):
                torch.testing.assert_close(rank_result["backbone"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    heads = sorted((r["head"] for r in results), key=lambda h: h["class_start"])
    assert [h["class_start"] for h in heads] == [0, heads[0]["num_local"]]  # two disjoint shards
    torch.testing.assert_close(torch.cat([h["weight"] for h in heads]), ref["head"]["weight"], rtol=1e-5, atol=1e-6)
    for name, rows in ref["head"]["rows"].items():
        torch.testing.assert_close(torch.cat([h["rows"][name] for h in heads]), rows, rtol=1e-4, atol=1e-5)
    # The backbone moved, and the classifier rows moved (they are trained, by their own optimiser).
    assert not torch.equal(ref["backbone"]["model.3.weight"], plain_net().state_dict()["3.weight"])


def _ddp_two_optimisers(rank, world, out):
    return {name: _train(rank, world, f"{out}/{name}", extra) for name, extra in OPTIMISERS.items()}


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_with_the_global_batch(tmp_path):
    """SGD and AdamW: 2 gloo ranks (DDP backbone, sharded classifier) == 1 process with accumulation."""
    results = run_distributed(_ddp_two_optimisers, 2, str(tmp_path))
    for name, extra in OPTIMISERS.items():
        ref = _reference(tmp_path / f"ref_{name}", extra)
        _assert_matches_reference([r[name] for r in results], ref)


def _deepspeed(rank, world, out):
    import importlib
    # The shared-memory all-reduce is a CPU speed-up compiled on first use (~1 min): not needed here.
    # (``deepspeed.comm.torch`` as an attribute is the torch package, hence the module lookup.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    results = {stage: _train(rank, world, f"{out}/z{stage}",
                             ("parallel.strategy=deepspeed", f"parallel.zero_stage={stage}"))
               for stage in (0, 1, 2, 3)}
    for stage in (0, 2):  # stage 0 checks nothing itself; stages 1-3 check inside DeepSpeed
        cfg = tiny_config(f"{out}/nan{stage}", "parallel.strategy=deepspeed", f"parallel.zero_stage={stage}")
        trainer = Trainer(cfg, init_distributed(device="cpu"), loader=SplitLoader(rank, world, nan_batches=(1,)),
                          backbone=bn_net())
        summary = trainer.fit()
        results[f"nan{stage}"] = (summary["skipped_steps"], summary["final_loss"],
                                  all(bool(torch.isfinite(p).all()) for p in trainer.runner.module.parameters()))
    return results


@pytest.mark.slow
def test_deepspeed_zero_two_ranks_equal_one_process(tmp_path):
    """ZeRO 0-3 give the DDP/single-process numbers; a non-finite step is skipped at stage 0 and 2."""
    pytest.importorskip("deepspeed")
    results = run_distributed(_deepspeed, 2, str(tmp_path))
    ref = _reference(tmp_path / "ref", ())
    for stage in (0, 1, 2, 3):
        _assert_matches_reference([r[stage] for r in results], ref)
    for r in results:
        for stage in (0, 2):
            skipped, loss, finite = r[f"nan{stage}"]
            assert skipped == 1 and math.isfinite(loss) and finite, (stage, r[f"nan{stage}"])


def test_nan_step_is_skipped_counted_and_rolled_back(tmp_path, capsys):
    ctx = init_distributed(device="cpu")
    common = ("loss.sample_rate=0.5", "max_steps=5", "optim.max_nonfinite_in_row=2")
    before = Trainer(tiny_config(tmp_path / "a", *common), ctx, loader=SplitLoader(), backbone=bn_net())
    before.fit(stop_at_step=2)
    planted = Trainer(tiny_config(tmp_path / "b", *common), ctx, loader=SplitLoader(nan_batches=(2,)),
                      backbone=bn_net())
    planted.fit(stop_at_step=3)
    assert planted.skipped_steps == 1 and planted.step == 3
    assert "step 3: non-finite loss or gradient" in capsys.readouterr().out
    # The skipped step moved nothing: weights, BatchNorm statistics, optimiser state, classifier rows.
    snap_before, snap_planted = backbone_snapshot(before), backbone_snapshot(planted)
    assert snap_before.keys() == snap_planted.keys()
    for key in snap_before:
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(snap_before[key], snap_planted[key]), key
    head_before, head_planted = classifier_snapshot(before), classifier_snapshot(planted)
    assert torch.equal(head_before["weight"], head_planted["weight"])
    for name in head_before["rows"]:
        assert torch.equal(head_before["rows"][name], head_planted["rows"][name]), name
    # Training goes on afterwards, with finite weights.
    summary = planted.fit()
    assert summary["steps"] == 5 and summary["skipped_steps"] == 1 and math.isfinite(summary["final_loss"])
    assert all(torch.isfinite(p).all() for p in planted.runner.module.parameters())


def test_skipped_step_puts_back_margin_state_and_centres(tmp_path, monkeypatch):
    # Finite features, non-finite gradient: the forward already moved CurricularFace's t and the
    # centre rows of the batch's classes; the skip must undo both.
    ctx = init_distributed(device="cpu")
    cfg = tiny_config(tmp_path, "loss.margin=curricularface", "loss.margin_options={}", "loss.metric_loss=center",
                      "loss.metric_weight=0.01", "max_steps=6", "optim.max_nonfinite_in_row=3")
    trainer = Trainer(cfg, ctx, loader=SplitLoader(), backbone=bn_net())
    trainer.fit(stop_at_step=2)
    t_before = trainer.head.margin.t.clone()
    centres_before = trainer.metric_loss.centers.clone()
    assert float(t_before) != 0.0 and centres_before.abs().sum() > 0  # both did move in the applied steps
    # The step checks the row gradients on the device (no host read): report them non-finite.
    monkeypatch.setattr(trainer.train_step, "_head_finite", lambda: torch.tensor(False))
    trainer.fit(stop_at_step=3)
    assert trainer.skipped_steps == 1
    assert torch.equal(trainer.head.margin.t, t_before)
    assert torch.equal(trainer.metric_loss.centers, centres_before)
    monkeypatch.undo()
    trainer.fit(stop_at_step=4)
    assert not torch.equal(trainer.metric_loss.centers, centres_before)
    assert not torch.equal(trainer.head.margin.t, t_before)


def test_consecutive_nan_steps_stop_the_run(tmp_path):
    cfg = tiny_config(tmp_path, "max_steps=8", "optim.max_nonfinite_in_row=3")
    trainer = Trainer(cfg, init_distributed(device="cpu"), loader=SplitLoader(nan_batches=tuple(range(1, 99))),
                      backbone=bn_net())
    with pytest.raises(NonFiniteTrainingError) as err:
        trainer.fit()
    assert "3 steps in a row had a non-finite loss or gradient (step 4" in str(err.value)
    assert "optim.max_nonfinite_in_row=3" in str(err.value)
    assert trainer.skipped_steps == 3


def test_fp16_overflow_backs_the_scale_off_and_unscales_both_optimisers(tmp_path, capsys):
    ctx = init_distributed(device="cpu")
    moved = {}
    for dtype in ("fp32", "fp16"):
        cfg = tiny_config(tmp_path / dtype, "max_steps=8", f"precision.dtype={dtype}", "precision.init_scale=65536",
                          "optim.max_nonfinite_in_row=2")
        trainer = Trainer(cfg, ctx, loader=SplitLoader(), backbone=plain_net())
        start = trainer.head.weight.detach().clone()
        summary = trainer.fit()
        moved[dtype] = (trainer.head.weight.detach() - start).norm().item()
        if dtype == "fp16":
            # 65536 overflows fp16 here at first; the scaler backs off, overflow skips do not end the run.
            assert summary["skipped_steps"] >= 2 and trainer.skipped_in_row == 0
            assert trainer.runner.loss_scale < 65536
            assert "gradients overflowed at loss scale 65536" in capsys.readouterr().out
    # Applied fp16 steps move the classifier like fp32 ones: its gradients were divided by the scale.
    assert 0.0 < moved["fp16"] < 3 * moved["fp32"]


def test_lr_multiplier_against_the_formulas():
    total, warm = 110, 10
    assert [lr_multiplier(s, total, warm) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    for s in (10, 37, 60, 109):
        progress = (s - warm) / (total - warm)
        assert lr_multiplier(s, total, warm, "poly", power=2.0) == pytest.approx((1 - progress) ** 2)
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_multiplier(s, total, warm, "cosine", min_ratio=0.1) == pytest.approx(cosine)
        assert lr_multiplier(s, total, warm, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule='step'"):
        lr_multiplier(20, total, warm, "step")


def test_schedule_peaks_survive_loading_an_optimiser_state():
    from train.schedule import LRSchedule
    p = torch.nn.Parameter(torch.zeros(2))
    saved = torch.optim.SGD([p], lr=0.4)  # e.g. saved by a run with a larger global batch
    LRSchedule([saved], 10).set_step(9)
    opt = torch.optim.SGD([p], lr=0.1)
    schedule = LRSchedule([opt], 10, warmup_steps=2, schedule="constant")
    opt.load_state_dict(saved.state_dict())
    assert schedule.set_step(0) == 0.5 and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert schedule.set_step(5) == 1.0 and opt.param_groups[0]["lr"] == pytest.approx(0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_requested_without_gpu_is_a_clear_error():
    from train.distributed import DistributedSetupError
    with pytest.raises(DistributedSetupError, match="device=cuda was requested but no CUDA GPU is visible"):
        init_distributed(device="cuda")


def test_world_size_larger_than_the_class_count_is_refused():
    from train.distributed import DistContext, DistributedSetupError, check_world_size
    ctx = DistContext(0, 8, 0, torch.device("cpu"), None, "gloo")
    with pytest.raises(DistributedSetupError, match="num_classes=5 is smaller than the world size 8"):
        check_world_size(ctx, num_classes=5, global_batch=64)
    check_world_size(ctx, num_classes=8, global_batch=8)


def test_no_weight_decay_on_norms_biases_and_prelu():
    net = bn_net()
    decay, no_decay = split_decay(net)
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in decay) == ["0.weight", "5.weight"]
    assert sorted(names[id(p)] for p in no_decay) == ["1.bias", "1.weight", "2.weight", "5.bias", "6.bias", "6.weight"]


@pytest.mark.slow
def test_torchrun_main_trains_evaluates_checkpoints_and_exports(tmp_path):
    """The real entry point under torchrun: 2 processes, iresnet_tiny, synthetic data, a .bin, W&B offline."""
    from data_pipeline.verification import write_bin
    from shard_helpers import make_jpeg
    jpegs = [make_jpeg(i, 32) for i in range(40)]
    write_bin(tmp_path / "pairs.bin", jpegs, [i % 2 == 0 for i in range(20)])
    out = tmp_path / "run"
    sets = ["data.loader=random_tensors", "data.manifest=", "data.num_classes=20", "data.num_samples=256",
            "data.batch_size=8",
            "data.image_size=32", "model.backbone=iresnet_tiny", "model.embedding_size=32", "max_steps=6",
            f"output_dir={out}", f"eval.bins=[{tmp_path / 'pairs.bin'}]", "eval.every_steps=3", "eval.batch_size=16",
            "checkpoint.every_steps=4", "log.every_steps=2", "log.wandb=true", "loss.sample_rate=0.5"]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"), PYTHONPATH=str(REPO))
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.main",
           "--config", "cpu_tiny"] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "global batch 16 = 8 x 2 ranks" in proc.stdout and "step 6/6" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["finished"] and summary["skipped_steps"] == 0
    assert set(summary["eval"]) == {"pairs"} and 0.0 <= summary["eval"]["pairs"]["accuracy"] <= 1.0
    assert (out / "eval" / "roc_step00000003.png").is_file() and (out / "eval" / "roc_step00000006.png").is_file()
    from train.config import TrainConfig
    assert TrainConfig.from_yaml((out / "config.yaml").read_text()) == TrainConfig.load("cpu_tiny", sets)
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in (ckpt / "step_00000006").iterdir()) == ["rank_00000.pt", "rank_00001.pt", "shared.pt"]
    shared = torch.load(ckpt / "step_00000006" / "shared.pt", weights_only=False)
    assert shared["progress"]["wandb_run_id"] and shared["progress"]["wandb_run_id"] == summary["wandb_run_id"]
    assert list((tmp_path / "wandb").rglob(f"offline-run-*{summary['wandb_run_id']}"))
    from train.export import load_embedding_model
    model = load_embedding_model(out / "model.pt")
    emb = model(torch.zeros(2, 3, 32, 32))
    assert emb.shape == (2, 32)
