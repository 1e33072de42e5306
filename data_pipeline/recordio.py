"""insightface MXNet RecordIO (``train.rec`` + ``train.idx``) read and written in pure Python.

Layout, as MXNet's ``MXIndexedRecordIO`` and dmlc-core's ``RecordIOWriter`` produce it:

* ``.idx``: text lines ``key<TAB>byte offset``.
* ``.rec``: records framed as ``uint32 magic 0xced7230a``, ``uint32 lrec`` (length in the lower
  29 bits, continuation flag in the upper 3: 0 whole, 1 first, 2 middle, 3 last part), the data,
  zero padding to a multiple of 4 bytes. The writer splits a record wherever the magic number
  occurs at a 4-byte-aligned position of the data and drops those 4 bytes; the reader puts
  them back between parts.
* record payload: IRHeader ``<IfQQ`` (flag, label, id, id2); when ``flag > 0`` the label is
  the ``flag`` float32 values that follow; then the JPEG bytes.
* insightface face sets: record 0 is a header whose label ``(a, b)`` says images are keys
  ``1 .. a-1`` and identity records are keys ``a .. b-1`` (each with label = its image range).
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .progress import Progress

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)
_LEN_MASK = (1 << 29) - 1


class RecordIOError(ValueError):
    """A ``.rec``/``.idx`` pair that does not follow the RecordIO format."""


@dataclass(frozen=True)
class IRHeader:
    """The image-record header: ``label`` is a float, or a tuple when ``flag > 0``."""

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


# -- payloads ----------------------------------------------------------------------------------

def pack_payload(label: float | Iterable[float], data: bytes, id: int = 0, id2: int = 0) -> bytes:
    """IRHeader + data, as ``mxnet.recordio.pack``: a sequence label sets ``flag`` to its length."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return struct.pack(IR_FORMAT, 0, float(label), id, id2) + data
    values = np.asarray(list(label), dtype="<f4")
    return struct.pack(IR_FORMAT, values.size, 0.0, id, id2) + values.tobytes() + data


def unpack_payload(payload: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Split a record payload into its IRHeader and the data that follows."""
    if len(payload) < IR_SIZE:
        raise RecordIOError(f"{where}: {len(payload)} bytes, shorter than the {IR_SIZE}-byte "
                            "IRHeader: not an image record")
    flag, label, id_, id2 = struct.unpack_from(IR_FORMAT, payload)
    body = payload[IR_SIZE:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(f"{where}: IRHeader says {flag} label floats follow but only "
                                f"{len(body)} bytes do: the record is corrupt")
        labels = tuple(float(v) for v in np.frombuffer(body[:4 * flag], dtype="<f4"))
        return IRHeader(flag, labels, id_, id2), body[4 * flag:]
    return IRHeader(flag, float(label), id_, id2), body


# -- framing -----------------------------------------------------------------------------------

def _lrec(cflag: int, length: int) -> bytes:
    return struct.pack("<II", MAGIC, (cflag << 29) | length)


def frame_record(data: bytes) -> bytes:
    """The bytes dmlc's RecordIOWriter writes for one record (split at aligned magic numbers)."""
    if len(data) > _LEN_MASK:
        raise RecordIOError(f"a record of {len(data)} bytes exceeds the RecordIO limit of 2^29 - 1")
    out, start = [], 0
    for i in range(0, len(data) - len(data) % 4, 4):
        if data[i:i + 4] == _MAGIC_BYTES:
            out += [_lrec(1 if start == 0 else 2, i - start), data[start:i]]
            start = i + 4
    out += [_lrec(3 if start else 0, len(data) - start), data[start:], b"\0" * (-len(data) % 4)]
    return b"".join(out)


def read_record(f: BinaryIO, offset: int, where: str) -> bytes:
    """Read the record starting at byte ``offset`` of ``f``, joining continuation parts."""
    f.seek(offset)
    parts: list[bytes] = []
    pos = offset
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise RecordIOError(f"{where}: truncated record at byte {pos}: the file ends inside "
                                "the record header (an incomplete copy?)")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"{where}: bad magic 0x{magic:08x} at byte {pos} (expected "
                                f"0x{MAGIC:08x}): the .idx does not belong to this .rec, or the "
                                "file is corrupt")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        if cflag not in ((0, 1) if not parts else (2, 3)):
            raise RecordIOError(f"{where}: continuation flag {cflag} at byte {pos} is out of "
                                "sequence: the record is corrupt")
        padded = length + (-length % 4)
        data = f.read(padded)
        if len(data) < padded:
            raise RecordIOError(f"{where}: truncated record at byte {pos}: {length} bytes "
                                f"announced, {len(data)} present (an incomplete copy?)")
        parts.append(data[:length])
        pos += 8 + padded
        if cflag in (0, 3):
            return _MAGIC_BYTES.join(parts)


# -- the index ---------------------------------------------------------------------------------

def default_index_path(rec_path: str | os.PathLike) -> Path:
    """``train.rec`` -> ``train.idx``."""
    return Path(rec_path).with_suffix(".idx")


def read_index(idx_path: str | os.PathLike) -> dict[int, int]:
    """Parse a ``.idx`` file: record key -> byte offset."""
    index: dict[int, int] = {}
    with open(idx_path, encoding="ascii", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                key, offset = int(fields[0]), int(fields[1])
            except (IndexError, ValueError):
                raise RecordIOError(f"{idx_path}:{lineno}: expected 'key<TAB>offset', got "
                                    f"{line.strip()[:60]!r}") from None
            index[key] = offset
    if not index:
        raise RecordIOError(f"{idx_path} lists no records")
    return index


def rebuild_index(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
                  progress: bool = True) -> Path:
    """Scan a ``.rec`` front to back and write its ``.idx`` (keys 0, 1, ... in file order)."""
    rec_path = Path(rec_path)
    out = Path(idx_path) if idx_path else default_index_path(rec_path)
    size = rec_path.stat().st_size
    bar = Progress(f"indexing {rec_path.name}", size, unit="B", enabled=progress)
    lines: list[str] = []
    with open(rec_path, "rb") as f:
        offset = 0
        while offset < size:
            read_record(f, offset, str(rec_path))
            lines.append(f"{len(lines)}\t{offset}\n")
            bar.update(f.tell() - offset)
            offset = f.tell()
    bar.close()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(lines), encoding="ascii")
    os.replace(tmp, out)
    return out


# -- the sample source -------------------------------------------------------------------------

class RecordIOSource:
    """A ``SampleSource`` over an insightface ``.rec``/``.idx`` pair: ``source[i] -> (jpeg, label)``.

    With a header record 0 (``flag > 0``) the images are keys ``1 .. a-1`` and ``num_classes``
    is the number of identity records; without one, every indexed record is an image and
    ``num_classes`` is the largest label + 1 (found by reading every record header).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
                 progress: bool = True) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else default_index_path(self.rec_path)
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file {self.rec_path} does not exist")
        if not self.idx_path.is_file():
            raise FileNotFoundError(
                f"RecordIO index {self.idx_path} does not exist: pass idx_path=... if it has "
                f"another name, or rebuild it with `python -c \"from data_pipeline.recordio import "
                f"rebuild_index; rebuild_index('{self.rec_path}')\"`")
        self.name = f"recordio:{self.rec_path.resolve()}"
        self._file: BinaryIO | None = None
        self._pid = -1
        index = read_index(self.idx_path)
        header = self._header(index)
        if header is not None:
            first_identity, end_identity = header
            missing = [k for k in range(1, first_identity) if k not in index]
            if missing:
                raise RecordIOError(f"{self.idx_path}: the header record says images are keys 1.."
                                    f"{first_identity - 1} but key {missing[0]} is not indexed "
                                    f"({len(missing)} missing): the .idx is incomplete")
            self.keys = np.arange(1, first_identity, dtype=np.int64)
            self.num_classes = end_identity - first_identity
        else:
            self.keys = np.array(sorted(index), dtype=np.int64)
        self.offsets = np.array([index[int(k)] for k in self.keys], dtype=np.int64)
        if header is None:
            self.num_classes = self._max_label(progress) + 1

    def _header(self, index: dict[int, int]) -> tuple[int, int] | None:
        """The identity range ``(a, b)`` of header record 0, or None if there is no header."""
        if 0 not in index:
            return None
        head, body = unpack_payload(self._read(index[0], 0), self._where(0))
        # An image record 0 may also carry a label array; the header is the one without a JPEG.
        if (head.flag <= 0 or not isinstance(head.label, tuple) or len(head.label) < 2
                or body.startswith(b"\xff\xd8")):
            return None
        a, b = int(head.label[0]), int(head.label[1])
        if not 1 <= a <= b:
            raise RecordIOError(f"{self._where(0)}: header identity range ({a}, {b}) is invalid "
                                "(expected 1 <= first identity key <= end)")
        return a, b

    def _max_label(self, progress: bool) -> int:
        bar = Progress(f"reading labels of {self.rec_path.name}", len(self), enabled=progress)
        top = -1
        for i in range(len(self)):
            top = max(top, self.label(i))
            bar.update()
        bar.close()
        return top

    def _where(self, key: int) -> str:
        return f"{self.rec_path} (record key {key})"

    def _read(self, offset: int, key: int) -> bytes:
        if self._file is None or self._pid != os.getpid():
            # A handle inherited from another process would share its file position.
            self._file = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return read_record(self._file, offset, self._where(key))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, -1
        return state

    def __len__(self) -> int:
        return len(self.keys)

    def record(self, i: int) -> tuple[IRHeader, bytes]:
        """Header and JPEG bytes of image ``i`` (``0 <= i < len(self)``)."""
        if not 0 <= i < len(self.keys):
            raise IndexError(f"image index {i} is outside [0, {len(self.keys)})")
        key = int(self.keys[i])
        return unpack_payload(self._read(int(self.offsets[i]), key), self._where(key))

    def label(self, i: int) -> int:
        """The class label of image ``i``."""
        return self._label(self.record(i)[0], int(self.keys[i]))

    def _label(self, head: IRHeader, key: int) -> int:
        value = head.label[0] if isinstance(head.label, tuple) else head.label
        if not float(value).is_integer() or value < 0:
            raise RecordIOError(f"{self._where(key)}: label {value} is not a class index")
        return int(value)

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        head, jpeg = self.record(i)
        return jpeg, self._label(head, int(self.keys[i]))


# -- writing (tests and small conversions) -----------------------------------------------------

def write_recordio(path: str | os.PathLike, samples: Iterable[tuple[bytes, int]], *,
                   idx_path: str | os.PathLike | None = None, identity_header: bool = True,
                   label_arrays: bool = False, num_classes: int | None = None) -> tuple[Path, Path]:
    """Write ``(jpeg, label)`` samples as an insightface-style ``.rec`` + ``.idx``.

    With ``identity_header`` (as MS1MV3/Glint360K have) images are grouped by label (stable),
    stored as keys ``1..N``, followed by one identity record per class and header record 0.
    ``label_arrays`` stores each label as a float array (``flag > 0``) instead of a float.
    """
    rec_path = Path(path)
    idx = Path(idx_path) if idx_path else default_index_path(rec_path)
    items = [(bytes(j), int(lbl)) for j, lbl in samples]
    classes = num_classes if num_classes is not None else max((lbl for _, lbl in items), default=-1) + 1
    records: list[tuple[int, bytes]] = []
    if identity_header:
        items.sort(key=lambda s: s[1])
        n = len(items)
        first_id = n + 1
        records.append((0, pack_payload([first_id, first_id + classes], b"", id=0)))
    for k, (jpeg, label) in enumerate(items, start=1 if identity_header else 0):
        lab = [float(label), 0.0] if label_arrays else float(label)
        records.append((k, pack_payload(lab, jpeg, id=k)))
    if identity_header:
        starts = np.searchsorted([lbl for _, lbl in items], np.arange(classes + 1)) + 1
        for c in range(classes):
            key = first_id + c
            records.append((key, pack_payload([int(starts[c]), int(starts[c + 1])], b"", id=key)))
    with open(rec_path, "wb") as rec, open(idx, "w", encoding="ascii") as index:
        for key, payload in records:
            index.write(f"{key}\t{rec.tell()}\n")
            rec.write(frame_record(payload))
    return rec_path, idx
