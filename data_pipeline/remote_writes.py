"""Writing objects to remote storage (``s3://``, ``gs://``...) with bounded retries.

HTTP and ``pipe:`` locations are read-only: a write to them is refused up front.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from .byte_streams import (
    DEFAULT_OPTIONS,
    PERMANENT_ERROR_NAMES,
    PERMANENT_ERRORS,
    RemoteOptions,
    RemoteSetupError,
    SourceUnreachable,
    describe_error,
    filesystem,
    protocol,
)

log = logging.getLogger("shardface.data")


def _with_retries(url: str, what: str, action: Callable[[], Any], options: RemoteOptions) -> Any:
    failures = 0
    while True:
        try:
            return action()
        except RemoteSetupError:
            raise
        except PERMANENT_ERRORS as e:
            raise SourceUnreachable(url, f"{what}: {describe_error(e)}") from e
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            if type(e).__name__ in PERMANENT_ERROR_NAMES:
                raise SourceUnreachable(url, f"{what}: {describe_error(e)}") from e
            failures += 1
            if failures > options.retries:
                raise SourceUnreachable(url, f"{what}: {failures} attempts failed "
                                        f"(last: {describe_error(e)})") from e
            log.warning("%s %s failed (%s); retry %d of %d", what, url, describe_error(e), failures,
                        options.retries)
            time.sleep(options.delay(failures))


def _check_writable(url: str) -> str:
    proto = protocol(url)
    if proto in ("http", "https", "pipe"):
        raise ValueError(f"cannot write to {url}: {proto} locations are read-only here; write to a "
                         "local directory or an object store (s3://, gs://)")
    return proto


def put_file(local: str | os.PathLike, url: str, options: RemoteOptions | None = None) -> None:
    """Upload a local file to ``url`` (an object appears whole or not at all on object stores)."""
    options = options or DEFAULT_OPTIONS
    fs = filesystem(_check_writable(url), options)
    _with_retries(url, "uploading to", lambda: fs.put_file(os.fspath(local), url), options)


def write_bytes(url: str, data: bytes, options: RemoteOptions | None = None) -> None:
    """Write ``data`` as the object ``url``."""
    options = options or DEFAULT_OPTIONS
    fs = filesystem(_check_writable(url), options)
    _with_retries(url, "writing", lambda: fs.pipe_file(url, data), options)


def remove(url: str, options: RemoteOptions | None = None) -> None:
    """Delete the object ``url`` if it exists."""
    options = options or DEFAULT_OPTIONS
    fs = filesystem(_check_writable(url), options)
    try:
        fs.rm_file(url)
    except FileNotFoundError:
        pass
