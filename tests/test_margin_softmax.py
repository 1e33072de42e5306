"""The fused margin softmax against the margin module + sharded softmax, and the deferred row correction."""
import pytest
import torch

from partial_fc import PartialFC, build_head_optimizer
from partial_fc.margin_softmax import margin_cross_entropy
from partial_fc.margins import MARGINS, build_margin
from partial_fc.margins.base import MarginInput
from partial_fc.softmax import sharded_cross_entropy_and_accuracy

SCALED = sorted(name for name in MARGINS if build_margin(name).logit_scale() is not None)


def _inputs(seed=0, n=6, c=9):
    gen = torch.Generator().manual_seed(seed)
    cos = (torch.rand(n, c, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_()
    target = torch.randint(0, c, (n,), generator=gen)
    target[1] = -1  # a sample whose class another rank holds
    norm = (torch.rand(n, 1, generator=gen, dtype=torch.float64) * 60 + 5).requires_grad_()
    return cos, target, norm


def test_the_common_margins_take_the_fused_path():
    assert {"arcface", "cosface", "combined", "magface", "elasticface"} <= set(SCALED)
    assert build_margin("curricularface").logit_scale() is None  # changes negatives too
    assert margin_cross_entropy(build_margin("softmax"), MarginInput(*_inputs()[:2], None, None)) is None


@pytest.mark.parametrize("name", SCALED)
def test_fused_loss_accuracy_and_gradients_equal_the_unfused_ones(name):
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        margin = build_margin(name).double().train()
        cos, target, norm = _inputs()
        inp = MarginInput(cos=cos, target=target, feature_norm=norm, weight_norm=torch.ones(cos.shape[1]))
        if fused:
            loss, acc = margin_cross_entropy(margin, inp, accuracy=True)
        else:
            logits = margin(inp)
            loss, acc = sharded_cross_entropy_and_accuracy(logits, target, logits.detach())
        loss.backward()
        results.append((loss.detach(), acc, cos.grad, norm.grad))
    (loss_f, acc_f, gc_f, gn_f), (loss_u, acc_u, gc_u, gn_u) = results
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-12, atol=1e-12)
    assert acc_f.item() == acc_u.item()
    torch.testing.assert_close(gc_f, gc_u, rtol=1e-10, atol=1e-12)
    if gn_u is None:
        assert gn_f is None or not gn_f.abs().max().item()
    else:
        torch.testing.assert_close(gn_f, gn_u, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deferred_row_correction_updates_like_the_completed_gradient(dtype):
    heads = []
    for complete_first in (False, True):
        head = PartialFC(16, 400, build_margin("arcface"), sample_rate=0.25, seed=1, param_dtype=dtype)
        opt = build_head_optimizer(head, "sgd", lr=0.5, seed=2)
        gen = torch.Generator().manual_seed(3)
        for _ in range(2):
            x = torch.randn(12, 16, generator=gen)
            y = torch.randint(0, 400, (12,), generator=gen)
            opt.zero_grad()
            head(x, y).backward()
            if complete_first:
                head.row_grads()  # completes the gradient: the optimiser gets no coefficients
            else:  # the forward's gradient still lacks its −coef·w term: the optimiser applies it
                assert head._chosen[0].correction.coef is not None
            opt.step()
        heads.append((head.weight.detach().float(), opt.state_rows()["weight.momentum_buffer"].float()))
    (w_deferred, m_deferred), (w_complete, m_complete) = heads
    assert torch.equal(w_deferred, w_complete) and torch.equal(m_deferred, m_complete)
    assert m_deferred.abs().sum() > 0  # the steps did move rows
