"""Generator states that a checkpoint can carry from one kind of device to another.

A CPU generator is a Mersenne Twister (a 5056-byte state); a CUDA generator is Philox
(16 bytes: seed and offset).  Neither state can be set into the other kind of generator,
and their streams differ anyway, so a resume on another kind of device cannot continue
the same random numbers.  What it can do is restart deterministically: the new generator
is seeded from a hash of the saved state, so resuming the same checkpoint twice gives the
same stream, and the stream differs from the one a fresh run would draw.  On the same kind
of device (any index: cuda:3 to cuda:0) the state is restored exactly.
"""
from __future__ import annotations

import hashlib
from typing import Any, Union

import torch

SavedState = Union[dict, torch.Tensor]


def portable_state(gen: torch.Generator) -> dict:
    """The generator's state with the kind of device it belongs to (CPU tensors only)."""
    return {"device_type": gen.device.type, "state": gen.get_state().detach().cpu().clone()}


def derived_seed(state: torch.Tensor) -> int:
    """A seed (63 bits) that depends only on the bytes of a saved generator state."""
    raw = bytes(state.detach().cpu().contiguous().view(torch.uint8).tolist())  # no NumPy needed
    return int.from_bytes(hashlib.sha256(raw).digest()[:8], "little") & ((1 << 63) - 1)


def _saved_kind(saved: SavedState, target_state: torch.Tensor, target_kind: str) -> tuple[str, torch.Tensor]:
    if not isinstance(saved, dict):
        if not torch.is_tensor(saved):
            raise ValueError(f"a saved generator state must be a tensor or a dict with 'state', "
                             f"got {type(saved).__name__}")
        # An older checkpoint stored the bare state: its size tells the kind of generator.
        same = saved.numel() == target_state.numel()
        return (target_kind if same else "other"), saved
    if "state" not in saved:
        raise ValueError(f"a saved generator state must be a tensor or a dict with 'state', got {type(saved).__name__}")
    return str(saved.get("device_type", target_kind)), saved["state"]


def restore_state(gen: Any, saved: SavedState) -> bool:
    """Put a state saved by :func:`portable_state` (or a bare state tensor) into ``gen``.

    Returns True when the stream continues exactly, False when ``gen`` was re-seeded
    deterministically because the state came from another kind of device.
    """
    current = gen.get_state()
    kind, state = _saved_kind(saved, current, gen.device.type)
    if kind == gen.device.type and state.numel() == current.numel():
        gen.set_state(state.detach().cpu().to(current.dtype))
        return True
    gen.manual_seed(derived_seed(state))
    return False


__all__ = ["portable_state", "restore_state", "derived_seed"]
