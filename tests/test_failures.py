"""Failures: the fault switch, a failing rank stopping every rank with its error, restarts that hold."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_pipeline.loaders import build_loader
from distributed_harness import free_port
from shard_helpers import write_dataset
from train.faults import Fault, FaultSwitch, InjectedFault, parse_faults

REPO = Path(__file__).resolve().parent.parent
SETTINGS = ["max_steps=12", "device=cpu", "data.loader=random_tensors", "data.manifest=", "data.num_classes=10",
            "data.num_samples=64", "data.batch_size=4", "data.image_size=56", "model.backbone=iresnet_tiny",
            "model.embedding_size=16", "loss.sample_rate=0.5", "checkpoint.every_steps=4", "eval.bins=[]",
            "log.every_steps=1", "log.progress=false", "log.wandb=false", "failure.hang_timeout_s=8",
            "checkpoint.export=false"]


def _sets(items):
    return [x for s in items for x in ("--set", s)]


def test_fault_spec_parses_and_names_mistakes():
    faults = parse_faults("rank=1,step=7,kind=raise; rank=*,step=resume,kind=sigkill,once=/tmp/m")
    assert faults == [Fault(1, 7, "raise"), Fault(None, "resume", "sigkill", "/tmp/m")]
    for bad, match in [("rank=1,step=7,kind=boom", "kind='boom'"), ("rank=x,step=1,kind=raise", "rank="),
                       ("rank=1,step=1,kind=raise,when=3", "'when=3'")]:
        with pytest.raises(ValueError, match=match):
            parse_faults(bad)


def test_switch_fires_on_its_rank_at_its_step_once_per_marker(tmp_path):
    marker = tmp_path / "fired"
    spec = [Fault(1, 3, "raise", str(marker)), Fault(0, 2, "enospc")]
    FaultSwitch(spec, 0).before_step(5)  # rank 0 has no step fault
    other = FaultSwitch(spec, 1)
    other.before_step(2)
    with pytest.raises(InjectedFault, match="raise at step 3 on rank 1"):
        other.before_step(3)
    assert marker.exists()
    FaultSwitch(spec, 1).before_step(4)  # a restarted process: the marker says it fired already
    with pytest.raises(OSError, match="No space left"):
        FaultSwitch(spec, 0).on_save(4)


@pytest.mark.slow
def test_killed_loader_worker_is_replaced_inside_the_rank(tmp_path, monkeypatch):
    root = tmp_path / "shards"
    write_dataset(root, [6, 6, 6, 6])
    kw = dict(rank=0, world_size=1, batch_size=2, workers=2, mode="exact", seed=1, shuffle_buffer=4)

    def epochs(loader):
        out = []
        for e in (0, 1):
            loader.set_epoch(e)
            out += [(x.clone(), y.clone()) for x, y in loader]
        # Stopped here: the worker's death leaves the loader in a reference cycle (the exception's
        # traceback), and its workers stopped later by the garbage collector take 5 s each to join.
        loader.close()
        return out

    full = epochs(build_loader("webdataset", root, **kw))
    marker = tmp_path / "killed"
    # Batch 15 is in the second epoch (12 batches each): the worker making it dies.
    monkeypatch.setenv("SHARDFACE_FAULT", f"rank=0,step=15,kind=worker_kill,once={marker}")
    again = epochs(build_loader("webdataset", root, **kw))
    assert marker.exists(), "the fault did not fire"
    assert len(again) == len(full)
    for (xa, ya), (xb, yb) in zip(full, again):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def _plain_launch(out: Path, fault: str, world: int = 2):
    """``python -m train.main`` per rank with RANK/WORLD_SIZE/MASTER_* only (no torchrun)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE=str(world), SHARDFACE_FAULT=fault)
    procs = [subprocess.Popen([sys.executable, "-m", "train.main", "--config", "cpu_tiny",
                               *_sets(SETTINGS + [f"output_dir={out}"])], cwd=REPO,
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    return [p.returncode for p in procs], logs, time.time()


@pytest.mark.slow
@pytest.mark.parametrize("kind,expect", [
    ("raise", "rank 1 failed at step 5: InjectedFault: injected fault raise"),
    ("enospc", "rank 1 could not write its part of checkpoint step_00000008"),
    ("hang", "rank 1 hung at step 5"),
    ("sigkill", "rank 1 stopped without a report"),
])
def test_plain_launch_stops_every_rank_with_the_failing_ranks_error(tmp_path, kind, expect):
    marker = tmp_path / "fired"
    codes, logs, ended = _plain_launch(tmp_path / "run", f"rank=1,step=5,kind={kind},once={marker}")
    assert marker.exists(), logs
    assert all(c != 0 for c in codes), (codes, logs)
    assert expect in logs[0].strip().splitlines()[-1], logs[0][-2000:]
    # Stopping takes seconds, not the collective timeout (the figures: docs/training.md, Failures).
    assert ended - marker.stat().st_mtime < 60


def _launch(out: Path, fault: str, nproc: int = 2, nodes: int = 1, restarts: int = 0):
    """``shardface train`` under torchrun: one launcher, or ``nodes`` launchers on loopback."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), SHARDFACE_FAULT=fault)
    base = [sys.executable, "-m", "launch.cli", "train", "--config", "cpu_tiny", "--nproc-per-node", str(nproc),
            "--max-restarts", str(restarts), *_sets(SETTINGS + [f"output_dir={out}"])]
    port = free_port()
    cmds = [base] if nodes == 1 else [
        base + ["--nnodes", str(nodes), "--node-rank", str(n), "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", f"test-{port}"] for n in range(nodes)]
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    return [p.returncode for p in procs], logs


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_torchrun_launch_ends_with_the_failing_ranks_error(tmp_path, nodes):
    marker = tmp_path / "fired"
    codes, logs = _launch(tmp_path / "run", f"rank=1,step=5,kind=raise,once={marker}", nproc=1 if nodes == 2 else 2,
                          nodes=nodes)
    assert all(c != 0 for c in codes), logs
    for log in logs:  # every launcher's last line is rank 1's error
        assert log.strip().splitlines()[-1] == ("shardface: error: rank 1 failed at step 5: InjectedFault: "
                                                "injected fault raise at step 5 on rank 1"), log[-2000:]


def _final_state(out: Path, steps: int) -> dict:
    folder = out / "checkpoints" / f"step_{steps:08d}"
    shared = torch.load(folder / "shared.pt", weights_only=False)
    ranks = sorted(folder.glob("rank_*.pt"))
    state: dict = {}
    _tensors({k: shared[k] for k in ("backbone", "optimizer") if k in shared}, "shared", state)
    for f in ranks:
        _tensors(torch.load(f, weights_only=False)["classifier"], f"classifier/{f.name}", state)
    return state


def _tensors(obj, prefix: str, out: dict) -> None:
    """Every tensor inside nested dicts/lists, by path."""
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{prefix}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, f"{prefix}/{i}", out)


def _kill_plan(seed: int, tmp: Path, world: int, steps: int) -> str:
    """Three SIGKILLs at seeded moments: during start-up, mid-run on a rank, during a resume."""
    rng = random.Random(seed)
    mid = rng.randrange(5, steps)  # after the first checkpoint (step 4), so that a resume follows
    plan = [f"rank={rng.randrange(world)},step=start,kind=sigkill,once={tmp / 'k0'}",
            f"rank={rng.randrange(world)},step={mid},kind=sigkill,once={tmp / 'k1'}",
            f"rank={rng.randrange(world)},step=resume,kind=sigkill,once={tmp / 'k2'}"]
    return ";".join(plan)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """Final state of the 12-step run without faults, 2 ranks on one node.

    A two-"node" launch (1 rank per node) runs the same 2 ranks with the same collectives over
    gloo and ends bit-identical to it, so both kill tests compare against this one run.
    """
    out = tmp_path_factory.mktemp("uninterrupted")
    codes, logs = _launch(out, "", nproc=2, nodes=1)
    assert codes == [0], logs[0][-3000:]
    return _final_state(out, 12)


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_three_kills_with_three_restarts_end_bit_identical(tmp_path, nodes, uninterrupted):
    steps = 12
    nproc = 1 if nodes == 2 else 2
    fault = _kill_plan(nodes, tmp_path, 2, steps)
    codes, logs = _launch(tmp_path / "run", fault, nproc=nproc, nodes=nodes, restarts=3)
    assert codes == [0] * nodes, "\n".join(log[-3000:] for log in logs)
    assert [i for i in range(3) if not (tmp_path / f"k{i}").exists()] == [], "planned kills that did not happen"
    ref, run = uninterrupted, _final_state(tmp_path / "run", steps)
    assert ref.keys() == run.keys() and ref
    for key in ref:
        assert torch.equal(ref[key], run[key]), key



def test_slow_start_up_is_not_a_hang_but_a_stuck_step_is(tmp_path, monkeypatch):
    """Start-up longer than failure.hang_timeout_s (a first DeepSpeed run builds an op) is not
    blamed; a step stuck as long afterwards is. In one process, with the verdict recorded
    instead of ending the process."""
    import torch.distributed as dist

    from train import failure
    from train import trainer as trainer_module
    from train.distributed import init_distributed
    from train.trainer import Trainer
    from train_fixtures import SplitLoader, plain_net, tiny_config

    verdicts: list[tuple[int, str]] = []
    lines: list[str] = []
    monkeypatch.delenv(failure.FAILURE_FILE_ENV, raising=False)
    monkeypatch.setattr(failure, "_say", lines.append)

    def record_exit(code):
        verdicts.append((code, lines[-1] if lines else ""))
        watch._stop.set()  # the watch thread ends instead of the process

    monkeypatch.setattr(failure, "_exit", record_exit)
    stuck_s, limit_s = 2.0, 0.8
    build = trainer_module.build_runner

    def slow_build(*args, **kwargs):
        time.sleep(stuck_s)  # one line, longer than the step limit, before any step
        return build(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "build_runner", slow_build)
    ctx = init_distributed(device="cpu")
    settings = failure.WatchSettings(hang_timeout_s=limit_s, heartbeat_timeout_s=60.0,
                                     startup_timeout_s=60.0, poll_s=0.05)
    watch = failure.FailureWatch(ctx, settings, store=dist.HashStore()).start()
    try:
        trainer = Trainer(tiny_config(tmp_path / "run", "max_steps=3"), ctx, loader=SplitLoader(),
                          backbone=plain_net(), watch=watch)
        step = trainer.train_step

        def stuck_step(batches, **kwargs):
            if kwargs.get("step") == 3:
                time.sleep(stuck_s)  # a hang in the third step
            return step(batches, **kwargs)

        trainer.train_step = stuck_step
        trainer.fit()
        deadline = time.monotonic() + 5
        while not verdicts and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        watch.stop()
    assert len(verdicts) == 1, verdicts
    code, line = verdicts[0]
    assert code == failure.EXIT_HUNG and "rank 0 hung at step 3" in line, line
    assert "failure.hang_timeout_s=0.8" in line and "test_failures.py" in line
