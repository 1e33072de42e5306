"""Bad samples: the reasons a sample is skipped, the strict-mode error and the skip report."""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image

log = logging.getLogger("shardface.data")

# Every reason a sample can be skipped; ``stats`` always lists all of them.
CORRUPT_JPEG = "corrupt_jpeg"
WRONG_SIZE = "wrong_image_size"
MISSING_JPG = "missing_jpg"
MISSING_CLS = "missing_cls"
BAD_LABEL = "bad_label"
TRUNCATED_SHARD = "truncated_shard"
MISSING_SHARD = "missing_shard"
UNREACHABLE_SHARD = "unreachable_shard"  # a remote shard that failed every retry (its URL in the detail)
CORRUPT_RECORD = "corrupt_record"  # a RecordIO record whose framing or header is damaged
REASONS = (CORRUPT_JPEG, WRONG_SIZE, MISSING_JPG, MISSING_CLS, BAD_LABEL, TRUNCATED_SHARD,
           MISSING_SHARD, CORRUPT_RECORD, UNREACHABLE_SHARD)

# Warnings for one reason: the first few in full, then one line at each power of ten.
FULL_WARNINGS_PER_REASON = 5


class BadSampleError(ValueError):
    """A bad sample met with ``strict=True``.

    It takes one message string, so a DataLoader worker's error is re-raised as this type.
    """


@dataclass(frozen=True)
class BadSample:
    """One skip event: ``count`` samples of ``shard`` lost for ``reason``, the first at ``key``."""

    reason: str
    shard: str
    key: str
    detail: str
    count: int = 1

    def message(self) -> str:
        """A one-line description naming the shard and key."""
        what = f"{self.count} samples" if self.count != 1 else "sample"
        return f"{self.reason}: {what} in shard {self.shard} at key {self.key}: {self.detail}"

    def error(self) -> BadSampleError:
        """The strict-mode error for this event."""
        return BadSampleError(
            f"bad data ({self.message()}); repair or re-create the shard (e.g. `shardface data "
            "convert`), or build the loader with strict=False to skip and count bad samples")


class SkipLog:
    """Collects skip events where samples are read (a loader worker); raises at once when strict."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.pending: list[BadSample] = []

    def add(self, event: BadSample) -> None:
        """Record ``event``, or raise it when strict."""
        if self.strict:
            raise event.error()
        self.pending.append(event)

    def take(self) -> list[BadSample]:
        """The events recorded since the last call."""
        out, self.pending = self.pending, []
        return out


class SkipReport:
    """Counts skipped samples by reason on the consuming process and logs them, rate-limited."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {r: 0 for r in REASONS}
        self._events: dict[str, int] = {r: 0 for r in REASONS}

    def add(self, events: Iterable[BadSample]) -> None:
        """Count and (rate-limited) log each event."""
        for e in events:
            self.counts[e.reason] = self.counts.get(e.reason, 0) + e.count
            n = self._events.get(e.reason, 0) + 1
            self._events[e.reason] = n
            if n <= FULL_WARNINGS_PER_REASON:
                log.warning("skipped bad data: %s", e.message())
            elif _is_power_of_ten(n):
                log.warning("skipped bad data: %d %s events so far (%d samples), latest: %s",
                            n, e.reason, self.counts[e.reason], e.message())

    def as_dict(self) -> dict[str, int]:
        """Skipped samples by reason (a copy)."""
        return dict(self.counts)

    def load(self, counts: dict[str, int]) -> None:
        """Restore counts saved with :meth:`as_dict`."""
        self.counts = {r: 0 for r in REASONS}
        self.counts.update({str(k): int(v) for k, v in counts.items()})


def _is_power_of_ten(n: int) -> bool:
    while n % 10 == 0 and n > 1:
        n //= 10
    return n == 1


def parse_label(raw: bytes, num_classes: int) -> int | str:
    """The label in a ``.cls`` payload, or a string saying why it is unusable."""
    text = raw.strip()
    if not text or not text.isdigit():
        return f"label {raw[:20]!r} is not decimal digits"
    label = int(text)
    if label >= num_classes:
        return (f"label {label} is outside [0, {num_classes}): is num_classes right for this "
                "manifest?")
    return label


def decode_jpeg(data: bytes, image_size: tuple[int, int]) -> np.ndarray | tuple[str, str]:
    """An RGB uint8 ``[H, W, 3]`` array, or ``(reason, detail)`` when the bytes are unusable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                return CORRUPT_JPEG, f"not a JPEG (PIL reads it as {im.format})"
            arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on damaged data
        return CORRUPT_JPEG, f"cannot decode ({type(e).__name__}: {e})"
    if arr.shape[:2] != tuple(image_size):
        return WRONG_SIZE, (f"image is {arr.shape[0]}x{arr.shape[1]}, the manifest says "
                            f"{image_size[0]}x{image_size[1]}")
    return arr
