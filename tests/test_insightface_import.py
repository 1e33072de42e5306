"""Importing arcface_torch weights: every listed network imports, computes the same function, and a
wrong backbone or a damaged file is one line naming the tensor or the file.

The arcface_torch side is an independent small re-implementation of its module layout (the
attribute names are what its state_dicts are made of), written here from its published
architecture, so the name mapping in train.insightface is checked against something it was
not derived from.
"""
from pathlib import Path

import pytest
import torch
from torch import nn

from train.export import load_embedding_model
from train.insightface import (
    build_imported,
    convert_state_dict,
    import_insightface,
    read_state_dict,
)

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- their IResNet layout
class TheirBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))


class TheirIResNet(nn.Module):
    def __init__(self, layers, num_features=512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        cin = 64
        for i, (n, c) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            blocks = [TheirBlock(cin, c, 2), *[TheirBlock(c, c, 1) for _ in range(n - 1)]]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = c
        self.bn2 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.dropout(torch.flatten(self.bn2(x), 1))))


# ----------------------------------------------------------------------------- their "mbf" layout
def conv_block(cin, cout, k, s, p, g=1, act=True):
    block = nn.Module()
    mods = [nn.Conv2d(cin, cout, k, s, p, groups=g, bias=False), nn.BatchNorm2d(cout)]
    block.layers = nn.Sequential(*mods, *([nn.PReLU(cout)] if act else []))
    block.forward = block.layers.forward
    return block


class DepthWise(nn.Module):
    def __init__(self, cin, cout, residual, stride, groups):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(conv_block(cin, groups, 1, 1, 0), conv_block(groups, groups, 3, stride, 1, groups),
                                    conv_block(groups, cout, 1, 1, 0, act=False))

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    def __init__(self, c, n, groups):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, 1, groups) for _ in range(n)])

    def forward(self, x):
        return self.layers(x)


class TheirMBF(nn.Module):
    def __init__(self, num_features=512):
        super().__init__()
        self.layers = nn.ModuleList([
            conv_block(3, 128, 3, 2, 1), conv_block(128, 128, 3, 1, 1, g=64),
            DepthWise(128, 128, False, 2, 128), Residual(128, 4, 128),
            DepthWise(128, 256, False, 2, 256), Residual(256, 6, 256),
            DepthWise(256, 256, False, 2, 512), Residual(256, 2, 256)])
        self.conv_sep = conv_block(256, 512, 1, 1, 0)
        self.features = nn.Module()
        self.features.layers = nn.Sequential(conv_block(512, 512, 7, 1, 0, g=512, act=False), nn.Flatten(),
                                             nn.Linear(512, num_features, bias=False), nn.BatchNorm1d(num_features))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features.layers(self.conv_sep(x))


# ----------------------------------------------------------------------------- their ViT layout
class TheirAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c))


class TheirViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TheirAttention(dim, heads)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(nn.functional.relu6(self.mlp.fc1(self.norm2(x))))


class TheirViT(nn.Module):
    def __init__(self, dim, depth, num_features=512):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 9, 9)
        self.pos_embed = nn.Parameter(torch.zeros(1, 144, dim))
        self.blocks = nn.ModuleList([TheirViTBlock(dim, 8) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(nn.Linear(dim * 144, dim, bias=False), nn.BatchNorm1d(dim, eps=2e-5),
                                     nn.Linear(dim, num_features, bias=False), nn.BatchNorm1d(num_features, eps=2e-5))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.feature(self.norm(x).reshape(x.shape[0], -1))


VITS = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l_dp005_mask_005": (768, 24),
        "vit_h": (1024, 48)}
LAYERS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3),
          "r200": (6, 26, 60, 6)}


def theirs(name, num_features=512):
    if name in VITS:
        return TheirViT(*VITS[name], num_features)
    return TheirMBF(num_features) if name == "mbf" else TheirIResNet(LAYERS[name], num_features)


def randomised(model, seed=0):
    """Random weights and BN statistics, so that every tensor matters to the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var") or name.endswith("weight") and t.dim() == 1 and "prelu" not in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                fan_in = t[0].numel() if t.dim() > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g) * (0.5 / fan_in ** 0.5 if t.dim() > 1 else 0.1))
    return model.eval()


# r18 and vit_t are imported with values below; r34 and r100 differ from r50/r200 only in block counts.
@pytest.mark.parametrize("name,ours", [("r50", "iresnet50"), ("r200", "iresnet200"), ("vit_s", "vit_s_insightface"),
                                       ("vit_b", "vit_b_insightface"), ("vit_l_dp005_mask_005", "vit_l_insightface"),
                                       ("vit_h", "vit_h_insightface")])
def test_every_listed_backbone_imports_by_names_and_shapes(name, ours):
    # Shapes only (the meta device allocates nothing): every name maps, every shape fits.
    with torch.device("meta"):
        state = theirs(name).state_dict()
    got, options, converted = convert_state_dict(state, name)
    assert got == ours and (options["embedding_size"], options["input_size"]) == (512, 112)
    assert len(converted) == len(state)


@pytest.mark.parametrize("name,alias,dim", [("r18", "iresnet18", 64), ("mbf", "mobilefacenet", 128),
                                            ("vit_t", "vit_t", 64)])
def test_imported_model_computes_their_function(tmp_path, name, alias, dim):
    torch.manual_seed(0)
    reference = randomised(theirs(name, dim))
    torch.save(reference.state_dict(), tmp_path / "backbone.pth")
    path, ours = import_insightface(tmp_path / "backbone.pth", alias, tmp_path / "model.pt")
    model = load_embedding_model(path)
    assert ours == model.backbone_name
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        want, got = reference(x), model(x)
    assert want.shape == (2, dim) and want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The comparison can fail: one tensor moved in the file changes the function.
    state = reference.state_dict()
    key = {"r18": "layer1.0.conv1.weight", "mbf": "conv_sep.layers.0.weight", "vit_t": "blocks.3.mlp.fc1.weight"}[name]
    state[key] = state[key] * 1.5
    changed = build_imported(state, name)[2]
    with torch.no_grad():
        assert (changed(x) - want).abs().max() > 1e-3


def test_ddp_prefixes_and_their_training_checkpoint_are_read(tmp_path):
    with torch.device("meta"):
        state = theirs("r18").state_dict()
    real = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in list(state.items())[:3]}
    torch.save({f"module.{k}": v for k, v in real.items()}, tmp_path / "ddp.pth")
    assert read_state_dict(tmp_path / "ddp.pth").keys() == real.keys()
    torch.save({"epoch": 3, "state_dict_backbone": real, "state_dict_softmax_fc": {}}, tmp_path / "ckpt.pt")
    assert read_state_dict(tmp_path / "ckpt.pt").keys() == real.keys()


def test_wrong_backbone_names_the_tensor():
    with torch.device("meta"):
        r50, r100 = theirs("r50").state_dict(), theirs("r100").state_dict()
    # r50's file as r100: r100's extra blocks are missing.
    with pytest.raises(ValueError, match=r"tensor 'layer2\.4\.bn1\.weight' \(our blocks\.7\.bn1\.weight.*is missing"):
        convert_state_dict(r50, "r100")
    # r100's file as r50: blocks r50 does not have are left over.
    with pytest.raises(ValueError, match=r"not part of insightface's r50, first 'layer2\.4\."):
        convert_state_dict(r100, "iresnet50")
    with pytest.raises(ValueError, match=r"not part of insightface's mbf, first 'conv1\.weight'"):
        convert_state_dict(r50, "mbf")


def test_wrong_shape_names_the_tensor():
    with torch.device("meta"):
        state = theirs("r34").state_dict()
    state["layer3.1.conv1.weight"] = torch.empty(256, 128, 3, 3, device="meta")
    with pytest.raises(ValueError, match=r"tensor 'layer3\.1\.conv1\.weight' has shape \[256, 128, 3, 3\].*"
                                         r"\[256, 256, 3, 3\]"):
        convert_state_dict(state, "r34")


def test_unsupported_and_unknown_names_say_why():
    with pytest.raises(ValueError, match="mbf_large cannot be imported: its stem"):
        convert_state_dict({}, "mbf_large")
    with pytest.raises(ValueError, match="unknown insightface backbone 'r51'"):
        convert_state_dict({}, "r51")


def test_damaged_files_name_the_file_or_the_tensor(tmp_path):
    torch.manual_seed(0)
    good = randomised(theirs("mbf", 64)).state_dict()
    torch.save(good, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pth cannot be read as a PyTorch state_dict.*truncated or corrupt"):
        read_state_dict(tmp_path / "cut.pth")
    partial = dict(list(good.items())[:-7])
    torch.save(partial, tmp_path / "partial.pth")
    missing = r"partial\.pth: tensor 'features\.layers\.\S+' \(our .*\) is missing \(7 in all\)"
    with pytest.raises(ValueError, match=missing):
        import_insightface(tmp_path / "partial.pth", "mbf", tmp_path / "out.pt")
    nan = dict(good)
    nan["conv_sep.layers.0.weight"] = nan["conv_sep.layers.0.weight"].clone().fill_(float("nan"))
    torch.save(nan, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"tensor 'conv_sep\.layers\.0\.weight' holds non-finite values"):
        import_insightface(tmp_path / "nan.pth", "mbf", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_cli_import_is_one_command_and_one_line_on_error(tmp_path, capsys):
    from launch.cli import main
    torch.manual_seed(0)
    torch.save(randomised(theirs("mbf", 64)).state_dict(), tmp_path / "backbone.pth")
    args = ["import", "insightface", str(tmp_path / "backbone.pth"), "--out", str(tmp_path / "model.pt")]
    assert main(args + ["--backbone", "mbf"]) == 0
    assert "model.backbone=mobilefacenet_mbf" in capsys.readouterr().out
    assert load_embedding_model(tmp_path / "model.pt").config["embedding_size"] == 64
    from launch.model_commands import export_model
    export_model(tmp_path / "model.pt", tmp_path / "model.onnx")  # `shardface export` takes it (parity checked)
    assert main(args + ["--backbone", "r50"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardface: error:") and "insightface's r50" in lines[0], lines
