"""Read the samples at a range of positions of one WebDataset data shard, reporting bad ones."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .bad_data import (
    BAD_LABEL,
    MISSING_CLS,
    MISSING_JPG,
    MISSING_SHARD,
    TRUNCATED_SHARD,
    UNREACHABLE_SHARD,
    BadSample,
    SkipLog,
    parse_label,
)

# open_shard: every read of a data shard opens it there (local path or URL), re-exported here.
from .byte_streams import RemoteOptions, SourceUnreachable, is_url, open_shard  # noqa: F401
from .tar_members import NotPlainTar, library_members, plain_members, split_name


@dataclass(frozen=True)
class RawSample:
    """An undecoded sample: where it came from, its JPEG bytes and its checked label."""

    shard: str
    key: str
    jpg: bytes
    label: int


@dataclass(frozen=True)
class ShardRef:
    """A data shard as the readers need it: absolute path or URL, name for messages, manifest count.

    ``remote`` says how a URL is read (retries, client options); open it with
    :func:`data_pipeline.byte_streams.open_shard`.
    """

    path: Path | str
    name: str
    num_samples: int
    remote: RemoteOptions | None = None

    @property
    def is_remote(self) -> bool:
        """True when ``path`` is a URL (``s3://``, ``http://``, ``pipe:``...)."""
        return is_url(self.path)


def shard_refs(manifest) -> list[ShardRef]:
    """The manifest's data shards as :class:`ShardRef` (absolute paths or URLs, manifest order)."""
    remote = getattr(manifest, "remote", None)
    return [ShardRef(path, info.path, info.num_samples, remote)
            for path, info in zip(manifest.shard_paths(), manifest.shards)]


class _SpanDone(Exception):
    """Raised from ``select`` once the span is read, to stop without reading on."""


class _Positions:
    """Numbers the samples (runs of members sharing a key) as the tar streams past."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop
        self.key: str | None = None
        self.pos = -1

    def select(self, fname: str) -> bool:
        # Called for every member before its data is read, so members outside
        # [start, stop) are skipped without being copied into memory.
        key, _ = split_name(fname)
        if key is None:
            return False
        if key != self.key:
            self.key, self.pos = key, self.pos + 1
        if self.pos >= self.stop:
            raise _SpanDone
        return self.start <= self.pos < self.stop


class _Groups:
    """Gathers members into samples (runs sharing a key) and checks each finished sample."""

    def __init__(self, shard: ShardRef, num_classes: int, log: SkipLog, start: int) -> None:
        self.shard, self.num_classes, self.log = shard, num_classes, log
        self.key: str | None = None
        self.members: dict[str, bytes] = {}
        self.done = start  # positions before this one are settled (yielded or reported)

    def add(self, fname: str, data: bytes) -> Iterator[RawSample]:
        key, ext = split_name(fname)
        if key is None or ext is None:
            return  # not a sample's member (no key.ext name): WebDataset skips these too
        if key != self.key:
            yield from self.close()
            self.key = key
        self.members[ext.lower()] = data

    def close(self) -> Iterator[RawSample]:
        if self.key is not None:
            yield from _finish(self.shard, self.key, self.members, self.num_classes, self.log)
            self.done += 1
        self.key, self.members = None, {}


def read_span(shard: ShardRef, start: int, stop: int, num_classes: int,
              log: SkipLog) -> Iterator[RawSample]:
    """The good samples at positions ``[start, stop)`` of ``shard``; bad ones go to ``log``."""
    stop = min(stop, shard.num_samples)
    if start >= stop:
        return
    if not shard.is_remote and not Path(shard.path).is_file():
        log.add(BadSample(MISSING_SHARD, shard.name, f"#{start}", f"{shard.path} does not exist; "
                          "copy the shard back or rewrite the manifest", count=stop - start))
        return
    try:
        opened = open_shard(shard)
    except SourceUnreachable as e:
        log.add(_unreachable(shard, e, f"#{start}", stop - start))
        return
    groups = _Groups(shard, num_classes, log, start)
    positions = _Positions(start, stop)
    failure: Exception | None = None
    with opened as stream:
        try:
            try:
                for fname, data in plain_members(stream, positions.select):
                    yield from groups.add(fname, data)
            except NotPlainTar:
                # Start over with the general reader at the first sample not yet settled.
                groups.key, groups.members = None, {}
                positions = _Positions(groups.done, stop)
                stream.seek(0)
                for fname, data in library_members(stream, positions.select):
                    yield from groups.add(fname, data)
        except _SpanDone:
            pass
        except Exception as exn:  # a cut or damaged file: tarfile and OSError kinds
            failure = exn
    if failure is not None:
        if groups.key is not None and {"jpg", "cls"} <= groups.members.keys():
            # Both members were read whole before the damage: the sample is fine.
            yield from groups.close()
        # Name the first lost sample: the half-read one, else the one whose member failed.
        where = groups.key or (positions.key if positions.pos >= groups.done else None) or f"#{groups.done}"
        if isinstance(failure, SourceUnreachable):
            log.add(_unreachable(shard, failure, where, stop - groups.done))
            return
        log.add(BadSample(TRUNCATED_SHARD, shard.name, where, f"unreadable after "
                          f"{groups.done - start} of {stop - start} samples ({failure}); "
                          "re-copy or re-create the shard", count=stop - groups.done))
        return
    yield from groups.close()
    if groups.done < stop:
        log.add(BadSample(TRUNCATED_SHARD, shard.name, f"#{groups.done}", f"the shard ends after "
                          f"{groups.done} samples, the manifest says {shard.num_samples}; "
                          "re-copy or re-create it", count=stop - groups.done))


def _unreachable(shard: ShardRef, err: SourceUnreachable, where: str, count: int) -> BadSample:
    if err.missing:
        return BadSample(MISSING_SHARD, shard.name, where, f"{err.url} does not exist ({err.detail}); "
                         "upload the shard again or rewrite the manifest", count=count)
    return BadSample(UNREACHABLE_SHARD, shard.name, where, f"{err.url} is unreachable ({err.detail}); "
                     "check the server, the endpoint and credentials (or raise data.retries)", count=count)


def _finish(shard: ShardRef, key: str, group: dict[str, bytes], num_classes: int,
            log: SkipLog) -> Iterator[RawSample]:
    if "jpg" not in group:
        log.add(BadSample(MISSING_JPG, shard.name, key, "the sample has no .jpg member"))
        return
    if "cls" not in group:
        log.add(BadSample(MISSING_CLS, shard.name, key, "the sample has no .cls member"))
        return
    label = parse_label(group["cls"], num_classes)
    if isinstance(label, str):
        log.add(BadSample(BAD_LABEL, shard.name, key, label))
        return
    yield RawSample(shard.name, key, group["jpg"], label)
