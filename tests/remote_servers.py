"""Servers on 127.0.0.1 for the remote-data tests: a shard folder over HTTP, and S3 (moto).

The HTTP server can honour ``Range`` (or ignore it, as ``python -m http.server`` does) and can
close the connection on purpose part-way through a file, once per listed file, to test resuming.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator


class ShardServer(ThreadingHTTPServer):
    """A threaded HTTP server of one folder.

    ``cuts`` maps a file name to the bytes at which to cut answers: each answer whose range
    holds the first of them is cut there (and that byte taken off the list).
    """

    daemon_threads = True

    def __init__(self, directory: Path, ranges: bool = True) -> None:
        self.ranges = ranges
        self.cuts: dict[str, list[int]] = {}
        self.requests: list[tuple[str, str]] = []  # (path, Range header or "")
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(directory)))

    @property
    def url(self) -> str:
        """The base URL (no trailing slash)."""
        return f"http://127.0.0.1:{self.server_port}"


class _Handler(SimpleHTTPRequestHandler):
    server: ShardServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - keep test output quiet
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return super().do_GET()
        name = path.name
        header = self.headers.get("Range", "")
        data = path.read_bytes()
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", header)
        if m and self.server.ranges:
            start = int(m.group(1))
            end = int(m.group(2)) + 1 if m.group(2) else len(data)
            body = data[start:end]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes" if self.server.ranges else "none")
        self.end_headers()
        with self.server.lock:
            self.server.requests.append((name, header))
            cuts = self.server.cuts.get(name, [])
            cut = cuts.pop(0) if cuts and start <= cuts[0] < start + len(body) else None
        if cut is not None:
            # Hand over part of the body, then drop the connection without finishing it.
            self.wfile.write(body[:cut - start])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@contextlib.contextmanager
def http_server(directory: Path, ranges: bool = True) -> Iterator[ShardServer]:
    """Serve ``directory`` on 127.0.0.1 for the ``with`` block."""
    server = ShardServer(directory, ranges=ranges)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """An S3-compatible server (moto) on 127.0.0.1, configured the way users point s3fs at one.

    Yields the endpoint URL; ``AWS_ENDPOINT_URL`` and test credentials are set in the
    environment for the block (and inherited by loader worker processes).
    """
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        import fsspec
        # File systems are cached by their arguments: one made for another endpoint must go.
        fsspec.filesystem("s3").clear_instance_cache()
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def upload_dir(directory: Path, url: str) -> None:
    """Copy a local folder's files to an ``s3://`` prefix."""
    import fsspec
    fs = fsspec.filesystem("s3")
    bucket = url[len("s3://"):].split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for p in sorted(directory.iterdir()):
        if p.is_file():
            fs.put_file(str(p), f"{url.rstrip('/')}/{p.name}")


def copy_tree(src: Path, dst: Path) -> Path:
    """A copy of a shard folder (tests that damage data keep the original intact)."""
    shutil.copytree(src, dst)
    return dst
