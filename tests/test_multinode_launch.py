"""A real two-"node" launch: two `shardface train` commands with --nnodes=2 rendezvous on 127.0.0.1."""
import json
import os
import subprocess
import sys
from pathlib import Path

from distributed_harness import free_port

REPO = Path(__file__).resolve().parent.parent


def test_two_nodes_on_loopback_train_together(tmp_path):
    port = free_port()
    out = tmp_path / "run"
    settings = [f"output_dir={out}", "max_steps=3", "device=cpu", "data.loader=random_tensors", "data.manifest=",
                "data.num_classes=10", "data.num_samples=64", "data.batch_size=4", "data.image_size=56",
                "model.backbone=iresnet_tiny", "model.embedding_size=16", "loss.sample_rate=0.5",
                "checkpoint.every_steps=0", "eval.bins=[]", "log.every_steps=1", "log.progress=false",
                "log.wandb=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "launch.cli", "train", "--config", "cpu_tiny", "--nnodes", "2",
               "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", "loopback-test"] + [x for s in settings for x in ("--set", s)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for node, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {node} failed:\n{log[-3000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["finished"]
    joined = "\n".join(logs)
    assert "world size 2" in joined, joined[-2000:]
