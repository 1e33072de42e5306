"""Starting a backbone from an embedding model file (``model.init_from``): fine-tuning.

The file is one written by :func:`train.export.export_embedding_model` (a run's ``model.pt``,
or ``shardface import insightface``).  Only the backbone is taken; the classifier, optimiser
and schedule start fresh.  The file's backbone must be the one the config builds, tensor for
tensor, or one line names the first difference.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config_parse import ConfigError


def load_init_weights(module: nn.Module, path: str | Path, backbone: str) -> None:
    """Copy the backbone weights of the embedding model file ``path`` into ``module`` (built as ``backbone``)."""
    from .export import FORMAT
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    key = f"model.init_from={str(path)!r}"
    if not p.is_file():
        raise ConfigError(f"{key}: no such file (give a model.pt written by training, export or "
                          "`shardface import insightface`)")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{key}: the file cannot be read ({reason}): it is truncated or not a model.pt") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{key} is not an embedding model file (a training checkpoint resumes with "
                          "checkpoint.resume instead)")
    if payload.get("backbone") != backbone:
        raise ConfigError(f"{key} holds a {payload.get('backbone')!r} backbone but model.backbone={backbone!r}: "
                          f"set model.backbone={payload.get('backbone')}")
    state, expected = payload["state_dict"], module.state_dict()
    for name, want in expected.items():
        got = state.get(name)
        if got is None:
            raise ConfigError(f"{key} has no tensor {name!r}: it was written by another version of {backbone}")
        if got.shape != want.shape:
            raise ConfigError(f"{key}: tensor {name!r} has shape {list(got.shape)} but this run's {backbone} has "
                              f"{list(want.shape)} (file built with {payload.get('config')}): match "
                              "model.embedding_size and data.image_size to the file")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ConfigError(f"{key} has tensor {extra[0]!r} that this run's {backbone} lacks")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name])
