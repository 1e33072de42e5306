"""JPEG header facts without decoding: is it a JPEG, and what size is it."""
from __future__ import annotations

import io

from PIL import Image

from .bad_data import pil_message

# Start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are
# other segments that share the range.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field.
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from the frame header, or None if ``data`` is not a well-formed JPEG header.

    Walks the marker segments only (a few microseconds); the entropy-coded data is not read.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF:
            if length < 7 or i + 9 > n:
                return None
            h = int.from_bytes(data[i + 5:i + 7], "big")
            w = int.from_bytes(data[i + 7:i + 9], "big")
            return (h, w) if h > 0 and w > 0 else None
        i += 2 + length
    return None


def describe_image(data: bytes) -> str:
    """What PIL takes ``data`` to be (for error messages about non-JPEG payloads)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return f"{im.format} {im.size[0]}x{im.size[1]}"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for unknown data
        return f"not a readable image ({type(e).__name__}: {pil_message(e)})"
