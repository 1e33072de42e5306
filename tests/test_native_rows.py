"""The C row kernels (partial_fc.native): built here, and the same numbers as the torch ops they replace."""
from __future__ import annotations

import pytest
import torch

import partial_fc.native as native
import partial_fc.rows as rows_mod
from partial_fc import PartialFC, build_head_optimizer
from partial_fc.margins.cosface import CosFace
from partial_fc.optim import PartialFCSGD

D, C = 64, 300
HAVE_COMPILER = native._compiler() is not None
needs_library = pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler on this machine")


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty build cache and no library loaded yet (restored afterwards)."""
    monkeypatch.setenv("SHARDFACE_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_state", {})
    return tmp_path / "cache"


@needs_library
def test_the_library_builds_into_its_cache_and_loads(fresh_build):
    assert native.library() is not None
    (built,) = fresh_build.iterdir()  # the library alone: no temporary file left behind
    assert built.name.startswith("row_kernels-") and built.suffix == ".so"


def test_without_a_compiler_the_torch_ops_run_and_one_warning_says_so(fresh_build, monkeypatch, tmp_path):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: no such compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setattr(native, "_compiler", lambda: str(broken))
    with pytest.warns(RuntimeWarning, match="did not build"):
        assert native.library() is None
    assert native.library() is None  # decided once
    head = PartialFC(D, C, CosFace(), sample_rate=0.2, seed=1, param_dtype=torch.bfloat16)
    opt = build_head_optimizer(head, "sgd", lr=0.5)
    before = head.weight.detach().clone()
    head(torch.randn(8, D), torch.randint(0, C, (8,))).backward()
    opt.step()
    assert not torch.equal(head.weight.detach(), before)


def test_shardface_native_0_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("SHARDFACE_NATIVE", "0")
    assert native.library() is None
    assert native.top_rows(torch.rand(100), 10) is None


def _train(dtype, torch_ops: bool, monkeypatch, **opt_args):
    """Three steps of a sampled head in blocks of 7 rows; ``torch_ops``: the row update as torch ops
    (the gather and the sampling stay as they are, so that both runs see the same rows and gradients)."""
    with monkeypatch.context() as patch:
        patch.setattr(rows_mod, "BLOCK_ELEMENTS", 7 * D)  # several blocks of rows, a short last one
        if torch_ops:
            patch.setattr(PartialFCSGD, "_native_block", lambda self, *a: None)
        row_decay = opt_args.pop("row_decay", "sampled")
        head = PartialFC(D, C, CosFace(), sample_rate=opt_args.pop("sample_rate", 0.3), seed=4, param_dtype=dtype)
        opt = PartialFCSGD(head, seed=4, row_decay=row_decay, **opt_args)
        gen = torch.Generator().manual_seed(9)
        for step in range(3):
            x, y = torch.randn(10, D, generator=gen), torch.randint(0, C, (10,), generator=gen)
            opt.zero_grad()
            head(x, y).backward()
            if step == 1:
                head.row_grads()  # a completed gradient (no pending product) takes the kernel too
            opt.step(grad_scale=0.5 if step == 2 else 1.0)
        return head.weight.detach().clone(), opt.state_rows()["weight.momentum_buffer"].clone()


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opt_args", [
    dict(lr=0.4, momentum=0.9, weight_decay=5e-4),
    dict(lr=0.4, momentum=0.9, weight_decay=0.0, nesterov=True),
    dict(lr=0.4, momentum=0.0, weight_decay=0.01),
    dict(lr=0.4, momentum=0.999, weight_decay=5e-4),  # bf16: the momentum rounds stochastically too
    dict(lr=0.4, momentum=0.9, weight_decay=0.05, row_decay="lazy_dense"),
    dict(lr=0.4, momentum=0.9, weight_decay=5e-4, sample_rate=1.0),  # bf16: every row, no index
], ids=["momentum", "nesterov", "plain", "momentum-0.999", "lazy-dense", "all-rows"])
def test_the_c_row_update_equals_the_torch_ops_bit_for_bit(monkeypatch, dtype, opt_args):
    ours = _train(dtype, False, monkeypatch, **dict(opt_args))
    ops = _train(dtype, True, monkeypatch, **dict(opt_args))
    assert torch.equal(ours[0], ops[0]) and torch.equal(ours[1], ops[1])
    assert not torch.equal(ours[0], PartialFC(D, C, CosFace(), seed=4, param_dtype=dtype).weight.detach())


@needs_library
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_c_gather_equals_index_select_and_its_norms_the_vector_norm(dtype):
    gen = torch.Generator().manual_seed(0)
    storage = torch.randn(500, 100, generator=gen).to(dtype)  # a width with a tail past 16-wide lanes
    index = torch.randperm(500, generator=gen)[:77].sort().values
    out, norms = torch.empty(77, 100), torch.empty(77)
    assert native.can_gather(storage, out)
    rows_mod.gather_rows(storage, index, out, norms=norms)
    assert torch.equal(out, storage[index].float())
    torch.testing.assert_close(norms, storage[index].float().norm(dim=1), rtol=2e-6, atol=0)
    whole = torch.empty(500, 100)
    rows_mod.gather_rows(storage, None, whole, norms=torch.empty(500))
    assert torch.equal(whole, storage.float())


@needs_library
def test_the_c_select_is_topk_then_sort_and_breaks_ties_by_the_lower_index():
    gen = torch.Generator().manual_seed(1)
    for n, k in ((2, 1), (1000, 999), (100_000, 10_000), (100_000, 13)):
        score = torch.randperm(n, generator=gen).float() / n  # distinct values: one right answer
        score[torch.randperm(n, generator=gen)[: min(k, 7)]] = 2.0  # positives, tied at the top
        want = torch.topk(score, k, sorted=False).indices.sort().values
        assert torch.equal(native.top_rows(score, k), want)
    tied = torch.tensor([0.5, 0.5, 0.25, 0.5, 0.75, 0.5])
    assert native.top_rows(tied, 3).tolist() == [0, 1, 4]
    assert native.top_rows(torch.rand(10), 10) is None  # nothing to select: the caller's path


@needs_library
def test_the_kernels_refuse_rows_they_cannot_address():
    weight, momentum = torch.zeros(10, 8), torch.zeros(10, 8)
    with pytest.raises(ValueError, match="contiguous 2-D CPU rows of width 8"):
        native.sgd_rows(weight, momentum.t().contiguous().t(), None, torch.zeros(3, 8), lr=0.1, momentum_factor=0.9,
                        weight_decay=0.0, nesterov=False)
    with pytest.raises(ValueError, match="row index must be 3 contiguous int64"):
        native.sgd_rows(weight, momentum, torch.tensor([1, 2, 3], dtype=torch.int32), torch.zeros(3, 8), lr=0.1,
                        momentum_factor=0.9, weight_decay=0.0, nesterov=False)
    with pytest.raises(ValueError, match="11 gradient rows for a storage of 10"):
        native.sgd_rows(weight, momentum, None, torch.zeros(11, 8), lr=0.1, momentum_factor=0.9, weight_decay=0.0,
                        nesterov=False)


def _cosine_backward(threads, num_threads=1):
    """The rows' and features' gradients of cosine logits whose backward runs in place."""
    from partial_fc.block_threads import BlockThreads
    from partial_fc.cosine import cosine_logits

    gen = torch.Generator().manual_seed(5)
    unit = torch.nn.functional.normalize(torch.randn(24, 32, generator=gen), dim=1).requires_grad_()
    rows = (torch.randn(1000, 32, generator=gen) * 3).requires_grad_()
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        cos = cosine_logits(unit, rows, grad_in_place=True, threads=BlockThreads() if threads else None)
        cos.backward(torch.randn(24, 1000, generator=gen))
    finally:
        torch.set_num_threads(before)
    return unit.grad, rows.grad


@needs_library
def test_the_c_cosine_backward_agrees_with_the_torch_ops_and_not_with_the_thread_count():
    ops = _cosine_backward(False)
    ours = _cosine_backward(True)
    torch.testing.assert_close(ours[0], ops[0], rtol=1e-5, atol=1e-6)  # only the column sums' order differs
    torch.testing.assert_close(ours[1], ops[1], rtol=1e-5, atol=1e-6)
    three = _cosine_backward(True, num_threads=3)  # the columns split three ways
    assert torch.equal(three[0], ours[0]) and torch.equal(three[1], ours[1])


@needs_library
def test_the_c_scale_and_clamp_equals_mul_then_clamp_bit_for_bit():
    gen = torch.Generator().manual_seed(2)
    cos = torch.randn(9, 333, generator=gen) * 0.7
    cos[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    inv_norm = torch.rand(333, generator=gen) * 2 + 0.1
    want = cos.clone().mul_(inv_norm).clamp_(-1.0, 1.0)
    for split in ([slice(0, 9)], [slice(0, 4), slice(4, 9)]):
        ours = cos.clone()
        for sl in split:
            native.scale_clamp_rows(ours, inv_norm, sl)
        same = (ours == want) | (ours.isnan() & want.isnan())
        assert same.all() and (ours.view(torch.int32) == want.view(torch.int32))[~want.isnan()].all()


def _margin_logits(raw, inv_norm, scale, column, value):
    """The logits margin_sum_rows sees, with torch's float32 roundings (mul, clamp, mul)."""
    logits = (raw * inv_norm).clamp(-1.0, 1.0) * scale
    here = column >= 0
    logits[here.nonzero().squeeze(1), column[here]] = value[here]
    return logits


def _margin_case(n=11, c=1003, seed=3):
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, c, generator=gen) * 0.3
    inv_norm = torch.rand(c, generator=gen) + 0.5
    column = torch.randint(0, c, (n,), generator=gen)
    column[[2, 7]] = -1  # another rank holds these rows' classes
    value = torch.randn(n, generator=gen) * 20
    value[4] = 90.0  # a target logit above every other one: it is the row's maximum
    return raw, inv_norm, column, value


def _margin_sums(raw, inv_norm, column, value, split):
    n = raw.shape[0]
    top, total, at_target = torch.empty(n), torch.empty(n), torch.empty(n)
    for sl in split:
        native.margin_sum_rows(raw, inv_norm, 64.0, column, value, top, total, at_target, sl)
    return top, total, at_target


@needs_library
def test_the_c_margin_softmax_pass_matches_a_float64_softmax_and_not_the_split():
    # rows of 1003 columns: no multiple of the 16 lanes
    raw, inv_norm, column, value = _margin_case()
    n = raw.shape[0]
    one = _margin_sums(raw, inv_norm, column, value, [slice(0, n)])
    three = _margin_sums(raw, inv_norm, column, value, [slice(0, 3), slice(3, 8), slice(8, n)])
    assert all(torch.equal(a, b) for a, b in zip(one, three))  # rows do not depend on the split
    logits = _margin_logits(raw, inv_norm, 64.0, column, value)
    top, total, at_target = one
    assert torch.equal(top, logits.max(dim=1).values)  # the maximum is exact
    want = (logits - top.unsqueeze(1)).double().exp()  # float32 differences, as the kernel forms them
    torch.testing.assert_close(total.double(), want.sum(dim=1), rtol=1e-6, atol=0)
    here = column >= 0
    torch.testing.assert_close(at_target[here].double(), want[here.nonzero().squeeze(1), column[here]],
                               rtol=3e-7, atol=1.3e-38)  # below e^-87.3: that value, not a subnormal
    assert (at_target[~here] == 0).all() and at_target[4] == 1.0


@needs_library
def test_the_c_exp_is_within_an_ulp_over_the_range_a_softmax_sees():
    # Rows [0, x] with x <= 0 at the target column: the maximum is 0 and target_exp is exp(x).
    x = torch.cat([torch.linspace(-87.3, 0.0, 400_000), torch.tensor([-1e-30, -87.31, -88.7, -103.97, -150.0])])
    n = x.numel()
    top, total, got = torch.empty(n), torch.empty(n), torch.empty(n)
    native.margin_sum_rows(torch.zeros(n, 2), torch.ones(2), 1.0, torch.ones(n, dtype=torch.int64), x, top, total,
                           got, slice(0, n))
    assert torch.equal(total, 1.0 + got)  # the row's sum: exp(0) + exp(x), in float32
    got, want = got.double(), x.double().exp()
    ulp = torch.finfo(torch.float32).eps * want[:-4]
    assert ((got[:-4] - want[:-4]).abs() <= ulp).all()
    # Below -87.3 (results that would be subnormal): exp(-87.3) ~ 1.2e-38, which no sum with a 1 sees.
    assert ((got[-4:] > 0) & (got[-4:] <= 1.3e-38)).all()


@needs_library
def test_a_nan_logit_makes_the_rows_sum_nan():
    raw = torch.zeros(2, 40)
    raw[1, 17] = float("nan")
    none = torch.full((2,), -1, dtype=torch.int64)
    top, total, at_target = _margin_sums(raw, torch.ones(40), none, torch.zeros(2), [slice(0, 2)])
    assert total[0] == 40.0 and total[1].isnan()


@needs_library
def test_the_c_softmax_and_cosine_backward_matches_the_formula_and_not_the_split():
    raw, inv_norm, column, value = _margin_case(n=13, c=517, seed=4)
    n, c = raw.shape
    top, _, _ = _margin_sums(raw, inv_norm, column, value, [slice(0, n)])
    gen = torch.Generator().manual_seed(5)
    row_scale, target_grad = torch.rand(n, generator=gen), torch.randn(n, generator=gen)
    runs = []
    for cuts in ([0, c], [0, 100, int(column[0]), int(column[0]) + 1, c]):  # one split at a target column
        g, coef = raw.clone(), torch.zeros(c)
        for lo, hi in zip(cuts, cuts[1:]):
            native.softmax_cosine_grad_columns(g, inv_norm, coef, 64.0, top, row_scale, column, target_grad,
                                               slice(lo, hi))
        runs.append((g, coef))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    cos = (raw * inv_norm).clamp(-1.0, 1.0)
    want = ((cos * 64.0 - top.unsqueeze(1)).double().exp() * row_scale.double().unsqueeze(1))
    here = column >= 0
    want[here.nonzero().squeeze(1), column[here]] = target_grad[here].double()
    want = want * inv_norm.double()
    g, coef = runs[0]
    torch.testing.assert_close(g.double(), want, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(coef.double(), (want * cos.double()).sum(dim=0), rtol=1e-5, atol=1e-6)
