"""launch/slurm.sbatch under a real (one-host) SLURM: preempted with SIGUSR1, requeued, resumed, bit-identical."""
import os
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed
from test_preemption import SETTINGS, assert_bit_identical, checkpoint_name_of, start_training

REPO = Path(__file__).resolve().parent.parent
STEPS = 40


def _wait_for_line(path: Path, text: str, cluster: SlurmCluster, job: int, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        state = cluster.job(job).get("JobState")
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            raise AssertionError(f"job {job} is {state} before {text!r}:\n"
                                 f"{path.read_text()[-3000:] if path.exists() else ''}")
        time.sleep(0.3)
    raise AssertionError(f"no {text!r} in {path} after {timeout:.0f} s")


@pytest.mark.slow
def test_sbatch_preempted_requeues_and_ends_with_the_uninterrupted_weights(tmp_path):
    try:
        ensure_installed()
    except SlurmUnavailable as err:
        pytest.skip(str(err))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # `shardface` on PATH runs this checkout (the script calls it as users have it installed).
    (bin_dir / "shardface").write_text(f"#!/bin/sh\nexec {sys.executable} -m launch.cli \"$@\"\n")
    (bin_dir / "shardface").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), "GPUS_PER_NODE": "2",
           "OMP_NUM_THREADS": "1"}
    sets = SETTINGS + [f"output_dir={tmp_path / 'run'}", f"max_steps={STEPS}"]
    args = ["--config", "cpu_tiny"] + [x for s in sets for x in ("--set", s)]
    (tmp_path / "cluster").mkdir()
    with SlurmCluster(tmp_path / "cluster") as cluster:
        job = cluster.sbatch(REPO / "launch" / "slurm.sbatch", *args, env=env, options=(
            "--nodes=1", "--cpus-per-task=2", "--gpus-per-node=0", "--time=10", f"--output={tmp_path}/job-%j.out"))
        out = tmp_path / f"job-{job}.out"
        _wait_for_line(out, "step 5/", cluster, job)
        cluster.run("scancel", "--signal=USR1", "--batch", str(job))
        # The uninterrupted reference trains while the job stops, waits for SLURM and starts again.
        ref = start_training(tmp_path / "ref", STEPS)
        info = cluster.wait_job(job, timeout=240)
        log = out.read_text(errors="replace")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-3000:]}"
        assert info["Restarts"] == "1", f"the job was not requeued once: {info}\n{log[-3000:]}"
    ref_log = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, ref_log[-3000:]
    assert "shardface: preempted by SIGUSR1" in log and "requeueing job" in log, log[-3000:]
    saved = [line for line in log.splitlines() if line.startswith("preempted: checkpoint of step ")]
    assert len(saved) == 1, log[-3000:]
    step = int(saved[0].split()[4].rstrip(","))
    assert 5 <= step < STEPS and f"resumed from {tmp_path / 'run' / 'checkpoints' / checkpoint_name_of(step)}" in log
    assert "start 1" in log and f"done: step {STEPS}/{STEPS}" in log, log[-3000:]
    final = checkpoint_name_of(STEPS)
    assert_bit_identical(tmp_path / "ref" / "checkpoints" / final, tmp_path / "run" / "checkpoints" / final)
