"""The row optimiser's block-wise sparse update, its reuse of the forward's rows, and bf16 rounding."""
from __future__ import annotations

import pytest
import torch

import partial_fc.rows as rows_mod
from partial_fc import PartialFC, build_head_optimizer
from partial_fc.margins.cosface import CosFace
from partial_fc.optim import _stochastic_round_bf16
from partial_fc.rows import round_to_bf16_, rounding_noise

D, C = 8, 90


def _reference_sparse_update(name, weight, state, index, grad, lr, wd, grad_scale=1.0):
    """The unblocked update: gather the rows, torch.optim's elementwise update, scatter."""
    w, g = weight[index].clone(), grad.clone() * grad_scale if grad_scale != 1.0 else grad.clone()
    if name == "sgd":
        buf = state["momentum_buffer"][index].clone()
        g.add_(w, alpha=wd)
        buf.mul_(0.9).add_(g)
        w.add_(buf, alpha=-lr)
        return {"weight": w, "momentum_buffer": buf}
    beta1, beta2 = 0.9, 0.999
    m, v, step = (state[k][index].clone() for k in ("exp_avg", "exp_avg_sq", "step"))
    w.mul_(1 - lr * wd)
    step.add_(1)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = (lr / (1 - beta1 ** step)).view(-1, 1)
    denom = (v / (1 - beta2 ** step).view(-1, 1)).sqrt_().add_(1e-8)
    w.addcdiv_(m * step_size, denom, value=-1.0)
    return {"weight": w, "exp_avg": m, "exp_avg_sq": v, "step": step}


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("block", [3 * D, 1 << 18])  # several blocks of 3 rows; one block
def test_blockwise_update_equals_unblocked_update_bit_for_bit(monkeypatch, name, block):
    monkeypatch.setattr(rows_mod, "BLOCK_ELEMENTS", block)
    monkeypatch.setattr(rows_mod, "PARALLEL_BLOCK_ELEMENTS", block)  # the same blocks at any thread count
    torch.manual_seed(0)
    head = PartialFC(D, C, CosFace(), sample_rate=0.3, seed=3)
    opt = build_head_optimizer(head, name, lr=0.3, weight_decay=0.05)
    for _ in range(3):
        x, y = torch.randn(6, D), torch.randint(0, C, (6,))
        opt.zero_grad()
        head(x, y).backward()
        index, grad, _ = head.row_grads()
        assert head.gathered_weight_rows() is not None  # the forward's copy is reused
        weight = head.weight.detach().clone()
        state = {k.split(".", 1)[1]: v.clone() for k, v in opt.state_rows().items()}
        want = _reference_sparse_update(name, weight, state, index, grad, 0.3, 0.05, grad_scale=0.5)
        opt.step(grad_scale=0.5)
        assert torch.equal(head.weight.detach()[index], want["weight"])
        for key, value in opt.state_rows().items():
            assert torch.equal(value[index], want[key.split(".", 1)[1]])
        untouched = torch.ones(C, dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(head.weight.detach()[untouched], weight[untouched])


def test_rows_changed_after_the_forward_are_gathered_again():
    head = PartialFC(D, C, CosFace(), sample_rate=0.3)
    opt = build_head_optimizer(head, "sgd", lr=0.3, weight_decay=0.0, momentum=0.0)
    head(torch.randn(4, D), torch.tensor([1, 2, 3, 4])).backward()
    index, grad, _ = head.row_grads()
    with torch.no_grad():
        head.weight.add_(1.0)  # e.g. a checkpoint restored between backward and step
    assert head.gathered_weight_rows() is None
    expected = head.weight.detach()[index].add(grad, alpha=-0.3)  # the stale copy would be 1 lower
    opt.step()
    assert torch.equal(head.weight.detach()[index], expected)


def test_a_second_forward_of_the_step_does_not_overwrite_the_first_ones_rows():
    head = PartialFC(D, C, CosFace(), sample_rate=0.2, seed=1)
    head(torch.randn(3, D), torch.tensor([0, 1, 2])).backward()
    first = head._chosen[0]
    before = head.weight.detach()[first.index].clone()
    head(torch.randn(3, D), torch.tensor([5, 6, 7])).backward()
    assert torch.equal(first.weight.detach(), before)
    assert head.gathered_weight_rows() is None  # two forwards: the optimiser gathers itself


def test_rounding_is_unbiased_per_element_with_a_fixed_seed():
    gen = torch.Generator().manual_seed(0)
    low, high = 1.0, 1.0 + 2 ** -7  # neighbouring bf16 values
    fraction = torch.rand(64, 16, generator=torch.Generator().manual_seed(1))
    value = low + fraction * (high - low)
    trials = 400
    up = torch.zeros_like(value)
    for _ in range(trials):
        rounded = _stochastic_round_bf16(value.clone(), gen).float()
        assert ((rounded == low) | (rounded == high)).all()
        up += rounded == high
    p = up / trials
    # Each element rounds up with the probability of its fraction: within 4.5 sigma per element,
    # and the mean deviation over all 1024 elements is far smaller still.
    sigma = (fraction * (1 - fraction) / trials).sqrt().clamp_min(1e-3)
    assert ((p - fraction).abs() < 4.5 * sigma + 1e-3).all()
    assert abs((p - fraction).mean().item()) < 3e-3


def test_rounding_noise_is_uniform_and_pairwise_independent():
    gen = torch.Generator().manual_seed(2)
    samples = []
    for _ in range(300):
        row, col = rounding_noise(4, 4, gen, "cpu")
        samples.append(torch.bitwise_xor(row, col))
    noise = torch.stack(samples).double() / 65536.0  # [trials, 4, 4], uniform on [0, 1)
    assert noise.min() >= 0 and noise.max() < 1
    assert abs(noise.mean().item() - 0.5) < 0.02
    flat = noise.view(noise.shape[0], -1)
    corr = torch.corrcoef(flat.t())
    off_diagonal = corr[~torch.eye(16, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.25  # same row, same column and neither: uncorrelated


def test_round_to_bf16_keeps_exact_values_and_brackets_the_rest():
    x = torch.tensor([[1.0, -2.5, 0.0, 3.0 + 2 ** -12]])
    row, col = rounding_noise(1, 4, torch.Generator().manual_seed(0), "cpu")
    out = round_to_bf16_(x.clone(), row, col, torch.empty(1, 4, dtype=torch.bfloat16)).float()
    assert out[0, :3].tolist() == [1.0, -2.5, 0.0]
    assert out[0, 3].item() in (3.0, 3.0 + 2 ** -6)


def test_bf16_rows_resume_bit_identically_from_the_saved_generators():
    def make():
        head = PartialFC(D, C, CosFace(), sample_rate=0.3, param_dtype=torch.bfloat16, seed=4)
        return head, build_head_optimizer(head, "sgd", lr=0.5, seed=4)

    data = [(torch.randn(6, D, generator=torch.Generator().manual_seed(i)),
             torch.randint(0, C, (6,), generator=torch.Generator().manual_seed(100 + i))) for i in range(6)]

    def run(head, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            head(x, y).backward()
            opt.step()

    head, opt = make()
    run(head, opt, data[:3])
    saved = (head.weight.detach().clone(), {k: v.clone() for k, v in opt.state_rows().items()},
             head.get_extra_state(), opt.rounding_generator.get_state())
    run(head, opt, data[3:])
    resumed, ropt = make()
    with torch.no_grad():
        resumed.weight.copy_(saved[0])
    ropt.load_state_rows(saved[1])
    resumed.set_extra_state(saved[2])
    ropt.rounding_generator.set_state(saved[3])
    run(resumed, ropt, data[3:])
    assert torch.equal(resumed.weight, head.weight)
    assert all(torch.equal(v, opt.state_rows()[k]) for k, v in ropt.state_rows().items())


def test_blocks_grow_when_ops_run_on_several_threads(monkeypatch):
    # Several threads: few large blocks (each parallel op pays a barrier); one thread: cache-sized.
    monkeypatch.setattr(rows_mod, "BLOCK_ELEMENTS", 8 * D)
    monkeypatch.setattr(rows_mod, "PARALLEL_BLOCK_ELEMENTS", 64 * D)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = list(rows_mod.blocks(128, D))
        torch.set_num_threads(2)
        two = list(rows_mod.blocks(128, D))
    finally:
        torch.set_num_threads(before)
    assert [s.stop - s.start for s in one] == [8] * 16
    assert [s.stop - s.start for s in two] == [64, 64]


def test_bf16_truncation_by_shift_and_narrow_equals_masking_and_converting():
    # Contiguous rows shift the upper 16 bits down and narrow; other layouts mask and convert: same bits.
    torch.manual_seed(4)
    x = torch.randn(7, 6) * torch.logspace(-30, 30, 6)
    x[0, 0], x[1, 1], x[2, 2] = float("inf"), float("-inf"), 3.3895e38  # rounds up to inf or stays
    row, col = rounding_noise(7, 6, torch.Generator().manual_seed(5), x.device)
    fast = round_to_bf16_(x.clone(), row, col, torch.empty(7, 6, dtype=torch.bfloat16))
    slow = round_to_bf16_(x.clone(), row, col, torch.empty(6, 7, dtype=torch.bfloat16).t())
    assert torch.equal(fast.view(torch.int16), slow.contiguous().view(torch.int16))
    assert fast[0, 0] == float("inf") and fast[1, 1] == float("-inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_update_on_several_threads_equals_one_thread_bit_for_bit(monkeypatch, dtype):
    # Blocks of 3 rows spread over Python threads (partial_fc.block_threads): each block's
    # arithmetic is the one-thread arithmetic, so weight and momentum match exactly.
    monkeypatch.setattr(rows_mod, "BLOCK_ELEMENTS", 3 * D)
    before = torch.get_num_threads()

    def train(threads):
        torch.set_num_threads(threads)
        head = PartialFC(D, C, CosFace(), sample_rate=0.5, param_dtype=dtype, seed=5)
        opt = build_head_optimizer(head, "sgd", lr=0.4, weight_decay=0.05, seed=5)
        for i in range(3):
            gen = torch.Generator().manual_seed(i)
            opt.zero_grad()
            head(torch.randn(6, D, generator=gen), torch.randint(0, C, (6,), generator=gen)).backward()
            opt.step()
            assert torch.get_num_threads() == threads  # the workers' one-thread setting is undone
        return head.weight.detach().clone(), opt.state_rows()["weight.momentum_buffer"].clone()

    try:
        one, three = train(1), train(3)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    assert not torch.equal(one[1], torch.zeros_like(one[1]))  # the rows did move


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_one_pass_sgd_update_equals_torch_optim_bit_for_bit(monkeypatch, nesterov, weight_decay):
    # Rows of 64 values take the fused kernel; the update must still be torch.optim.SGD's.
    import partial_fc.optim as optim_mod

    calls = []
    if optim_mod._FUSED_SGD is not None:
        kernel = optim_mod._FUSED_SGD
        monkeypatch.setattr(optim_mod, "_FUSED_SGD", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    gen = torch.Generator().manual_seed(7)
    w, g, m = (torch.randn(37, 64, generator=gen) for _ in range(3))
    ours = {"param": w.clone(), "momentum_buffer": m.clone()}
    group = dict(lr=0.3, momentum=0.9, weight_decay=weight_decay, nesterov=nesterov)
    optim_mod.PartialFCSGD._update(None, ours, g.clone(), group)
    ref = torch.nn.Parameter(w.clone())
    ref.grad = g.clone()
    sgd = torch.optim.SGD([ref], lr=0.3, momentum=0.9, weight_decay=weight_decay, nesterov=nesterov, foreach=False)
    sgd.state[ref]["momentum_buffer"] = m.clone()
    sgd.step()
    assert torch.equal(ours["param"], ref.detach())
    assert torch.equal(ours["momentum_buffer"], sgd.state[ref]["momentum_buffer"])
    assert calls or optim_mod._FUSED_SGD is None


def test_momentum_buffer_rounds_to_nearest_unless_momentum_is_close_to_one():
    def first_step(momentum):
        head = PartialFC(D, C, CosFace(), param_dtype=torch.bfloat16, seed=2)
        opt = build_head_optimizer(head, "sgd", lr=0.1, momentum=momentum, weight_decay=0.0, seed=2)
        gen = torch.Generator().manual_seed(4)
        head(torch.randn(6, D, generator=gen), torch.randint(0, C, (6,), generator=gen)).backward()
        _, grad, _ = head.row_grads()  # the state starts at zero: after one step it is the gradient
        opt.step()
        return grad, opt.state_rows()["weight.momentum_buffer"]

    grad, buf = first_step(0.9)
    assert torch.equal(buf, grad.to(torch.bfloat16))  # round to nearest
    grad, buf = first_step(0.999)
    nearest = grad.to(torch.bfloat16)
    assert not torch.equal(buf, nearest)  # stochastic: some values round the other way
    assert ((buf.float() - grad).abs() <= grad.abs() * 2 ** -7).all()  # ... to a neighbour
