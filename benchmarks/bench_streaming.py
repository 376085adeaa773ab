"""Data at any size: peak memory and images/s for 10k, 50k and 200k generated 64 px images, held
in memory (the engine's fast path, and what every run did before), read per batch from the
decoded-image cache on disk, or decoded per batch in worker processes.

The images (photo-like JPEGs: smooth colour fields and noise, 10 classes) are made once under
``--root``. Each (size, storage) then runs in a fresh process, as a run would: the ``csv``
dataset plugin lists the first N images, the engine fingerprints them and splits them, and
``RunData.pixels`` opens the train split's images with ``data.storage`` forced (memory with an
unlimited budget; disk and stream under a 64 MB budget) and a fresh cache folder; then
``--epochs`` epochs of shuffled batches of 256 are drawn as training draws them (positions ->
``uint8`` batch -> random shift and flip -> normalised floats). Reported: seconds to open (for
memory and disk: decoding everything and writing the cache), images/s of the last epoch, and
peak RSS of the process and of its largest worker (``ru_maxrss``).

    python benchmarks/bench_streaming.py [--sizes 10000 50000 200000] [--json out.json]
"""

from __future__ import annotations

import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import Report, parser

STORAGES = ("memory", "disk", "stream")


def make_images(root: Path, total: int, size: int = 64) -> Path:
    """``total`` JPEGs in ``root/class<k>/``, the i-th of each class listed in order in
    ``root/all.csv`` (so the first N rows hold N/10 images of each class); made once."""
    manifest = root / "all.csv"
    if manifest.exists() and sum(1 for _ in manifest.open()) - 1 >= total:
        return manifest
    from concurrent.futures import ProcessPoolExecutor

    root.mkdir(parents=True, exist_ok=True)
    per_class = total // 10
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_make_chunk, [(root, c, start, min(per_class, start + 2000), size)
                                    for c in range(10) for start in range(0, per_class, 2000)]))
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for i in range(per_class):
            for c in range(10):
                writer.writerow([f"class{c}/{i:06d}.jpg", f"class{c}"])
    return manifest


def _make_chunk(job) -> None:
    from PIL import Image

    root, c, start, stop, size = job
    folder = root / f"class{c}"
    folder.mkdir(exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(start, stop):
        path = folder / f"{i:06d}.jpg"
        if path.exists():  # made by an earlier, interrupted call (written under another name, then renamed)
            continue
        rng = np.random.default_rng(c * 1_000_003 + i)
        base = rng.uniform(0, 255, 3) * 0.5 + 25 * c
        field = (base[None, None, :] + 80 * np.sin(6 * xx[..., None] * rng.uniform(0.5, 2, 3) + rng.uniform(0, 6, 3))
                 * np.cos(5 * yy[..., None] * rng.uniform(0.5, 2, 3)) + rng.normal(0, 12, (size, size, 3)))
        Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.tmp", format="JPEG", quality=90)
        (folder / f"{i:06d}.tmp").rename(path)


def child(n: int, storage: str, root: Path, epochs: int, workers: int) -> dict:
    """One (size, storage) in this process: what a run does up to its training batches."""
    import torch

    from fusion_engine.augment import shift_flip
    from fusion_engine.data import dataset_fingerprint, run_data, split_indices
    from fusion_engine.plugins import get_plugins
    from fusion_engine.records import InputConfig
    from fusion_engine.spec import SplitSpec
    from fusion_engine.training import _Normaliser

    torch.set_num_threads(1)
    manifest = root / f"first-{n}.csv"
    with (root / "all.csv").open() as src, manifest.open("w") as dst:
        for i, line in enumerate(src):
            if i > n:
                break
            dst.write(line)
    record = get_plugins().catalog().get("dataset", "csv").record
    t0 = time.perf_counter()
    dataset = record.load(record.params(path=manifest), base_dir=root)
    indices = split_indices(dataset, SplitSpec(val=0.1, test=0.1), 0)
    fingerprint = dataset_fingerprint(dataset)
    listed = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=root.parent) as cache:
        data = run_data(dataset, indices, cache_dir=Path(cache), fingerprint=fingerprint)
        data.memory_budget = "64MB" if storage != "memory" else 1.0
        data.storage, data.workers = storage, workers
        cfg = InputConfig(size=64, mean=(0.5,) * 3, std=(0.25,) * 3)
        t0 = time.perf_counter()
        train = data.pixels(cfg)["train"]
        train.store  # opened: decoded (and cached) for memory and disk
        opened = time.perf_counter() - t0
        normalise = _Normaliser(cfg, torch.device("cpu"))
        gen = torch.Generator().manual_seed(0)
        seconds = []
        for _ in range(epochs):
            t0 = time.perf_counter()
            positions = torch.randperm(len(train), generator=gen).split(256)
            for xb in train.batches(positions):
                normalise(shift_flip(xb, 8, True, gen))
            seconds.append(time.perf_counter() - t0)
    return {"n": n, "storage": storage, "train_images": len(train), "list_and_fingerprint_s": listed,
            "open_s": opened, "epoch_s": seconds[-1], "images_per_s": len(train) / seconds[-1],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    p.add_argument("--storages", nargs="+", default=list(STORAGES), choices=STORAGES)
    p.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "fusion-engine-bench-64px")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("N", "STORAGE"), help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.root, args.epochs, args.workers)))
        return
    report = Report("streaming", args)
    t0 = time.perf_counter()
    make_images(args.root, max(args.sizes))
    report.add("images made (or found)", f"{max(args.sizes):,} JPEGs of 64 px in {time.perf_counter() - t0:.0f} s",
               images=max(args.sizes))
    results = []
    for n in args.sizes:
        for storage in args.storages:
            out = subprocess.run([sys.executable, __file__, "--root", str(args.root), "--epochs", str(args.epochs),
                                  "--workers", str(args.workers), "--child", str(n), storage],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            report.add(f"{n:>7,} images, {storage}",
                       f"peak RSS {r['peak_rss_mb']:6.0f} MB (worker {r['peak_worker_rss_mb']:4.0f} MB)  "
                       f"open {r['open_s']:6.1f} s  epoch {r['images_per_s']:7.0f} img/s  "
                       f"(listing + fingerprint {r['list_and_fingerprint_s']:.1f} s)", **r)
    for storage in ("disk", "stream"):
        rss = [r["peak_rss_mb"] for r in results if r["storage"] == storage]
        if len(rss) >= 2:
            growth = rss[-1] - rss[0]
            report.check(f"{storage}: flat memory", growth < 0.25 * rss[0],
                         f"peak RSS grows < 25% from {args.sizes[0]:,} to {args.sizes[-1]:,} images "
                         f"({rss[0]:.0f} -> {rss[-1]:.0f} MB)")
    report.finish()


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
