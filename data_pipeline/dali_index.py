"""DALI index files for WebDataset data shards, listing only the samples that pass the checks.

``fn.readers.webdataset`` reads the members an index names (format ``v1.2``, one line per
sample: ``ext offset size name ...``, as DALI's ``wds2idx`` writes). Writing the index here
lets the checks of :mod:`data_pipeline.bad_data` run once per shard and bad samples simply be
left out: DALI stops the whole pipeline on an image it cannot decode. The index
``<shard>.dali.idx`` and a sidecar ``<shard>.dali.json`` (what was left out, and the tar's
size and mtime, to notice a changed shard) sit next to the shard, or under
``~/.cache/shardface/dali-index`` when that directory is read-only.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from webdataset.tariterators import base_plus_ext

from .bad_data import (
    BAD_LABEL,
    CORRUPT_JPEG,
    MISSING_CLS,
    MISSING_JPG,
    MISSING_SHARD,
    TRUNCATED_SHARD,
    WRONG_SIZE,
    BadSample,
    decode_jpeg,
    parse_label,
    pil_message,
)
from .manifest import atomic_write_bytes
from .progress import Progress
from .tar_reader import ShardRef

INDEX_FORMAT = "shardface-dali-index/1"
LABEL_WIDTH = 10  # the .cls payload DALI batches as a fixed-width byte array


@dataclass
class ShardIndex:
    """A shard's DALI index: where it is, how many samples it lists, and what it left out."""

    shard: ShardRef
    index_path: Path
    num_listed: int
    skipped: list[BadSample]
    decode_verified: bool


def cache_dir() -> Path:
    """Where indexes go when the shard directory cannot be written."""
    return Path.home() / ".cache" / "shardface" / "dali-index"


def index_location(shard: ShardRef) -> Path:
    """Where the shard's index file is (beside the shard, or in the cache when that is read-only)."""
    here = Path(shard.path).with_name(Path(shard.path).name.rsplit(".tar", 1)[0] + ".dali.idx")
    if os.access(Path(shard.path).parent, os.W_OK):
        return here
    tag = hashlib.sha256(str(Path(shard.path).resolve()).encode()).hexdigest()[:16]
    return cache_dir() / tag / here.name


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check_header(data: bytes, image_size: tuple[int, int]) -> tuple[str, str] | None:
    """Why the JPEG's header is unusable (reason, detail), or None; no pixels are decoded."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, size = im.format, im.size
    except Exception as e:  # PIL raises several types on damaged headers
        return CORRUPT_JPEG, f"unreadable JPEG header ({type(e).__name__}: {pil_message(e)})"
    if fmt != "JPEG":
        return CORRUPT_JPEG, f"not a JPEG (PIL reads it as {fmt})"
    if (size[1], size[0]) != tuple(image_size):
        return WRONG_SIZE, (f"image is {size[1]}x{size[0]}, the manifest says "
                            f"{image_size[0]}x{image_size[1]}")
    return None


def _scan(shard: ShardRef, num_classes: int, image_size: tuple[int, int], decode: bool
          ) -> tuple[list[str], list[BadSample]]:
    """Index lines of the shard's good samples, and the bad ones."""
    lines: list[str] = []
    bad: list[BadSample] = []
    if not Path(shard.path).is_file():
        return lines, [BadSample(MISSING_SHARD, shard.name, "#0", f"{shard.path} does not exist; "
                                 "copy the shard back or rewrite the manifest",
                                 count=shard.num_samples)]
    file_size = Path(shard.path).stat().st_size
    seen = 0
    key: str | None = None
    group: dict[str, tarfile.TarInfo] = {}

    def finish(tar: tarfile.TarFile) -> None:
        assert key is not None, "finish() follows the members of a sample"
        if "jpg" not in group:
            bad.append(BadSample(MISSING_JPG, shard.name, key, "the sample has no .jpg member"))
            return
        if "cls" not in group:
            bad.append(BadSample(MISSING_CLS, shard.name, key, "the sample has no .cls member"))
            return
        raw = _read(tar, group["cls"])
        label = parse_label(raw, num_classes)
        if isinstance(label, str) or len(raw) != LABEL_WIDTH:
            why = label if isinstance(label, str) else (
                f"label text {raw!r} is not {LABEL_WIDTH} zero-padded digits, which DALI needs")
            bad.append(BadSample(BAD_LABEL, shard.name, key, why))
            return
        jpg = _read(tar, group["jpg"])
        problem = check_header(jpg, image_size)
        if problem is None and decode:
            decoded = decode_jpeg(jpg, image_size)
            problem = decoded if isinstance(decoded, tuple) else None
        if problem is not None:
            bad.append(BadSample(problem[0], shard.name, key, problem[1]))
            return
        lines.append(" ".join(f"{ext} {m.offset_data} {m.size} {m.name}"
                              for ext, m in (("jpg", group["jpg"]), ("cls", group["cls"]))))

    failure: Exception | None = None
    try:
        with tarfile.open(shard.path, "r:") as tar:
            try:
                for member in tar:
                    if not member.isreg():
                        continue
                    k, ext = base_plus_ext(member.name)
                    if k is None:
                        continue
                    if k != key:
                        if key is not None:
                            finish(tar)
                            seen += 1
                        key, group = k, {}
                    if member.offset_data + member.size > file_size:
                        raise tarfile.ReadError(f"member {member.name} runs past the end of "
                                                "the file")
                    group[ext.lower()] = member
            except (tarfile.TarError, OSError, EOFError) as e:
                failure = e
            # After damage, a sample with both members whole still counts.
            if key is not None and (failure is None or {"jpg", "cls"} <= group.keys()):
                finish(tar)
                seen += 1
                key = None
    except (tarfile.TarError, OSError, EOFError) as e:  # not a tar at all
        failure = e
    if failure is not None or seen < shard.num_samples:
        why = f"({failure})" if failure is not None else "(the file ends early)"
        bad.append(BadSample(TRUNCATED_SHARD, shard.name, key or f"#{seen}",
                             f"unreadable after {seen} of {shard.num_samples} samples {why}; "
                             "re-copy or re-create the shard", count=shard.num_samples - seen))
    return lines, bad


def _cached(shard: ShardRef, idx: Path, num_classes: int, image_size: tuple[int, int],
            decode: bool) -> ShardIndex | None:
    """The shard's index when the files beside it are current for these settings, else None."""
    meta_path = idx.with_suffix(".json")
    if not (Path(shard.path).is_file() and meta_path.is_file() and idx.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if (meta.get("format") == INDEX_FORMAT and meta.get("tar") == _stamp(Path(shard.path))
                and meta.get("num_classes") == num_classes
                and meta.get("image_size") == list(image_size)
                and (meta.get("decode_verified") or not decode)):
            return ShardIndex(shard, idx, meta["num_listed"], [BadSample(**e) for e in meta["skipped"]],
                              meta["decode_verified"])
    except (ValueError, KeyError, TypeError, OSError):
        pass  # an unreadable cache entry is rebuilt
    return None


def _build(shard: ShardRef, idx: Path, num_classes: int, image_size: tuple[int, int],
           decode: bool) -> ShardIndex:
    """Scan the shard and write its index and sidecar (atomically: a reader never sees half a file)."""
    stamp = _stamp(Path(shard.path)) if Path(shard.path).is_file() else None
    lines, bad = _scan(shard, num_classes, image_size, decode)
    if stamp is not None:
        idx.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(idx, (f"v1.2 {len(lines)}\n" + "".join(f"{ln}\n" for ln in lines))
                           .encode())
        meta = {"format": INDEX_FORMAT, "tar": stamp, "num_classes": num_classes,
                "image_size": list(image_size), "num_listed": len(lines),
                "decode_verified": decode, "skipped": [asdict(e) for e in bad]}
        atomic_write_bytes(idx.with_suffix(".json"), json.dumps(meta).encode())
    return ShardIndex(shard, idx, len(lines), bad, decode)


def index_shard(shard: ShardRef, num_classes: int, image_size: tuple[int, int],
                decode: bool = False) -> ShardIndex:
    """The shard's index, read from the cache when it is current, else written (atomically)."""
    idx = index_location(shard)
    return _cached(shard, idx, num_classes, image_size, decode) or _build(shard, idx, num_classes,
                                                                          image_size, decode)


def default_index_workers(todo: int) -> int:
    """Threads that index shards: one per usable core, at most 32, at most one per shard."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(todo, cores, 32))


def index_shards(shards: list[ShardRef], num_classes: int, image_size: tuple[int, int],
                 decode: bool = False, workers: int | None = None) -> list[ShardIndex]:
    """Indexes for all shards in their order: current ones read, the others built in parallel.

    A thread pool, not processes: reading the tars is I/O, PIL decodes without holding the
    GIL, and a training process that already holds CUDA and a process group must not fork.
    """
    paths = [index_location(s) for s in shards]  # here, so a redirected cache dir holds for every thread
    out: list[ShardIndex | None] = [_cached(s, p, num_classes, image_size, decode)
                                    for s, p in zip(shards, paths)]
    todo = [i for i, ix in enumerate(out) if ix is None]
    if todo:
        progress = Progress("DALI index" + (" (verifying decodes)" if decode else ""), len(todo),
                            unit="shard", enabled=len(todo) > 8)
        threads = workers if workers is not None else default_index_workers(len(todo))
        if threads <= 1 or len(todo) == 1:
            for i in todo:
                out[i] = _build(shards[i], paths[i], num_classes, image_size, decode)
                progress.update()
        else:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dali-index") as pool:
                futures = {pool.submit(_build, shards[i], paths[i], num_classes, image_size, decode): i
                           for i in todo}
                for future in as_completed(futures):
                    out[futures[future]] = future.result()
                    progress.update()
        progress.close()
    return out  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """``python -m data_pipeline.dali_index MANIFEST``: write the indexes ahead of a run."""
    import argparse

    from .manifest import Manifest
    from .tar_reader import shard_refs
    p = argparse.ArgumentParser(description="Write the DALI index files of a dataset's shards.")
    p.add_argument("manifest",
                   help="manifest.json or its directory (a URL: the shards are staged into the local cache)")
    p.add_argument("--decode", action="store_true", help="decode every image with PIL (data.dali_verify=decode)")
    p.add_argument("--workers", type=int, default=None, help="indexing threads (default: one per core)")
    args = p.parse_args(argv)
    m = Manifest.load(args.manifest)
    refs = shard_refs(m)
    if any(r.is_remote for r in refs):
        # DALI reads the staged copies of remote shards: stage them (the bounded cache) first.
        from .shard_cache import stage_shards
        refs, failed = stage_shards(refs, [s.sha256 for s in m.shards], m.remote)
        for e in failed:
            print(f"not staged: {e.message()}")
    indexes = index_shards(refs, m.num_classes, m.image_size, decode=args.decode, workers=args.workers)
    skipped = sum(e.count for ix in indexes for e in ix.skipped)
    print(f"{len(indexes)} shards indexed: {sum(ix.num_listed for ix in indexes)} samples listed, {skipped} left out")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The bytes of a regular ``member`` of ``tar``."""
    f = tar.extractfile(member)
    if f is None:
        raise tarfile.ReadError(f"member {member.name} is not a regular file")
    return f.read()
