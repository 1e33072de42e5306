"""JPEG bytes decoded straight into a slot of a batch array; simplejpeg when installed, else PIL.

Both decode with libjpeg-turbo's accurate DCT and smooth upsampling. simplejpeg writes into
the caller's buffer (no intermediate image, no copy into the batch) and skips PIL's
per-image object set-up. Whatever it refuses (a CMYK or damaged JPEG, not a JPEG at all)
goes through PIL, which names the reason the sample is skipped.
"""
from __future__ import annotations

import numpy as np

from .bad_data import WRONG_SIZE, decode_jpeg

try:  # optional: pip install shardface[fast-decode]
    import simplejpeg
except ImportError:  # pragma: no cover - exercised where simplejpeg is absent
    simplejpeg = None

DECODERS = ("simplejpeg", "pil")


def default_decoder() -> str:
    """``simplejpeg`` where it is installed, else ``pil``."""
    return "simplejpeg" if simplejpeg is not None else "pil"


def decode_into(data: bytes, out: np.ndarray, decoder: str = "pil") -> tuple[str, str] | None:
    """Decode ``data`` into ``out`` (uint8 ``[H, W, 3]``); ``(reason, detail)`` if it is unusable.

    ``out`` is left unspecified when a reason is returned.
    """
    h, w = out.shape[:2]
    if decoder == "simplejpeg" and simplejpeg is not None:
        try:
            # A larger image does not fit the buffer (ValueError); a smaller one decodes
            # into its start: either way PIL below names the wrong size.
            if simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out).shape[:2] == (h, w):
                return None
        except ValueError:
            pass  # PIL decides below what is wrong (or decodes what simplejpeg does not)
    decoded = decode_jpeg(data, (h, w))
    if isinstance(decoded, tuple):
        return decoded
    out[...] = decoded
    return None


__all__ = ["DECODERS", "WRONG_SIZE", "decode_into", "default_decoder"]
