"""Checking a shard directory against its manifest: files, checksums, samples, labels, JPEGs."""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from . import byte_streams
from .bad_data import pil_message
from .manifest import Manifest
from .progress import Progress, quantity
from .shards import LABEL_WIDTH, SHARD_PATTERN

MAX_EXAMPLES = 100
_LABEL_RE = re.compile(rb"^\d{%d}$" % LABEL_WIDTH)

# Sample problem kinds, as counted in InspectReport.problem_counts.
PROBLEM_TEXT = {
    "label_out_of_range": "labels outside [0, num_classes)",
    "bad_label": "labels not 10 zero-padded digits",
    "missing_jpg": "samples without .jpg",
    "missing_cls": "samples without .cls",
    "unexpected_member": "unexpected tar members",
    "duplicate_key": "duplicate sample keys",
    "undecodable": "undecodable JPEGs",
    "wrong_size": "images of another size than the manifest's",
}


@dataclass
class ShardCheck:
    """One data shard as found: ``found`` samples (None when not read), ``status`` ok or the problem."""

    path: str
    expected: int
    found: int | None = None
    status: str = "ok"
    detail: str = ""


@dataclass(frozen=True)
class SampleProblem:
    """One bad sample: the shard, its key, the problem kind and what was seen."""

    shard: str
    key: str
    kind: str
    detail: str


@dataclass
class InspectReport:
    """What ``inspect_dataset`` found; ``ok`` is True when nothing is wrong."""

    path: Path | str
    manifest: Manifest
    verified: bool
    deep: bool
    shards: list[ShardCheck] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    missing_verification: list[str] = field(default_factory=list)
    problem_counts: Counter = field(default_factory=Counter)
    sample_problems: list[SampleProblem] = field(default_factory=list)
    samples_read: int = 0
    classes_seen: int | None = None

    def _with(self, status: str) -> list[str]:
        return [s.path for s in self.shards if s.status == status]

    @property
    def missing_shards(self) -> list[str]:
        """Shards listed in the manifest but absent."""
        return self._with("missing")

    @property
    def checksum_mismatches(self) -> list[str]:
        """Shards whose SHA-256 differs from the manifest's."""
        return self._with("checksum")

    @property
    def count_mismatches(self) -> list[str]:
        """Shards holding another number of samples than the manifest says."""
        return self._with("count")

    @property
    def unreadable_shards(self) -> list[str]:
        """Shards that are not valid tar files."""
        return self._with("unreadable")

    @property
    def shard_counts(self) -> dict[str, int | None]:
        """Samples found per shard (None where the shard was not read)."""
        return {s.path: s.found for s in self.shards}

    @property
    def label_violations(self) -> list[SampleProblem]:
        """Examples of samples whose label is outside [0, num_classes) or malformed."""
        return [p for p in self.sample_problems if p.kind in ("label_out_of_range", "bad_label")]

    @property
    def undecodable(self) -> list[SampleProblem]:
        """Examples of JPEGs that do not decode (only looked for with ``deep=True``)."""
        return [p for p in self.sample_problems if p.kind == "undecodable"]

    @property
    def ok(self) -> bool:
        """True when no shard, file or sample problem was found."""
        return (all(s.status == "ok" for s in self.shards) and not self.leftovers
                and not self.missing_verification and not self.problem_counts)

    def format(self) -> str:
        """A short human summary (a few lines)."""
        m = self.manifest
        sizes = [s.expected for s in self.shards]
        lines = [f"{self.path}: {m.num_samples:,} samples, {m.num_classes:,} classes, "
                 f"{m.image_size[0]}x{m.image_size[1]}, {quantity(len(self.shards), 'shard')} of "
                 f"{min(sizes, default=0):,}-{max(sizes, default=0):,} samples",
                 f"source: {m.source or '?'}; verification sets: "
                 f"{', '.join(sorted(m.verification)) or 'none'}"]
        if self.verified:
            lines.append(f"read {self.samples_read:,} samples"
                         + (", decoded every JPEG" if self.deep else "")
                         + (f"; {self.classes_seen:,} of {m.num_classes:,} classes have samples"
                            if self.classes_seen is not None else ""))
        else:
            lines.append("checked only that the shard files exist (checksums, sample counts and labels "
                         "were not verified)")
        for status, what in (("missing", "missing shards"), ("checksum", "checksum mismatches"),
                             ("count", "sample-count mismatches"), ("unreadable", "unreadable shards")):
            bad = self._with(status)
            if bad:
                lines.append(f"{len(bad)} {what}: {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else ""))
        for kind, count in sorted(self.problem_counts.items()):
            ex = next(p for p in self.sample_problems if p.kind == kind)
            lines.append(f"{count:,} {PROBLEM_TEXT.get(kind, kind)} (e.g. {ex.shard}:{ex.key}: {ex.detail})")
        if self.leftovers:
            lines.append(f"{len(self.leftovers)} files not in the manifest (interrupted write?): "
                         f"{', '.join(self.leftovers[:5])}")
        if self.missing_verification:
            lines.append(f"missing verification files: {', '.join(self.missing_verification)}")
        lines.append("OK" if self.ok else "PROBLEMS FOUND")
        return "\n".join(lines)


class _HashingReader:
    """A read-only stream wrapper hashing what is read, so one pass both parses and checksums."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class _Bitmap:
    """Which integers in [0, n) were seen, in n bytes (a set of ints would cost ~70 bytes each)."""

    def __init__(self, n: int) -> None:
        self.bits = bytearray(n)
        self.other: set[int] = set()

    def add(self, k: int) -> bool:
        """Mark ``k``; returns False when it was already marked."""
        if 0 <= k < len(self.bits):
            seen, self.bits[k] = self.bits[k], 1
            return not seen
        if k in self.other:
            return False
        self.other.add(k)
        return True

    def count(self) -> int:
        return self.bits.count(1) + len(self.other)


class _Checker:
    """Reads shards sample by sample and records problems into a report."""

    def __init__(self, report: InspectReport, bar: Progress) -> None:
        self.report, self.bar = report, bar
        m = report.manifest
        self.keys = _Bitmap(m.num_samples)
        self.classes = _Bitmap(m.num_classes)

    def problem(self, shard: str, key: str, kind: str, detail: str) -> None:
        self.report.problem_counts[kind] += 1
        if len(self.report.sample_problems) < MAX_EXAMPLES:
            self.report.sample_problems.append(SampleProblem(shard, key, kind, detail))

    def sample(self, shard: str, key: str, members: dict[str, bytes]) -> None:
        r = self.report
        r.samples_read += 1
        self.bar.update()
        if key.isdigit() and not self.keys.add(int(key)):
            self.problem(shard, key, "duplicate_key", "key seen before")
        for ext in sorted(set(members) - {"jpg", "cls"}):
            self.problem(shard, key, "unexpected_member", f"{key}.{ext}")
        cls = members.get("cls")
        if cls is None:
            self.problem(shard, key, "missing_cls", "no .cls member")
        elif not _LABEL_RE.match(cls):
            self.problem(shard, key, "bad_label", repr(cls[:20]))
        else:
            label = int(cls)
            if label >= r.manifest.num_classes:
                self.problem(shard, key, "label_out_of_range",
                             f"label {label} >= num_classes {r.manifest.num_classes}")
            else:
                self.classes.add(label)
        jpeg = members.get("jpg")
        if jpeg is None:
            self.problem(shard, key, "missing_jpg", "no .jpg member")
        elif r.deep:
            self.decode(shard, key, jpeg)

    def decode(self, shard: str, key: str, jpeg: bytes) -> None:
        try:
            with Image.open(io.BytesIO(jpeg)) as im:
                im.load()
                fmt, (w, h) = im.format, im.size
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
            self.problem(shard, key, "undecodable", f"{type(e).__name__}: {pil_message(e)}")
            return
        if fmt != "JPEG":
            self.problem(shard, key, "undecodable", f"{fmt} data, not JPEG")
        elif (h, w) != tuple(self.report.manifest.image_size):
            self.problem(shard, key, "wrong_size", f"{h}x{w}")

    def shard(self, check: ShardCheck, path: Path | str, sha256: str) -> None:
        count = 0
        try:
            opened = byte_streams.open_stream(path, self.report.manifest.remote)
        except byte_streams.SourceUnreachable as e:
            check.status = "missing" if e.missing else "unreadable"
            check.detail = e.detail
            return
        with opened as f:
            reader = _HashingReader(f)
            try:
                # Streaming mode: one sequential pass, no seeking back.
                with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                    key: str | None = None
                    members: dict[str, bytes] = {}
                    for info in tar:
                        if not info.isfile():
                            continue
                        base = os.path.basename(info.name)
                        k, _, ext = base.partition(".")
                        data = tar.extractfile(info).read()
                        if k != key:
                            if key is not None:
                                self.sample(check.path, key, members)
                                count += 1
                            key, members = k, {}
                        members[ext] = data
                    if key is not None:
                        self.sample(check.path, key, members)
                        count += 1
            except (tarfile.TarError, EOFError, OSError) as e:
                check.found, check.status, check.detail = count, "unreadable", f"{type(e).__name__}: {e}"
                return
            reader.drain()
        check.found = count
        if reader.sha.hexdigest() != sha256:
            check.status, check.detail = "checksum", f"sha256 {reader.sha.hexdigest()[:12]}..."
        elif count != check.expected:
            check.status, check.detail = "count", f"{count} samples"


def inspect_dataset(path: str | os.PathLike, verify: bool = True, deep: bool = False,
                    progress: bool = True) -> InspectReport:
    """Check a shard directory: shard files (always), checksums/counts/labels (``verify``),
    JPEG decoding (``deep``, implies ``verify``). ``path`` may be a URL (``s3://``, ``http://``)."""
    manifest = Manifest.load(path)
    verify = verify or deep
    root = manifest.root
    assert root is not None
    report = InspectReport(path=root, manifest=manifest, verified=verify, deep=deep)
    bar = Progress(f"inspecting {quantity(len(manifest.shards), 'shard')}", manifest.num_samples,
                   enabled=progress and verify)
    checker = _Checker(report, bar)
    for info, abs_path in zip(manifest.shards, manifest.shard_paths()):
        check = ShardCheck(info.path, info.num_samples)
        report.shards.append(check)
        if not verify:
            if not byte_streams.exists(abs_path, manifest.remote):
                check.status = "missing"
        elif not byte_streams.is_url(abs_path) and not Path(abs_path).is_file():
            check.status = "missing"
        else:  # a remote shard is found missing (or unreachable) when it is opened
            checker.shard(check, abs_path, info.sha256)
    if verify:
        bar.close()
        report.classes_seen = checker.classes.count()
    listed = {s.path for s in manifest.shards}
    names = byte_streams.list_names(root, manifest.remote) or []  # some servers cannot list
    report.leftovers = sorted(n for n in names if SHARD_PATTERN.match(n) and n not in listed)
    report.missing_verification = sorted(name for name, p in manifest.verification_paths().items()
                                         if not p.is_file())
    return report
