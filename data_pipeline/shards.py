"""Writing a dataset as globally shuffled WebDataset data shards: atomic, resumable, checked."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from collections import deque
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Protocol, TextIO, runtime_checkable

import numpy as np

from .jpeg import describe_image, jpeg_size
from .manifest import MANIFEST_NAME, Manifest, ShardInfo, atomic_write_bytes
from .progress import Progress, quantity
from .tar_writer import write_tar_atomic

JOURNAL_NAME = ".shardface-progress.jsonl"
JOURNAL_FORMAT = "shardface-write/1"
SHARD_PATTERN = re.compile(r"^train-(\d{6,})\.tar(\.tmp)?$")
LABEL_WIDTH = 10


@runtime_checkable
class SampleSource(Protocol):
    """Random-access samples: ``source[i] -> (jpeg_bytes, label)`` for ``0 <= i < len(source)``.

    ``num_classes`` bounds the labels (``0 <= label < num_classes``); ``name`` says where the
    samples come from (it goes into the manifest and identifies the source on resume).
    Sources are pickled into worker processes when ``workers > 1``.
    """

    name: str

    @property
    def num_classes(self) -> int: ...

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[bytes, int]: ...


def sample_name(source: SampleSource, i: int) -> str:
    """``sample i of source '...'``, with the file it came from when the source can say (``describe(i)``)."""
    describe = getattr(source, "describe", None)
    where = f" ({describe(i)})" if callable(describe) else ""
    return f"sample {i}{where} of source {source.name!r}"


class SampleError(RuntimeError):
    """Reading or checking one sample of a source failed; the message names the sample."""


def shard_name(index: int) -> str:
    """File name of data shard ``index`` (``train-000000.tar``)."""
    return f"train-{index:06d}.tar"


def shuffle_order(num_samples: int, seed: int) -> np.ndarray:
    """The global shuffle: position ``k`` of the written dataset holds source sample ``order[k]``."""
    return np.random.default_rng(seed).permutation(num_samples).astype(np.int64)


def shard_sizes(num_samples: int, samples_per_shard: int) -> list[int]:
    """Sizes of the data shards: ``ceil(N / samples_per_shard)`` shards whose sizes differ by at most 1.

    Even sizes keep ranks and loader workers that split the shards equally busy.
    """
    num_shards = -(-num_samples // samples_per_shard)
    base, extra = divmod(num_samples, num_shards)
    return [base + (1 if s < extra else 0) for s in range(num_shards)]


def encode_label(label: int) -> bytes:
    """The ``.cls`` payload: ASCII decimal, zero-padded to 10 characters (fixed width for DALI)."""
    return f"{label:0{LABEL_WIDTH}d}".encode("ascii")


# -- reading samples (in this process or in a pool) ------------------------------------------------

def _prepare(source: SampleSource, i: int) -> tuple[bytes, int, tuple[int, int]]:
    """Read sample ``i`` and check it is a JPEG with an integer label; returns its [H, W] too."""
    try:
        jpeg, label = source[i]
    except Exception as e:  # noqa: BLE001 - re-raised with the sample named
        raise SampleError(f"reading {sample_name(source, i)} failed: "
                          f"{type(e).__name__}: {e}") from e
    if isinstance(label, (float, np.floating)) and float(label).is_integer():
        label = int(label)
    if not isinstance(label, (int, np.integer)) or isinstance(label, bool):
        raise SampleError(f"{sample_name(source, i)} has label {label!r}: "
                          "labels must be integers")
    if not isinstance(jpeg, (bytes, bytearray, memoryview)):
        raise SampleError(f"{sample_name(source, i)} gave {type(jpeg).__name__} "
                          "instead of JPEG bytes")
    jpeg = bytes(jpeg)
    size = jpeg_size(jpeg)
    if size is None:
        raise SampleError(f"{sample_name(source, i)} is not a JPEG with a readable "
                          f"frame header ({describe_image(jpeg)}): re-encode it to JPEG in the source")
    return jpeg, int(label), size


# A pool worker's copy of the source, set once by the initializer so that the source is
# pickled once per worker rather than once per task.
_WORKER_SOURCE: SampleSource | None = None


def _init_worker(source: SampleSource) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


def _prepare_chunk(indices: list[int]) -> list[tuple[bytes, int, tuple[int, int]]]:
    assert _WORKER_SOURCE is not None
    return [_prepare(_WORKER_SOURCE, i) for i in indices]


def _stream_samples(source: SampleSource, indices: np.ndarray, workers: int,
                    chunk: int = 32) -> Generator[tuple[bytes, int, tuple[int, int]], None, None]:
    """Yield prepared samples in ``indices`` order, reading them with ``workers`` processes."""
    if workers <= 1:
        for i in indices:
            yield _prepare(source, int(i))
        return
    # spawn: a forked child of a process that has run torch/OpenMP threads can deadlock.
    ctx = multiprocessing.get_context("spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(source,))
    try:
        chunks = (indices[k:k + chunk].tolist() for k in range(0, len(indices), chunk))
        pending: deque = deque()
        # A bounded window keeps memory flat when readers outrun the tar writer.
        for c in chunks:
            pending.append(pool.apply_async(_prepare_chunk, (c,)))
            if len(pending) >= 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# -- checksums -------------------------------------------------------------------------------------

def file_sha256(path: Path, block: int = 1 << 20) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            sha.update(data)
    return sha.hexdigest()


# -- the resume journal ----------------------------------------------------------------------------

def _read_journal(path: Path, fingerprint: dict[str, Any]) -> dict[int, dict[str, Any]] | None:
    """Completed shards recorded by an earlier run with the same fingerprint (None: no such run)."""
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    try:
        head = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        return None
    if head.get("journal") != JOURNAL_FORMAT or head.get("fingerprint") != fingerprint:
        return None
    done: dict[int, dict[str, Any]] = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
            done[int(entry["shard"])] = entry
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line torn by a crash while it was being appended
    return done


def _append_line(f: TextIO, entry: dict[str, Any]) -> None:
    f.write(json.dumps(entry, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())


# -- the writer ------------------------------------------------------------------------------------

def _check_args(source: Any, samples_per_shard: int, workers: int, num_classes: int) -> int:
    for attr in ("__len__", "__getitem__", "name"):
        if not hasattr(source, attr):
            raise TypeError(f"source {source!r} has no {attr!r}: it must be a SampleSource "
                            "(__len__, __getitem__(i) -> (jpeg_bytes, label), num_classes, name)")
    n = len(source)
    if n <= 0:
        raise ValueError(f"source {source.name!r} has no samples: nothing to write")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be at least 1")
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be positive: does source "
                         f"{source.name!r} report its classes?")
    return n


def _check_verification(out: Path, verification: Mapping[str, str] | None) -> dict[str, str]:
    verification = dict(verification or {})
    for name, rel in verification.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"verification set {name!r}: path {rel!r} must be relative to {out}")
        if not (out / rel).is_file():
            raise FileNotFoundError(f"verification set {name!r}: {out / rel} does not exist: "
                                    "write the .bin files into the output directory first")
    return verification


def _stale_shard_files(out: Path, keep: set[str]) -> list[Path]:
    return [p for p in out.iterdir() if SHARD_PATTERN.match(p.name) and p.name not in keep]


def _resume_state(out: Path, journal_path: Path, fingerprint: dict[str, Any], sizes: list[int],
                  progress: bool) -> dict[int, dict[str, Any]]:
    """Journal entries of the shards an earlier run with the same fingerprint completed, checked
    against the files; with no such run, start a new journal (and drop a manifest it outdates)."""
    previous = _read_journal(journal_path, fingerprint)
    if previous is None:
        if not journal_path.exists() and not (out / MANIFEST_NAME).exists():
            foreign = _stale_shard_files(out, keep=set())
            if foreign:
                raise FileExistsError(f"{out} already holds shard files ({foreign[0].name}, ...) that "
                                      "no shardface run recorded: choose an empty output directory")
        # The old manifest describes shards that are about to be overwritten with other content.
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        atomic_write_bytes(journal_path, (json.dumps({"journal": JOURNAL_FORMAT,
                                                      "fingerprint": fingerprint}) + "\n").encode())
        return {}
    kept: dict[int, dict[str, Any]] = {}
    check = Progress("checking written shards", len(previous), unit="shards",
                     enabled=progress and bool(previous))
    for s, entry in sorted(previous.items()):
        p = out / shard_name(s)
        # Only a renamed, fsynced shard is in the journal, and only one whose bytes still
        # hash to what was recorded is kept; anything else (a .tmp, a damaged file) is rewritten.
        if (s < len(sizes) and entry.get("num_samples") == sizes[s] and p.is_file()
                and file_sha256(p) == entry.get("sha256")):
            kept[s] = entry
        check.update()
    check.close(note=f"{len(kept)} kept")
    return kept


def write_shards(source: SampleSource, out_dir: str | os.PathLike, *, samples_per_shard: int = 10000,
                 seed: int = 0, workers: int = 1, progress: bool = True,
                 verification: Mapping[str, str] | None = None,
                 num_classes: int | None = None,
                 on_shard: Callable[[Path], None] | None = None) -> Manifest:
    """Write ``source`` as globally shuffled data shards plus ``manifest.json`` in ``out_dir``.

    Sample order is a seeded permutation of source indices. Each shard is written to
    ``.tar.tmp``, fsynced and renamed; the manifest is written last. A re-run with the same
    arguments keeps complete shards whose checksum matches and writes only the rest.
    ``verification`` maps names to ``.bin`` files already in ``out_dir``; ``num_classes``
    overrides ``source.num_classes``. ``on_shard(path)`` is called with each finished shard
    (an upload to remote storage, see :mod:`data_pipeline.remote_output`).
    """
    classes = int(num_classes if num_classes is not None else getattr(source, "num_classes", 0))
    n = _check_args(source, samples_per_shard, workers, classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    verification = _check_verification(out, verification)

    order = shuffle_order(n, seed)
    sizes = shard_sizes(n, samples_per_shard)
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    fingerprint = {"source": source.name, "num_samples": n, "num_classes": classes,
                   "samples_per_shard": samples_per_shard, "seed": seed,
                   # Pins the permutation itself, in case the generator's stream ever changes.
                   "order_sha256": hashlib.sha256(order.tobytes()).hexdigest()}

    journal_path = out / JOURNAL_NAME
    kept = _resume_state(out, journal_path, fingerprint, sizes, progress)
    image_size: tuple[int, int] | None = None
    for entry in kept.values():
        height, width = entry["image_size"]
        size = (int(height), int(width))
        if image_size is not None and size != image_size:
            raise ValueError(f"shards written earlier disagree on image size ({image_size} vs {size}): "
                             f"delete {journal_path} to rewrite everything")
        image_size = size

    todo = [s for s in range(len(sizes)) if s not in kept]
    todo_indices = (np.concatenate([order[starts[s]:starts[s + 1]] for s in todo])
                    if todo else np.empty(0, np.int64))
    bar = Progress(f"writing {quantity(len(sizes), 'shard')}", n, enabled=progress,
                   initial=n - len(todo_indices))
    stream = _stream_samples(source, todo_indices, workers)

    def shard_members(s: int) -> Iterator[tuple[str, bytes]]:
        nonlocal image_size
        for k in range(starts[s], starts[s + 1]):
            jpeg, label, size = next(stream)
            if not 0 <= label < classes:
                raise ValueError(f"label {label} of {sample_name(source, int(order[k]))} "
                                 f"is outside [0, {classes}): is num_classes right for this source?")
            if image_size is None:
                image_size = size
            elif size != image_size:
                raise ValueError(f"{sample_name(source, int(order[k]))} is "
                                 f"{size[0]}x{size[1]} but earlier samples are "
                                 f"{image_size[0]}x{image_size[1]}: a dataset holds aligned crops "
                                 "of one size; align or resize the images first")
            bar.update()
            yield f"{k:09d}.jpg", jpeg
            yield f"{k:09d}.cls", encode_label(label)

    try:
        with open(journal_path, "a", encoding="utf-8") as journal:
            for s in todo:
                sha = write_tar_atomic(out / shard_name(s), shard_members(s))
                kept[s] = {"shard": s, "num_samples": sizes[s], "sha256": sha,
                           "image_size": list(image_size)}  # type: ignore[arg-type]
                _append_line(journal, kept[s])
                if on_shard is not None:
                    on_shard(out / shard_name(s))
    finally:
        stream.close()
    bar.close(note=f"{quantity(len(todo), 'shard')} written, {len(sizes) - len(todo)} kept")

    assert image_size is not None
    manifest = Manifest(num_samples=n, num_classes=classes, image_size=image_size,
                        shards=[ShardInfo(shard_name(s), sizes[s], kept[s]["sha256"])
                                for s in range(len(sizes))],
                        source=source.name, verification=verification)
    manifest.save(out / MANIFEST_NAME)
    # Shards of an earlier run with other arguments (more shards, or a crash's .tar.tmp)
    # are not part of this dataset; leaving them would confuse globbing tools.
    for p in _stale_shard_files(out, keep={s.path for s in manifest.shards}):
        p.unlink()
    return manifest
