"""Converting insightface RecordIO or an image folder into a shard directory."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .byte_streams import RemoteOptions
from .image_folder import ImageFolderSource
from .manifest import Manifest, atomic_write_bytes
from .recordio import RecordIOSource
from .remote_output import ShardHook, write_dataset_to
from .shards import write_shards

KINDS = ("recordio", "folder")
WRITE_OPTIONS = {"samples_per_shard", "seed", "workers", "progress"}
SOURCE_OPTIONS = {"recordio": {"idx_path", "copy_bins"}, "folder": {"skip_bad"}}


def _find_rec(src: Path) -> Path:
    if src.is_dir():
        recs = sorted(src.glob("*.rec"))
        if (src / "train.rec").is_file():
            return src / "train.rec"
        if len(recs) == 1:
            return recs[0]
        raise FileNotFoundError(f"{src} holds {len(recs)} .rec files and no train.rec: pass the "
                                ".rec file itself")
    if not src.is_file():
        raise FileNotFoundError(f"RecordIO file {src} does not exist")
    return src


def _copy_bins(rec: Path, out: Path) -> dict[str, str]:
    """Copy the verification ``.bin`` files that sit beside an insightface ``.rec`` (lfw.bin, ...)."""
    found = {}
    for b in sorted(rec.parent.glob("*.bin")):
        dest = out / b.name
        tmp = out / f".{b.name}.tmp"
        shutil.copyfile(b, tmp)
        os.replace(tmp, dest)
        found[b.stem] = b.name
    return found


def convert(kind: str, src: str | os.PathLike, out_dir: str | os.PathLike,
            remote: RemoteOptions | None = None, **opts: Any) -> Manifest:
    """Convert ``src`` to a shard directory ``out_dir``; ``kind`` is "recordio" or "folder".

    ``out_dir`` may be a URL (``s3://bucket/data``): shards are uploaded as they are written
    and the manifest last (see :mod:`data_pipeline.remote_output`).

    Options: ``samples_per_shard``, ``seed``, ``workers``, ``progress`` (see ``write_shards``);
    for "recordio" ``idx_path`` and ``copy_bins`` (copy ``*.bin`` verification sets found beside
    the ``.rec``, default True); for "folder" ``skip_bad`` (skip unreadable images, listed in
    ``skipped_images.txt``). A folder conversion writes ``identities.txt`` (line i: label i).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown conversion kind {kind!r}: choose one of {', '.join(KINDS)}")
    allowed = WRITE_OPTIONS | SOURCE_OPTIONS[kind]
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise TypeError(f"convert({kind!r}) got unknown option(s) {', '.join(unknown)}: "
                        f"valid options are {', '.join(sorted(allowed))}")
    return write_dataset_to(out_dir, lambda out, on_shard: _convert(kind, Path(src), out, on_shard, opts),
                            remote)


def _convert(kind: str, src: Path, out: Path, on_shard: ShardHook, opts: dict[str, Any]) -> Manifest:
    write_opts = {k: v for k, v in opts.items() if k in WRITE_OPTIONS}
    write_opts["on_shard"] = on_shard
    progress = bool(opts.get("progress", True))
    out.mkdir(parents=True, exist_ok=True)

    if kind == "recordio":
        rec = _find_rec(src)
        source = RecordIOSource(rec, opts.get("idx_path"), progress=progress)
        verification = _copy_bins(rec, out) if opts.get("copy_bins", True) else {}
        return write_shards(source, out, verification=verification, **write_opts)

    folder = ImageFolderSource(src, skip_bad=bool(opts.get("skip_bad", False)), progress=progress)
    atomic_write_bytes(out / "identities.txt",
                       "".join(f"{name}\n" for name in folder.identities).encode("utf-8"))
    skipped_list = out / "skipped_images.txt"
    if folder.skipped:
        atomic_write_bytes(skipped_list, "".join(f"{p}\t{why}\n" for p, why in folder.skipped)
                           .encode("utf-8"))
    elif skipped_list.exists():
        skipped_list.unlink()
    return write_shards(folder, out, **write_opts)
