"""The gather-with-gradient collective against a hand-computed expectation."""
import torch

from distributed_harness import run_distributed
from partial_fc.comm import all_gather_no_grad, all_gather_with_grad
from partial_fc.sharding import class_range


def _gather_and_backward(rank, world_size):
    # Rank r holds r + 1 rows (uneven local batches) filled with r.
    x = torch.full((rank + 1, 2), float(rank), requires_grad=True)
    g = all_gather_with_grad(x)
    # Rank r's share weights global row i by (r + 1) * (i + 1).
    weights = torch.arange(1, g.shape[0] + 1, dtype=torch.float32).unsqueeze(1) * (rank + 1)
    (g * weights).sum().backward()
    return g.detach(), x.grad, all_gather_no_grad(torch.tensor([rank] * (rank + 1)))


def test_all_gather_with_grad_uneven_sizes():
    world = 3
    results = run_distributed(_gather_and_backward, world)
    sizes = [1, 2, 3]
    expected_rows = torch.cat([torch.full((n, 2), float(r)) for r, n in enumerate(sizes)])
    share_sum = sum(r + 1 for r in range(world))  # every rank's weight factor, added up
    offset = 0
    for rank, (g, grad, labels) in enumerate(results):
        torch.testing.assert_close(g, expected_rows)
        rows = torch.arange(offset + 1, offset + sizes[rank] + 1, dtype=torch.float32)
        expected_grad = (rows * share_sum * world).unsqueeze(1).expand(-1, 2)
        torch.testing.assert_close(grad, expected_grad)
        assert labels.tolist() == [0, 1, 1, 2, 2, 2]
        offset += sizes[rank]


def test_class_range_even_split():
    ranges = [class_range(10, r, 3) for r in range(3)]
    assert ranges == [(0, 4), (4, 3), (7, 3)]
    assert sum(n for _, n in ranges) == 10


def _gather_batch(rank, world_size):
    return {dtype: _gather_batch_in(rank, dtype) for dtype in (torch.float32, torch.bfloat16)}


def _gather_batch_in(rank, dtype):
    from partial_fc.comm import gather_batch
    sizes = [2, 3, 1]
    x = torch.full((sizes[rank], 3), float(rank + 1), dtype=dtype, requires_grad=True)
    # Labels beyond 2^24 (not exact as float32 values): they travel as bits, not values.
    labels = torch.arange(sizes[rank]) + (1 << 24) + 1 + 10 * rank
    features, global_labels = gather_batch(x, labels, sizes=sizes)
    # Rank r's share weights every global feature entry by (r + 1).
    (features.float() * (rank + 1)).sum().backward()
    return features.detach().float(), global_labels, x.grad.float()


def test_gather_batch_one_call_carries_labels_bit_exactly_with_announced_uneven_sizes():
    world = 3
    sizes = [2, 3, 1]
    expected_labels = torch.cat([torch.arange(n) + (1 << 24) + 1 + 10 * r for r, n in enumerate(sizes)])
    expected_rows = torch.cat([torch.full((n, 3), float(r + 1)) for r, n in enumerate(sizes)])
    results = run_distributed(_gather_batch, world)
    for dtype in (torch.float32, torch.bfloat16):
        for rank, (features, labels, grad) in enumerate(r[dtype] for r in results):
            assert labels.dtype == torch.int64 and torch.equal(labels, expected_labels)
            torch.testing.assert_close(features, expected_rows)
            # Σ over ranks of (r + 1), times W (the gather's DDP convention).
            torch.testing.assert_close(grad, torch.full((sizes[rank], 3), float(1 + 2 + 3) * world))
