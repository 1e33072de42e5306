"""Importing insightface arcface_torch backbone weights (``backbone.pth``) as a shardface embedding model.

arcface_torch's IResNets compute the same function as ours, its "mbf" the same as our
``mobilefacenet_mbf`` and its ViTs the same as our ``vit_*_insightface``; only the parameter
names differ (the ViTs share theirs).  The mapping is derived from our own
model's structure: every tensor of our backbone is given the name it has in arcface_torch, and
the file must hold exactly those names with exactly our shapes (nothing missing, nothing left
over).  The result is written with :func:`train.export.export_embedding_model`, so ``shardface
eval/export/embed`` and ``model.init_from`` take it like a model we trained.

What has no counterpart here is listed in :data:`NOT_IMPORTABLE` with the reason.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .backbones import build_backbone
from .backbones.iresnet import IResNet

INPUT_SIZE = 112  # arcface_torch's backbones are built for 112x112 faces only


@dataclass(frozen=True)
class Correspondence:
    """One arcface_torch network and the backbone of ours that computes the same function."""

    theirs: str
    """arcface_torch's ``get_model`` name (``config.network``)."""
    ours: str
    """Our registered backbone name."""
    their_name: Callable[[str, torch.nn.Module], str]
    """Maps one of our state_dict names (of the built model) to arcface_torch's."""
    embedding_tensor: str
    """arcface_torch's name of a tensor whose length is the embedding size."""
    options: tuple[tuple[str, float], ...] = ()
    """Builder options of ours that reproduce their variant (training-time regularisation only)."""


# ----------------------------------------------------------------------------- IResNet
def _iresnet_name(ours: str, model: torch.nn.Module) -> str:
    """stem.0/1/2 → conv1/bn1/prelu; blocks.j → layer{stage}.{index}; bn2, fc, features keep their names."""
    stem = {"stem.0.": "conv1.", "stem.1.": "bn1.", "stem.2.": "prelu."}
    for prefix, theirs in stem.items():
        if ours.startswith(prefix):
            return theirs + ours[len(prefix):]
    match = re.match(r"blocks\.(\d+)\.(.*)", ours)
    if match is None:
        return ours
    block, rest = int(match.group(1)), match.group(2)
    assert isinstance(model, IResNet)
    for stage, (start, count) in enumerate(_stage_spans(model), start=1):
        if block < start + count:
            return f"layer{stage}.{block - start}.{rest}"
    raise ValueError(f"block {block} is beyond the model's stages")


def _stage_spans(model: IResNet) -> list[tuple[int, int]]:
    """(first block index, block count) of each stage: a stage starts with its strided block."""
    starts = [i for i, b in enumerate(model.blocks) if b.conv2.stride != (1, 1)]
    ends = starts[1:] + [len(model.blocks)]
    return [(s, e - s) for s, e in zip(starts, ends)]


# ----------------------------------------------------------------------------- MobileFaceNet ("mbf")
# arcface_torch's mbf (blocks 1-4-6-2): layers.0/1 are the stem, then strided DepthWise blocks
# (layers.2/4/6) alternate with Residual groups (layers.3/5/7) of 4, 6 and 2 blocks.
_MBF_BLOCKS = ["layers.2"] + [f"layers.3.layers.{r}" for r in range(4)] + ["layers.4"] + \
              [f"layers.5.layers.{r}" for r in range(6)] + ["layers.6"] + [f"layers.7.layers.{r}" for r in range(2)]


def _mbf_name(ours: str, model: torch.nn.Module) -> str:
    """Our MobileFaceNet names → arcface_torch's (ConvBlock/LinearBlock wrap their Sequential in ``.layers``)."""
    rules = [(r"stem\.(\d)\.(\d)\.(.*)", lambda m: f"layers.{m[1]}.layers.{m[2]}.{m[3]}"),
             (r"blocks\.(\d+)\.body\.(\d)\.(\d)\.(.*)",
              lambda m: f"{_MBF_BLOCKS[int(m[1])]}.layers.{m[2]}.layers.{m[3]}.{m[4]}"),
             (r"conv_head\.(\d)\.(.*)", lambda m: f"conv_sep.layers.{m[1]}.{m[2]}"),
             (r"gdc\.(\d)\.(.*)", lambda m: f"features.layers.0.layers.{m[1]}.{m[2]}"),
             (r"embed\.weight", lambda m: "features.layers.2.weight"),  # their Linear, our conv1x1
             (r"features\.(.*)", lambda m: f"features.layers.3.{m[1]}")]
    for pattern, rename in rules:
        match = re.fullmatch(pattern, ours)
        if match is not None:
            return rename(match)
    raise ValueError(f"no arcface_torch name for {ours}")


def _same_name(ours: str, model: torch.nn.Module) -> str:
    """Our arcface_torch-layout ViTs use their module names."""
    return ours


def _vit(theirs: str, ours: str, drop_path_rate: float, mask_ratio: float) -> Correspondence:
    return Correspondence(theirs, ours, _same_name, "feature.3.running_mean",
                          (("drop_path_rate", drop_path_rate), ("mask_ratio", mask_ratio)))


# arcface_torch's get_model names of its ViTs and their regularisation settings.
_VITS = [("vit_t", "vit_t_insightface", 0.1, 0.1), ("vit_t_dp005_mask0", "vit_t_insightface", 0.05, 0.0),
         ("vit_s", "vit_s_insightface", 0.1, 0.1), ("vit_s_dp005_mask_0", "vit_s_insightface", 0.05, 0.0),
         ("vit_b", "vit_b_insightface", 0.1, 0.1), ("vit_b_dp005_mask_005", "vit_b_insightface", 0.05, 0.05),
         ("vit_l_dp005_mask_005", "vit_l_insightface", 0.05, 0.05), ("vit_h", "vit_h_insightface", 0.1, 0.0)]

CORRESPONDENCES: dict[str, Correspondence] = {
    **{f"r{d}": Correspondence(f"r{d}", f"iresnet{d}", _iresnet_name, "features.running_mean")
       for d in (18, 34, 50, 100, 200)},
    "mbf": Correspondence("mbf", "mobilefacenet_mbf", _mbf_name, "features.layers.3.running_mean"),
    **{theirs: _vit(theirs, ours, dp, mask) for theirs, ours, dp, mask in _VITS},
}
ALIASES = {**{f"iresnet{d}": f"r{d}" for d in (18, 34, 50, 100, 200)},
           "mobilefacenet": "mbf", "mobilefacenet_mbf": "mbf",
           "vit_t_insightface": "vit_t", "vit_s_insightface": "vit_s", "vit_b_insightface": "vit_b",
           "vit_l_insightface": "vit_l_dp005_mask_005", "vit_l": "vit_l_dp005_mask_005",
           "vit_h_insightface": "vit_h"}

NOT_IMPORTABLE: dict[str, str] = {
    "mbf_large": "its stem ends in two residual blocks instead of a grouped conv, and its residual blocks narrow "
                 "to half their width inside; no backbone of ours has that layout",
    "r2060": "IResNet-2060 (blocks 3-128-896-3, a scale experiment) is not registered here; build it with "
             "train.backbones.iresnet.IResNet((3, 128, 896, 3)) if you need it",
}


def correspondence(name: str) -> Correspondence:
    """The arcface_torch network called ``name`` (theirs: r50, mbf; or ours: iresnet50, mobilefacenet_mbf)."""
    key = ALIASES.get(name, name)
    if key in CORRESPONDENCES:
        return CORRESPONDENCES[key]
    if key in NOT_IMPORTABLE:
        raise ValueError(f"insightface's {name} cannot be imported: {NOT_IMPORTABLE[key]}")
    choices = ", ".join(list(CORRESPONDENCES) + list(ALIASES))
    raise ValueError(f"unknown insightface backbone {name!r}: choose one of {choices}")


def their_names(model: torch.nn.Module, corr: Correspondence) -> dict[str, str]:
    """arcface_torch's name → our name, for every tensor of our built ``model``."""
    table = {corr.their_name(k, model): k for k in model.state_dict()}
    if len(table) != len(model.state_dict()):
        raise AssertionError("two of our tensors map onto one arcface_torch name")
    return table


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone tensors of an arcface_torch file: ``backbone.pth`` (a state_dict), a DDP
    state_dict (``module.`` prefixes) or a training checkpoint (``state_dict_backbone``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no insightface weights at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} cannot be read as a PyTorch state_dict ({reason}): the file is truncated "
                         "or corrupt; download it again") from err
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict_backbone"), Mapping):
        payload = payload["state_dict_backbone"]
    if not isinstance(payload, Mapping) or not payload:
        raise ValueError(f"{path} holds a {type(payload).__name__}, not a state_dict of tensors: pass "
                         "arcface_torch's backbone.pth")
    bad = [k for k, v in payload.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entry {bad[0]!r} is not a tensor: pass arcface_torch's backbone.pth")
    if all(k.startswith("module.") for k in payload):
        payload = {k[len("module."):]: v for k, v in payload.items()}
    return dict(payload)


def _fits(theirs: torch.Size, ours: torch.Size) -> bool:
    """Same shape, or ours with trailing 1s (their Linear is our 1x1 convolution)."""
    return tuple(theirs) == tuple(ours) or tuple(ours) == tuple(theirs) + (1,) * (len(ours) - len(theirs))


def convert_state_dict(state: Mapping[str, torch.Tensor], name: str,
                       source: str = "the file") -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(our backbone name, its build options, our state_dict) for arcface_torch tensors ``state``.

    Every tensor must be present with the shape of our model and nothing may be left over;
    otherwise one line names the first tensor that is wrong.
    """
    corr = correspondence(name)
    length = state.get(corr.embedding_tensor)
    embedding_size = int(length.shape[0]) if length is not None and length.dim() == 1 else 512
    options: dict[str, Any] = {"embedding_size": embedding_size, "input_size": INPUT_SIZE, **dict(corr.options)}
    with torch.device("meta"):
        model = build_backbone(corr.ours, **options)
    table = their_names(model, corr)
    expected = model.state_dict()
    extra = [k for k in state if k not in table]
    missing = [k for k in table if k not in state]
    hint = f"is --backbone {name} right, and is the file complete?"
    if extra:
        where = f"{len(extra)} tensor(s) are not part of insightface's {corr.theirs}"
        raise ValueError(f"{source}: {where}, first {extra[0]!r} {list(state[extra[0]].shape)}"
                         f"{f' ({len(missing)} expected ones are missing)' if missing else ''}: {hint}")
    if missing:
        ours = table[missing[0]]
        raise ValueError(f"{source}: tensor {missing[0]!r} (our {ours}, shape {list(expected[ours].shape)}) is missing"
                         f"{f' ({len(missing)} in all)' if len(missing) > 1 else ''}: {hint}")
    converted: dict[str, torch.Tensor] = {}
    for theirs, ours in table.items():
        tensor, want = state[theirs], expected[ours]
        if not _fits(tensor.shape, want.shape):
            raise ValueError(f"{source}: tensor {theirs!r} has shape {list(tensor.shape)} but insightface's "
                             f"{corr.theirs} (embedding {embedding_size}) has {list(want.shape)} there: {hint}")
        if tensor.is_floating_point() != want.is_floating_point():
            raise ValueError(f"{source}: tensor {theirs!r} is {tensor.dtype}, expected {want.dtype}: {hint}")
        value = tensor.reshape(want.shape).to(want.dtype).clone()
        if value.is_floating_point() and not value.is_meta and not torch.isfinite(value).all():
            raise ValueError(f"{source}: tensor {theirs!r} holds non-finite values: the file is corrupt")
        converted[ours] = value
    return corr.ours, options, converted


def build_imported(state: Mapping[str, torch.Tensor], name: str,
                   source: str = "the file") -> tuple[str, dict, torch.nn.Module]:
    """(our backbone name, build options, our backbone in eval mode holding arcface_torch's tensors)."""
    ours, options, converted = convert_state_dict(state, name, source)
    model = build_backbone(ours, **options)
    model.load_state_dict(converted, strict=True)
    return ours, options, model.eval()


def import_insightface(weights: str | Path, name: str, out: str | Path) -> tuple[Path, str]:
    """Convert arcface_torch's ``weights`` of network ``name`` into an embedding model file ``out``.

    Returns (path written, our backbone name).
    """
    from .export import export_embedding_model
    state = read_state_dict(weights)
    ours, options, model = build_imported(state, name, source=str(weights))
    return export_embedding_model(model, ours, options, out), ours
