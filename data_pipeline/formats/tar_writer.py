"""Deterministic, atomic tar writing for data shards (POSIX ustar, as ``tarfile`` writes it)."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from .manifest import fsync_dir

BLOCK = 512
RECORD = 20 * BLOCK  # tar files end on a 10 KiB record boundary, as tar(1) and tarfile pad them
_MODE = 0o444


def _octal(value: int, width: int) -> bytes:
    # A NUL-terminated zero-padded octal field, the form tarfile writes for ustar numbers.
    return b"%0*o\0" % (width - 1, value)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file with fixed metadata (mtime 0, mode 0444, root).

    Fixed metadata makes a shard's bytes a function of its samples alone, so a resumed
    conversion reproduces the checksums of an uninterrupted one.
    """
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name {name!r} is longer than the 100 bytes ustar allows")
    if size >= 8 ** 11:
        raise ValueError(f"tar member {name!r} of {size} bytes exceeds the ustar limit of 8 GiB")
    head = b"".join([
        raw.ljust(100, b"\0"), _octal(_MODE, 8), _octal(0, 8), _octal(0, 8),
        _octal(size, 12), _octal(0, 12), b" " * 8, b"0", b"\0" * 100, b"ustar\x0000",
        b"\0" * 32, b"\0" * 32, b"\0" * 8, b"\0" * 8, b"\0" * 155,  # no device numbers
    ]).ljust(BLOCK, b"\0")
    checksum = b"%06o\0" % sum(head)  # computed with the checksum field as spaces
    return head[:148] + checksum + head[155:]


class TarShardWriter:
    """Appends files to an open binary stream as a tar archive, hashing every byte written."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def _put(self, data: bytes) -> None:
        self.sha.update(data)
        self.f.write(data)
        self.size += len(data)

    def add(self, name: str, data: bytes) -> None:
        """Append one regular file."""
        self._put(ustar_header(name, len(data)))
        self._put(data)
        if len(data) % BLOCK:
            self._put(b"\0" * (BLOCK - len(data) % BLOCK))

    def finish(self) -> str:
        """Write the end-of-archive blocks; returns the archive's SHA-256."""
        self._put(b"\0" * (2 * BLOCK))
        if self.size % RECORD:
            self._put(b"\0" * (RECORD - self.size % RECORD))
        return self.sha.hexdigest()


def write_tar_atomic(path: Path, members: Iterable[tuple[str, bytes]]) -> str:
    """Write ``(name, data)`` members to ``path`` via ``path.tmp``, fsync and rename; returns SHA-256.

    A crash leaves at most a ``.tmp`` file, never a partial file under the final name.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            writer = TarShardWriter(f)
            for name, data in members:
                writer.add(name, data)
            sha = writer.finish()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return sha
