"""The classifier's insightface-facing options and sharp edges: inter-class filtering (against a
float64 reference), lazy_dense row decay (against dense SGD), torch optimisers over a sampled
shard, margin schedules under gradient accumulation, the top-1 ranking, BatchNorm statistics
under gradient checkpointing."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from distributed_harness import run_distributed
from partial_fc import PartialFC, build_head_optimizer, class_range
from partial_fc.margins import build_margin
from train.config import ConfigError, TrainConfig

D, C = 8, 11
S, M = 8.0, 0.3
THRESHOLD = 0.3
LOCAL_SIZES = [5, 4]


def cosface():
    return build_margin("cosface", s=S, m=M)


def global_batch(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen, dtype=torch.float64), torch.randint(0, C, (n,), generator=gen)


def reference(x, w, labels, columns, threshold):
    """float64 mean CE of s·(cos − m·onehot) over ``columns``, negatives above ``threshold`` set to cos 0."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    cos = F.normalize(x, dim=1) @ F.normalize(w[columns], dim=1).t()
    target = torch.searchsorted(columns, labels)
    onehot = F.one_hot(target, len(columns)).bool()
    filtered = (cos.detach() > threshold) & ~onehot if threshold > 0 else torch.zeros_like(onehot)
    cos = torch.where(filtered, torch.zeros((), dtype=cos.dtype), cos)
    loss = F.cross_entropy(S * (cos - M * onehot.double()), target)
    loss.backward()
    return loss.detach(), x.grad, w.grad, int(filtered.sum())


# ---------------------------------------------------------------- inter-class filtering
def _filtered_step(rank, world_size, sample_rate, threshold):
    from partial_fc.comm import all_gather_no_grad
    n = sum(LOCAL_SIZES[:world_size])
    x, labels = global_batch(n)
    head = PartialFC(D, C, cosface(), sample_rate=sample_rate, seed=4, interclass_filtering_threshold=threshold)
    full_w = all_gather_no_grad(head.weight.detach())
    start = sum(LOCAL_SIZES[:rank])
    xl = x[start:start + LOCAL_SIZES[rank]].float().requires_grad_()
    loss = head(xl, labels[start:start + LOCAL_SIZES[rank]])
    loss.backward()
    index = head.row_grads()[0]
    index = torch.arange(head.num_local) if index is None else index
    return dict(loss=loss.detach(), x_grad=xl.grad, w_dense=head.dense_weight_grad(), full_w=full_w,
                columns=head.class_start + index)


def _check_filtered(results, world_size, threshold):
    n = sum(LOCAL_SIZES[:world_size])
    x, labels = global_batch(n)
    columns = torch.cat([r["columns"] for r in results]).sort().values
    ref_loss, ref_x, ref_w, filtered = reference(x, results[0]["full_w"].double(), labels, columns, threshold)
    assert filtered > 0, "no negative is above the threshold: the test would prove nothing"
    unfiltered = reference(x, results[0]["full_w"].double(), labels, columns, 0.0)[0]
    assert abs(unfiltered - ref_loss) > 1e-3
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["loss"].double(), ref_loss, rtol=1e-5, atol=1e-6)
        start = sum(LOCAL_SIZES[:rank])
        # The gather's backward returns world_size × the single-process gradient (DDP averages).
        torch.testing.assert_close(r["x_grad"].double(), world_size * ref_x[start:start + LOCAL_SIZES[rank]],
                                   rtol=1e-5, atol=1e-6)
        lo, count = class_range(C, rank, world_size)
        torch.testing.assert_close(r["w_dense"].double(), ref_w[lo:lo + count], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_interclass_filtering_matches_float64_reference_in_one_process(sample_rate):
    _check_filtered([_filtered_step(0, 1, sample_rate, THRESHOLD)], 1, THRESHOLD)


@pytest.mark.slow
def test_interclass_filtering_sharded_over_two_ranks_with_sampling():
    _check_filtered(run_distributed(_filtered_step, 2, 0.5, THRESHOLD), 2, THRESHOLD)


def test_interclass_filtering_threshold_is_checked():
    with pytest.raises(ValueError, match="interclass_filtering_threshold=1.5"):
        PartialFC(D, C, cosface(), interclass_filtering_threshold=1.5)
    with pytest.raises(ConfigError, match="loss.interclass_filtering_threshold=-0.1"):
        TrainConfig.load("cpu_tiny", ["loss.interclass_filtering_threshold=-0.1"])
    with pytest.raises(ConfigError, match="optim.row_decay='dense'"):
        TrainConfig.load("cpu_tiny", ["optim.row_decay=dense"])


# ---------------------------------------------------------------- row decay
def _decay_run(row_decay, steps=8, wd=0.1):
    """(per-step max relative gap between this run's sampled rows and dense SGD's, final gap after a flush)."""
    classes = 40
    head = PartialFC(D, classes, cosface(), sample_rate=0.2, seed=2)
    opt = build_head_optimizer(head, "sgd", lr=0.1, momentum=0.0, weight_decay=wd, row_decay=row_decay)
    dense = head.weight.detach().double().clone()
    gen = torch.Generator().manual_seed(0)
    gaps = []
    for step in range(steps):
        lr = 0.05 * (1 + step % 3)  # a schedule that changes every step
        opt.param_groups[0]["lr"] = lr
        x, labels = torch.randn(5, D, generator=gen), torch.randint(0, classes, (5,), generator=gen)
        opt.zero_grad()
        head(x, labels).backward()
        index = head.row_grads()[0]
        # Dense SGD on the same loss (the same sampled columns): every row decays every step.
        grad = torch.zeros_like(dense)
        _, _, w_grad, _ = reference(x.double(), dense, labels, index, 0.0)
        grad[index] = w_grad[index]
        dense -= lr * (grad + wd * dense)
        opt.step()
        got = head.weight.detach().double()[index]
        gaps.append(float(((got - dense[index]).norm(dim=1) / dense[index].norm(dim=1)).max()))
    behind = (head.weight.detach().double() - dense).norm(dim=1).max()
    opt.flush_row_decay()
    final = float(((head.weight.detach().double() - dense).norm(dim=1) / dense.norm(dim=1)).max())
    return gaps, final, float(behind)


def test_lazy_dense_rows_equal_dense_sgd_when_next_sampled():
    gaps, final, behind = _decay_run("lazy_dense")
    assert max(gaps) < 1e-5, gaps
    assert behind > 1e-4, "unsampled rows should still owe their decay before the flush"
    assert final < 1e-5
    # The default policy leaves unsampled rows alone: the same comparison fails.
    sampled_gaps, sampled_final, _ = _decay_run("sampled")
    assert max(sampled_gaps) > 1e-3 and sampled_final > 1e-3


def test_lazy_dense_debt_survives_a_checkpoint_of_its_rows():
    def make():
        head = PartialFC(D, 30, cosface(), sample_rate=0.2, seed=5)
        return head, build_head_optimizer(head, "adamw", lr=0.01, weight_decay=0.5, row_decay="lazy_dense")

    data = [(torch.randn(4, D, generator=torch.Generator().manual_seed(i)),
             torch.randint(0, 30, (4,), generator=torch.Generator().manual_seed(50 + i))) for i in range(6)]

    def run(head, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            head(x, y).backward()
            opt.step()

    head, opt = make()
    run(head, opt, data[:3])
    rows = {k: v.clone() for k, v in opt.state_rows().items()}
    assert (rows["weight.decay_owed"] < 0).any()
    saved = (head.weight.detach().clone(), head.get_extra_state())
    run(head, opt, data[3:])
    resumed, ropt = make()
    ropt.lazy_decay.total = -3.0  # another run's running total: the debt is stored relative to it
    with torch.no_grad():
        resumed.weight.copy_(saved[0])
    ropt.load_state_rows(rows)
    resumed.set_extra_state(saved[1])
    run(resumed, ropt, data[3:])
    torch.testing.assert_close(resumed.weight, head.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ropt.state_rows()["weight.decay_owed"], opt.state_rows()["weight.decay_owed"])


# ---------------------------------------------------------------- torch optimisers over the shard
def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


@pytest.mark.parametrize("kwargs", [{"sample_rate": 0.5}, {"param_dtype": torch.bfloat16}], ids=["sampled", "bf16"])
def test_torch_sgd_over_a_shard_with_row_gradients_fails_on_its_first_step(kwargs):
    head = PartialFC(D, 40, cosface(), **kwargs)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    head(torch.randn(4, D), torch.tensor([0, 1, 2, 3])).backward()
    with pytest.raises(TypeError, match="build_head_optimizer"):
        opt.step()
    # The row optimiser over the same shard is accepted.
    build_head_optimizer(head, "sgd", lr=0.1).step()


def test_torch_sgd_over_a_dense_shard_trains_without_growing_memory():
    head = PartialFC(D, 40, cosface(), seed=1)
    twin = PartialFC(D, 40, cosface(), seed=1)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    twin_opt = build_head_optimizer(twin, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    before = head.weight.detach().clone()
    counts = []
    for step in range(8):
        x, y = torch.randn(6, D), torch.randint(0, 40, (6,))
        for h, o in ((head, opt), (twin, twin_opt)):
            o.zero_grad()
            h(x, y).backward()
            o.step()
        if step in (2, 7):
            counts.append((_live_tensors(), len(head._chosen)))
    assert not torch.equal(head.weight.detach(), before)
    torch.testing.assert_close(head.weight, twin.weight, rtol=1e-5, atol=1e-6)
    assert counts[1] == counts[0], counts


def test_row_optimizer_steps_do_not_grow_memory():
    head = PartialFC(D, 200, cosface(), sample_rate=0.1, seed=1)
    opt = build_head_optimizer(head, "sgd", lr=0.1, row_decay="lazy_dense")
    counts = []
    for step in range(8):
        opt.zero_grad()
        head(torch.randn(6, D), torch.randint(0, 200, (6,))).backward()
        opt.step()
        if step in (2, 7):
            counts.append(_live_tensors())
    assert counts[1] <= counts[0], counts


def test_forwards_without_backward_do_not_pile_up():
    head = PartialFC(D, 200, cosface(), sample_rate=0.1)
    for _ in range(5):
        head(torch.randn(4, D), torch.tensor([0, 1, 2, 3]))  # e.g. a loss computed and dropped
    assert len(head._chosen) == 1


# ---------------------------------------------------------------- margin schedules per optimiser step
@pytest.mark.parametrize("name", ["sphereface", "lsoftmax", "elasticface"])
def test_margin_schedule_follows_optimiser_steps_not_forwards(name):
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, D, generator=gen), torch.randint(0, 20, (6,), generator=gen)) for _ in range(8)]

    def run(accum):
        head = PartialFC(D, 20, build_margin(name), seed=0)
        opt = build_head_optimizer(head, "sgd", lr=0.0, weight_decay=0.0)  # rows fixed: losses show the margin
        losses = []
        for step in range(4):
            opt.zero_grad()
            for micro in range(accum):
                x, y = batches[2 * step] if micro == 0 else batches[2 * step + 1]
                loss = head(x, y)
                loss.backward()
                losses.append(loss.item())
            opt.step()
        counter = head.margin.step if name == "elasticface" else int(head.margin.iteration)
        return losses, counter

    single, single_count = run(1)
    double, double_count = run(2)
    assert single_count == double_count == 4
    # The first micro-batch of step k sees the margin of step k, as the unaccumulated run does.
    assert double[0::2] == pytest.approx(single, rel=1e-6)
    if name != "elasticface":
        assert len(set(single)) > 1, "λ should change from step to step"


# ---------------------------------------------------------------- top-1
def test_top1_ranks_by_the_logits_the_loss_uses():
    # Softmax margin: logits are w·x, not cosines.  Class 1's row points almost along x but
    # is short; class 0's is long and 30° off: the cosine prefers 1, the logits prefer 0.
    head = PartialFC(2, 3, build_margin("softmax"))
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[10.0 * 0.866, 10.0 * 0.5], [1.0, 0.01], [-1.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0]])
    head(x, torch.tensor([0]))
    assert head.accuracy.item() == 1.0
    head(x, torch.tensor([1]))
    assert head.accuracy.item() == 0.0


# ---------------------------------------------------------------- BatchNorm under checkpointing
def test_gradient_checkpointing_updates_batchnorm_statistics_once():
    from train.backbones import build_backbone
    torch.manual_seed(0)
    plain = build_backbone("iresnet_tiny", embedding_size=16, input_size=32)
    torch.manual_seed(0)
    recomputed = build_backbone("iresnet_tiny", embedding_size=16, input_size=32, gradient_checkpointing=True)
    images = torch.randn(4, 3, 32, 32)
    for model in (plain, recomputed):
        model.train()
        model(images).square().sum().backward()
    tracked = [b for n, b in recomputed.named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked and all(int(b) == 1 for b in tracked)
    for (name, a), (_, b) in zip(plain.named_buffers(), recomputed.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    # The embedding BatchNorm's fixed scale (insightface's head) has no gradient in either model.
    grads = [(p.grad, q.grad) for p, q in zip(plain.parameters(), recomputed.parameters()) if p.requires_grad]
    assert grads and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in grads)


# ---------------------------------------------------------------- the options in a training run
def test_training_run_takes_the_options_and_checkpoints_the_row_debt(tmp_path):
    from train.distributed import init_distributed
    from train.trainer import Trainer
    from train_fixtures import SplitLoader, bn_net, tiny_config
    cfg = tiny_config(tmp_path, "loss.sample_rate=0.5", "loss.margin=sphereface", "loss.margin_options={}",
                      "loss.interclass_filtering_threshold=0.4", "optim.row_decay=lazy_dense",
                      "optim.momentum=0.0", "optim.grad_accum=2", "max_steps=3")
    trainer = Trainer(cfg, init_distributed(device="cpu"), loader=SplitLoader(), backbone=bn_net())
    assert trainer.head.interclass_filtering_threshold == 0.4
    assert trainer.head_optimizer.row_decay == "lazy_dense" and trainer.head.lazy_decay is not None
    summary = trainer.fit()
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0
    assert int(trainer.head.margin.iteration) == 3  # one λ step per optimiser step, not per micro-batch
    from train.reshard import classifier_state
    rows = classifier_state(trainer.head, trainer.head_optimizer)["rows"]  # what a checkpoint stores
    assert "opt.weight.decay_owed" in rows and (rows["opt.weight.decay_owed"] < 0).any()
