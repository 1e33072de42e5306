"""A checkpoint carries the margin's running state (it is not per class, so any world size takes it)."""
import torch

from partial_fc import PartialFC, build_head_optimizer
from partial_fc.margins import build_margin
from train.reshard import classifier_state, restore_classifier


def _trained_head(name):
    head = PartialFC(8, 10, build_margin(name), seed=0)
    opt = build_head_optimizer(head, "sgd", lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        head(torch.randn(6, 8), torch.randint(0, 10, (6,))).backward()
        opt.step()
    return head, opt


def test_margin_state_survives_save_and_restore():
    for name in ("curricularface", "adaface", "sphereface"):
        head, opt = _trained_head(name)
        saved = classifier_state(head, opt)
        fresh = PartialFC(8, 10, build_margin(name), seed=0)
        fresh_opt = build_head_optimizer(fresh, "sgd", lr=0.1)
        before = {k: v.clone() for k, v in fresh.margin.state_dict().items() if torch.is_tensor(v)}
        restore_classifier(fresh, fresh_opt, saved["rows"], {"margin": saved["extra"]["margin"]})
        after = fresh.margin.state_dict()
        changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
        assert changed, f"{name}: training did not change any margin state, the test would prove nothing"
        for key, value in head.margin.state_dict().items():
            if torch.is_tensor(value):
                assert torch.equal(after[key], value), f"{name}: {key} not restored"
