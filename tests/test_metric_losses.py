"""Metric losses at W = 1, 2, 3 against single-process float64 references written from the papers."""
import functools
import math
import re

import pytest
import torch

from distributed_harness import run_distributed
from partial_fc import NonFiniteEmbeddingError
from partial_fc.comm import all_gather_no_grad, all_reduce
from partial_fc.metric_losses import CenterLoss, CircleLoss, TripletLoss, build_metric_loss
from partial_fc.sharding import class_range

D = 8
C = 7  # split 4+3 over two ranks, 3+2+2 over three
# Classes 1 and 5 appear once: those anchors have no positive and must be left out.
LABELS = torch.tensor([0, 3, 0, 5, 3, 6, 0, 1, 3, 6])
SPLITS = {1: [[10]], 2: [[6, 4]], 3: [[3, 5, 2], [0, 6, 4]]}  # local batch sizes per rank
ALPHA, MARGIN, M, GAMMA = 0.5, 0.3, 0.25, 256.0


def global_features() -> torch.Tensor:
    """Ten float64 features clustered by class (loosely, so that hinges are active)."""
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(C, D, generator=gen, dtype=torch.float64)
    return means[LABELS] + 0.8 * torch.randn(len(LABELS), D, generator=gen, dtype=torch.float64)


def initial_centers() -> torch.Tensor:
    """Non-zero centres (float32 values, as the buffer stores them), so the test sees them."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(C, D, generator=gen).double()


# ---------------------------------------------------------------- references (float64, loops)
def center_reference(x, labels, centers, alpha):
    """Loss, feature gradient and updated centres of Wen et al. on the full batch."""
    x = x.clone().requires_grad_()
    n = len(labels)
    loss = sum(0.5 * ((x[i] - centers[labels[i]]) ** 2).sum() for i in range(n)) / n
    loss.backward()
    updated = centers.clone()
    for j in range(centers.shape[0]):
        members = [i for i in range(n) if labels[i] == j]
        delta = sum((centers[j] - x[i].detach() for i in members), torch.zeros(D, dtype=torch.float64))
        updated[j] = centers[j] - alpha * delta / (1 + len(members))
    return loss.detach(), x.grad, updated


def _pairs(labels, a):
    positives = [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]
    negatives = [q for q in range(len(labels)) if labels[q] != labels[a]]
    return positives, negatives


def triplet_reference(x, labels, margin):
    """Batch-hard triplet loss of Hermans et al. on the full batch: (loss, grad, valid anchors, hinges)."""
    x = x.clone().requires_grad_()
    u = x / x.norm(dim=1, keepdim=True)
    terms = []
    for a in range(len(labels)):
        positives, negatives = _pairs(labels, a)
        if positives and negatives:
            hardest_p = max((u[a] - u[p]).norm() for p in positives)
            hardest_n = min((u[a] - u[q]).norm() for q in negatives)
            terms.append(torch.clamp(margin + hardest_p - hardest_n, min=0.0))
    loss = sum(terms) / len(terms)
    loss.backward()
    return loss.detach(), x.grad, len(terms), torch.stack(terms).detach()


def circle_reference(x, labels, m, gamma):
    """Circle loss of Sun et al. (pair form, one term per anchor) on the full batch."""
    x = x.clone().requires_grad_()
    u = x / x.norm(dim=1, keepdim=True)
    terms = []
    for a in range(len(labels)):
        positives, negatives = _pairs(labels, a)
        if not (positives and negatives):
            continue
        pos_sum = 0.0
        for p in positives:
            s = u[a] @ u[p]
            pos_sum = pos_sum + torch.exp(-gamma * torch.clamp(1 + m - s.detach(), min=0) * (s - (1 - m)))
        neg_sum = 0.0
        for q in negatives:
            s = u[a] @ u[q]
            neg_sum = neg_sum + torch.exp(gamma * torch.clamp(s.detach() + m, min=0) * (s - m))
        terms.append(torch.log(1 + neg_sum * pos_sum))
    loss = sum(terms) / len(terms)
    assert torch.isfinite(loss), "the float64 reference overflowed: choose other test features"
    loss.backward()
    return loss.detach(), x.grad, len(terms)


# ---------------------------------------------------------------- the distributed side
def _local(tensor, sizes, rank):
    start = sum(sizes[:rank])
    return tensor[start:start + sizes[rank]]


def _run_losses(rank, world_size, sizes):
    """Every loss on one split of the global batch: values, local gradients, gathered centres."""
    x, labels = global_features().float(), LABELS
    xl, yl = _local(x, sizes, rank), _local(labels, sizes, rank)
    out = {}

    center = CenterLoss(C, D, alpha=ALPHA)
    start, n = class_range(C, rank, world_size)
    center.centers.copy_(initial_centers()[start:start + n])
    feats = xl.clone().requires_grad_()
    loss = center(feats, yl)
    loss.backward()
    out["center"] = dict(loss=loss.detach(), grad=feats.grad, centers=all_gather_no_grad(center.centers.clone()))
    center.eval()
    center(xl, yl)
    out["center"]["centers_after_eval"] = all_gather_no_grad(center.centers.clone())

    for name, module in (("triplet", TripletLoss(MARGIN)), ("circle", CircleLoss(M, GAMMA))):
        feats = xl.clone().requires_grad_()
        loss = module(feats, yl)
        loss.backward()
        out[name] = dict(loss=loss.detach(), grad=feats.grad, valid=int(module.num_valid_anchors),
                         anchors=int(module.num_anchors))
    return out


def _bad_input_outcomes(rank, world_size):
    """Each case makes one rank's batch bad; every rank must raise (none may hang)."""
    x, labels = global_features().float(), LABELS
    sizes = SPLITS[3][0]
    xl, yl = _local(x, sizes, rank), _local(labels, sizes, rank).clone()
    cases = {
        "label": (CenterLoss(C, D), lambda: (xl, torch.where(torch.arange(len(yl)) == 0, 99, yl)), 1),
        "width": (TripletLoss(embedding_size=D), lambda: (torch.cat([xl, xl[:, :1]], 1), yl), 2),
        "mixed_widths": (TripletLoss(), lambda: (torch.cat([xl, xl[:, :1]], 1), yl), 0),
        "nan": (CircleLoss(), lambda: (xl.masked_fill(torch.arange(D) == 3, float("nan")), yl), 0),
    }
    outcomes = {}
    for name, (module, bad, culprit) in cases.items():
        feats, lab = bad() if rank == culprit else (xl, yl)
        try:
            module(feats, lab)
            outcomes[name] = None
        except ValueError as err:
            outcomes[name] = (type(err).__name__, str(err))
    return outcomes


def _train(rank, world_size, name, lr, steps):
    """SGD on a linear embedding of separable data, gradients averaged over ranks as DDP does."""
    gen = torch.Generator().manual_seed(123)
    classes, width = 4, 16
    means = 1.0 * torch.randn(classes, width, generator=gen)
    embed = torch.nn.Linear(width, D)
    with torch.no_grad():  # the same initial weights on every rank
        embed.weight.copy_(0.3 * torch.randn(D, width, generator=gen))
        embed.bias.zero_()
    loss_fn = build_metric_loss(name, classes, D)
    opt = torch.optim.SGD(embed.parameters(), lr=lr)

    def batch(step):
        g = torch.Generator().manual_seed(1000 * step + rank)
        y = torch.randint(0, classes, (6 + 2 * rank,), generator=g)
        return means[y] + 0.8 * torch.randn(len(y), width, generator=g), y

    held_out = [batch(10_000 + i) for i in range(3)]

    def evaluate():
        loss_fn.eval()
        with torch.no_grad():
            value = sum(loss_fn(embed(x), y) for x, y in held_out) / len(held_out)
        loss_fn.train()
        return float(value)

    before = evaluate()
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        loss_fn(embed(x), y).backward()
        for p in embed.parameters():
            p.grad /= world_size
            all_reduce(p.grad, "sum")
        opt.step()
    return before, evaluate()


def _launch_body(rank, world_size):
    results = {"losses": [_run_losses(rank, world_size, sizes) for sizes in SPLITS[world_size]]}
    if world_size == 3:
        results["bad_input"] = _bad_input_outcomes(rank, world_size)
    if world_size == 2:
        results["train"] = {name: _train(rank, world_size, name, lr, steps)
                            for name, lr, steps in (("center", 0.05, 30), ("triplet", 0.5, 30),
                                                    ("circle", 0.002, 30))}
    return results


@functools.lru_cache(maxsize=None)
def launch(world_size):
    """One process launch per world size serves all the tests below."""
    if world_size == 1:  # a single process needs no process group: the collectives are no-ops
        return [_launch_body(0, 1)]
    return run_distributed(_launch_body, world_size)


def _cases(world_size):
    for split_index, sizes in enumerate(SPLITS[world_size]):
        yield sizes, [r["losses"][split_index] for r in launch(world_size)]


# ---------------------------------------------------------------- tests
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_center_loss_value_gradient_and_update(world_size):
    x = global_features().float().double()
    centers = initial_centers().float().double()
    ref_loss, ref_grad, ref_centers = center_reference(x, LABELS, centers, ALPHA)
    for sizes, ranks in _cases(world_size):
        for rank, r in enumerate(ranks):
            out = r["center"]
            torch.testing.assert_close(out["loss"].double(), ref_loss, **TOL)
            torch.testing.assert_close(out["grad"].double(), world_size * _local(ref_grad, sizes, rank), **TOL)
            torch.testing.assert_close(out["centers"].double(), ref_centers, **TOL)
            # An evaluation forward leaves the centres where training put them.
            assert torch.equal(out["centers_after_eval"], out["centers"])
    assert not torch.allclose(ref_centers, centers), "the reference update must move some centre"


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_batch_hard_triplet_value_gradient_and_valid_anchors(world_size):
    ref_loss, ref_grad, ref_valid, hinges = triplet_reference(global_features(), LABELS, MARGIN)
    assert ref_valid == 8 and (hinges > 0).sum() >= 3, "test data must exercise the hinge"
    for sizes, ranks in _cases(world_size):
        for rank, r in enumerate(ranks):
            out = r["triplet"]
            torch.testing.assert_close(out["loss"].double(), ref_loss, **TOL)
            torch.testing.assert_close(out["grad"].double(), world_size * _local(ref_grad, sizes, rank), **TOL)
            assert (out["valid"], out["anchors"]) == (ref_valid, len(LABELS))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_circle_value_gradient_and_valid_anchors(world_size):
    ref_loss, ref_grad, ref_valid = circle_reference(global_features(), LABELS, M, GAMMA)
    scale = ref_grad.abs().max().item()
    for sizes, ranks in _cases(world_size):
        for rank, r in enumerate(ranks):
            out = r["circle"]
            torch.testing.assert_close(out["loss"].double(), ref_loss, **TOL)
            torch.testing.assert_close(out["grad"].double(), world_size * _local(ref_grad, sizes, rank),
                                       rtol=1e-4, atol=1e-5 * world_size * scale)
            assert (out["valid"], out["anchors"]) == (ref_valid, len(LABELS))


def test_bad_input_on_one_rank_stops_every_rank():
    outcomes = [r["bad_input"] for r in launch(3)]
    # Value problems are seen by every rank in the gathered batch, so every rank names them;
    # a shape problem is named by its rank, the others say which rank stopped them.
    expected = {"label": (None, r"label 99 \(global sample 3, rank 1\) is outside \[0, 7\)"),
                "width": (2, r"width 9, expected embedding_size=8"),
                "mixed_widths": (None, r"different widths \(rank 0: 9, rank 1: 8, rank 2: 8\)"),
                "nan": (None, r"global sample 0 \(rank 0\) is not finite")}
    for case, (culprit, pattern) in expected.items():
        for rank, outcome in enumerate(outcomes):
            assert outcome[case] is not None, f"rank {rank} did not raise for {case}"
            kind, message = outcome[case]
            if culprit is None or rank == culprit:
                assert re.search(pattern, message), (case, rank, message)
            else:
                assert f"rank {culprit} passed a bad batch" in message
    assert outcomes[1]["nan"][0] == NonFiniteEmbeddingError.__name__


@pytest.mark.parametrize("name", ["center", "triplet", "circle"])
def test_sgd_on_separable_data_reduces_each_loss(name):
    results = [r["train"][name] for r in launch(2)]
    assert results[0] == results[1], "every rank must see the same global loss"
    before, after = results[0]
    assert math.isfinite(after) and after < 0.5 * before, (before, after)


def test_single_process_bad_inputs_and_registry():
    loss = CenterLoss(C, D)
    with pytest.raises(ValueError, match=r"label 7 \(global sample 1, rank 0\) is outside \[0, 7\)"):
        loss(torch.randn(2, D), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"label -1"):
        TripletLoss()(torch.randn(2, D), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"width 9, expected embedding_size=8"):
        loss(torch.randn(2, D + 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must be integer class ids, got dtype torch.float32"):
        loss(torch.randn(2, D), torch.tensor([0.0, 1.0]))
    with pytest.raises(NonFiniteEmbeddingError, match="global sample 1"):
        CircleLoss()(torch.tensor([[1.0, 0.0], [float("inf"), 1.0]]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"unknown metric loss 'arc': choose one of center, triplet, circle"):
        build_metric_loss("arc", C, D)
    with pytest.raises(ValueError, match=r"triplet loss has no parameter 'alpha': it accepts margin=0.3"):
        build_metric_loss("triplet", C, D, alpha=0.1)
    for bad in (dict(name="center", alpha=0.0), dict(name="triplet", margin=-0.1),
                dict(name="circle", m=1.5), dict(name="circle", gamma=0)):
        key, value = [(k, v) for k, v in bad.items() if k != "name"][0]
        with pytest.raises(ValueError, match=rf"{key}={value!r}"):
            build_metric_loss(bad["name"], C, D, **{key: value})
    built = build_metric_loss("circle", C, D, gamma=64.0)
    assert isinstance(built, CircleLoss) and built.gamma == 64.0 and built.m == 0.25


def test_autocast_bf16_features_give_float32_loss_and_finite_gradient():
    x = global_features().float().requires_grad_()
    for name in ("center", "triplet", "circle"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = x @ torch.eye(D)  # bf16 under autocast, as a backbone's output would be
            loss = build_metric_loss(name, C, D)(feats, LABELS)
        assert feats.dtype == torch.bfloat16 and loss.dtype == torch.float32
        x.grad = None
        loss.backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, name


def test_center_rollback_restores_every_row_moved_since_record():
    torch.manual_seed(0)
    loss = CenterLoss(num_classes=6, embedding_size=4).train()
    loss(torch.randn(8, 4), torch.randint(0, 6, (8,)))
    kept = loss.centers.clone()
    loss.record_updates()
    for _ in range(3):  # micro-batches of one step, some classes repeated between them
        loss(torch.randn(8, 4), torch.tensor([0, 1, 1, 2, 3, 3, 5, 0]))
    assert not torch.equal(loss.centers, kept)
    loss.rollback_updates()
    assert torch.equal(loss.centers, kept)
    loss.record_updates()
    loss(torch.randn(8, 4), torch.tensor([0, 1, 1, 2, 3, 3, 5, 0]))
    moved = loss.centers.clone()
    loss.commit_updates()
    loss.rollback_updates()  # nothing recorded any more: a no-op
    assert torch.equal(loss.centers, moved) and not torch.equal(moved, kept)
