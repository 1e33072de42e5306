"""Images per second of the data loaders on 112x112 JPEG shards, beside two baselines.

Rows:

- ``webdataset`` and ``dali`` (CPU decode): ``build_loader(..., mode="exact")`` over the
  shards, one rank, random flip on: what training gets;
- ``image folder``: the same JPEGs as files ``root/<label>/<key>.jpg`` read by a plain
  ``torch.utils.data.Dataset`` with PIL and a shuffling ``DataLoader`` (the usual setup);
- ``PIL decode floor``: a bare loop decoding the JPEG bytes already in memory, one core:
  any PIL-based loader pays at least this per image and core;
- ``random_tensors``: in-memory tensors, no decode (what the loader contract costs by itself).

Each row is the median of ``--repeats`` timed epochs after one untimed epoch (worker
start-up, DALI index files and the page cache are warm). The data is rendered with
:class:`data_pipeline.synthetic.SyntheticFaces` and written with ``write_shards``.
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results import machine_description, markdown_table, write_section  # noqa: E402
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
                            workers=2, progress=True)
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


def _cpu_seconds() -> float:
    # Loader worker processes are reaped at the end of each epoch, so their time is in
    # RUSAGE_CHILDREN by then; DALI's threads are in RUSAGE_SELF.
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


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


def loader_rate(kind: str, manifest, workers: int, batch: int, repeats: int
                ) -> tuple[float, float]:
    """images/s of one exact epoch of ``build_loader(kind, ...)`` on one rank."""
    loader = build_loader(kind, manifest, rank=0, world_size=1, batch_size=batch, workers=workers,
                          mode="exact")

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


def main() -> None:
    """Run the comparison, print the table and record it in bench/RESULTS.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000, help="JPEGs to render (112x112)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per row (median)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
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
        b, r = args.batch_size, args.repeats
        runs = [(f"{kind} loader", w, lambda k=kind, w=w: loader_rate(k, manifest, w, b, r))
                for kind in ("webdataset", "dali") for w in (1, 2)]
        runs += [("image folder + PIL + DataLoader", w,
                  lambda w=w: folder_rate(folder, w, b, r)) for w in (1, 2)]
        runs += [("random_tensors loader (no decode)", 0,
                  lambda: loader_rate("random_tensors", manifest, 0, b, r))]
        for name, workers, run in runs:
            rate, cpu = run()
            rows.append((name, str(workers), rate, cpu))
            print(f"{name}, workers={workers}: {rate:,.0f} img/s, {cpu:.3f} CPU ms/img",
                  flush=True)

    headers = ["loader", "workers", "images/s", "vs PIL floor", "CPU ms/img (all processes)"]
    table = markdown_table(headers, [[n, w, f"{r:,.0f}", f"{r / floor:.2f}x", f"{c:.3f}"]
                                     for n, w, r, c in rows])
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
            "less than images/s. Written by `bench/data_bench.py`.")
    write_section("Data loaders", note + "\n\n" + table)
    print("\nwrote the 'Data loaders' section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
