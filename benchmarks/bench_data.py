"""Data loading: the engine's decode-once (and cache-once) against torchvision's per-epoch loader.

A folder of JPEGs (made here: 10 classes, ``--per-class`` images each, 96 px) is read as a
member's training would read it for ``--epochs`` epochs at 32 px:

- bare: ``torchvision.datasets.ImageFolder`` with a resize transform and a ``DataLoader``
  (``--workers`` processes, batch 64, shuffled), the usual hand-written pipeline, which decodes
  every file again in every epoch;
- engine, first run: ``imagefolder`` decoded once by the engine's thread pool into one uint8
  tensor (and written to the registry's image cache), then one epoch of batches indexed from it;
- engine, later runs: the same tensor read back from the image cache.

    python benchmarks/bench_data.py [--per-class 500] [--epochs 10] [--json out.json]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from _common import Report, parser


def make_folder(root: Path, per_class: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for c in range(10):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            path = folder / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path, quality=90)
            paths.append(path)
    return paths


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args()
    report = Report("data", args)

    import torch
    import torchvision
    from torchvision.transforms import v2

    from fusion_engine.data import cached_images, dataset_fingerprint
    from fusion_engine.plugins import get_plugins

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_folder(tmp / "images", args.per_class)
        n = 10 * args.per_class

        transform = v2.Compose([v2.PILToTensor(), v2.Resize((args.size, args.size), antialias=True)])
        folder = torchvision.datasets.ImageFolder(str(tmp / "images"), transform=transform)
        loader = torch.utils.data.DataLoader(folder, batch_size=64, shuffle=True, num_workers=args.workers,
                                             persistent_workers=args.workers > 0)
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            for xb, yb in loader:
                pass
        bare = time.perf_counter() - t0
        del loader

        record = get_plugins().catalog().get("dataset", "imagefolder").record
        epochs_s = []

        def engine(cache_dir: Path) -> float:
            t0 = time.perf_counter()
            dataset = record.load(record.params(root=tmp / "images"), base_dir=tmp)
            fingerprint = dataset_fingerprint(dataset)
            x = cached_images(dataset.images, fingerprint, args.size, 3, cache_dir)
            t1 = time.perf_counter()
            for _ in range(args.epochs):
                for idx in torch.randperm(n).split(64):
                    x[idx]  # the gather a training step makes
            epochs_s.append(time.perf_counter() - t1)
            return time.perf_counter() - t0

        first = engine(tmp / "cache")
        later = engine(tmp / "cache")
        report.add(f"bare ImageFolder+DataLoader ({args.workers} workers)",
                   f"{bare:7.2f} s for {args.epochs} epochs of {n} images ({args.epochs * n / bare:6.0f} img/s)",
                   seconds=bare, epochs=args.epochs, images=n, workers=args.workers)
        report.add("engine, first run (decode + cache)", f"{first:7.2f} s  ({bare / first:5.1f}x faster than bare)",
                   seconds=first, ratio=bare / first)
        report.add("engine, later runs (from the cache)", f"{later:7.2f} s  ({bare / later:5.1f}x faster than bare)",
                   seconds=later, ratio=bare / later)
        report.add("  of which batch indexing, all epochs", f"{epochs_s[-1]:7.3f} s", seconds=epochs_s[-1])
        report.check("data loading", first <= bare, "the engine's first run reads the data no slower than the bare loader")
    report.finish()


if __name__ == "__main__":
    main()
