"""Backbones: registry, output shapes, input-size adaptation, checkpointing, params/FLOPs table."""
from pathlib import Path

import pytest
import torch
from torch import nn

from train.backbones import build_backbone, list_backbones, register_backbone
from train.backbones.flops import (
    count_flops,
    count_parameters,
    default_profiles,
    extract_table,
    markdown_table,
    profile_backbone,
)
from train.backbones.vit import FaceViT

DOCS = Path(__file__).resolve().parent.parent / "docs" / "backbones.md"
EXPECTED = {"iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "iresnet_tiny",
            "mobilefacenet", "mobilefacenet_tiny", "vit_t", "vit_s", "vit_b"}


def test_registry_lists_every_backbone():
    assert EXPECTED <= set(list_backbones())


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'.*iresnet50.*vit_b"):
        build_backbone("resnet9000")


def test_unknown_option_and_bad_values_are_refused():
    with pytest.raises(ValueError, match="does not take option.*widthh.*it takes: .*input_size"):
        build_backbone("iresnet_tiny", widthh=3)
    with pytest.raises(ValueError, match="embedding_size=0"):
        build_backbone("iresnet_tiny", embedding_size=0)
    with pytest.raises(ValueError, match="dropout=1.5"):
        build_backbone("iresnet_tiny", dropout=1.5)
    with pytest.raises(ValueError, match="input_size=60 is not a multiple of 8"):
        build_backbone("vit_t", input_size=60)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_backbone("iresnet50")(lambda embedding_size=512: nn.Identity())


@pytest.mark.parametrize("name,size", [("iresnet_tiny", 112), ("iresnet_tiny", 56), ("mobilefacenet_tiny", 112),
                                       ("mobilefacenet_tiny", 56), ("mobilefacenet", 112), ("iresnet18", 112),
                                       ("vit_t", 56)])
def test_output_shape(name, size):
    torch.manual_seed(0)
    model = build_backbone(name, embedding_size=96, input_size=size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size) * 2 - 1)
    assert out.shape == (2, 96)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["iresnet50", "iresnet100", "iresnet200", "vit_s", "vit_b"])
def test_big_backbones_shape_on_meta_device(name):
    # The meta device checks shapes without allocating weights or computing anything.
    with torch.device("meta"):
        model = build_backbone(name, embedding_size=256).eval()
        assert model(torch.empty(2, 3, 112, 112)).shape == (2, 256)


def test_wrong_image_size_names_the_built_size():
    model = build_backbone("iresnet_tiny", input_size=56)
    with pytest.raises(ValueError, match=r"built for images \[B, 3, 56, 56\].*input_size=112"):
        model(torch.zeros(1, 3, 112, 112))


def _small_vit(**kw):
    return FaceViT(dim=48, depth=2, num_heads=2, embedding_size=32, input_size=56, **kw)


@pytest.mark.parametrize("name", ["iresnet_tiny", "mobilefacenet_tiny", "vit"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(name):
    torch.manual_seed(0)
    if name == "vit":  # the registered ViTs share this class; a 2-block one keeps the test fast
        plain, ckpt = _small_vit().train(), _small_vit(gradient_checkpointing=True).train()
    else:
        plain = build_backbone(name, embedding_size=32, input_size=56).train()
        ckpt = build_backbone(name, embedding_size=32, input_size=56, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    block, block_forward = ckpt.blocks[0], ckpt.blocks[0].forward

    def counting_forward(x):
        calls.append(1)
        return block_forward(x)

    block.forward = counting_forward
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    grads = []
    for model in (plain, ckpt):
        model(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert len(calls) == 2, "the checkpointed block should run again in backward"
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_count_flops_against_hand_count():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 5))
    conv_macs = 10 * 10 * 8 * (3 * 3 * 3)
    linear_macs = 800 * 5
    assert count_flops(model, input_size=10) == conv_macs + linear_macs
    assert count_parameters(model) == (8 * 27 + 8) + (800 * 5 + 5)


def test_iresnet50_matches_published_size():
    profile = profile_backbone("iresnet50")
    assert abs(profile.params - 43.6e6) / 43.6e6 < 0.005
    assert abs(profile.flops - 6.3e9) / 6.3e9 < 0.02


def test_mobilefacenet_matches_paper_size():
    # Chen et al. 2018: 0.99M parameters and 221M MAdds with a 128-d embedding.
    profile = profile_backbone("mobilefacenet", embedding_size=128)
    assert abs(profile.params - 0.99e6) / 0.99e6 < 0.02
    assert abs(profile.flops - 221e6) / 221e6 < 0.02


def test_docs_table_matches_the_code():
    documented = extract_table(DOCS.read_text())
    assert documented == markdown_table(default_profiles()), \
        "docs/backbones.md is stale: run python -m train.backbones.flops --write docs/backbones.md"
