"""Checkpoints: exact resume, resume at another world size, atomicity under a kill, retention."""
import os

import pytest
import torch

from distributed_harness import fresh_process, run_distributed
from train.checkpoint import (
    LATEST,
    CheckpointManager,
    find_latest,
    list_checkpoints,
    load_local,
    load_shared,
    rank_file,
)
from train.distributed import init_distributed
from train.reshard import check_ranges, gather_rows
from train.trainer import Trainer
from train_fixtures import (
    CLASSES,
    SplitLoader,
    assert_same_run_state,
    backbone_snapshot,
    bn_net,
    classifier_snapshot,
    run_state,
    tiny_config,
)

# Negative sampling, momentum, BatchNorm statistics and dropout: all must survive a resume.
RESUME = ("loss.sample_rate=0.5", "max_steps=6", "optim.warmup_steps=2")


def _straight_and_resumed(rank, world, out):
    ctx = init_distributed(device="cpu")
    straight = Trainer(tiny_config(f"{out}/straight", *RESUME), ctx, loader=SplitLoader(rank, world), backbone=bn_net())
    straight.fit()
    first = Trainer(tiny_config(f"{out}/split", *RESUME), ctx, loader=SplitLoader(rank, world), backbone=bn_net())
    first.fit(stop_at_step=3)
    del first  # the "killed" process: only its checkpoint survives
    resumed = Trainer(tiny_config(f"{out}/split", *RESUME, "checkpoint.resume=latest"), ctx,
                      loader=SplitLoader(rank, world), backbone=bn_net())
    summary = resumed.fit()
    return {"straight": run_state(straight), "resumed": run_state(resumed), "resumed_from": str(resumed.resumed_from),
            "steps_this_run": summary["steps_this_run"]}


@pytest.mark.slow
def test_kill_and_resume_gives_identical_weights(tmp_path):
    """N steps in one go == N/2 steps, a new process that resumes 'latest', N/2 more (2 ranks)."""
    results = run_distributed(_straight_and_resumed, 2, str(tmp_path))
    for r in results:
        assert r["resumed_from"].endswith("step_00000003") and r["steps_this_run"] == 3
        assert_same_run_state(r["straight"], r["resumed"])
    assert not torch.equal(results[0]["straight"]["head"]["weight"], results[1]["straight"]["head"]["weight"])


def _train_and_save(rank, world, out, extra):
    cfg = tiny_config(out, "loss.sample_rate=0.5", "max_steps=3", *extra)
    Trainer(cfg, init_distributed(device="cpu"), loader=SplitLoader(rank, world), backbone=bn_net()).fit()


def _resume_only(rank, world, out, extra):
    cfg = tiny_config(out, "loss.sample_rate=0.5", "max_steps=3", *extra)
    trainer = Trainer(cfg, init_distributed(device="cpu"), loader=SplitLoader(rank, world), backbone=bn_net())
    notes = trainer.resume(find_latest(trainer.checkpoint_dir))
    return {"head": classifier_snapshot(trainer), "notes": notes, "backbone": backbone_snapshot(trainer)}


def _saved_rows(folder):
    """Every saved shard's rows concatenated in class order: the reference for any re-slicing."""
    shared = load_shared(folder)
    parts = [load_local(folder, r)["classifier"]["rows"] for r in range(shared["world_size"])]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}, shared


def _check_resliced(heads, saved):
    for head in heads:
        lo, hi = head["class_start"], head["class_start"] + head["num_local"]
        assert torch.equal(head["weight"], saved["weight"][lo:hi])
        for name, rows in head["rows"].items():
            assert torch.equal(rows, saved[f"opt.{name}"][lo:hi]), name
    assert sum(h["num_local"] for h in heads) == CLASSES


@pytest.mark.slow
def test_resume_two_ranks_on_one(tmp_path):
    extra = ("optim.name=adamw", "optim.lr=0.01")
    run_distributed(_train_and_save, 2, str(tmp_path), extra)
    saved, shared = _saved_rows(tmp_path / "checkpoints" / "step_00000003")
    assert shared["world_size"] == 2
    # Rows that were never sampled still have zero moments: the test sees the difference.
    assert (saved["opt.weight.step"] > 0).any() and (saved["opt.weight.exp_avg"] != 0).any()
    result = _resume_only(0, 1, str(tmp_path), extra)
    _check_resliced([result["head"]], saved)
    assert any("re-sliced from world size 2 to 1" in n for n in result["notes"])
    shared = torch.load(tmp_path / "checkpoints" / "step_00000003" / "shared.pt", weights_only=False)
    backbone = shared["runner"]["backbone"]
    for key, value in backbone.items():
        assert torch.equal(result["backbone"][f"model.{key}"], value), key


@pytest.mark.slow
def test_resume_one_rank_on_two(tmp_path):
    _train_and_save(0, 1, str(tmp_path), ())
    saved, _ = _saved_rows(tmp_path / "checkpoints" / "step_00000003")
    assert (saved["opt.weight.momentum_buffer"] != 0).any()
    results = run_distributed(_resume_only, 2, str(tmp_path), ())
    _check_resliced([r["head"] for r in results], saved)
    assert [r["head"]["class_start"] for r in results] == [0, CLASSES // 2]


def test_gather_rows_reslices_uneven_ranges():
    full = torch.arange(23 * 3, dtype=torch.float32).view(23, 3)
    saved = [(0, 8), (8, 8), (16, 7)]  # three ranks
    check_ranges(saved, 23)
    read = lambda i: {"weight": full[saved[i][0]:saved[i][0] + saved[i][1]]}  # noqa: E731
    for start, count in [(0, 12), (12, 11), (5, 1), (7, 10), (0, 23)]:
        assert torch.equal(gather_rows(saved, read, start, count)["weight"], full[start:start + count])
    with pytest.raises(ValueError, match="cover 23 classes, the run has 24"):
        check_ranges(saved, 24)


def _manager(root):
    return CheckpointManager(root, init_distributed(device="cpu"), keep_last=2)


def _payload(step):
    return {"step": step, "weights": torch.full((4,), float(step))}


def _killed_save(root, where):
    """Save step 2 and die at ``where``: mid rank file, after it, or before the pointer moves."""
    import train.checkpoint as ckpt
    real_save = ckpt.save_file
    if where == "rank_file":
        def save_file(obj, path):
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a zip")  # torn write
            os._exit(9)
        ckpt.save_file = save_file
    elif where == "shared_file":
        def save_file(obj, path):
            if path.name == "shared.pt":
                os._exit(9)
            real_save(obj, path)
        ckpt.save_file = save_file
    else:
        def write_text_atomic(path, text):
            os._exit(9)
        ckpt.write_text_atomic = write_text_atomic
    _manager(root).save(2, _payload(2), _payload(2))


@pytest.mark.parametrize("where", ["rank_file", "shared_file", "pointer"])
def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path, where):
    root = tmp_path / "ckpt"
    _manager(root).save(1, _payload(1), _payload(1))
    child = fresh_process(_killed_save, root, where)
    child.start()
    child.join(60)
    assert child.exitcode == 9
    latest = find_latest(root)
    if where == "pointer":
        # The new folder is complete, the pointer still names the previous one: both load.
        assert latest.name == "step_00000001" and (root / "step_00000002" / "shared.pt").is_file()
    else:
        assert latest.name == "step_00000001" and [p.name for p in list_checkpoints(root)] == ["step_00000001"]
        assert list(root.glob(".tmp-step_00000002"))
    assert load_shared(latest)["step"] == 1 and torch.equal(load_local(latest, 0)["weights"], torch.ones(4))
    # The next save clears the debris and moves the pointer.
    _manager(root).save(3, _payload(3), _payload(3))
    assert not list(root.glob(".tmp-*")) and find_latest(root).name == "step_00000003"


def test_retention_and_pointer_fallback(tmp_path):
    root = tmp_path / "ckpt"
    manager = _manager(root)
    for step in (1, 2, 3):
        manager.save(step, _payload(step), _payload(step))
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000003"]
    assert (root / LATEST).read_text().strip() == "step_00000003"
    assert sorted(p.name for p in (root / "step_00000003").iterdir()) == [rank_file(0), "shared.pt"]
    (root / LATEST).write_text("step_00000009\n")  # a pointer to something deleted by hand
    assert find_latest(root).name == "step_00000003"
    (root / LATEST).unlink()
    assert find_latest(root).name == "step_00000003"
    assert find_latest(tmp_path / "nothing") is None


def test_resume_with_another_batch_size_continues_at_the_same_sample_count(tmp_path):
    ctx = init_distributed(device="cpu")
    common = ("loss.sample_rate=0.5", "max_steps=6")
    Trainer(tiny_config(tmp_path, *common), ctx, loader=SplitLoader(batch_size=4), backbone=bn_net()).fit(
        stop_at_step=3)
    resumed = Trainer(tiny_config(tmp_path, *common, "checkpoint.resume=latest"), ctx,
                      loader=SplitLoader(batch_size=6), backbone=bn_net())
    notes = resumed.resume(find_latest(resumed.checkpoint_dir))
    assert any("batch_size: saved 4, now 6" in n and "new order" in n for n in notes), notes
    assert resumed.step == 3 and resumed.loader.state_dict()["batches_consumed"] == 3 * 4 // 6
