"""The sharded classifier against a single-process float64 softmax written from the formula."""
import math

import pytest
import torch
import torch.nn.functional as F

from distributed_harness import run_distributed
from partial_fc import NonFiniteEmbeddingError, PartialFC, build_head_optimizer, class_range
from partial_fc.margins.base import Margin

D = 8
C = 11
LOCAL_SIZES = [3, 2, 4]
S, M = 8.0, 0.3


class AdditiveCosine(Margin):
    """s·(cos θ − m) on the target: a margin local to these tests, independent of margins/."""

    def forward(self, inp):
        logits = inp.cos * S
        return self.apply_target(logits, inp, (inp.cos.gather(1, inp.target.clamp(min=0)[:, None])[:, 0] - M) * S)


def global_batch(world_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(LOCAL_SIZES[:world_size])
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, C, (n,), generator=gen)
    return x, labels


def reference(x, w, labels, columns=None):
    """float64 loss and gradients of mean CE(s·(cos − m·onehot)); ``columns`` restricts the classes."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    cols = torch.arange(w.shape[0]) if columns is None else columns
    cos = F.normalize(x, dim=1) @ F.normalize(w[cols], dim=1).t()
    target = torch.searchsorted(cols, labels)
    logits = S * (cos - M * F.one_hot(target, len(cols)).double())
    loss = F.cross_entropy(logits, target)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def local_rows(rank, world_size, tensor):
    start = sum(LOCAL_SIZES[:rank])
    return tensor[start:start + LOCAL_SIZES[rank]]


def _sharded_step(rank, world_size, sample_rate, seed):
    x, labels = global_batch(world_size)
    head = PartialFC(D, C, AdditiveCosine(), sample_rate=sample_rate, seed=seed)
    full_w = torch.cat(run_collect_weights(head))
    xl = local_rows(rank, world_size, x).float().requires_grad_()
    loss = head(xl, local_rows(rank, world_size, labels))
    loss.backward()
    index, _, _ = head.row_grads()
    return dict(loss=loss.detach(), x_grad=xl.grad, w_dense=head.dense_weight_grad(), full_w=full_w,
                index=index, start=head.class_start, acc=head.accuracy)


def run_collect_weights(head):
    """Every rank's initial shard, in rank order (all-gather of unequal row counts)."""
    from partial_fc.comm import all_gather_no_grad
    return [all_gather_no_grad(head.weight.detach())]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_full_softmax_matches_single_process_reference(world_size):
    results = run_distributed(_sharded_step, world_size, 1.0, 0)
    x, labels = global_batch(world_size)
    full_w = results[0]["full_w"].double()
    ref_loss, ref_x, ref_w = reference(x, full_w, labels)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["loss"].double(), ref_loss, rtol=1e-5, atol=1e-6)
        # The gather's backward returns world_size × the single-process gradient (DDP averages).
        torch.testing.assert_close(r["x_grad"].double(), world_size * local_rows(rank, world_size, ref_x),
                                   rtol=1e-5, atol=1e-6)
        start, n = class_range(C, rank, world_size)
        torch.testing.assert_close(r["w_dense"].double(), ref_w[start:start + n], rtol=1e-5, atol=1e-6)
        assert r["index"] is None


def test_initial_weight_does_not_depend_on_world_size():
    one = run_distributed(_sharded_step, 1, 1.0, 0)[0]["full_w"]
    three = run_distributed(_sharded_step, 3, 1.0, 0)[0]["full_w"]
    torch.testing.assert_close(one, three, rtol=0, atol=0)


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampled_softmax_is_the_full_softmax_restricted_to_sampled_classes(world_size):
    results = run_distributed(_sharded_step, world_size, 0.4, 3)
    x, labels = global_batch(world_size)
    full_w = results[0]["full_w"].double()
    sampled = torch.cat([r["start"] + r["index"] for r in results])
    assert set(labels.tolist()) <= set(sampled.tolist()), "every positive class must be sampled"
    for r in results:  # ceil(r · num_local) rows per rank, or all positives when more
        n_local = r["w_dense"].shape[0]
        assert len(r["index"]) >= math.ceil(0.4 * n_local)
    ref_loss, ref_x, ref_w_sub = reference(x, full_w, labels, columns=sampled.sort().values)
    ref_w = ref_w_sub  # rows of unsampled classes got zero gradient in the reference too
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["loss"].double(), ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["x_grad"].double(), world_size * local_rows(rank, world_size, ref_x),
                                   rtol=1e-5, atol=1e-6)
        start, n = class_range(C, rank, world_size)
        torch.testing.assert_close(r["w_dense"].double(), ref_w[start:start + n], rtol=1e-5, atol=1e-6)
        unsampled = torch.ones(n, dtype=torch.bool)
        unsampled[r["index"]] = False
        assert unsampled.any() and (r["w_dense"][unsampled] == 0).all()


def test_sampling_is_reproducible_by_seed():
    x = torch.randn(4, D)
    labels = torch.tensor([0, 1, 2, 3])

    def index_for(seed):
        head = PartialFC(D, 200, AdditiveCosine(), sample_rate=0.1, seed=seed)
        head(x, labels).backward()
        return head.row_grads()[0]

    assert torch.equal(index_for(5), index_for(5))
    assert not torch.equal(index_for(5), index_for(6))
    assert {0, 1, 2, 3} <= set(index_for(5).tolist()) and len(index_for(5)) == 20


def _optimizer_pair(name, steps=3, sample_rate=1.0):
    torch.manual_seed(0)
    head = PartialFC(D, C, AdditiveCosine(), sample_rate=sample_rate)
    ref_w = torch.nn.Parameter(head.weight.detach().clone())
    opt = build_head_optimizer(head, name, lr=0.5, weight_decay=0.01)
    ref_opt = (torch.optim.SGD([ref_w], lr=0.5, momentum=0.9, weight_decay=0.01) if name == "sgd"
               else torch.optim.AdamW([ref_w], lr=0.5, weight_decay=0.01))
    for _ in range(steps):
        x, labels = torch.randn(6, D), torch.randint(0, C, (6,))
        opt.zero_grad()
        head(x, labels).backward()
        ref_w.grad = head.dense_weight_grad()
        opt.step()
        ref_opt.step()
    return head, ref_w, opt


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_row_optimizer_equals_torch_optimizer_when_every_row_is_sampled(name):
    head, ref_w, _ = _optimizer_pair(name)
    torch.testing.assert_close(head.weight.detach(), ref_w.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_unsampled_rows_and_their_state_do_not_change(name):
    head = PartialFC(D, 100, AdditiveCosine(), sample_rate=0.1)
    opt = build_head_optimizer(head, name, lr=0.1, weight_decay=0.1)
    before = head.weight.detach().clone()
    head(torch.randn(4, D), torch.tensor([1, 2, 3, 4])).backward()
    index = head.row_grads()[0]
    opt.step()
    moved = (head.weight.detach() != before).any(dim=1)
    assert moved[index].all()
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[index] = False
    assert not moved[untouched].any()
    state = next(iter(opt.state_rows().values()))
    assert (state[untouched] == 0).all() and (state[index] != 0).any()


def test_gradient_accumulation_sums_rows_of_several_forwards():
    head = PartialFC(D, 60, AdditiveCosine(), sample_rate=0.2, seed=1)
    xs = [torch.randn(3, D) for _ in range(2)]
    ys = [torch.tensor([0, 1, 2]), torch.tensor([2, 3, 4])]
    dense = torch.zeros_like(head.weight)
    for x, y in zip(xs, ys):
        head(x, y).backward()
    # Re-run the same two micro-steps one at a time to build the expected sum.
    ref = PartialFC(D, 60, AdditiveCosine(), sample_rate=0.2, seed=1)
    for x, y in zip(xs, ys):
        ref.clear_row_grads()
        ref(x, y).backward()
        dense += ref.dense_weight_grad()
    torch.testing.assert_close(head.dense_weight_grad(), dense)


def test_bf16_storage_with_stochastic_rounding_trains():
    head = PartialFC(D, C, AdditiveCosine(), param_dtype=torch.bfloat16)
    opt = build_head_optimizer(head, "sgd", lr=0.5)
    x, labels = torch.randn(16, D), torch.randint(0, C, (16,))
    first = head(x, labels).item()
    for _ in range(20):
        opt.zero_grad()
        head(x, labels).backward()
        opt.step()
    assert head.weight.dtype == torch.bfloat16
    assert opt.state_rows()["weight.momentum_buffer"].dtype == torch.bfloat16
    assert head(x, labels).item() < first - 0.5


def test_stochastic_rounding_is_unbiased():
    from partial_fc.optim import _stochastic_round_bf16
    value = torch.full((20000,), 1.0 + 2 ** -10)  # between two bf16 neighbours (1 and 1 + 2^-7)
    rounded = _stochastic_round_bf16(value.clone(), torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert abs(rounded.mean().item() - (1.0 + 2 ** -10)) < 2e-4


def test_autocast_bf16_is_finite_at_theta_zero_and_pi():
    head = PartialFC(D, 4, AdditiveCosine())
    w = head.weight.detach()
    x = torch.stack([w[0], -w[1], w[2] * 3]).clone().requires_grad_()  # θ = 0, π, 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_bad_inputs_give_clear_errors():
    head = PartialFC(D, C, AdditiveCosine())
    with pytest.raises(ValueError, match=r"label 11 .* outside \[0, 11\)"):
        head(torch.randn(2, D), torch.tensor([0, 11]))
    with pytest.raises(ValueError, match=r"label -1"):
        head(torch.randn(2, D), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"expected \[batch, 8\]"):
        head(torch.randn(2, D + 1), torch.tensor([0, 1]))
    bad = torch.randn(2, D)
    bad[1, 3] = float("nan")
    with pytest.raises(NonFiniteEmbeddingError, match="global sample 1"):
        head(bad, torch.tensor([0, 1]))
    for rate in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"sample_rate={rate}"):
            PartialFC(D, C, AdditiveCosine(), sample_rate=rate)


def test_accuracy_is_exposed():
    head = PartialFC(D, 3, AdditiveCosine())
    w = head.weight.detach()
    head(w[[0, 1, 2, 0]].clone(), torch.tensor([0, 1, 2, 1]))
    assert head.accuracy.item() == pytest.approx(0.75)
