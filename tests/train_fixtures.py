"""Small pieces shared by the trainer and checkpoint tests: a deterministic loader, tiny nets, configs."""
from __future__ import annotations

import torch
from torch import nn

from data_pipeline.loaders.loader_base import Loader
from train.config import TrainConfig

IMAGE = 16
CLASSES = 12


class SplitLoader(Loader):
    """Fixed images; global batch j of an epoch is the permutation's slice [jG, (j+1)G), G = B x W.

    Rank r gets rows [rB, (r+1)B) of each global batch, so a W-rank run and a 1-rank run
    with B x W per step (or B per micro-step and W micro-steps) see the same samples.
    ``nan_batches`` lists this rank's batch numbers (counted over the run) whose images are NaN.
    """

    kind = "split"

    def __init__(self, rank: int = 0, world_size: int = 1, batch_size: int = 4, num_samples: int = 96,
                 seed: int = 0, nan_batches: tuple[int, ...] = ()):
        super().__init__(num_classes=CLASSES, num_batches=num_samples // (batch_size * world_size), rank=rank,
                         world_size=world_size, batch_size=batch_size, seed=seed, mode="resampled",
                         settings={"num_samples": num_samples})
        g = torch.Generator().manual_seed(1234)
        self.labels = torch.randint(0, CLASSES, (num_samples,), generator=g)
        centres = torch.randn(CLASSES, 3, IMAGE, IMAGE, generator=g)
        self.images = (centres[self.labels] + 0.7 * torch.randn(num_samples, 3, IMAGE, IMAGE, generator=g)).clamp(-1, 1)
        self.nan_batches = set(nan_batches)
        self.served = 0

    def _iter_epoch(self, epoch: int, start: int):
        perm = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.seed * 97 + epoch))
        b, w = self.batch_size, self.world_size
        for j in range(start, len(self)):
            lo = j * b * w + self.rank * b
            idx = perm[lo:lo + b]
            images = self.images[idx].clone()
            if self.served in self.nan_batches:
                images.fill_(float("nan"))
            self.served += 1
            yield images, self.labels[idx]


def plain_net(embedding: int = 16) -> nn.Module:
    """Conv + PReLU + linear: no batch statistics, so data parallelism is exactly a bigger batch."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.PReLU(8), nn.Flatten(),
                         nn.Linear(8 * (IMAGE // 2) ** 2, embedding))


def bn_net(embedding: int = 16, dropout: float = 0.1) -> nn.Module:
    """With BatchNorm (running statistics) and dropout (RNG): state that resume must restore."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8),
                         nn.Dropout(dropout), nn.Flatten(), nn.Linear(8 * (IMAGE // 2) ** 2, embedding),
                         nn.BatchNorm1d(embedding))


def tiny_config(out_dir, *overrides: str) -> TrainConfig:
    """A run of a few steps on the fixtures above (no evaluation, no export, quiet)."""
    base = [f"output_dir={out_dir}", "max_steps=4", "device=cpu", "data.loader=random_tensors",
            f"data.num_classes={CLASSES}", "data.num_samples=96", "data.batch_size=4", f"data.image_size={IMAGE}",
            "model.embedding_size=16", "loss.margin=arcface", "loss.margin_options={s: 16.0, m: 0.3}",
            "optim.lr=0.05", "optim.reference_batch=0", "optim.warmup_steps=1", "optim.schedule=poly",
            "checkpoint.every_steps=0", "checkpoint.export=false", "eval.bins=[]", "log.every_steps=1000",
            "log.progress=false"]
    return TrainConfig.load(None, base + list(overrides))


def classifier_snapshot(trainer) -> dict:
    """Class range, rows and row optimiser state of a trainer's classifier shard (CPU copies)."""
    head, opt = trainer.head, trainer.head_optimizer
    return {"class_start": head.class_start, "num_local": head.num_local,
            "weight": head.weight.detach().clone(),
            "rows": {k: v.detach().clone() for k, v in opt.state_rows().items()}}


def backbone_snapshot(trainer, optimizer: bool = True) -> dict:
    """Backbone weights and buffers (gathered under ZeRO-3), and the backbone optimiser's state tensors."""
    with trainer.runner.full_parameters() as module:
        state = {f"model.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    if optimizer:
        for i, s in trainer.runner.optimizer.state_dict()["state"].items():
            for k, v in s.items():
                if torch.is_tensor(v):
                    state[f"opt.{i}.{k}"] = v.detach().clone()
    return state


def run_state(trainer) -> dict:
    """What an exact resume must reproduce: backbone (+ optimiser), classifier rows and state, generators."""
    return {"backbone": backbone_snapshot(trainer), "head": classifier_snapshot(trainer),
            "sampler": trainer.head.sampler().get_state(), "torch_rng": torch.get_rng_state()}


def assert_same_run_state(a: dict, b: dict) -> None:
    """Bitwise equality of two :func:`run_state` snapshots, naming the first tensor that differs."""
    assert a["backbone"].keys() == b["backbone"].keys()
    for key in a["backbone"]:
        assert torch.equal(a["backbone"][key], b["backbone"][key]), key
    assert torch.equal(a["head"]["weight"], b["head"]["weight"])
    for name in a["head"]["rows"]:
        assert torch.equal(a["head"]["rows"][name], b["head"]["rows"][name]), name
    assert torch.equal(a["sampler"], b["sampler"]) and torch.equal(a["torch_rng"], b["torch_rng"])
