"""A picture of the augmentations: synthetic faces under each transform, one row per transform.

``python -m data_pipeline.augment_figure [out.jpg|out.png]`` writes it (default
``docs/img/augmentations.jpg``): the first row shows the faces as decoded, each further row
the same faces with one transform always on (its probability set to 1), drawn through the
same :class:`~data_pipeline.augment.SampleTransform` the loaders use; the last row has
every transform at the probability given by ``--mixed``.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .augment import Augment, SampleTransform
from .synthetic import SynthConfig, SyntheticFaces

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "augmentations.jpg"


def augment_grid(faces: int = 6, seed: int = 0, mixed: float = 0.5, label_width: int = 90,
                 gap: int = 2) -> Image.Image:
    """The grid image: ``faces`` columns; rows: none, each transform alone, all at ``mixed``."""
    source = SyntheticFaces(SynthConfig(num_identities=faces, images_per_identity=1, heldout_identities=0,
                                        heldout_pairs=0, image_size=(112, 112), seed=seed))
    images = [np.asarray(Image.open(io.BytesIO(source[i][0])).convert("RGB")) for i in range(faces)]
    names = [f.name for f in dataclasses.fields(Augment)]
    rows: list[tuple[str, Augment]] = [("decoded", Augment())]
    rows += [(name, Augment(**{name: 1.0})) for name in names]
    rows.append((f"all at p={mixed:g}", Augment(**{name: mixed for name in names})))
    h, w = images[0].shape[:2]
    sheet = Image.new("RGB", (label_width + faces * (w + gap), len(rows) * (h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, aug) in enumerate(rows):
        transform = SampleTransform(aug, seed)
        y = r * (h + gap)
        draw.text((4, y + h // 2 - 6), label, fill=(0, 0, 0))
        for c, image in enumerate(images):
            out = transform(image, epoch=0, shard="figure", key=str(c))
            sheet.paste(Image.fromarray(out), (label_width + c * (w + gap), y))
    return sheet


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=str(DEFAULT_OUT), help="image file to write (.jpg or .png)")
    p.add_argument("--faces", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed", type=float, default=0.5, help="probability of every transform in the last row")
    args = p.parse_args(argv)
    sheet = augment_grid(args.faces, args.seed, args.mixed)
    if args.out.lower().endswith(".png"):
        sheet.save(args.out, format="PNG", optimize=True)
    else:
        sheet.save(args.out, format="JPEG", quality=88)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
