"""Parameter and FLOP counts of the backbones, and the table in docs/backbones.md.

FLOPs are multiply-accumulates of convolutions, linear layers and attention matmuls, each
counted once (the convention of face-recognition papers, where IResNet-50 is "6.3 GFLOPs");
norms, activations and additions are not counted.  Models are built and run on the ``meta``
device, so even IResNet-200 is counted in a fraction of a second without allocating weights.

    python -m train.backbones.flops --markdown            # print the table
    python -m train.backbones.flops --write docs/backbones.md
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .registry import build_backbone, list_backbones

TABLE_START = "<!-- backbone-table:start (python -m train.backbones.flops --write docs/backbones.md) -->"
TABLE_END = "<!-- backbone-table:end -->"
SMALL_INPUT_BACKBONES = ("iresnet_tiny", "mobilefacenet_tiny")


@dataclass(frozen=True)
class BackboneProfile:
    """Size and cost of one backbone configuration."""

    name: str
    input_size: int
    embedding_size: int
    params: int
    flops: int

    def row(self) -> str:
        """This profile as a markdown table row."""
        return (f"| {self.name} | {self.input_size} | {self.embedding_size} | {self.params / 1e6:.2f} "
                f"| {self.flops / 1e9:.3f} |")


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: int = 112) -> int:
    """Multiply-accumulates per image of conv/linear/matmul ops in one forward of ``model`` (eval mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batch = 2  # BatchNorm1d and squeeze-like reshapes behave the same at 2 as at any batch
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(batch, 3, input_size, input_size, device=device))
    finally:
        model.train(was_training)
    # FlopCounterMode counts 2 FLOPs per multiply-accumulate.
    return counter.get_total_flops() // (2 * batch)


def profile_backbone(name: str, input_size: int = 112, embedding_size: int = 512) -> BackboneProfile:
    """Parameters and FLOPs of the registered backbone ``name``, built on the meta device."""
    with torch.device("meta"):
        model = build_backbone(name, embedding_size=embedding_size, input_size=input_size)
        flops = count_flops(model, input_size)
    return BackboneProfile(name, input_size, embedding_size, count_parameters(model), flops)


def default_profiles() -> list[BackboneProfile]:
    """Every registered backbone at 112×112, and the CPU variants at 56×56 too (embedding 512)."""
    profiles = [profile_backbone(name) for name in list_backbones()]
    profiles += [profile_backbone(name, input_size=56) for name in SMALL_INPUT_BACKBONES]
    return profiles


def markdown_table(profiles: Iterable[BackboneProfile]) -> str:
    """Markdown table of params (millions) and GFLOPs per image."""
    lines = ["| backbone | input | embedding | params (M) | GFLOPs / image |", "|---|---|---|---|---|"]
    lines += [p.row() for p in profiles]
    return "\n".join(lines)


def replace_table(text: str, table: str) -> str:
    """``text`` with the part between the table markers replaced by ``table``."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {TABLE_START!r} and {TABLE_END!r} are missing or out of order: "
                         f"add them where the table should go")
    return text[: start + len(TABLE_START)] + "\n" + table + "\n" + text[end:]


def extract_table(text: str) -> str:
    """The table between the markers of a document (stripped)."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"no backbone table markers found (expected {TABLE_START!r} … {TABLE_END!r})")
    return text[start + len(TABLE_START): end].strip()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the table, or rewrite it inside a markdown file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the markdown table")
    parser.add_argument("--write", metavar="PATH", help="replace the table between the markers in PATH")
    args = parser.parse_args(argv)
    profiles = []
    for profile in default_profiles():
        print(f"counted {profile.name} at {profile.input_size}", file=sys.stderr)
        profiles.append(profile)
    table = markdown_table(profiles)
    if args.write:
        path = Path(args.write)
        path.write_text(replace_table(path.read_text(), table))
        print(f"wrote the table of {len(profiles)} backbones into {path}", file=sys.stderr)
    if args.markdown or not args.write:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
