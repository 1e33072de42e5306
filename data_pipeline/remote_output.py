"""Writing a dataset to a URL (``s3://``, ``gs://``...): shards uploaded as they are written, the manifest last.

Shards are written one at a time into a local staging folder, uploaded and deleted there, so
the local disk holds about one shard at a time (``on_shard``). Other files (verification sets,
``identities.txt``) follow at the end, then ``manifest.json``: until that last upload the
dataset has no manifest, so a half-written dataset never looks complete. A manifest left by
an earlier write to the same place is deleted first, since the shards it lists are about to
be replaced. An interrupted upload starts over (resuming applies to local output only).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from . import byte_streams, remote_writes
from .byte_streams import RemoteOptions, is_url
from .manifest import MANIFEST_NAME, Manifest

ShardHook = Optional[Callable[[Path], None]]


def write_dataset_to(out: str | os.PathLike, write: Callable[[Path, ShardHook], Manifest],
                     remote: RemoteOptions | None = None) -> Manifest:
    """Run ``write(folder, on_shard)`` for ``out``: a local folder as is, a URL through staging."""
    if not is_url(out):
        return write(Path(out), None)
    url = os.fspath(out).rstrip("/")
    remote = remote or RemoteOptions()
    manifest_url = byte_streams.join(url, MANIFEST_NAME)
    remote_writes.remove(manifest_url, remote)  # also refuses read-only protocols up front
    staging = Path(tempfile.mkdtemp(prefix="shardface-upload-"))

    def upload_shard(path: Path) -> None:
        remote_writes.put_file(path, byte_streams.join(url, path.name), remote)
        path.unlink()

    try:
        manifest = write(staging, upload_shard)
        rest = sorted(p for p in staging.rglob("*") if p.is_file() and not p.name.startswith(".")
                      and p.name != MANIFEST_NAME)
        for p in rest + [staging / MANIFEST_NAME]:
            remote_writes.put_file(p, byte_streams.join(url, p.relative_to(staging).as_posix()), remote)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest.root, manifest.remote = url, remote
    return manifest
