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
