"""A bounded local cache of remote data shards, for readers that only read local files (DALI).

DALI's ``fn.readers.webdataset`` opens files by path, so a remote dataset is staged before the
reader starts: every shard is downloaded once (streamed, retried and resumed as in
:mod:`data_pipeline.byte_streams`), checked against the manifest's SHA-256 and stored under
its checksum, ``<cache>/shards/<sha256>.tar``; a later run (or epoch) finds it there. The
cache holds at most ``cache_gb``: shards of other datasets are evicted oldest first to make
room, and a dataset larger than the bound is refused with a message naming both sizes (the
webdataset loader streams without a local copy).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

from . import byte_streams
from .bad_data import MISSING_SHARD, TRUNCATED_SHARD, UNREACHABLE_SHARD, BadSample
from .byte_streams import RemoteOptions, SourceUnreachable
from .tar_reader import ShardRef

log = logging.getLogger("shardface.data")
GIB = 1 << 30


class CacheTooSmall(ValueError):
    """A remote dataset that does not fit in the bounded local cache."""


def _entry(root: Path, shard: ShardRef, sha256: str) -> Path:
    # Named by content when the manifest gives a checksum (a changed shard gets a new entry),
    # else by URL.
    key = sha256 if len(sha256) == 64 else hashlib.sha256(str(shard.path).encode()).hexdigest()
    return root / f"{key}.tar"


def _download_checked(url: str, dest: Path, sha256: str, options: RemoteOptions) -> str | None:
    """Download ``url`` to ``dest``; returns why it is unusable (checksum mismatch), or None."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with byte_streams.open_stream(url, options) as src, open(tmp, "wb") as out:
            while chunk := src.read(byte_streams.READ_BUFFER):
                digest.update(chunk)
                out.write(chunk)
        if len(sha256) == 64 and digest.hexdigest() != sha256:
            return (f"the downloaded bytes have sha256 {digest.hexdigest()[:12]}..., the manifest "
                    f"says {sha256[:12]}...: the remote shard changed or is damaged")
        os.replace(tmp, dest)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def _cache_files(root: Path) -> list[Path]:
    return [p for p in root.glob("*") if p.is_file()] if root.is_dir() else []


def _make_room(root: Path, need: int, keep: set[Path], bound: int) -> None:
    """Evict the oldest cache files outside ``keep`` until ``need`` more bytes fit in ``bound``."""
    files = sorted(_cache_files(root), key=lambda p: p.stat().st_mtime)
    used = sum(p.stat().st_size for p in files)
    kept = {p.name.split(".")[0] for p in keep}  # a kept shard's index files stay too
    for p in files:
        if used + need <= bound:
            return
        if p.name.split(".")[0] in kept:
            continue
        used -= p.stat().st_size
        p.unlink(missing_ok=True)


def stage_shards(refs: list[ShardRef], checksums: list[str], options: RemoteOptions,
                 download: bool = True) -> tuple[list[ShardRef], list[BadSample]]:
    """Local refs for ``refs`` (remote ones staged into the cache) and the shards that failed.

    ``download=False`` only looks up what is staged already (ranks that wait while local
    rank 0 downloads). A failed shard keeps a ref to its absent cache path.
    """
    root = options.cache_root() / "shards"
    entries = [_entry(root, r, c) if r.is_remote else None for r, c in zip(refs, checksums)]
    todo = [i for i, e in enumerate(entries) if e is not None and not e.is_file()]
    bound = int(options.cache_gb * GIB)
    if download and todo:
        sizes = []
        for i in todo:
            try:
                sizes.append(byte_streams.size(refs[i].path, options) or 0)
            except Exception:  # noqa: BLE001 - an unreachable shard is reported when downloaded
                sizes.append(0)
        staged = sum(e.stat().st_size for e in entries if e is not None and e.is_file())
        need = sum(sizes)
        if staged + need > bound:
            raise CacheTooSmall(
                f"loader=dali reads local files, so remote shards are staged into {root} first; this "
                f"dataset needs {(staged + need) / GIB:.2f} GiB there, more than data.cache_gb="
                f"{options.cache_gb:g}: raise data.cache_gb (with data.cache_dir on a disk with room), "
                "or use loader=webdataset, which streams remote shards without a local copy")
        _make_room(root, need, {e for e in entries if e is not None}, bound)
        log.info("staging %d remote shards (%.2f GiB) into %s for DALI", len(todo), need / GIB, root)
    events: list[BadSample] = []
    out: list[ShardRef] = []
    for i, (ref, entry) in enumerate(zip(refs, entries)):
        if entry is None:
            out.append(ref)
            continue
        if entry.is_file():
            os.utime(entry)  # recently used: evicted last
        else:
            problem = _stage_one(ref, entry, checksums[i], options) if download else \
                BadSample(UNREACHABLE_SHARD, ref.name, "#0", f"{ref.path} was not staged into {root} by "
                          "local rank 0 (see its log)", count=ref.num_samples)
            if problem is not None:
                events.append(problem)
        out.append(replace(ref, path=entry, remote=None))
    return out, events


def _stage_one(ref: ShardRef, entry: Path, sha256: str, options: RemoteOptions) -> BadSample | None:
    try:
        mismatch = _download_checked(str(ref.path), entry, sha256, options)
    except SourceUnreachable as e:
        reason = MISSING_SHARD if e.missing else UNREACHABLE_SHARD
        return BadSample(reason, ref.name, "#0", f"{e.url}: {e.detail}", count=ref.num_samples)
    if mismatch is not None:
        return BadSample(TRUNCATED_SHARD, ref.name, "#0", f"{ref.path}: {mismatch}", count=ref.num_samples)
    return None


def clear(options: RemoteOptions) -> None:
    """Delete the staged shards (and their DALI indexes)."""
    shutil.rmtree(options.cache_root() / "shards", ignore_errors=True)
