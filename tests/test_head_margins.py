"""Every margin through the sharded classifier at W = 1, 2, 3 against the float64 paper reference."""
import pytest
import torch

from distributed_harness import run_distributed
from margin_reference import reference_loss
from partial_fc import PartialFC
from partial_fc.comm import all_gather_no_grad
from partial_fc.margins import MARGINS, build_margin
from partial_fc.sharding import class_range

D, C = 8, 11
LOCAL_SIZES = [3, 2, 4]
NAMES = sorted(MARGINS)


def _batch(world_size):
    gen = torch.Generator().manual_seed(7)
    n = sum(LOCAL_SIZES[:world_size])
    # Feature norms spread over [5, 60] so that norm-aware margins (AdaFace, MagFace) vary.
    x = torch.nn.functional.normalize(torch.randn(n, D, generator=gen, dtype=torch.float64), dim=1)
    x = x * torch.linspace(5, 60, n, dtype=torch.float64).unsqueeze(1)
    return x, torch.randint(0, C, (n,), generator=gen)


def _all_margins(rank, world_size):
    x, labels = _batch(world_size)
    lo = sum(LOCAL_SIZES[:rank])
    out = {}
    for name in NAMES:
        head = PartialFC(D, C, build_margin(name), seed=3)
        # Row norms vary too (L-Softmax and softmax use them).
        with torch.no_grad():
            head.weight.mul_(torch.linspace(50, 150, head.num_local).unsqueeze(1))
        full_w = all_gather_no_grad(head.weight.detach())
        full_b = all_gather_no_grad(head.bias.detach()) if head.bias is not None else None
        xl = x[lo:lo + LOCAL_SIZES[rank]].float().requires_grad_()
        loss = head(xl, labels[lo:lo + LOCAL_SIZES[rank]])
        loss.backward()
        bias_grad = head.row_grads()[2]
        out[name] = dict(loss=loss.detach(), x_grad=xl.grad, w_grad=head.dense_weight_grad(), full_w=full_w,
                         full_b=full_b, b_grad=None if bias_grad is None else bias_grad.clone())
    return out


def _close(got, want, what):
    scale = want.abs().max().item() + 1e-12
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-5 * scale + 1e-7, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_margin_matches_reference_when_sharded(world_size):
    results = run_distributed(_all_margins, world_size)
    x, labels = _batch(world_size)
    for name in NAMES:
        r0 = results[0][name]
        w = r0["full_w"].double().requires_grad_()
        b = r0["full_b"].double().requires_grad_() if r0["full_b"] is not None else None
        xr = x.clone().requires_grad_()
        ref = reference_loss(name, xr, w, labels, build_margin(name), bias=b)
        ref.backward()
        for rank, res in enumerate(results):
            r = res[name]
            _close(r["loss"], ref.detach(), f"{name} W={world_size} loss")
            lo = sum(LOCAL_SIZES[:rank])
            _close(r["x_grad"], world_size * xr.grad[lo:lo + LOCAL_SIZES[rank]], f"{name} rank {rank} feature grad")
            start, n = class_range(C, rank, world_size)
            _close(r["w_grad"], w.grad[start:start + n], f"{name} rank {rank} weight grad")
            if b is not None:
                _close(r["b_grad"], b.grad[start:start + n], f"{name} rank {rank} bias grad")
