"""Images per second of the data loaders on 112x112 JPEG shards, beside two baselines.

Rows:

- ``webdataset`` and ``dali`` (CPU decode): ``build_loader(..., mode="exact")`` over the
  shards, one rank, random flip on: what training gets (the webdataset loader decodes with
  simplejpeg where it is installed; the ``PIL decode`` row forces PIL);
- ``image folder``: the same JPEGs as files ``root/<label>/<key>.jpg`` read by a plain
  ``torch.utils.data.Dataset`` with PIL and a shuffling ``DataLoader`` (the usual setup);
- ``PIL decode floor``: a bare loop decoding the JPEG bytes already in memory, one core:
  any PIL-based loader pays at least this per image and core; ``simplejpeg decode floor``:
  the same with simplejpeg (into a reused array);
- ``random_tensors``: in-memory tensors, no decode (what the loader contract costs by itself);
- ``webdataset, HTTP`` and ``webdataset, S3``: the same shards streamed from loopback servers
  in processes of their own (``python -m http.server``; moto's S3 server, reached through
  ``AWS_ENDPOINT_URL`` as a user's S3 is): what streaming costs the loader beside local files
  (the servers' own CPU time is not counted).

Each row is the median of ``--repeats`` timed epochs after one untimed epoch (worker
start-up, DALI index files and the page cache are warm). The data is rendered with
:class:`data_pipeline.synthetic.SyntheticFaces` and written with ``write_shards``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results import machine_description, markdown_table, results_path, write_section  # noqa: E402
from data_pipeline.loaders import build_loader  # noqa: E402
from data_pipeline.manifest import Manifest  # noqa: E402
from data_pipeline.shards import write_shards  # noqa: E402
from data_pipeline.synthetic import SynthConfig, SyntheticFaces  # noqa: E402


class JpegFolder(Dataset):
    """An ImageFolder-style dataset: ``root/<label>/<name>.jpg`` decoded with PIL."""

    def __init__(self, root: Path) -> None:
        self.files = sorted(root.glob("*/*.jpg"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.files[i]
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))
        x = torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(path.parent.name)


def make_data(root: Path, images: int) -> tuple[Manifest, list[bytes], Path]:
    """Shards, the same JPEG bytes in memory, and the same JPEGs as an image folder."""
    per_identity = 25
    cfg = SynthConfig(num_identities=max(1, images // per_identity),
                      images_per_identity=per_identity, heldout_identities=0, heldout_pairs=0,
                      image_size=(112, 112))
    manifest = write_shards(SyntheticFaces(cfg), root / "shards", samples_per_shard=500,
                            workers=1, progress=True)
    folder = root / "folder"
    jpegs: list[bytes] = []
    for path in manifest.shard_paths():
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in members.items():
                if not name.endswith(".jpg"):
                    continue
                key = name[:-4]
                data = tar.extractfile(member).read()
                label = int(tar.extractfile(members[key + ".cls"]).read())
                (folder / str(label)).mkdir(parents=True, exist_ok=True)
                (folder / str(label) / name).write_bytes(data)
                jpegs.append(data)
    return manifest, jpegs, folder


def _live_descendants_seconds() -> float:
    """CPU seconds of this process's descendants still running (Linux ``/proc``; else 0)."""
    parent: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        parent[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    ours, total = {os.getpid()}, 0.0
    for pid in sorted(parent):  # children have larger pids, except after pid wrap-around
        if parent[pid] in ours:
            ours.add(pid)
            total += times[pid]
    return total


def _cpu_seconds() -> float:
    # Loader workers that ended are in RUSAGE_CHILDREN once reaped; workers still alive
    # (reaped later, or kept across epochs) are read from /proc; DALI's threads are in
    # RUSAGE_SELF.
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime + _live_descendants_seconds()


def median_rate(epoch, count: int, repeats: int) -> tuple[float, float]:
    """Median images/s and CPU ms per image over ``repeats`` timed ``epoch()`` calls.

    One untimed call comes first. CPU time counts every process and thread of the loader,
    so it says what an image costs even when other work on the machine slows the wall clock.
    """
    epoch()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        epoch()
        times.append(time.perf_counter() - t0)
        cpu.append(_cpu_seconds() - c0)
    return count / statistics.median(times), 1e3 * statistics.median(cpu) / count


def loader_rate(kind: str, manifest, workers: int, batch: int, repeats: int,
                decoder: str | None = None) -> tuple[float, float]:
    """images/s of one exact epoch of ``build_loader(kind, ...)`` on one rank."""
    loader = build_loader(kind, manifest, rank=0, world_size=1, batch_size=batch, workers=workers,
                          mode="exact")
    if decoder is not None:
        loader.decoder = loader._dataset.decoder = decoder

    def epoch() -> None:
        for _ in loader:
            pass

    return median_rate(epoch, len(loader) * batch - loader.last_batch_padding, repeats)


def folder_rate(folder: Path, workers: int, batch: int, repeats: int) -> tuple[float, float]:
    """images/s of a shuffled epoch of the image-folder Dataset through a DataLoader."""
    ds = JpegFolder(folder)
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers)

    def epoch() -> None:
        for _ in dl:
            pass

    return median_rate(epoch, len(ds), repeats)


def floor_rate(jpegs: list[bytes], repeats: int) -> tuple[float, float]:
    """images/s of a bare PIL decode loop over bytes in memory (one core)."""
    def epoch() -> None:
        for data in jpegs:
            with Image.open(io.BytesIO(data)) as im:
                np.asarray(im)  # the images are RGB already: decode, nothing else

    return median_rate(epoch, len(jpegs), repeats)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(argv: list[str], port: int) -> Iterator[str]:
    """A server process on 127.0.0.1:``port`` for the block; yields its base URL."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def remote_copies(shards: Path) -> Iterator[list[tuple[str, str]]]:
    """``[(row name, manifest URL)]`` of the shard folder served over HTTP and S3 on loopback."""
    port = _free_port()
    with contextlib.ExitStack() as stack:
        http = stack.enter_context(_server([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                            "-d", str(shards), str(port)], port))
        rows = [("webdataset loader, HTTP (loopback)", f"{http}/manifest.json")]
        try:
            import fsspec
            s3_port = _free_port()
            endpoint = stack.enter_context(_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                                    "-p", str(s3_port)], s3_port))
        except ImportError:
            print("moto or s3fs not installed: no S3 row", flush=True)
        else:
            os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
            fs = fsspec.filesystem("s3")
            fs.mkdir("bench-shards")
            for f in sorted(shards.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    fs.put_file(str(f), f"s3://bench-shards/{f.name}")
            rows.append(("webdataset loader, S3 (moto, loopback)", "s3://bench-shards/manifest.json"))
        yield rows
def simplejpeg_floor_rate(jpegs: list[bytes], repeats: int) -> tuple[float, float] | None:
    """images/s of a bare simplejpeg decode loop into one reused array (None: not installed)."""
    try:
        import simplejpeg
    except ImportError:
        return None
    out = np.empty((112, 112, 3), np.uint8)

    def epoch() -> None:
        for data in jpegs:
            simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)

    return median_rate(epoch, len(jpegs), repeats)


def main() -> None:
    """Run the comparison, print the table and record it in bench/RESULTS.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000, help="JPEGs to render (112x112)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per row (median)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--no-remote", action="store_true", help="skip the HTTP and S3 streaming rows")
    args = p.parse_args()
    torch.set_num_threads(1)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        manifest, jpegs, folder = make_data(Path(tmp), args.images)
        print(f"data: {manifest.num_samples} JPEGs 112x112 in {len(manifest.shards)} shards, "
              f"mean {sum(map(len, jpegs)) / len(jpegs) / 1024:.1f} KiB; batch {args.batch_size}",
              flush=True)
        floor, floor_cpu = floor_rate(jpegs, args.repeats)
        rows: list[tuple[str, str, float, float]] = [
            ("PIL decode floor (bytes in memory)", "1 (loop)", floor, floor_cpu)]
        print(f"PIL decode floor: {floor:,.0f} img/s, {floor_cpu:.3f} CPU ms/img", flush=True)
        fast = simplejpeg_floor_rate(jpegs, args.repeats)
        if fast is not None:
            rows.append(("simplejpeg decode floor (bytes in memory)", "1 (loop)", *fast))
        b, r = args.batch_size, args.repeats
        runs = [("webdataset loader (in the training process)", 0,
                 lambda: loader_rate("webdataset", manifest, 0, b, r))]
        runs += [(f"{kind} loader", w, lambda k=kind, w=w: loader_rate(k, manifest, w, b, r))
                 for kind in ("webdataset", "dali") for w in (1, 2)]
        runs += [("webdataset loader, PIL decode", w,
                  lambda w=w: loader_rate("webdataset", manifest, w, b, r, decoder="pil")) for w in (1, 2)]
        runs += [("image folder + PIL + DataLoader", w,
                  lambda w=w: folder_rate(folder, w, b, r)) for w in (1, 2)]
        runs += [("random_tensors loader (no decode)", 0,
                  lambda: loader_rate("random_tensors", manifest, 0, b, r))]
        with contextlib.ExitStack() as servers:
            if not args.no_remote:
                for name, url in servers.enter_context(remote_copies(Path(manifest.root))):
                    runs += [(name, w, lambda u=url, w=w: loader_rate("webdataset", u, w, b, r)) for w in (1, 2)]
            for name, workers, run in runs:
                rate, cpu = run()
                rows.append((name, str(workers), rate, cpu))
                print(f"{name}, workers={workers}: {rate:,.0f} img/s, {cpu:.3f} CPU ms/img",
                      flush=True)

    headers = ["loader", "workers", "images/s", "vs PIL floor", "CPU ms/img (all processes)",
               "CPU vs PIL floor"]
    table = markdown_table(headers, [[n, w, f"{r:,.0f}", f"{r / floor:.2f}x", f"{c:.3f}",
                                      f"{c / floor_cpu:.2f}x"] for n, w, r, c in rows])
    print("\n" + table)
    if args.no_write:
        return
    # Other work on the machine takes cores from the loaders: say how busy it was.
    load = f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    note = (f"Machine: {machine_description()}, 1-minute load average {load} "
            f"({os.cpu_count()} cores). No GPU, so DALI decodes on the CPU "
            "(`device='cpu'`). `workers`: DataLoader processes (webdataset, image folder) or DALI "
            f"threads. {args.images} synthetic-face JPEGs 112x112 (quality 90), batch "
            f"{args.batch_size}, one rank, exact epochs with random flip; median of "
            f"{args.repeats} timed epochs after a warm-up epoch. CPU ms/img sums the time of "
            "every process and thread involved, which other load on the machine changes far "
            "less than images/s; `CPU vs PIL floor` is its ratio to the PIL decode loop's. "
            "The webdataset loader decodes with simplejpeg where it is installed (the `PIL "
            "decode` rows force PIL); its DataLoader workers live across epochs (started in "
            "the warm-up epoch). The HTTP and S3 rows stream the same shards from loopback servers "
            "(their own CPU time not counted). Written by `bench/data_bench.py`.")
    write_section("Data loaders", note + "\n\n" + table)
    print(f"\nwrote the 'Data loaders' section of {results_path()}")


if __name__ == "__main__":
    main()
