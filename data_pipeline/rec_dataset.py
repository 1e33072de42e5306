"""An insightface ``train.rec``/``train.idx`` pair described for training straight from it.

``data.manifest`` may name a ``.rec`` file, or a folder holding ``train.rec`` (or a single
``*.rec``) and no ``manifest.json``. :func:`open_dataset` returns a :class:`RecDataset` for
those and a shard :class:`~data_pipeline.manifest.Manifest` otherwise; both answer
``num_samples``, ``num_classes``, ``image_size``, ``source`` and ``verification_paths()``.

Two layouts are read:

* **header** (MS1MV3, Glint360K as published): record 0 is a header whose label ``(a, b)``
  says the images are keys ``1 .. a-1`` and the identity records keys ``a .. b-1``;
  ``num_classes = b - a``.
* **plain** (the output of insightface's ``shuffle_rec.py``, or any ``.rec`` without a
  header): every indexed record is an image. ``num_classes`` comes from the ``property``
  file beside the ``.rec`` (``classes,height,width``), else from ``data.num_classes``, else
  from one pass over every record's label (slow on a large set: write a ``property`` file).

``image_size`` comes from ``property`` when present, else from the first image's JPEG header.
The ``.idx`` is parsed by numpy (about 0.6 µs a line on one core: ~25 s for WebFace42M's 42M
lines); per image only its key and byte offset are kept (16 bytes).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .jpeg import jpeg_size
from .manifest import MANIFEST_NAME, Manifest
from .recordio import RecordIOError, default_index_path, read_record, unpack_payload

log = logging.getLogger("shardface.data")
PROPERTY_NAME = "property"
LAYOUTS = ("header", "plain")


def find_rec(path: str | os.PathLike) -> Path | None:
    """The ``.rec`` that ``path`` names (the file, or a folder's ``train.rec`` / only ``*.rec``)."""
    p = Path(path)
    if p.suffix == ".rec":
        return p
    if p.is_dir() and not (p / MANIFEST_NAME).is_file():
        if (p / "train.rec").is_file():
            return p / "train.rec"
        recs = sorted(p.glob("*.rec"))
        if len(recs) == 1:
            return recs[0]
    return None


def open_dataset(path: str | os.PathLike, *, num_classes: int | None = None,
                 scan_labels: bool = True) -> Manifest | RecDataset:
    """The dataset at ``path``: a RecordIO pair (see the module docstring) or a shard manifest."""
    rec = find_rec(path)
    if rec is not None:
        return RecDataset.open(rec, num_classes=num_classes, scan_labels=scan_labels)
    return Manifest.load(path)


def read_index_arrays(idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, offsets)`` of a ``.idx`` file, sorted by key (int64 each)."""
    try:
        table = np.loadtxt(idx_path, dtype=np.int64, ndmin=2, comments=None)
    except ValueError as e:
        raise RecordIOError(f"{idx_path}: expected 'key<TAB>offset' lines ({e})") from None
    if table.size == 0:
        raise RecordIOError(f"{idx_path} lists no records")
    if table.shape[1] != 2:
        raise RecordIOError(f"{idx_path}: expected 2 columns 'key<TAB>offset', found {table.shape[1]}")
    order = np.argsort(table[:, 0], kind="stable")
    return table[order, 0].copy(), table[order, 1].copy()


def label_of(head_label: float | tuple[float, ...]) -> float:
    """The class label of an image record (the first value of a label array)."""
    return head_label[0] if isinstance(head_label, tuple) else head_label


@dataclass(eq=False)  # holds numpy arrays: compared by identity
class RecDataset:
    """What a ``.rec``/``.idx`` pair holds; images are ``keys[i]`` at byte ``offsets[i]``."""

    rec_path: Path
    idx_path: Path
    layout: str
    keys: np.ndarray
    offsets: np.ndarray
    num_classes: int | None
    image_size: tuple[int, int]
    verification: dict[str, str] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Image records (header and identity records are not samples)."""
        return len(self.keys)

    @property
    def root(self) -> Path:
        """The folder of the ``.rec`` (where its ``property`` and ``*.bin`` files sit)."""
        return self.rec_path.parent

    @property
    def source(self) -> str:
        """``recordio:<absolute path>``, as a converted manifest records it."""
        return f"recordio:{self.rec_path.resolve()}"

    def verification_paths(self) -> dict[str, Path]:
        """Name -> path of the verification ``.bin`` files beside the ``.rec`` (lfw, cfp_fp, ...)."""
        return {name: self.root / rel for name, rel in self.verification.items()}

    def settings(self) -> dict[str, Any]:
        """What a saved loader position depends on: the same records (not where the file sits)."""
        return {"rec_bytes": self.rec_path.stat().st_size, "num_samples": self.num_samples}

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None, *,
             num_classes: int | None = None, scan_labels: bool = True) -> RecDataset:
        """Read the index, find the layout, the class count and the image size."""
        rec = Path(rec_path)
        idx = Path(idx_path) if idx_path else default_index_path(rec)
        if not rec.is_file():
            raise FileNotFoundError(f"RecordIO file {rec} does not exist")
        if not idx.is_file():
            raise FileNotFoundError(
                f"RecordIO index {idx} does not exist: rebuild it with `python -c \"from "
                f"data_pipeline.recordio import rebuild_index; rebuild_index('{rec}')\"`")
        keys, offsets = read_index_arrays(idx)
        prop = _read_property(rec.parent / PROPERTY_NAME)
        with open(rec, "rb") as f:
            header = _header(f, keys, offsets, rec)
            if header is not None:
                first, end = header
                images = (keys >= 1) & (keys < first)
                if int(images.sum()) != first - 1:
                    raise RecordIOError(f"{idx}: the header record says images are keys 1..{first - 1} "
                                        f"but {first - 1 - int(images.sum())} of them are not indexed: "
                                        "the .idx is incomplete")
                layout, keys, offsets = "header", keys[images], offsets[images]
                classes: int | None = end - first
            else:
                layout, classes = "plain", None
            if prop is not None:
                if classes is not None and classes != prop[0]:
                    raise RecordIOError(f"{rec.parent / PROPERTY_NAME} says {prop[0]} classes, the "
                                        f"header record of {rec} says {classes}: fix or remove the "
                                        "property file")
                classes = prop[0]
            if num_classes is not None:
                if classes is not None and classes != num_classes:
                    raise RecordIOError(f"data.num_classes={num_classes} but {rec} holds {classes} "
                                        f"classes ({'property file' if prop else 'header record'})")
                classes = num_classes
            if len(keys) == 0:
                raise RecordIOError(f"{rec} holds no image records")
            if classes is None and scan_labels:
                log.warning("%s has no header record and no %s file: reading every record's label "
                            "to count the classes (write '<classes>,<height>,<width>' to %s to skip "
                            "this)", rec, PROPERTY_NAME, rec.parent / PROPERTY_NAME)
                classes = 1 + max(int(label_of(unpack_payload(read_record(f, int(o), str(rec)))[0].label))
                                  for o in offsets)
            size = (prop[1], prop[2]) if prop is not None else _first_image_size(f, keys, offsets, rec)
        bins = {b.stem: b.name for b in sorted(rec.parent.glob("*.bin"))}
        return cls(rec, idx, layout, keys, offsets, classes, size, bins)


def _read_property(path: Path) -> tuple[int, int, int] | None:
    if not path.is_file():
        return None
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise RecordIOError(f"{path}: expected '<classes>,<height>,<width>' (e.g. 85742,112,112), "
                            f"got {text[:40]!r}")
    return values[0], values[1], values[2]


def _header(f, keys: np.ndarray, offsets: np.ndarray, rec: Path) -> tuple[int, int] | None:
    """The identity range ``(a, b)`` of header record 0, or None (plain layout)."""
    if len(keys) == 0 or keys[0] != 0:
        return None
    head, body = unpack_payload(read_record(f, int(offsets[0]), f"{rec} (record key 0)"),
                                f"{rec} (record key 0)")
    if (head.flag <= 0 or not isinstance(head.label, tuple) or len(head.label) < 2
            or body.startswith(b"\xff\xd8")):
        return None
    a, b = int(head.label[0]), int(head.label[1])
    if not 1 <= a <= b:
        raise RecordIOError(f"{rec} (record key 0): header identity range ({a}, {b}) is invalid "
                            "(expected 1 <= first identity key <= end)")
    return a, b


def _first_image_size(f, keys: np.ndarray, offsets: np.ndarray, rec: Path) -> tuple[int, int]:
    # The first few records, in case the first is damaged.
    for off in list(offsets)[:16]:
        try:
            _, jpeg = unpack_payload(read_record(f, int(off), str(rec)))
        except RecordIOError:
            continue
        size = jpeg_size(jpeg)
        if size is not None:
            return size
    raise RecordIOError(f"{rec}: none of its first records holds a readable JPEG header, so the "
                        f"image size is unknown: write '<classes>,<height>,<width>' to "
                        f"{rec.parent / PROPERTY_NAME}")
