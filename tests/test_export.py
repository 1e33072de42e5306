"""Export: ONNX parity (dynamic batch), embedding-only export round trip, embedding a folder."""
import os

import numpy as np
import pytest
import torch
from torch import nn

from train.backbones import build_backbone
from train.export import (
    check_onnx_parity,
    embed_folder,
    export_embedding_model,
    export_onnx,
    load_embedding_model,
    unwrap,
)


def trained_looking(name, **kw):
    """A backbone whose BN statistics are random, so that its outputs are O(1) and parity is meaningful."""
    torch.manual_seed(0)
    model = build_backbone(name, **kw)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("name", ["iresnet_tiny", "mobilefacenet_tiny"])
def test_onnx_parity_with_dynamic_batch(tmp_path, name):
    import onnx

    model = trained_looking(name, embedding_size=64)
    path = export_onnx(model, tmp_path / f"{name}.onnx", image_size=112)
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    with torch.no_grad():
        assert model(torch.rand(2, 3, 112, 112) * 2 - 1).abs().mean() > 0.1
    assert check_onnx_parity(model, path, batch_sizes=(1, 3)) < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.onnx"], "no temporary files left behind"
    # The check can fail: change the PyTorch weights after exporting.
    with torch.no_grad():
        model.features.bias.add_(0.01)
    with pytest.raises(RuntimeError, match="differs from PyTorch by up to"):
        check_onnx_parity(model, path)


def test_embedding_export_round_trip(tmp_path):
    model = trained_looking("iresnet_tiny", embedding_size=32, input_size=56)
    config = {"embedding_size": 32, "input_size": 56}
    path = export_embedding_model(model, "iresnet_tiny", config, tmp_path / "export" / "model.pt")
    loaded = load_embedding_model(path)
    assert (loaded.backbone_name, loaded.image_size, loaded.config) == ("iresnet_tiny", 56, config)
    assert not loaded.training
    x = torch.rand(3, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert os.listdir(tmp_path / "export") == ["model.pt"]


def test_embedding_export_refuses_a_config_that_cannot_rebuild(tmp_path):
    model = build_backbone("iresnet_tiny", embedding_size=32, input_size=56)
    with pytest.raises(ValueError, match="do not fit build_backbone"):
        export_embedding_model(model, "iresnet_tiny", {"embedding_size": 32}, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a shardface embedding model"):
        load_embedding_model(tmp_path / "other.pt")


def test_a_bf16_backbone_exports_from_a_float32_copy(tmp_path):
    model = trained_looking("mobilefacenet_tiny", embedding_size=16, input_size=56).to(torch.bfloat16)
    path = export_onnx(model, tmp_path / "bf16.onnx", image_size=56)
    assert check_onnx_parity(model, path, batch_sizes=(2,)) < 1e-4
    assert next(model.parameters()).dtype == torch.bfloat16, "the backbone itself is left as it was"


def test_wrappers_are_unwrapped():
    inner = nn.Linear(2, 2)
    wrapper = nn.Module()
    wrapper.module = inner
    assert unwrap(wrapper) is inner


def _write_images(root, rng):
    from PIL import Image

    paths = ["b/2.png", "a/1.png", "a/3.jpg", "c.png"]
    for rel in paths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        side = 56 if rel != "c.png" else 64  # one image needs resizing
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / rel, quality=95)
    (root / "notes.txt").write_text("not an image")
    return sorted(paths)


def test_embed_folder_matches_a_direct_computation(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "faces"
    names = _write_images(folder, rng)
    model = trained_looking("mobilefacenet_tiny", embedding_size=16, input_size=56)
    seen = []
    npy, txt = embed_folder(model, folder, tmp_path / "out" / "emb.npy", batch_size=3,
                            progress=lambda done, total: seen.append((done, total)))
    assert txt.read_text().splitlines() == names
    assert seen == [(3, 4), (4, 4)]
    emb = np.load(npy)
    assert emb.shape == (4, 16) and emb.dtype == np.float32
    for row, rel in zip(emb, names):
        img = Image.open(folder / rel).convert("RGB").resize((56, 56), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            ref = (model(x) + model(x.flip(3)))[0].double().numpy()
        np.testing.assert_allclose(row, ref / np.linalg.norm(ref), atol=1e-5)


def test_embed_folder_names_an_undecodable_image(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    model = build_backbone("iresnet_tiny", embedding_size=8, input_size=56)
    with pytest.raises(ValueError, match="cannot decode image .*broken.jpg"):
        embed_folder(model, tmp_path, tmp_path / "emb.npy", progress=None)
    with pytest.raises(ValueError, match="missing is not a folder"):
        embed_folder(model, tmp_path / "missing", tmp_path / "emb.npy", progress=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        embed_folder(model, tmp_path / "empty", tmp_path / "emb.npy", progress=None)
