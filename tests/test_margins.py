"""Every margin against the float64 reference of tests/margin_reference.py (logits, gradients,
state), at the edges θ = 0 and π, split over two ranks, and the registry's errors."""
from __future__ import annotations

import math

import pytest
import torch

from distributed_harness import run_distributed
from margin_reference import reference_extra_loss, reference_logits, reference_state_after
from partial_fc.margins import MARGINS, Margin, MarginInput, build_margin, margin_parameters

N, D, C = 10, 12, 7
SPLIT = 4  # two ranks: columns [0, 4) and [4, 7)
RTOL = 1e-5

# (name, hyper-parameter overrides, state set before the forward, training)
CASES = [
    ("softmax", {}, {}, True),
    ("normface", {}, {}, True),
    ("lsoftmax", {}, {}, True),
    ("lsoftmax", {}, {"iteration": 40_000}, True),  # λ ≈ 0: ψ alone
    ("lsoftmax", {"m": 3}, {"iteration": 3_000}, True),
    ("sphereface", {}, {}, True),
    ("sphereface", {}, {"iteration": 10_000}, True),  # λ at λ_min
    ("cosface", {}, {}, True),
    ("arcface", {}, {}, True),
    ("arcface", {"easy_margin": True}, {}, True),
    ("combined", {}, {}, True),
    ("combined", {"m1": 1.35, "m2": 0.0, "m3": 0.0}, {}, True),
    ("subcenter_arcface", {}, {}, True),
    ("curricularface", {}, {}, True),
    ("curricularface", {}, {"t": 0.4}, True),
    ("curricularface", {}, {"t": 0.4}, False),
    ("adaface", {}, {}, True),
    ("adaface", {}, {"batch_mean": 40.0, "batch_std": 20.0}, True),
    ("adaface", {}, {"batch_mean": 40.0, "batch_std": 20.0}, False),
    ("magface", {}, {}, True),
    ("magface", {"easy_margin": False}, {}, True),
    ("elasticface", {}, {"step": 5}, True),
    ("elasticface", {"plus": True, "seed": 3}, {}, True),
    ("elasticface", {}, {}, False),
]


def case_id(case) -> str:
    name, over, state, training = case
    parts = [name] + [f"{k}={v}" for k, v in {**over, **state}.items()] + ([] if training else ["eval"])
    return ",".join(parts)


def make_margin(case) -> Margin:
    name, over, state, training = case
    margin = build_margin(name, **over)
    for key, value in state.items():
        if isinstance(getattr(margin, key), torch.Tensor):
            getattr(margin, key).fill_(value)
        else:
            setattr(margin, key, value)
    return margin.train(training)


def make_batch(centers: int, seed: int = 0):
    """float64 x [N, D], W [C, centers·D], labels, bias: norms from 2 to 150 and targets at
    cos ≈ ±0.99, so that clamps, the θ + m > π branch and the easy-margin branch are all hit."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(C, centers * D, generator=gen, dtype=torch.float64) * (0.5 + torch.rand(C, 1, generator=gen))
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 1, 2, 5])
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    first = W[:, :D] / W[:, :D].norm(dim=1, keepdim=True)
    x[0] = first[labels[0]] + 0.05 * x[0] / x[0].norm()
    x[1] = -first[labels[1]] + 0.05 * x[1] / x[1].norm()
    x[2] = first[labels[2]] + 0.4 * x[2] / x[2].norm()
    norms = torch.exp(torch.linspace(math.log(2.0), math.log(150.0), N))
    x = x / x.norm(dim=1, keepdim=True) * norms[torch.randperm(N, generator=gen)].unsqueeze(1)
    bias = 0.1 * torch.randn(C, generator=gen, dtype=torch.float64)
    return x, W, labels, bias


def margin_input(margin: Margin, x, W, labels, bias, start: int = 0, end: int = C, group=None) -> MarginInput:
    """The MarginInput PartialFC would build, in float32, for the classes [start, end)."""
    rows = W[start:end].reshape(-1, D)
    fn = x.norm(dim=1, keepdim=True)
    cos = (x / fn) @ (rows / rows.norm(dim=1, keepdim=True)).t()
    wn = rows.norm(dim=1)
    k = margin.num_centers
    if k > 1:
        cos = cos.reshape(x.shape[0], -1, k).max(dim=2).values
        wn = wn.reshape(-1, k).max(dim=1).values
    if not margin.uses_weight_norm:
        wn = wn.detach()
    here = (labels >= start) & (labels < end)
    target = torch.where(here, labels - start, torch.full_like(labels, -1))
    b = bias[start:end] if margin.uses_bias else None
    return MarginInput(cos=cos, target=target, feature_norm=fn, weight_norm=wn, bias=b, group=group)


def state_of(margin: Margin, name: str) -> dict:
    keys = {"lsoftmax": ["iteration"], "sphereface": ["iteration"], "curricularface": ["t"],
            "adaface": ["batch_mean", "batch_std"], "elasticface": ["step"]}.get(name, [])
    out = {}
    for key in keys:
        value = getattr(margin, key)
        out[key] = value.item() if isinstance(value, torch.Tensor) else value
    return out


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """|actual − expected| <= RTOL · max|expected| elementwise (relative to the tensor's scale)."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= RTOL * scale, f"{what}: max error {err:.3g} > {RTOL} × {scale:.3g}"


def reference_run(case, x, W, labels, bias, weights):
    """Reference logits, state and gradients of Σ logits·weights + extra (float64 leaves)."""
    name = case[0]
    margin = make_margin(case)
    x64, W64, b64 = (t.clone().requires_grad_() for t in (x, W, bias))
    logits = reference_logits(name, x64, W64, labels, margin, bias=b64)
    extra = reference_extra_loss(name, x64, W64, labels, margin)
    state = reference_state_after(name, x64, W64, labels, margin)
    ((logits * weights).sum() + extra).backward()
    return logits.detach(), extra.detach(), state, x64.grad, W64.grad, b64.grad


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_margin_matches_float64_reference(case):
    name = case[0]
    margin = make_margin(case)
    x, W, labels, bias = make_batch(margin.num_centers)
    weights = torch.randn(N, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_logits, ref_extra, ref_state, ref_gx, ref_gw, ref_gb = reference_run(case, x, W, labels, bias, weights)

    x32, W32, b32 = (t.float().requires_grad_() for t in (x, W, bias))
    inp = margin_input(margin, x32, W32, labels, b32)
    logits = margin(inp)
    extra = margin.extra_loss(inp)
    assert logits.dtype == torch.float32 and logits.shape == (N, C)
    assert_rel_close(logits.detach(), ref_logits, f"{case_id(case)} logits")
    if extra is None:
        assert ref_extra.item() == 0.0
    else:
        assert_rel_close(extra.detach(), ref_extra, f"{case_id(case)} extra loss")
    assert state_of(margin, name) == pytest.approx(ref_state, rel=1e-6)

    loss = (logits * weights.float()).sum() + (extra if extra is not None else 0.0)
    loss.backward()
    assert_rel_close(x32.grad, ref_gx, f"{case_id(case)} d/dx")
    assert_rel_close(W32.grad, ref_gw, f"{case_id(case)} d/dW")
    if margin.uses_bias:
        assert_rel_close(b32.grad, ref_gb, f"{case_id(case)} d/dbias")


def test_reference_detects_a_wrong_margin():
    """The comparison has teeth: ArcFace with m = 0.45 is told apart from the m = 0.5 reference."""
    case = ("arcface", {}, {}, True)
    x, W, labels, bias = make_batch(1)
    ref = reference_logits("arcface", x, W, labels, make_margin(case))
    wrong = build_margin("arcface", m=0.45)
    got = wrong(margin_input(wrong, x.float(), W.float(), labels, bias.float())).detach()
    with pytest.raises(AssertionError):
        assert_rel_close(got, ref, "arcface m=0.45")


@pytest.mark.parametrize("name", list(MARGINS))
def test_theta_zero_and_pi_are_finite(name):
    """Cosines exactly ±1 (and one ulp inside) at the target and elsewhere: finite values and grads."""
    margin = make_margin((name, {}, {}, True))
    edge = torch.tensor([1.0, -1.0, 1.0 - 6e-8, -1.0 + 6e-8, 1.0, -1.0])
    cos = torch.tensor([[0.3, -0.2, 0.1]] * 6)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    cos[torch.arange(6), target] = edge
    cos[0, 1], cos[1, 2] = -1.0, 1.0  # non-target columns at the edges too
    cos.requires_grad_()
    fn = torch.tensor([[1.0], [5.0], [20.0], [60.0], [110.0], [300.0]], requires_grad=True)
    wn = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    inp = MarginInput(cos=cos, target=target, feature_norm=fn, weight_norm=wn,
                      bias=torch.zeros(3, requires_grad=True) if margin.uses_bias else None)
    logits = margin(inp)
    extra = margin.extra_loss(inp)
    assert torch.isfinite(logits).all(), logits
    loss = logits.sum() + (extra if extra is not None else 0.0)
    loss.backward()
    for what, grad in (("cos", cos.grad), ("feature_norm", fn.grad), ("weight_norm", wn.grad)):
        assert grad is None or torch.isfinite(grad).all(), f"{name}: non-finite gradient of {what}"


def test_features_on_the_class_row_and_opposite_it():
    """x = w_y and x = −w_y through the cosine: finite logits and gradients for every margin."""
    for name in MARGINS:
        margin = make_margin((name, {}, {}, True))
        k = margin.num_centers
        gen = torch.Generator().manual_seed(2)
        W = torch.randn(3, k * D, generator=gen, requires_grad=True)
        x = torch.stack([W[0, :D], -W[1, :D]]).detach().clone().requires_grad_()
        inp = margin_input(margin, x, W, torch.tensor([0, 1]), torch.zeros(3), end=3)
        logits = margin(inp)
        extra = margin.extra_loss(inp)
        (logits.sum() + (extra if extra is not None else 0.0)).backward()
        assert torch.isfinite(logits).all(), name
        assert torch.isfinite(x.grad).all() and torch.isfinite(W.grad).all(), name


def _two_rank_margins(rank: int, world_size: int, cases: list, label_sets: list) -> list:
    """Each case on this rank's columns of the global batch: logits, gradients, state."""
    results = []
    start, end = (0, SPLIT) if rank == 0 else (SPLIT, C)
    for case in cases:
        for labels in label_sets:
            margin = make_margin(case)
            x, W, _, bias = make_batch(margin.num_centers)
            weights = torch.randn(N, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            x32, W32, b32 = (t.float().requires_grad_() for t in (x, W, bias))
            inp = margin_input(margin, x32, W32, labels, b32, start, end)
            logits = margin(inp)
            extra = margin.extra_loss(inp)
            # This rank's share of the loss: its columns, and 1/W of the global extra term.
            loss = (logits * weights[:, start:end].float()).sum()
            if extra is not None:
                loss = loss + extra / world_size
            loss.backward()
            results.append(dict(logits=logits.detach(), gx=x32.grad, gw=W32.grad[start:end],
                                gb=b32.grad[start:end] if margin.uses_bias else None,
                                state=state_of(margin, case[0])))
    return results


def test_two_ranks_match_the_single_process_reference():
    """Columns split over two gloo ranks (one rank may hold no target at all): the concatenated
    logits and summed gradients match the reference, and stateful margins agree on their state."""
    cases = [c for c in CASES if c[3]]
    mixed = torch.tensor([0, 1, 2, 3, 4, 5, 6, 1, 2, 5])
    rank0_only = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 2, 1])
    label_sets = [mixed, rank0_only]
    per_rank = run_distributed(_two_rank_margins, 2, cases, label_sets)
    i = 0
    for case in cases:
        for labels in label_sets:
            r0, r1 = per_rank[0][i], per_rank[1][i]
            i += 1
            what = f"{case_id(case)} labels={labels.tolist()}"
            margin = make_margin(case)
            x, W, _, bias = make_batch(margin.num_centers)
            weights = torch.randn(N, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            ref_logits, _, ref_state, ref_gx, ref_gw, ref_gb = reference_run(case, x, W, labels, bias, weights)
            assert_rel_close(torch.cat([r0["logits"], r1["logits"]], dim=1), ref_logits, f"{what} logits")
            assert_rel_close(r0["gx"] + r1["gx"], ref_gx, f"{what} d/dx")
            assert_rel_close(torch.cat([r0["gw"], r1["gw"]]), ref_gw, f"{what} d/dW")
            if r0["gb"] is not None:
                assert_rel_close(torch.cat([r0["gb"], r1["gb"]]), ref_gb, f"{what} d/dbias")
            # Both ranks hold the same state, equal to the single-process one.
            assert r0["state"] == r1["state"], what
            single = make_margin(case)
            single(margin_input(single, x.float(), W.float(), labels, bias.float()))
            assert r0["state"] == pytest.approx(state_of(single, case[0]), rel=1e-6, abs=1e-7), what
            assert r0["state"] == pytest.approx(ref_state, rel=1e-6), what


def test_state_round_trips_through_state_dict():
    """A fresh margin loaded from a state_dict continues exactly where the saved one was."""
    x, W, labels, bias = make_batch(1)
    for case in [("sphereface", {}, {}, True), ("curricularface", {}, {}, True),
                 ("adaface", {}, {}, True), ("elasticface", {}, {}, True)]:
        first = make_margin(case)
        for _ in range(3):  # three optimiser steps of one forward each
            first(margin_input(first, x.float(), W.float(), labels, bias.float()))
            first.advance()
        second = make_margin(case)
        second.load_state_dict(first.state_dict())
        a = first(margin_input(first, x.float(), W.float(), labels, bias.float()))
        b = second(margin_input(second, x.float(), W.float(), labels, bias.float()))
        assert torch.equal(a, b), case[0]
        assert state_of(first, case[0]) == state_of(second, case[0]) != state_of(make_margin(case), case[0])


def test_registry_names_papers_and_descriptions():
    expected = {"softmax", "normface", "lsoftmax", "sphereface", "cosface", "arcface", "combined",
                "subcenter_arcface", "curricularface", "adaface", "magface", "elasticface"}
    assert set(MARGINS) == expected
    for name, cls in MARGINS.items():
        margin = build_margin(name)
        assert isinstance(margin, cls) and cls.name == name
        assert cls.paper and cls.__doc__
        assert margin.describe() == {"name": name, **margin_parameters(name)}
    assert build_margin("arcface", m=0.3, s=32.0).describe() == {"name": "arcface", "s": 32.0, "m": 0.3,
                                                               "easy_margin": False}
    assert build_margin("subcenter_arcface").num_centers == 3
    assert build_margin("subcenter_arcface", k=2).num_centers == 2
    assert build_margin("softmax").uses_bias and not build_margin("arcface").uses_bias


def test_registry_errors_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown margin 'arcfce'.*arcface.*elasticface"):
        build_margin("arcfce")
    with pytest.raises(ValueError, match=r"'margin'.*parameters are s, m, easy_margin"):
        build_margin("arcface", margin=0.5)
    with pytest.raises(ValueError, match=r"m=-0.1"):
        build_margin("cosface", m=-0.1)
    with pytest.raises(ValueError, match=r"m=2.5"):
        build_margin("sphereface", m=2.5)
    with pytest.raises(ValueError, match=r"l_a=50.0, u_a=20.0"):
        build_margin("magface", l_a=50.0, u_a=20.0)
    with pytest.raises(ValueError, match=r"bias"):
        build_margin("softmax")(MarginInput(cos=torch.zeros(1, 1), target=torch.zeros(1, dtype=torch.long),
                                            feature_norm=torch.ones(1, 1), weight_norm=torch.ones(1)))
