"""Byte streams of local files and URLs, read with bounded retries that resume where they stopped.

Every shard, manifest and verification file is opened here: a local path, an object-store or
web URL (``s3://``, ``gs://``, ``http(s)://`` and anything else fsspec knows) or WebDataset's
``pipe:<command>``. Remote reads go through fsspec's own back ends (aiohttp for HTTP, s3fs,
gcsfs), configured as their users configure them (``FSSPEC_S3``, ``AWS_ENDPOINT_URL`` and
``AWS_*`` credentials, ...), plus :class:`RemoteOptions.storage_options` per protocol.

(Writing to object stores is in :mod:`data_pipeline.remote_writes`.) A connection that fails
mid-stream is opened again at the byte after the last one handed on
(``Range: bytes=pos-`` over HTTP; a seek for object stores; a server or command that can only
start over is read from the start and the first ``pos`` bytes dropped), so a reader sees every
byte exactly once. After ``retries`` failed attempts in a row the stream raises
:class:`SourceUnreachable`, naming the URL.
"""
from __future__ import annotations

import io
import logging
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

log = logging.getLogger("shardface.data")

READ_BUFFER = 1 << 20
"""Bytes a remote stream asks its connection for at once (tar headers are read 512 at a time)."""
REOPEN_SKIP = 4 << 20
"""A forward skip longer than this reopens an HTTP stream at the target instead of reading past."""


def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` and ``pipe:...`` locations, False for local paths."""
    text = os.fspath(location)
    if text.startswith("pipe:"):
        return True
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.replace("+", "").replace("-", "").isalnum() and scheme != "file"


def protocol(url: str) -> str:
    """The URL's scheme (``s3``, ``http``, ``pipe``...)."""
    return "pipe" if url.startswith("pipe:") else url.partition("://")[0].lower()


def join(base: str, relative: str) -> str:
    """``relative`` resolved against the directory URL ``base`` (absolute URLs stay as they are)."""
    if is_url(relative):
        return relative
    return base.rstrip("/") + "/" + relative.lstrip("/")


def parent(url: str) -> str:
    """The directory URL of a file URL."""
    return url.rstrip("/").rsplit("/", 1)[0]


def local_path(location: str | os.PathLike) -> Path:
    """A local path from a path or a ``file://`` URL."""
    text = os.fspath(location)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


@dataclass(frozen=True)
class RemoteOptions:
    """How remote data is reached: retries, back-off, per-protocol client options, local cache."""

    retries: int = 5
    """Failed attempts in a row (open or read) before a URL counts as unreachable."""
    backoff_s: float = 1.0
    """First wait before a retry; doubled after each failure, capped at 30 s, with jitter."""
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Keyword arguments for the fsspec file system of each protocol, e.g. ``{"s3": {"endpoint_url": ...}}``."""
    block_size: int = 4 << 20
    """Bytes per ranged GET from object stores (s3fs/gcsfs)."""
    cache_dir: str = ""
    """Local directory for staged copies (DALI, verification sets); empty: ``~/.cache/shardface/remote``."""
    cache_gb: float = 50.0
    """Bound on the staged copies in ``cache_dir``, in GiB."""

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries={self.retries} must be >= 0")
        if self.backoff_s < 0:
            raise ValueError(f"backoff_s={self.backoff_s} must be >= 0")
        if self.cache_gb <= 0:
            raise ValueError(f"cache_gb={self.cache_gb} must be positive")
        if not isinstance(self.storage_options, dict) or not all(
                isinstance(v, dict) for v in self.storage_options.values()):
            raise ValueError(f"storage_options={self.storage_options!r} must map a protocol "
                             "(s3, gs, http...) to a dict of options, e.g. {s3: {endpoint_url: ...}}")

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row."""
        base = min(30.0, self.backoff_s * 2 ** (failures - 1))
        return base * (0.5 + random.random() / 2)  # jitter: workers that failed together spread out

    def options_for(self, proto: str) -> dict[str, Any]:
        """The client options of ``proto`` (``https`` falls back to ``http``'s)."""
        opts = self.storage_options.get(proto)
        if opts is None and proto == "https":
            opts = self.storage_options.get("http")
        return dict(opts or {})

    def cache_root(self) -> Path:
        """The local staging directory."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else \
            Path.home() / ".cache" / "shardface" / "remote"


DEFAULT_OPTIONS = RemoteOptions()


class SourceUnreachable(OSError):
    """A URL that could not be opened or read after the allowed retries (or that does not exist)."""

    def __init__(self, url: str, detail: str, missing: bool = False) -> None:
        super().__init__(f"{url}: {detail}")
        self.url, self.detail, self.missing = url, detail, missing


class RemoteSetupError(RuntimeError):
    """A URL this installation cannot read at all (no client library for its protocol)."""


# Answers no retry will change: the object is not there, or we may not read it.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# botocore's missing-credentials errors are not OSErrors; retrying them only waits.
PERMANENT_ERROR_NAMES = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}


def describe_error(err: BaseException) -> str:
    """``Type: message`` of an exception, for one-line reports."""
    return f"{type(err).__name__}: {err}".strip().rstrip(":")


class _PipeFile:
    """The standard output of ``pipe:<command>``; a non-zero exit at its end is an error."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)

    def read(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        data = self.proc.stdout.read(n)
        if not data:
            code = self.proc.wait()
            if code != 0:
                err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
                raise OSError(f"command {self.command!r} exited with status {code}"
                              + (f" ({err.splitlines()[-1]})" if err else ""))
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for s in (self.proc.stdout, self.proc.stderr):
            if s is not None:
                s.close()


def filesystem(proto: str, options: RemoteOptions) -> Any:
    """The fsspec file system of ``proto`` with its options; a missing client library is a clear error."""
    try:
        import fsspec
        return fsspec.filesystem(proto, **options.options_for(proto))
    except ImportError as e:
        raise RemoteSetupError(f"reading {proto}:// locations needs a client library that is not "
                               f"installed ({e}); `pip install shardface[remote]` brings fsspec and "
                               "s3fs, `pip install gcsfs` reads gs://") from None
    except ValueError as e:
        if "protocol" not in str(e).lower():
            raise
        raise RemoteSetupError(f"{proto}:// is not a protocol fsspec knows ({e}): use s3://, gs://, "
                               "http(s)://, pipe:<command> or a local path") from None


def _open_at(url: str, pos: int, options: RemoteOptions) -> tuple[Any, int, bool]:
    """A readable file at ``url`` and the byte it is at (<= ``pos``); and whether it seeks cheaply."""
    proto = protocol(url)
    if proto == "pipe":
        return _PipeFile(url[len("pipe:"):]), 0, False
    fs = filesystem(proto, options)
    if proto in ("http", "https"):
        # One streamed GET per shard (block_size=0), resumed with a Range request; ``size``
        # given so that fsspec does not send a HEAD first (a streamed file does not use it).
        headers = dict(options.options_for(proto).get("headers", {}))
        if pos:
            headers["Range"] = f"bytes={pos}-"
        f = fs.open(url, "rb", block_size=0, size=1, headers=headers)
        response = getattr(f, "r", None)
        # 206 with our start: resumed. Anything else (a server that ignores Range answers 200
        # with the whole file) starts from byte 0.
        at = pos if pos and response is not None and response.status == 206 and \
            response.headers.get("Content-Range", "").startswith(f"bytes {pos}-") else 0
        return f, at, False
    f = fs.open(url, "rb", block_size=options.block_size)
    if pos:
        try:
            f.seek(pos)
            return f, pos, True
        except (ValueError, OSError, io.UnsupportedOperation):
            return f, 0, False
    return f, 0, True


def _received_before(f: Any) -> bytes:
    """The bytes an HTTP connection had received before it failed, or ``b""``.

    aiohttp, under fsspec's streamed HTTP file, raises a broken connection's error (e.g.
    ``ContentLengthError``) on the next read even when body bytes that arrived before the break
    are still in its buffer; whether a read sees those bytes first is a race with the close.
    """
    content = getattr(getattr(f, "r", None), "content", None)
    take = getattr(content, "_read_nowait", None)
    if content is None or take is None or getattr(content, "exception", lambda: None)() is None:
        return b""
    try:
        return bytes(take(-1))
    except Exception:  # noqa: BLE001 - a client that keeps its buffer otherwise: nothing saved
        return b""


DEAD_FOR_S = 60.0
"""After a URL failed every retry, later opens in the same process try it once, for this long."""

# URL -> when it last failed every retry. Per process on purpose: resampling draws a dead shard
# again and again, and each draw would otherwise wait through the whole back-off.
_dead_since: dict[str, float] = {}


class ResumingReader(io.RawIOBase):
    """A read-only stream over a URL that reconnects after a failure at the byte it stopped at."""

    def __init__(self, url: str, options: RemoteOptions = DEFAULT_OPTIONS,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__()
        self.url, self.options, self._sleep = url, options, sleep
        self.pos = 0
        self.retried = 0  # reconnections after a failure, over the stream's life
        self._file: Any = None
        self._cheap_seek = False
        self._pending = b""  # bytes received before a connection broke, not yet handed on
        dead = time.monotonic() - _dead_since.get(url, -DEAD_FOR_S) < DEAD_FOR_S
        # Open now: an unreachable URL is reported at open (a recently dead one after one try).
        self._retrying(lambda: None, retries=0 if dead else None)
        _dead_since.pop(url, None)

    # -- connection ------------------------------------------------------------------------
    def _connect(self) -> None:
        f, at, cheap = _open_at(self.url, self.pos, self.options)
        try:
            while at < self.pos:  # the source started over: drop what was handed on already
                chunk = f.read(min(READ_BUFFER, self.pos - at))
                if not chunk:
                    raise EOFError(f"the stream ended at byte {at}, before byte {self.pos} "
                                   "where it was resumed (the object changed?)")
                at += len(chunk)
        except BaseException:
            f.close()
            raise
        self._file, self._cheap_seek = f, cheap

    def _drop(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close too
                pass
            self._file = None

    def _retrying(self, action: Callable[[], Any], retries: int | None = None) -> Any:
        retries = self.options.retries if retries is None else retries
        failures = 0
        while True:
            try:
                if self._file is None and not self._pending:
                    self._connect()
                return action()
            except RemoteSetupError:
                raise
            except PERMANENT_ERRORS as e:
                self._drop()
                raise SourceUnreachable(self.url, describe_error(e),
                                        missing=isinstance(e, FileNotFoundError)) from e
            except Exception as e:  # noqa: BLE001 - network errors come in many types
                self._drop()
                if type(e).__name__ in PERMANENT_ERROR_NAMES:
                    raise SourceUnreachable(self.url, f"{describe_error(e)}: set the credentials (e.g. "
                                            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)") from e
                failures += 1
                if failures > retries:
                    _dead_since[self.url] = time.monotonic()
                    raise SourceUnreachable(self.url, f"{failures} attempts in a row failed at byte "
                                            f"{self.pos} (last: {describe_error(e)})") from e
                wait = self.options.delay(failures)
                log.warning("reading %s failed at byte %d (%s); retry %d of %d in %.1f s",
                            self.url, self.pos, describe_error(e), failures, retries, wait)
                self.retried += 1
                self._sleep(wait)

    # -- io.RawIOBase ----------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def _read(self, n: int) -> bytes:
        if self._pending:  # bytes saved from a broken connection come first
            data, self._pending = self._pending[:n], self._pending[n:]
            return data
        try:
            return self._file.read(n)
        except Exception as e:  # noqa: BLE001 - the same network errors as in _retrying
            data = _received_before(self._file)
            if not data:
                raise
            # The bytes that arrived before the cut are handed on; the next read reconnects
            # after them. Without this a server that cuts every answer at the same byte could
            # never be read past it, and the samples before the cut would be lost too.
            log.warning("reading %s failed at byte %d (%s) after %d more bytes had arrived; "
                        "reconnecting after them", self.url, self.pos, describe_error(e), len(data))
            self._drop()
            self.retried += 1
            data, self._pending = data[:n], data[n:]
            return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._retrying(lambda: self._read(len(view)))
        n = len(data)
        view[:n] = data
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            target = self.pos + offset
        elif whence == io.SEEK_SET:
            target = offset
        else:
            raise io.UnsupportedOperation("a remote stream cannot seek from its end")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        if target == self.pos:
            return self.pos
        if target > self.pos and self._file is not None and self._cheap_seek:
            try:
                self._file.seek(target)
                self.pos = target
                return self.pos
            except Exception:  # noqa: BLE001 - fall back to a new connection
                pass
        if target < self.pos or target - self.pos > REOPEN_SKIP or self._file is None:
            self._drop()
            self._pending = b""
            self.pos = target  # the next read connects there (or drops up to there)
            return self.pos
        while self.pos < target:  # a short skip: read past it on the open connection
            chunk = self.read(min(READ_BUFFER, target - self.pos))
            if not chunk:
                break
        return self.pos

    def close(self) -> None:
        self._drop()
        super().close()


def open_stream(location: str | os.PathLike, options: RemoteOptions | None = None) -> BinaryIO:
    """A buffered binary stream of a local file or a URL (remote ones retried and resumed)."""
    if not is_url(location):
        return open(local_path(location), "rb")
    raw = ResumingReader(os.fspath(location), options or DEFAULT_OPTIONS)
    return io.BufferedReader(raw, buffer_size=READ_BUFFER)


def open_shard(shard: Any) -> BinaryIO:
    """The byte stream of a data shard (``ShardRef``: ``.path`` and ``.remote``); every reader opens shards here."""
    return open_stream(shard.path, getattr(shard, "remote", None))


def read_bytes(location: str | os.PathLike, options: RemoteOptions | None = None) -> bytes:
    """The whole content of a (small) local file or URL."""
    with open_stream(location, options) as f:
        return f.read()


def exists(location: str | os.PathLike, options: RemoteOptions | None = None) -> bool:
    """Whether a local file or remote object exists (``pipe:`` commands count as existing)."""
    if not is_url(location):
        return local_path(location).is_file()
    url = os.fspath(location)
    if protocol(url) == "pipe":
        return True
    try:
        return bool(filesystem(protocol(url), options or DEFAULT_OPTIONS).exists(url))
    except Exception:  # noqa: BLE001 - unreachable counts as absent here
        return False


def size(location: str | os.PathLike, options: RemoteOptions | None = None) -> int | None:
    """Bytes in a local file or remote object, or None where the server does not say."""
    if not is_url(location):
        return local_path(location).stat().st_size
    url = os.fspath(location)
    if protocol(url) == "pipe":
        return None
    value = filesystem(protocol(url), options or DEFAULT_OPTIONS).size(url)
    return int(value) if value is not None else None


def list_names(directory: str | os.PathLike, options: RemoteOptions | None = None) -> list[str] | None:
    """File names directly inside a local or remote directory, or None where it cannot be listed."""
    if not is_url(directory):
        p = local_path(directory)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else None
    url = os.fspath(directory)
    try:
        entries = filesystem(protocol(url), options or DEFAULT_OPTIONS).ls(url, detail=False)
    except Exception:  # noqa: BLE001 - a server without listings
        return None
    return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)


def download(location: str, dest: Path, options: RemoteOptions | None = None) -> None:
    """Copy a URL to the local file ``dest`` through a temporary name (streamed, resumed on failure)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with open_stream(location, options) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, READ_BUFFER)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
