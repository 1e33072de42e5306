"""The dataset manifest: what a directory of WebDataset data shards holds (``manifest.json``)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import byte_streams, remote_writes
from .atomic import atomic_write_bytes, fsync_dir  # noqa: F401 - re-exported for the writers
from .byte_streams import RemoteOptions, is_url

FORMAT = "shardface-shards/1"
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest file that is missing or does not follow ``shardface-shards/1``."""


@dataclass(frozen=True)
class ShardInfo:
    """One data shard: its path relative to the manifest, sample count and SHA-256 of the tar."""

    path: str
    num_samples: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        """The shard's entry in ``manifest.json``."""
        return {"path": self.path, "num_samples": self.num_samples, "sha256": self.sha256}


def _check_relative(path: str, what: str) -> None:
    # Manifests travel with their directory (copied to a cluster, mounted elsewhere),
    # so every path in them must stay inside that directory, or be a URL.
    if is_url(path):
        return
    p = Path(path)
    if p.is_absolute() or ".." in p.parts or path == "":
        raise ManifestError(f"{what} path {path!r} must be relative to the manifest's directory "
                            "and stay inside it (no leading '/', no '..')")


@dataclass
class Manifest:
    """What a shard directory holds; ``root`` is the directory the relative paths refer to.

    ``root`` is a local directory or a URL (``s3://bucket/data``, ``http://host/data``);
    shard paths are relative to it or URLs themselves. ``remote`` says how URLs are read.
    """

    num_samples: int
    num_classes: int
    image_size: tuple[int, int]
    shards: list[ShardInfo]
    source: str = ""
    verification: dict[str, str] = field(default_factory=dict)
    root: Path | str | None = field(default=None, compare=False)
    remote: RemoteOptions = field(default_factory=RemoteOptions, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.image_size = tuple(int(v) for v in self.image_size)  # type: ignore[assignment]
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise ManifestError(f"image_size={list(self.image_size)} must be [height, width] "
                                "with both positive")
        if self.num_classes <= 0:
            raise ManifestError(f"num_classes={self.num_classes} must be positive")
        counted = sum(s.num_samples for s in self.shards)
        if counted != self.num_samples:
            raise ManifestError(f"num_samples={self.num_samples} but the shards hold {counted} "
                                "samples in total: the manifest is inconsistent, rewrite it")
        for s in self.shards:
            _check_relative(s.path, "shard")
            if s.num_samples < 0:
                raise ManifestError(f"shard {s.path} has num_samples={s.num_samples} < 0")
        for name, rel in self.verification.items():
            _check_relative(rel, f"verification set {name!r}")
        if self.root is not None and not is_url(self.root):
            self.root = Path(self.root)

    # -- paths -------------------------------------------------------------------------------
    @property
    def is_remote(self) -> bool:
        """True when the manifest was read from (or saved to) a URL."""
        return self.root is not None and is_url(self.root)

    def _locate(self, rel: str) -> Path | str:
        if self.root is None:
            raise ManifestError("this manifest has no directory yet: load it with Manifest.load() "
                                "or save it with .save() before asking for absolute paths")
        if is_url(rel):
            return rel
        if is_url(self.root):
            return byte_streams.join(str(self.root), rel)
        return Path(self.root).resolve() / rel

    def shard_paths(self) -> list[Path | str]:
        """Absolute paths (or URLs) of the data shards, in manifest order."""
        return [self._locate(s.path) for s in self.shards]

    def verification_paths(self) -> dict[str, Path]:
        """Local paths of the verification ``.bin`` files, by name.

        Remote ones are copied into the local cache first (they are small and read whole); one
        that cannot be fetched is returned as its would-be cache path, which does not exist.
        """
        out: dict[str, Path] = {}
        for name, rel in self.verification.items():
            where = self._locate(rel)
            out[name] = where if isinstance(where, Path) else self._fetch(where)
        return out

    def _fetch(self, url: str) -> Path:
        import hashlib
        dest = (self.remote.cache_root() / "files" / hashlib.sha256(url.encode()).hexdigest()[:16]
                / url.rsplit("/", 1)[-1])
        if not dest.is_file():
            try:
                byte_streams.download(url, dest, self.remote)
            except OSError as e:
                import logging
                logging.getLogger("shardface.data").warning("could not fetch %s: %s", url, e)
        return dest

    # -- (de)serialisation -------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The ``manifest.json`` document."""
        return {
            "format": FORMAT,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "image_size": list(self.image_size),
            "source": self.source,
            "shards": [s.to_json() for s in self.shards],
            "verification": dict(self.verification),
        }

    @classmethod
    def from_json(cls, doc: Any, root: Path | str | None = None, where: str = "manifest") -> "Manifest":
        """Build a manifest from a parsed ``manifest.json``; errors name ``where`` and the key."""
        if not isinstance(doc, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        if doc.get("format") != FORMAT:
            raise ManifestError(f"{where}: key 'format' is {doc.get('format')!r}, expected "
                                f"{FORMAT!r}: is this a shardface shard directory?")

        def need(key: str, kind: type | tuple[type, ...], d: dict = doc, ctx: str = "") -> Any:
            if key not in d:
                raise ManifestError(f"{where}: missing key '{ctx}{key}'")
            value = d[key]
            # bool is an int in Python; a count of True is a corrupt file, not a count.
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise ManifestError(f"{where}: key '{ctx}{key}' is {value!r}, expected "
                                    f"{getattr(kind, '__name__', kind)}")
            return value

        shards = []
        for i, entry in enumerate(need("shards", list)):
            ctx = f"shards[{i}]."
            if not isinstance(entry, dict):
                raise ManifestError(f"{where}: key 'shards[{i}]' must be an object, got {entry!r}")
            shards.append(ShardInfo(need("path", str, entry, ctx), need("num_samples", int, entry, ctx),
                                    need("sha256", str, entry, ctx)))
        size = need("image_size", list)
        if len(size) != 2 or not all(isinstance(v, int) for v in size):
            raise ManifestError(f"{where}: key 'image_size' is {size!r}, expected [height, width]")
        verification = doc.get("verification", {})
        if not isinstance(verification, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in verification.items()):
            raise ManifestError(f"{where}: key 'verification' must map names to relative paths, "
                                f"got {verification!r}")
        try:
            return cls(num_samples=need("num_samples", int), num_classes=need("num_classes", int),
                       image_size=(size[0], size[1]), shards=shards, source=str(doc.get("source", "")),
                       verification=dict(verification), root=root)
        except ManifestError as e:
            raise ManifestError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike, remote: RemoteOptions | None = None) -> "Manifest":
        """Read ``manifest.json`` (``path`` is the file or its directory, local or a URL)."""
        if is_url(path):
            return cls._load_url(os.fspath(path), remote or RemoteOptions())
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_NAME
        if not p.is_file():
            raise ManifestError(f"no manifest at {p}: expected a shard directory with {MANIFEST_NAME} "
                                "(write one with `shardface data convert`)")
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            from .file_kind import file_kind
            kind = file_kind(p)
            if kind is not None:
                raise ManifestError(f"{p} is {kind}, not a manifest: give the manifest.json written by "
                                    "`shardface data synth|convert` (or its folder)") from None
            raise ManifestError(f"{p} is not valid JSON ({e}): the file is damaged, rewrite it") from None
        m = cls.from_json(doc, root=p.parent, where=str(p))
        if remote is not None:
            m.remote = remote
        return m

    @classmethod
    def _load_url(cls, url: str, remote: RemoteOptions) -> "Manifest":
        if not url.endswith(".json"):
            url = byte_streams.join(url, MANIFEST_NAME)
        try:
            raw = byte_streams.read_bytes(url, remote)
        except byte_streams.SourceUnreachable as e:
            hint = ("check the URL (write one with `shardface data convert --out URL`)" if e.missing
                    else "check the server, the endpoint and the credentials")
            raise ManifestError(f"cannot read the manifest {url}: {e.detail}; {hint}") from None
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{url} is not valid JSON ({e}): the file is damaged, rewrite it") from None
        m = cls.from_json(doc, root=byte_streams.parent(url), where=url)
        m.remote = remote
        return m

    def save(self, path: str | os.PathLike) -> Path | str:
        """Write ``manifest.json`` atomically (``path`` is the file or its directory); returns the file."""
        if is_url(path):
            url = os.fspath(path)
            if not url.endswith(".json"):
                url = byte_streams.join(url, MANIFEST_NAME)
            remote_writes.write_bytes(url, (json.dumps(self.to_json(), indent=1) + "\n").encode("utf-8"),
                                     self.remote)
            self.root = byte_streams.parent(url)
            return url
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_NAME
        atomic_write_bytes(p, (json.dumps(self.to_json(), indent=1) + "\n").encode("utf-8"))
        self.root = p.parent
        return p
