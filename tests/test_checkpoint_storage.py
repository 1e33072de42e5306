"""Checkpoint format versions, stale temporary folders, the storage probe, node-local storage, async saves."""
import os
import threading

import pytest
import torch

from data_pipeline.loaders.loader_base import LoaderSettingsMismatch
from distributed_harness import fresh_process, run_distributed
from train.checkpoint import (
    SHARED,
    CheckpointFormatError,
    CheckpointManager,
    CheckpointStorageError,
    capture_rng,
    find_latest,
    list_checkpoints,
    load_local,
    load_shared,
    rank_file,
    read_checkpoint,
    save_file,
)
from train.distributed import init_distributed
from train.reshard import classifier_state
from train.trainer import Trainer
from train_fixtures import SplitLoader, assert_same_run_state, bn_net, run_state, tiny_config

RESUME = ("loss.sample_rate=0.5", "max_steps=6", "optim.warmup_steps=2")


# ---------------------------------------------------------------------- format versions
def _write_format1(trainer, folder):
    """The flat layout of format 1, as the previous trainer wrote it."""
    folder.mkdir(parents=True)
    shared = {"format": 1, "step": trainer.step, "epoch": trainer.epoch, "world_size": 1,
              "num_classes": trainer.num_classes, "config": trainer.cfg.to_yaml(),
              "class_ranges": [(0, trainer.num_classes)], "schedule": trainer.schedule.state_dict(),
              "wandb_run_id": None, "skipped_steps": 0, "skipped_in_row": 0, **trainer.runner.state_dict()}
    local = {"rank": 0, "classifier": classifier_state(trainer.head, trainer.head_optimizer, trainer.metric_loss),
             "rng": capture_rng(trainer.ctx.device), "loader": trainer.loader.state_dict(), "fresh_epoch": False}
    save_file(shared, folder / SHARED)
    save_file(local, folder / rank_file(0))


def test_format1_checkpoint_resumes_exactly_and_an_unknown_format_is_refused(tmp_path):
    ctx = init_distributed(device="cpu")
    straight = Trainer(tiny_config(tmp_path / "a", *RESUME), ctx, loader=SplitLoader(), backbone=bn_net())
    straight.fit()
    first = Trainer(tiny_config(tmp_path / "b", *RESUME), ctx, loader=SplitLoader(), backbone=bn_net())
    first.fit(stop_at_step=3)
    old = tmp_path / "old" / "step_00000003"
    _write_format1(first, old)
    resumed = Trainer(tiny_config(tmp_path / "c", *RESUME, f"checkpoint.resume={old}"), ctx,
                      loader=SplitLoader(), backbone=bn_net())
    assert resumed.fit()["steps_this_run"] == 3
    assert_same_run_state(run_state(straight), run_state(resumed))
    assert read_checkpoint(old)["header"]["format"] == 1
    assert load_shared(find_latest(tmp_path / "c" / "checkpoints"))["format"] == 2

    newer = tmp_path / "newer"
    newer.mkdir()
    save_file({"format": 7, "step": 1, "world_size": 1}, newer / SHARED)
    with pytest.raises(CheckpointFormatError, match="format 7; this shardface reads formats 1, 2"):
        Trainer(tiny_config(tmp_path / "d", *RESUME), ctx, loader=SplitLoader(), backbone=bn_net()).resume(newer)


def test_loader_settings_mismatch_is_a_typed_error():
    saved = SplitLoader(batch_size=4).state_dict()
    with pytest.raises(LoaderSettingsMismatch) as info:
        SplitLoader(batch_size=6).load_state_dict(saved)
    assert info.value.differences == {"batch_size": (4, 6)} and isinstance(info.value, ValueError)


# ---------------------------------------------------------------------- stale temporary folders
def test_stale_temporary_folders_are_removed_at_start(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for name in (".tmp-step_00000002", ".tmp-old-step_00000001"):
        (ckpt / name).mkdir(parents=True)
        (ckpt / name / "rank_00000.pt").write_bytes(b"torn")
    (ckpt / ".latest.tmp-123").write_text("step_00000002\n")
    trainer = Trainer(tiny_config(tmp_path, "max_steps=1"), init_distributed(device="cpu"),
                      loader=SplitLoader(), backbone=bn_net())
    trainer._start()
    assert sorted(p.name for p in ckpt.iterdir()) == []


# ---------------------------------------------------------------------- async saves
def _slow_manager(root):
    return CheckpointManager(root, init_distributed(device="cpu"), keep_last=2, asynchronous=True)


def test_background_save_writes_a_snapshot_taken_at_the_call(tmp_path, monkeypatch):
    import train.checkpoint as ckpt
    release = threading.Event()
    real = ckpt.save_file

    def gated(obj, path):
        release.wait(30)  # the writer may not start before the caller has changed the tensor
        real(obj, path)

    monkeypatch.setattr(ckpt, "save_file", gated)
    manager = _slow_manager(tmp_path)
    live = torch.ones(4)
    manager.save(1, {"w": live}, {"w": live}, background=True)
    assert manager.writing and find_latest(tmp_path) is None
    live.add_(5)  # training goes on and changes the state in place
    release.set()
    manager.wait()
    assert not manager.writing
    assert torch.equal(load_shared(find_latest(tmp_path))["w"], torch.ones(4))
    assert torch.equal(load_local(find_latest(tmp_path), 0)["w"], torch.ones(4))


def _killed_background_save(root):
    import train.checkpoint as ckpt

    def save_file(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half")
        os._exit(9)

    ckpt.save_file = save_file
    manager = _slow_manager(root)
    manager.save(2, {"step": 2}, {"w": torch.ones(2)}, background=True)
    manager.wait()


def test_kill_during_a_background_write_leaves_the_last_good_checkpoint(tmp_path):
    _slow_manager(tmp_path).save(1, {"step": 1}, {"w": torch.zeros(2)})
    child = fresh_process(_killed_background_save, tmp_path)
    child.start()
    child.join(60)
    assert child.exitcode == 9
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert find_latest(tmp_path).name == "step_00000001" and list(tmp_path.glob(".tmp-step_00000002"))


def test_a_failed_background_write_is_raised_at_the_next_save(tmp_path, monkeypatch):
    import train.checkpoint as ckpt

    def full(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    manager = _slow_manager(tmp_path)
    manager.save(1, {"step": 1}, {"w": torch.zeros(2)}, background=True)
    with pytest.raises(ckpt.CheckpointWriteError,
                       match="rank 0 could not write its part of checkpoint step_00000001.*OSError: .*No space left"):
        manager.save(2, {"step": 2}, {"w": torch.zeros(2)}, background=True)


def _async_straight_and_resumed(rank, world, out):
    ctx = init_distributed(device="cpu")
    a = ("checkpoint.async_save=true", "checkpoint.every_steps=1", "checkpoint.keep_last=2")
    straight = Trainer(tiny_config(f"{out}/straight", *RESUME), ctx, loader=SplitLoader(rank, world), backbone=bn_net())
    straight.fit()
    first = Trainer(tiny_config(f"{out}/split", *RESUME, *a), ctx, loader=SplitLoader(rank, world), backbone=bn_net())
    first.fit(stop_at_step=3)
    stalls = first.checkpoints.last_stall_s
    resumed = Trainer(tiny_config(f"{out}/split", *RESUME, *a, "checkpoint.resume=latest"), ctx,
                      loader=SplitLoader(rank, world), backbone=bn_net())
    summary = resumed.fit()
    return {"straight": run_state(straight), "resumed": run_state(resumed), "resumed_from": str(resumed.resumed_from),
            "steps": summary["steps_this_run"], "stall": stalls,
            "saved": [p.name for p in list_checkpoints(resumed.checkpoint_dir)]}


@pytest.mark.slow
def test_async_checkpoints_resume_bit_identically_on_two_ranks(tmp_path):
    for r in run_distributed(_async_straight_and_resumed, 2, str(tmp_path)):
        assert r["resumed_from"].endswith("step_00000003") and r["steps"] == 3
        assert r["saved"] == ["step_00000005", "step_00000006"]
        assert_same_run_state(r["straight"], r["resumed"])


# ---------------------------------------------------------------------- storage probe, node-local storage
def _two_nodes(rank, world, out, storage, stop):
    os.environ["LOCAL_WORLD_SIZE"] = "1"  # one rank per "node": each gets its own folder below
    ctx = init_distributed(device="cpu")
    cfg = (*RESUME, f"checkpoint.dir={out}/node{{node}}", f"checkpoint.storage={storage}")
    try:
        first = Trainer(tiny_config(f"{out}/split", *cfg), ctx, loader=SplitLoader(rank, world), backbone=bn_net())
        first.fit(stop_at_step=stop)
    except CheckpointStorageError as err:
        return {"error": str(err)}
    straight = Trainer(tiny_config(f"{out}/straight", *RESUME), ctx, loader=SplitLoader(rank, world), backbone=bn_net())
    straight.fit()
    resumed = Trainer(tiny_config(f"{out}/split", *cfg, "checkpoint.resume=latest"), ctx,
                      loader=SplitLoader(rank, world), backbone=bn_net())
    resumed.fit()
    return {"straight": run_state(straight), "resumed": run_state(resumed), "resumed_from": str(resumed.resumed_from)}


@pytest.mark.slow
def test_folder_not_shared_between_nodes_is_a_one_line_error(tmp_path):
    results = run_distributed(_two_nodes, 2, str(tmp_path), "shared", 3)
    for r in results:
        assert "rank(s) [1] do not see the checkpoint folder" in r["error"]
        assert "checkpoint.storage=node_local" in r["error"] and "\n" not in r["error"]


@pytest.mark.slow
def test_node_local_storage_keeps_each_nodes_ranks_and_resumes_exactly(tmp_path):
    results = run_distributed(_two_nodes, 2, str(tmp_path), "node_local", 3)
    for node in (0, 1):
        folder = tmp_path / f"node{node}" / "step_00000006"
        assert sorted(p.name for p in folder.iterdir()) == [rank_file(node), SHARED]
        assert (tmp_path / f"node{node}" / "step_00000003" / SHARED).is_file()
    for r in results:
        assert r["resumed_from"].endswith("step_00000003")
        assert_same_run_state(r["straight"], r["resumed"])
