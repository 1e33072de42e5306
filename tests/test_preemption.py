"""Preemption and Ctrl-C: a signalled run saves the step it was at, resumes bit-identically, leaves no rank."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from launch.supervise import descendants
from train.checkpoint import find_latest
from train.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parent.parent
# Periodic checkpoints off: the only checkpoint of an interrupted run is the one the signal caused.
SETTINGS = ["device=cpu", "data.loader=random_tensors", "data.manifest=", "data.num_classes=10", "data.num_samples=64",
            "data.batch_size=4", "data.image_size=32", "model.backbone=iresnet_tiny", "model.embedding_size=16",
            "loss.sample_rate=0.5", "checkpoint.every_steps=0", "checkpoint.export=false", "eval.bins=[]",
            "log.every_steps=1", "log.progress=false", "log.wandb=false"]


def start_training(out: Path, steps: int, *extra: str) -> subprocess.Popen:
    """``shardface train --nproc-per-node 2`` (torchrun, gloo) in the background, output on a pipe."""
    sets = SETTINGS + [f"output_dir={out}", f"max_steps={steps}", *extra]
    cmd = [sys.executable, "-m", "launch.cli", "train", "--config", "cpu_tiny", "--nproc-per-node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(cmd + [x for s in sets for x in ("--set", s)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def read_until_step(proc: subprocess.Popen, step: int, total: int) -> list[str]:
    """Lines up to the metrics line of ``step`` (fails if the run ends first)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step {step}/{total} "):
            return lines
    raise AssertionError(f"the run ended before step {step}:\n{''.join(lines[-40:])}")


def tensors(obj, prefix=""):
    """Every tensor inside nested dicts/lists, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


def checkpoint_tensors(folder: Path) -> dict:
    """Backbone, optimiser, classifier shards and RNG states of a checkpoint, as tensors by path."""
    found = {}
    for f in sorted(folder.glob("*.pt")):
        found.update({f"{f.name}{k}": v for k, v in tensors(torch.load(f, map_location="cpu", weights_only=False))})
    return found


def assert_bit_identical(a: Path, b: Path) -> None:
    """Weights, optimiser states, classifier shards and the saved RNG states equal bit for bit."""
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys() and ta, f"{a} and {b} hold different tensors"
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] != "Z"


def shards_with_loader_workers(root: Path) -> list[str]:
    """Settings for a small webdataset read by 2 DataLoader workers per rank (they see the signals too)."""
    from data_pipeline.synthetic import SynthConfig
    from data_pipeline.synthetic.dataset import make_synthetic_dataset
    make_synthetic_dataset(SynthConfig(num_identities=12, images_per_identity=8, heldout_identities=2,
                                       heldout_pairs=10, image_size=32), root, samples_per_shard=24, workers=1)
    return ["data.loader=webdataset", f"data.manifest={root / 'manifest.json'}", "data.num_classes=12",
            "data.num_samples=96", "data.workers=2", "data.shuffle_buffer=10"]


@pytest.mark.slow
def test_signal_at_a_random_step_saves_that_step_and_resumes_bit_identically(tmp_path):
    total = 30
    data = shards_with_loader_workers(tmp_path / "data")
    chooser = random.Random()
    sig = chooser.choice([signal.SIGTERM, signal.SIGUSR1])
    at = chooser.randint(2, total - 8)
    why = f"({sig.name} after step {at})"
    # The uninterrupted reference trains meanwhile (on its own folder): only the final checkpoints are compared.
    ref = start_training(tmp_path / "ref", total, *data)
    proc = start_training(tmp_path / "run", total, *data)
    lines = read_until_step(proc, at, total)
    time.sleep(chooser.random() * 0.05)  # a random moment inside the next steps
    proc.send_signal(sig)
    lines.append(proc.communicate(timeout=300)[0])
    log = "".join(lines)
    assert proc.returncode == PREEMPTED_EXIT_CODE, f"{why} exit {proc.returncode}:\n{log[-3000:]}"
    saved = find_latest(tmp_path / "run" / "checkpoints")
    stopped = int(saved.name.split("_")[1])
    # The checkpoint is of the step the ranks were at (the signal lands during step at+1 or a little later),
    # it is the only one, and both ranks agreed on it.
    assert at <= stopped < total, f"{why} checkpoint {saved}"
    assert f"preempted: checkpoint of step {stopped}" in log, log[-2000:]
    assert [p.name for p in saved.parent.glob("step_*")] == [saved.name]
    assert sorted(p.name for p in saved.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert "Traceback" not in log, log[-3000:]
    assert f"last checkpoint {saved}" in log.splitlines()[-1], log[-500:]

    ref_log = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, ref_log[-3000:]
    resumed = start_training(tmp_path / "run", total, *data, "checkpoint.resume=latest")
    resumed_log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, resumed_log[-3000:]
    assert f"resumed from {saved} at step {stopped}" in resumed_log
    final = checkpoint_name_of(total)
    assert_bit_identical(tmp_path / "ref" / "checkpoints" / final, tmp_path / "run" / "checkpoints" / final)


def checkpoint_name_of(step: int) -> str:
    from train.checkpoint import checkpoint_name
    return checkpoint_name(step)


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_and_names_the_last_checkpoint(tmp_path, who="launcher"):
    """SIGINT to the launcher only (``who="every process"``, as a terminal would, was checked by hand)."""
    total = 5000
    proc = start_training(tmp_path / "run", total, "checkpoint.every_steps=4")
    read_until_step(proc, 9, total)
    started = descendants(proc.pid)
    ranks = [p for p in started if "train.main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    assert len(ranks) >= 2, f"expected two ranks among {started}"
    targets = [proc.pid] + (started if who == "every process" else [])
    for pid in targets:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == INTERRUPTED_EXIT_CODE, log[-3000:]
    left = [p for p in started if alive(p)]
    assert not left, f"still running after Ctrl-C: {left}"
    assert "Traceback" not in log, log[-3000:]
    latest = find_latest(tmp_path / "run" / "checkpoints")
    closing = [line for line in log.splitlines() if line.startswith("shardface:")]
    assert len(closing) == 1 and f"last checkpoint {latest}" in closing[0], closing
    assert "checkpoint.resume=latest" in closing[0]
    # At most one line per process after the signal (the ranks, torchrun, the launcher).
    after = log.split("step 9/")[-1].splitlines()[1:]
    after = [line for line in after if not line.startswith("step ")]
    assert len(after) <= len(started) + 1, after


def test_second_signal_aborts_and_repeats_count_once(tmp_path):
    """In one process: a repeat within the window is ignored, a later second signal exits at once."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        import torch
        from train import preemption
        from train.distributed import DistContext
        ctx = DistContext(0, 1, 0, torch.device("cpu"), None, "none")
        h = preemption.PreemptionHandler(ctx, ["SIGUSR1", "SIGTERM"], lambda: 7).install()
        assert not h.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # the same signal again at once: counts once
        assert h.should_stop() and h.received == signal.SIGUSR1
        print("agreed", flush=True)
        preemption.REPEAT_WINDOW_S = 0.0
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("not aborted", flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.strip() == "agreed", proc.stdout + proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "SIGUSR1 at step 7" in proc.stderr and "second SIGTERM: aborting" in proc.stderr


def test_preemption_signals_are_checked_by_name():
    from train.config import ConfigError, TrainConfig
    assert TrainConfig.load("cpu_tiny", ["preempt.signals=[USR2, 15]"]).preempt.signals == ["USR2", "15"]
    for bad, words in (("SIGFOO", "not a signal name"), ("SIGKILL", "cannot be caught"), ("SIGINT", "Ctrl-C")):
        with pytest.raises(ConfigError, match=words):
            TrainConfig.load("cpu_tiny", [f"preempt.signals=[{bad}]"])
