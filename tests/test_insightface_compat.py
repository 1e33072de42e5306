"""Working where insightface users expect: the IResNet head as arcface_torch's, fine-tuning from an
embedding model file (model.init_from), the effective learning rate stated at start, and our ONNX
export used the way insightface's ArcFaceONNX uses its recognition models."""
import numpy as np
import pytest
import torch
from torch import nn

from train.backbones import build_backbone
from train.config_parse import ConfigError
from train.distributed import init_distributed
from train.export import export_embedding_model
from train.trainer import Trainer
from train_fixtures import IMAGE, SplitLoader, tiny_config


def randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
    return model


# ----------------------------------------------------------------------------- the IResNet head
def test_iresnet_feature_scale_is_fixed_at_one_and_not_trained():
    torch.manual_seed(0)
    model = build_backbone("iresnet_tiny", embedding_size=16, input_size=16).train()
    assert not model.features.weight.requires_grad and torch.equal(model.features.weight, torch.ones(16))
    model(torch.rand(4, 3, 16, 16)).square().sum().backward()
    assert model.features.weight.grad is None and model.fc.weight.grad is not None
    trained = build_backbone("iresnet_tiny", embedding_size=16, input_size=16, train_feature_scale=True)
    assert trained.features.weight.requires_grad


def test_iresnet_fc_and_features_run_in_fp32_under_autocast():
    torch.manual_seed(0)
    seen = {}
    for fp32_head in (True, False):
        model = randomise_bn(build_backbone("iresnet_tiny", embedding_size=16, input_size=16,
                                            fp32_head=fp32_head)).eval()
        model.fc.register_forward_hook(
            lambda m, args, out, key=fp32_head: seen.__setitem__(key, (args[0].dtype, out.dtype)))
        x = torch.rand(3, 3, 16, 16) * 2 - 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == (torch.float32 if fp32_head else torch.bfloat16)
    assert seen[True] == (torch.float32, torch.float32) and seen[False][1] == torch.bfloat16
    # Without autocast nothing changes: the head is the same computation as before.
    with torch.no_grad():
        trunk = torch.flatten(model.bn2(model.blocks(model.stem(x))), 1)
        torch.testing.assert_close(model(x), model.features(model.fc(trunk)), rtol=0, atol=0)


# ----------------------------------------------------------------------------- model.init_from
def _source_model(tmp_path, embedding=16):
    torch.manual_seed(3)
    model = randomise_bn(build_backbone("iresnet_tiny", embedding_size=embedding, input_size=IMAGE))
    config = {"embedding_size": embedding, "input_size": IMAGE}
    return model, export_embedding_model(model, "iresnet_tiny", config, tmp_path / "src" / "model.pt")


def _trainer(tmp_path, *overrides):
    cfg = tiny_config(tmp_path / "run", "model.backbone=iresnet_tiny", *overrides)
    return Trainer(cfg, init_distributed(device="cpu"), loader=SplitLoader())


def test_init_from_starts_the_backbone_from_the_file(tmp_path):
    source, path = _source_model(tmp_path)
    trainer = _trainer(tmp_path, f"model.init_from={path}")
    with trainer.runner.full_parameters() as module:
        got = module.state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(got[name], tensor), name
    fresh = _trainer(tmp_path)  # the comparison can fail: without init_from the weights differ
    with fresh.runner.full_parameters() as module:
        assert not torch.equal(module.state_dict()["fc.weight"], source.state_dict()["fc.weight"])
    trainer.fit()  # and it trains from there


def test_init_from_mismatches_are_one_line(tmp_path):
    _, path = _source_model(tmp_path)
    with pytest.raises(ConfigError, match=r"tensor 'fc\.weight' has shape \[16, 128\] but this run's iresnet_tiny "
                                          r"has \[32, 128\].*model\.embedding_size"):
        _trainer(tmp_path, f"model.init_from={path}", "model.embedding_size=32")
    with pytest.raises(ConfigError, match=r"holds a 'iresnet_tiny' backbone but model\.backbone='mobilefacenet_tiny'"):
        cfg = tiny_config(tmp_path / "run", "model.backbone=mobilefacenet_tiny", f"model.init_from={path}")
        Trainer(cfg, init_distributed(device="cpu"), loader=SplitLoader())
    with pytest.raises(ConfigError, match="no such file"):
        _trainer(tmp_path, f"model.init_from={tmp_path / 'nope.pt'}")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=r"cut\.pt.*cannot be read"):
        _trainer(tmp_path, f"model.init_from={tmp_path / 'cut.pt'}")


def test_effective_learning_rate_is_stated_at_start(tmp_path):
    scaled = _trainer(tmp_path, "optim.reference_batch=16", "optim.lr=0.2")
    assert scaled.lr == pytest.approx(0.2 * 4 / 16)
    assert "lr 0.05 backbone" in scaled._describe()
    assert "effective lr = optim.lr 0.2 x samples/step 4 / optim.reference_batch 16" in scaled._describe()
    assert "no batch scaling" in _trainer(tmp_path)._describe()


# ----------------------------------------------------------------------------- insightface's ONNX use
def _insightface_input_convention(onnx_path, session):
    """What insightface's ArcFaceONNX derives from a recognition model: mean/std, input size, outputs.

    It takes a graph whose first 8 nodes include both a Sub and a Mul for an MXNet model that
    normalises inside (mean 0, std 1); any other model gets mean = std = 127.5.
    """
    import onnx
    nodes = onnx.load(str(onnx_path)).graph.node[:8]
    sub = any(n.name.startswith(("Sub", "_minus")) for n in nodes)
    mul = any(n.name.startswith(("Mul", "_mul")) for n in nodes)
    mean, std = (0.0, 1.0) if sub and mul else (127.5, 127.5)
    shape = session.get_inputs()[0].shape
    return mean, std, tuple(shape[2:4][::-1]), shape, [o.name for o in session.get_outputs()]


def _blob_from_bgr(images_bgr, scale, size, mean):
    """cv2.dnn.blobFromImages(images, scale, size, (mean,)*3, swapRB=True) for images already of ``size``."""
    try:
        import cv2
        return cv2.dnn.blobFromImages(images_bgr, scale, size, (mean, mean, mean), swapRB=True)
    except ImportError:  # the same arithmetic: swap to RGB, subtract the mean, multiply by the scale, NCHW
        stack = np.stack([img[:, :, ::-1] for img in images_bgr]).astype(np.float32)
        return np.ascontiguousarray(((stack - np.float32(mean)) * np.float32(scale)).transpose(0, 3, 1, 2))


def test_exported_onnx_works_as_insightface_uses_it(tmp_path):
    import onnxruntime
    from PIL import Image

    from launch.model_commands import embed_images, export_model

    torch.manual_seed(0)
    model = randomise_bn(build_backbone("iresnet_tiny", embedding_size=64, input_size=112))
    export_embedding_model(model, "iresnet_tiny", {"embedding_size": 64, "input_size": 112},
                           tmp_path / "model.pt")
    onnx_path = export_model(tmp_path / "model.pt", tmp_path / "model.onnx", check=False)
    folder = tmp_path / "faces"
    folder.mkdir()
    rng = np.random.default_rng(0)
    # Noise over a left-to-right ramp, different per channel: mirroring and channel order both matter.
    ramp = np.linspace(0, 200, 112)[None, :, None] * np.array([1.0, 0.3, -0.5]) + np.array([0, 60, 120])
    rgb = [np.clip(ramp + rng.normal(0, 30, (112, 112, 3)), 0, 255).astype(np.uint8) for _ in range(3)]
    for i, img in enumerate(rgb):
        Image.fromarray(img).save(folder / f"{i}.png")
    embed_images(tmp_path / "model.pt", folder, tmp_path / "plain.npy", flip=False)
    embed_images(tmp_path / "model.pt", folder, tmp_path / "flip.npy")

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    mean, std, size, shape, outputs = _insightface_input_convention(onnx_path, session)
    assert (mean, std, size, len(outputs)) == (127.5, 127.5, (112, 112), 1)
    assert shape[1:] == [3, 112, 112] and isinstance(shape[0], str), shape  # dynamic batch
    bgr = [np.asarray(Image.open(folder / f"{i}.png"))[:, :, ::-1] for i in range(3)]  # cv2.imread's order
    blob = _blob_from_bgr(bgr, 1.0 / std, size, mean)
    assert blob.shape == (3, 3, 112, 112) and blob.dtype == np.float32
    (feat,) = session.run(outputs, {session.get_inputs()[0].name: blob})
    (single,) = session.run(outputs, {session.get_inputs()[0].name: blob[:1]})
    np.testing.assert_allclose(single, feat[:1], rtol=1e-4, atol=1e-5)
    assert feat.shape == (3, 64) and np.abs(feat).mean() > 0.1

    def normalised(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    plain, flipped = np.load(tmp_path / "plain.npy"), np.load(tmp_path / "flip.npy")
    np.testing.assert_allclose(plain, normalised(feat), rtol=0, atol=2e-5)
    (mirror,) = session.run(outputs, {session.get_inputs()[0].name: np.ascontiguousarray(blob[..., ::-1])})
    np.testing.assert_allclose(flipped, normalised(feat + mirror), rtol=0, atol=2e-5)
    assert np.abs(plain - flipped).max() > 1e-3  # the two comparisons are not the same one
    swapped = _blob_from_bgr([img[:, :, ::-1] for img in bgr], 1.0 / std, size, mean)  # RGB fed as BGR
    (wrong,) = session.run(outputs, {session.get_inputs()[0].name: swapped})
    assert np.abs(normalised(wrong) - plain).max() > 1e-3  # the channel order is checked too


# ----------------------------------------------------------------------------- arcface_torch-layout ViT training
def test_insightface_vit_masks_tokens_and_drops_paths_only_in_training():
    from train.backbones.vit_insightface import InsightfaceViT
    torch.manual_seed(0)
    model = InsightfaceViT(dim=32, depth=2, num_heads=4, embedding_size=16, drop_path_rate=0.5, mask_ratio=0.25)
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    seen = []
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # eval is deterministic: no masking, no dropped paths
    model.train()
    out = model(x)
    assert seen == [144, 144, 108]  # 144 tokens in eval, 75 % of them in training
    out[:, 0].pow(3).sum().backward()
    assert model.mask_token.grad.abs().sum() > 0  # the mask token is learned
    unmasked = InsightfaceViT(dim=32, depth=2, num_heads=4, embedding_size=16, mask_ratio=0.0)
    assert not unmasked.mask_token.requires_grad  # never used, so not a parameter DDP waits for
    # Stochastic depth: a sample's branch is dropped whole or kept scaled by 1 / keep.
    block = model.blocks[1].train()
    assert block.drop_path == 0.5 and model.blocks[0].drop_path == 0.0
    branch = torch.ones(64, 3, 5)
    dropped = block._dropped(branch)
    per_sample = dropped.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0} and (per_sample == per_sample[:, :1]).all()
    assert torch.equal(block.eval()._dropped(branch), branch)
