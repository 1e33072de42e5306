"""The classifier's GEMMs in bf16: loss and gradients against a float64 reference, the ends of the angle, training."""
import math

import pytest
import torch
import torch.nn.functional as F

from partial_fc import PartialFC
from partial_fc.margins import build_margin

D, C, N = 64, 40, 24
S, M = 32.0, 0.5
# bf16 keeps 8 significant bits: each product is rounded to ~0.4 %, sums stay float32.
# Measured on these sizes: loss within 0.01 %, gradients within 0.8 % of their largest entry;
# the tolerances leave a few times that.
LOSS_RTOL = 1e-3
GRAD_TOL = 3e-2  # of the largest gradient entry


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g)


def arcface_reference(x, w, labels):
    """float64 mean CE of s·cos(θ + m) at the target, s·cos elsewhere (no easy margin)."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    cos = (F.normalize(x, dim=1) @ F.normalize(w, dim=1).t()).clamp(-1 + 1e-7, 1 - 1e-7)
    theta = torch.acos(cos)
    onehot = F.one_hot(labels, C).bool()
    target = torch.cos(theta + M)
    # The usual fallback past π − m keeps the logit monotonic (as arcface does).
    target = torch.where(theta + M <= math.pi, target, cos - math.sin(math.pi - M) * M)
    logits = S * torch.where(onehot, target, cos)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _head(dtype):
    return PartialFC(D, C, build_margin("arcface", s=S, m=M), compute_dtype=dtype, seed=3)


def _max_rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_classifier_gemms_against_the_float64_reference(dtype):
    x, labels = _batch()
    head = _head(dtype)
    ref_loss, ref_gx, ref_gw = arcface_reference(x, head.weight.detach().double(), labels)
    xf = x.float().requires_grad_()
    loss = head(xf, labels)
    loss.backward()
    tol = (LOSS_RTOL, GRAD_TOL) if dtype == torch.bfloat16 else (1e-5, 1e-4)
    assert abs(float(loss.detach()) - float(ref_loss)) <= tol[0] * abs(float(ref_loss))
    assert _max_rel(xf.grad, ref_gx) <= tol[1]
    assert _max_rel(head.dense_weight_grad(), ref_gw) <= tol[1]
    if dtype == torch.bfloat16:
        # The bf16 GEMMs really ran: the result is not the float32 one to the last bit.
        fp32 = _head(torch.float32)
        assert float(fp32(x.float(), labels).detach()) != float(loss.detach())


def test_no_nan_or_inf_at_theta_zero_and_pi():
    head = _head(torch.bfloat16)
    w = head.weight.detach()[:4].float()
    # Features along class rows (θ = 0 at the target) and against them (θ = π).
    x = torch.cat([w * 3.0, -w * 3.0]).requires_grad_()
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    loss = head(x, labels)
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.dense_weight_grad()).all()


def test_fp16_classifier_off_cuda_is_a_clear_error():
    head = _head(torch.float16)
    x, labels = _batch()
    with pytest.raises(ValueError, match="compute_dtype=float16 needs a CUDA device"):
        head(x.float(), labels)


def test_precision_classifier_resolves_from_the_run(tmp_path):
    from train.builders import CLASSIFIER_DTYPES, classifier_precision
    from train.config import ConfigError
    from train_fixtures import tiny_config
    cpu = torch.device("cpu")
    assert classifier_precision(tiny_config(tmp_path, "precision.dtype=bf16").precision, cpu) == "bf16"
    assert classifier_precision(tiny_config(tmp_path, "precision.dtype=fp16").precision, cpu) == "fp32"
    assert classifier_precision(tiny_config(tmp_path, "precision.classifier=tf32").precision, cpu) == "fp32"
    assert CLASSIFIER_DTYPES["bf16"] == torch.bfloat16
    with pytest.raises(ConfigError, match="precision.classifier=fp16 needs a CUDA device"):
        classifier_precision(tiny_config(tmp_path, "precision.classifier=fp16").precision, cpu)


def _run_losses(tmp_path, classifier):
    from train.distributed import init_distributed
    from train.trainer import Trainer
    from train_fixtures import SplitLoader, plain_net, tiny_config
    cfg = tiny_config(tmp_path / classifier, f"precision.classifier={classifier}", "max_steps=40", "optim.lr=0.2")
    trainer = Trainer(cfg, init_distributed(device="cpu"), loader=SplitLoader(), backbone=plain_net())
    assert trainer.head.compute_dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[classifier]
    losses = []
    original = trainer.train_step

    def record(batches, **kw):
        result = original(batches, **kw)
        losses.append(result.loss)
        return result
    trainer.train_step = record
    summary = trainer.fit()
    assert summary["steps"] == 40 and summary["skipped_steps"] == 0
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


def test_tiny_run_with_a_bf16_classifier_learns_like_fp32(tmp_path):
    first, last = _run_losses(tmp_path, "bf16")
    first32, last32 = _run_losses(tmp_path, "fp32")
    assert last32 < first32 - 1.0  # the run does learn (mean loss over 5 steps, start vs end)
    assert first - last >= 0.8 * (first32 - last32), (first, last, first32, last32)


def test_deferred_input_check_names_the_step_and_skips_it(tmp_path):
    from train.distributed import init_distributed
    from train.trainer import Trainer
    from train_fixtures import CLASSES, SplitLoader, plain_net, tiny_config

    class BadLabelAt3(SplitLoader):
        def _iter_epoch(self, epoch, start):
            for j, (images, labels) in enumerate(super()._iter_epoch(epoch, start), start):
                if j == 2:
                    labels = labels.clone()
                    labels[1] = CLASSES + 5
                yield images, labels

    cfg = tiny_config(tmp_path, "max_steps=6", "loss.check_inputs=deferred")
    trainer = Trainer(cfg, init_distributed(device="cpu"), loader=BadLabelAt3(), backbone=plain_net())
    trainer.fit(stop_at_step=2)
    before = trainer.head.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"step 3: label {CLASSES + 5} \(global sample 1, rank 0\) is outside "
                                         rf"\[0, {CLASSES}\)"):
        trainer.fit()
    assert torch.equal(trainer.head.weight.detach(), before)  # the bad step did not move the rows


@pytest.mark.parametrize("cuda, native, want", [(True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")])
def test_fast_precision_is_bf16_only_where_bf16_runs_natively(monkeypatch, cuda, native, want):
    # The demo and the loss study train in it: emulated bf16 on an AVX2 CPU is 4x slower than fp32.
    from train.builders import fast_precision
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native, raising=False)
    assert fast_precision() == want
