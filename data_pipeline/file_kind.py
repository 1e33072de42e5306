"""What kind of file a path holds, from its first bytes: for messages when the wrong file is given."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\x93NUMPY", "a NumPy array (.npy)"),
    (b"\x0a\x23\xd7\xce", "an insightface RecordIO file (.rec)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BM", "a BMP image"),
)


def file_kind(path: str | os.PathLike) -> Optional[str]:
    """``"a JPEG image"``, ``"an ONNX model"``, ... for files recognised by content, else None."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if len(head) > 262 and head[257:262] == b"ustar":
        return "a tar archive (a data shard?)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a torch.save file?)"
    # ONNX is a protobuf without magic: its first field is ir_version (tag 0x08), and the
    # producer name follows within the first bytes.
    if p.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and b"pytorch" in head[:64]):
        return "an ONNX model"
    return None
