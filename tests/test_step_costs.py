"""What a training step costs in host reads and collectives (the budget of docs/performance.md).

Every place where a tensor becomes a Python value (``item``, ``bool``, ``int``/``float``,
``tolist``, ``numpy``, ``__index__``) and every op whose output size depends on data
(``nonzero``, ``unique``, ``masked_select``, boolean indexing) is counted, and so is every
``torch.distributed`` collective, over full training steps at W = 1 and 2 (gloo).
"""
import contextlib
import tempfile
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from distributed_harness import run_distributed
from train_fixtures import SplitLoader, plain_net, tiny_config

CLASSES = 64  # enough that W = 2 still samples (32 rows per rank, 8 of them per step)

_READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy")
_DATA_SIZED = ("nonzero", "unique", "masked_select")
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
                "reduce_scatter_tensor", "reduce_scatter_single",
                "broadcast", "all_to_all", "all_to_all_single", "barrier", "all_gather_object", "reduce", "gather",
                "scatter")


class WideLoader(SplitLoader):
    """The fixture's data, announced as a 64-class dataset (labels stay below 12)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.num_classes = CLASSES


@contextlib.contextmanager
def counting():
    """Count host reads (by kind) and collectives (by name) while the block runs."""
    reads, calls = Counter(), Counter()
    saved = []

    def patch(owner, name, counter, key):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            counter[key] += 1
            return original(*args, **kwargs)
        saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    for name in _READS:
        patch(torch.Tensor, name, reads, name)
    for name in _DATA_SIZED:
        patch(torch.Tensor, name, reads, name)
        patch(torch, name, reads, name)
    original_getitem, original_setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def boolean(index) -> bool:
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

    def getitem(self, index):
        if boolean(index):
            reads["boolean index"] += 1
        return original_getitem(self, index)

    def setitem(self, index, value):
        if boolean(index):
            reads["boolean index"] += 1
        return original_setitem(self, index, value)
    saved += [(torch.Tensor, "__getitem__", original_getitem), (torch.Tensor, "__setitem__", original_setitem)]
    torch.Tensor.__getitem__, torch.Tensor.__setitem__ = getitem, setitem
    if dist.is_initialized():
        for name in _COLLECTIVES:
            if not hasattr(dist, name):
                continue
            # The single-tensor all-gather and reduce-scatter count under one name whichever
            # spelling torch offers (all_gather_single is all_gather_into_tensor renamed).
            key = {"all_gather_single": "all_gather_into_tensor",
                   "reduce_scatter_single": "reduce_scatter_tensor"}.get(name, name)
            patch(dist, name, calls, key)
    try:
        yield reads, calls
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def _step_costs(rank, world_size, check_inputs):
    from train.distributed import init_distributed
    from train.trainer import Trainer
    ctx = init_distributed(device="cpu")
    with tempfile.TemporaryDirectory() as out:
        cfg = tiny_config(out, f"data.num_classes={CLASSES}", "loss.sample_rate=0.25", "max_steps=20",
                          f"loss.check_inputs={check_inputs}")
        trainer = Trainer(cfg, ctx, loader=WideLoader(rank=rank, world_size=world_size), backbone=plain_net())
        trainer.runner.module.train()
        trainer.head.train()
        batches = trainer._batches()
        trainer.train_step(batches, log=True)  # first step: lazy state (optimiser rows, generators)
        steps = []
        for log in (False, False, True):
            with counting() as (reads, calls):
                result = trainer.train_step(batches, log=log)
            steps.append({"log": log, "reads": dict(reads), "calls": dict(calls), "loss": result.loss,
                          "accuracy": result.accuracy, "samples": result.samples})
        # The head alone: forward and backward counted apart.
        x = torch.randn(4, cfg.model.embedding_size, requires_grad=True)
        labels = torch.arange(4) + rank
        sizes = [4] * world_size
        with counting() as (_, forward_calls):
            loss = trainer.head(x, labels, sizes=sizes, accuracy=True)
        with counting() as (_, backward_calls):
            loss.backward()
        trainer.head.clear_row_grads()
        # The last batch of an exact epoch, announced by the batch itself: rank r holds 4 − r samples.
        sizes = [4 - r for r in range(world_size)]
        images, labels = next(batches)
        short = iter([(images[:sizes[rank]], labels[:sizes[rank]], sizes)])
        with counting() as (uneven_reads, uneven_calls):
            uneven = trainer.train_step(short, log=False)
        return {"uneven": {"samples": uneven.samples, "reads": dict(uneven_reads), "calls": dict(uneven_calls),
                           "loss": uneven.loss},
"steps": steps, "num_sample": trainer.head.num_sample, "num_local": trainer.head.num_local,
                "forward": dict(forward_calls), "backward": dict(backward_calls)}


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_step_that_does_not_log_reads_the_device_once(world_size):
    for result in run_distributed(_step_costs, world_size, "deferred"):
        assert result["num_sample"] < result["num_local"], "the test must exercise the sampled path"
        for step in result["steps"]:
            if not step["log"]:
                # The one read: the packed vote/metrics tensor (train/step.py, ``packed.tolist()``).
                assert sum(step["reads"].values()) <= 1, step["reads"]
                assert step["accuracy"] != step["accuracy"]  # NaN: not computed when not logging
            else:
                assert 0.0 <= step["accuracy"] <= 1.0
            assert step["samples"] == 4 * world_size and step["loss"] > 0
        uneven = result["uneven"]
        assert uneven["samples"] == sum(4 - r for r in range(world_size)) and uneven["loss"] > 0
        assert sum(uneven["reads"].values()) <= 1, uneven["reads"]


@pytest.mark.slow
def test_the_instrumentation_sees_the_reads_of_strict_checks():
    # strict checks read the device at once (check_global_batch): the counter must notice.
    for result in run_distributed(_step_costs, 1, "strict"):
        assert all(sum(step["reads"].values()) >= 2 for step in result["steps"])


@pytest.mark.slow
def test_collectives_per_step_within_the_documented_budget():
    world_size = 2
    for result in run_distributed(_step_costs, world_size, "deferred"):
        # Head forward: one gather (features and labels together), two all-reduces (softmax max,
        # then the packed sums; the accuracy rides along).  Backward: one reduce-scatter (an
        # all-reduce on gloo).  No size exchange: the loader announces equal batches.
        assert result["forward"] == {"all_gather_into_tensor": 1, "all_reduce": 2}
        assert result["backward"] == {"all_reduce": 1}
        for step in result["steps"]:
            # The step: the head's four plus the vote's one all-reduce, logging or not (DDP's
            # gradient buckets run in its C++ reducer and are not counted here).
            assert step["calls"] == {"all_gather_into_tensor": 1, "all_reduce": 4}, step
        # An announced uneven batch: padded inside the same single gather, no size exchange.
        assert result["uneven"]["calls"] == {"all_gather_into_tensor": 1, "all_reduce": 4}
