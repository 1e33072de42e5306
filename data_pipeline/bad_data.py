"""Bad samples: the reasons a sample is skipped, the strict-mode error and the skip report."""
from __future__ import annotations

import io
import logging
import re
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
# The bad-sample fraction is judged only once this many samples were read (a few bad ones
# among the first dozen samples say little about the dataset).
MIN_SAMPLES_FOR_LIMIT = 100
# Distinct bad samples remembered in a checkpoint (so a resumed run does not count them again).
MAX_SAVED_BAD_KEYS = 100_000

# What to change when most samples are bad for one reason.
LIMIT_HINTS = {
    BAD_LABEL: "the labels do not fit the class count: check data.num_classes and the manifest's num_classes",
    WRONG_SIZE: "the images are not the manifest's size: check data.image_size and the manifest's image_size",
    MISSING_SHARD: "shards listed in the manifest are missing: check the shard folder beside data.manifest",
}
DEFAULT_LIMIT_HINT = "repair or re-create the shards (`shardface data inspect --deep` lists the bad samples)"


class BadSampleError(ValueError):
    """A bad sample met with ``strict=True``.

    It takes one message string, so a DataLoader worker's error is re-raised as this type.
    """


class BadDataLimitError(BadSampleError):
    """More than ``data.max_bad_fraction`` of the samples read were bad."""


def from_worker(err: BadSampleError) -> BadSampleError:
    """The error itself when a DataLoader worker raised it (its message is then a traceback's text).

    The DataLoader re-raises a worker's error as ``Caught BadSampleError in DataLoader worker
    process 0.`` followed by the worker's traceback; the last line holds the message that
    names the shard, the key and the setting to change.
    """
    text = str(err)
    if not text.startswith("Caught "):
        return err
    name = f"{type(err).__name__}: "
    for line in reversed(text.splitlines()):
        if name in line:
            return type(err)(f"{line.split(name, 1)[1].strip()} (in a loader worker)")
    return err


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
            "convert`), or set data.strict=false to skip and count bad samples (up to data.max_bad_fraction)")


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
    """Counts skipped samples by reason on the consuming process and logs them, rate-limited.

    ``counts`` holds distinct bad samples: a corrupt JPEG read again (a shard drawn twice in
    resampled mode, a later epoch) is counted once.  ``bad_reads`` counts every read of a bad
    sample and ``handed_out`` the samples the loader gave to training: their ratio is the
    fraction that :meth:`check_limit` bounds.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {r: 0 for r in REASONS}
        self._events: dict[str, int] = {r: 0 for r in REASONS}
        self._seen: set[tuple[str, str, str]] = set()
        self._first: dict[str, BadSample] = {}
        self.bad_reads = 0
        self.handed_out = 0

    def add(self, events: Iterable[BadSample]) -> None:
        """Count and (rate-limited) log each event not seen before."""
        for e in events:
            self.bad_reads += e.count
            ident = (e.reason, e.shard, e.key)
            if ident in self._seen:
                continue
            self._seen.add(ident)
            self._first.setdefault(e.reason, e)
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

    def seen(self) -> list[list[str]]:
        """The distinct bad samples counted so far, ``[reason, shard, key]`` (for a checkpoint; capped)."""
        return [list(k) for k in sorted(self._seen)[:MAX_SAVED_BAD_KEYS]]

    def load(self, counts: dict[str, int], seen: Iterable[Iterable[str]] = ()) -> None:
        """Restore counts saved with :meth:`as_dict` (and the samples of :meth:`seen`)."""
        self.counts = {r: 0 for r in REASONS}
        self.counts.update({str(k): int(v) for k, v in counts.items()})
        self._seen = {tuple(map(str, k)) for k in seen}  # type: ignore[misc]

    def reset(self) -> None:
        """Forget every count (a loader that re-reads the whole dataset, e.g. DALI's indexing)."""
        self.__init__()  # type: ignore[misc]

    def check_limit(self, max_fraction: float | None, read_ahead: int = 0) -> None:
        """Raise :class:`BadDataLimitError` when more than ``max_fraction`` of the samples read were bad.

        ``read_ahead``: good samples read but not handed out yet (shuffle buffers), whose bad
        neighbours are already counted.
        """
        if max_fraction is None or not self.bad_reads:
            return
        read = self.bad_reads + self.handed_out + read_ahead
        fraction = self.bad_reads / read
        if read < MIN_SAMPLES_FOR_LIMIT or fraction <= max_fraction:
            return
        reason = max(self.counts, key=lambda r: self.counts[r])
        first = self._first.get(reason)
        example = f", first: {first.message()}" if first is not None else ""
        raise BadDataLimitError(
            f"bad data: {self.bad_reads} of {read} samples read ({fraction:.0%}) were bad, more than "
            f"data.max_bad_fraction={max_fraction:g} (mostly {reason}{example}): "
            f"{LIMIT_HINTS.get(reason, DEFAULT_LIMIT_HINT)}; or set data.max_bad_fraction=1 to train on")


def _is_power_of_ten(n: int) -> bool:
    while n % 10 == 0 and n > 1:
        n //= 10
    return n == 1


def pil_message(err: Exception) -> str:
    """PIL's message without the ``<_io.BytesIO object at 0x...>`` it names an in-memory file by."""
    return re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))


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
        return CORRUPT_JPEG, f"cannot decode ({type(e).__name__}: {pil_message(e)})"
    if arr.shape[:2] != tuple(image_size):
        return WRONG_SIZE, (f"image is {arr.shape[0]}x{arr.shape[1]}, the manifest says "
                            f"{image_size[0]}x{image_size[1]}")
    return arr
