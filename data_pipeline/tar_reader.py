"""Read the samples at a range of positions of one WebDataset data shard, reporting bad ones."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from webdataset.tariterators import base_plus_ext, tar_file_iterator

from .bad_data import (BAD_LABEL, MISSING_CLS, MISSING_JPG, MISSING_SHARD, TRUNCATED_SHARD,
                       BadSample, SkipLog, parse_label)


@dataclass(frozen=True)
class RawSample:
    """An undecoded sample: where it came from, its JPEG bytes and its checked label."""

    shard: str
    key: str
    jpg: bytes
    label: int


@dataclass(frozen=True)
class ShardRef:
    """A data shard as the readers need it: absolute path, name for messages, manifest count."""

    path: Path
    name: str
    num_samples: int


def shard_refs(manifest) -> list[ShardRef]:
    """The manifest's data shards as :class:`ShardRef` (absolute paths, manifest order)."""
    return [ShardRef(path, info.path, info.num_samples)
            for path, info in zip(manifest.shard_paths(), manifest.shards)]


class _SpanDone(Exception):
    """Raised inside the tar iteration once the span is read, to stop without reading on."""


class _Positions:
    """Numbers the samples (runs of members sharing a key) as the tar streams past."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop
        self.key: str | None = None
        self.pos = -1

    def select(self, fname: str) -> bool:
        # Called for every member before its data is read, so members outside
        # [start, stop) are skipped without being copied into memory.
        key, _ = base_plus_ext(fname)
        if key is None:
            return False
        if key != self.key:
            self.key, self.pos = key, self.pos + 1
        if self.pos >= self.stop:
            raise _SpanDone
        return self.start <= self.pos < self.stop


def read_span(shard: ShardRef, start: int, stop: int, num_classes: int,
              log: SkipLog) -> Iterator[RawSample]:
    """The good samples at positions ``[start, stop)`` of ``shard``; bad ones go to ``log``."""
    stop = min(stop, shard.num_samples)
    if start >= stop:
        return
    if not shard.path.is_file():
        log.add(BadSample(MISSING_SHARD, shard.name, f"#{start}", f"{shard.path} does not exist; "
                          "copy the shard back or rewrite the manifest", count=stop - start))
        return
    positions = _Positions(start, stop)
    failure: list[BaseException] = []

    def stop_shard(exn: BaseException) -> bool:
        if not isinstance(exn, _SpanDone):
            failure.append(exn)
        return False

    group_key: str | None = None
    group: dict[str, bytes] = {}
    done = start  # positions before this one are settled (yielded or reported)
    with open(shard.path, "rb") as stream:
        try:
            for member in tar_file_iterator(stream, handler=stop_shard,
                                            select_files=positions.select):
                key, ext = base_plus_ext(member["fname"])
                if key != group_key:
                    if group_key is not None:
                        yield from _finish(shard, group_key, group, num_classes, log)
                        done += 1
                    group_key, group = key, {}
                group[ext.lower()] = member["data"]
        except Exception as exn:  # a header read past the end of a cut file
            failure.append(exn)
    if failure:
        if group_key is not None and {"jpg", "cls"} <= group.keys():
            # Both members were read whole before the damage: the sample is fine.
            yield from _finish(shard, group_key, group, num_classes, log)
            done += 1
            group_key = None
        # Name the first lost sample: the half-read one, else the one whose member failed.
        where = group_key or (positions.key if positions.pos >= done else f"#{done}")
        log.add(BadSample(TRUNCATED_SHARD, shard.name, where, f"unreadable after {done - start} of "
                          f"{stop - start} samples ({failure[0]}); re-copy or re-create the shard",
                          count=stop - done))
        return
    if group_key is not None:
        yield from _finish(shard, group_key, group, num_classes, log)
        done += 1
    if done < stop:
        log.add(BadSample(TRUNCATED_SHARD, shard.name, f"#{done}", f"the shard ends after {done} "
                          f"samples, the manifest says {shard.num_samples}; re-copy or "
                          "re-create it",
                          count=stop - done))


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
