"""Photos: the engine's timm path against timm's own loader, training at 224 px with the same
transforms and the same number of worker processes.

``--images`` JPEGs of 256 px (photo-like, 4 classes) are made in a folder. Each side trains the
same network from the same weights for one epoch with the same optimizer (AdamW), batch size and
transforms (random-resized crop, flip, ``--auto-augment``), ``--workers`` DataLoader processes:

- engine: ``fusion_engine.training.train_member`` with ``augment.pipeline: timm`` on the
  folder's images (an image set of file paths); per-image transforms in the workers end in
  ``uint8``, batches are normalised in the training process; its images/s counts the training
  epochs only (validation on one image aside);
- timm: ``timm.data.create_dataset`` + ``timm.data.create_loader(is_training=True)`` with the
  same transform settings (``use_prefetcher=False``: timm's prefetcher needs CUDA) and a plain
  loop: forward, cross-entropy, backward, step.

Two networks: a pooling-and-linear head, so that the data path alone is measured, and timm's
``test_resnet`` (a small ResNet), where the model's compute takes its share. Interleaved
repetitions; the fastest of each side is compared. Each side's CPU time per image is reported
too (the training process and its worker processes, from ``getrusage``, over the whole call):
on a machine other jobs keep busy, images/s measure the neighbours as well, CPU time much less.

    python benchmarks/bench_photo.py [--images 512] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import Report, parser, side_by_side


def make_folder(root: Path, n: int, size: int = 256) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c = i % 4
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        field = (rng.uniform(0, 200, 3)[None, None, :] + 60 * np.sin(8 * xx[..., None] * rng.uniform(0.5, 2, 3))
                 * np.cos(6 * yy[..., None]) + rng.normal(0, 10, (size, size, 3)))
        Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--auto-augment", default="rand-m9-mstd0.5-inc1")
    p.add_argument("--models", nargs="+", default=["head", "test_resnet"])
    p.add_argument("--device", default="cpu")
    p.set_defaults(repeats=3)
    args = p.parse_args()
    report = Report("photo", args)

    import timm
    import torch
    from timm.data import create_dataset, create_loader
    from torch import nn

    from fusion_engine.augment import _safe_posterize
    from fusion_engine.imagesets import ImageSet
    from fusion_engine.records import InputConfig
    from fusion_engine.spec import TrainSpec
    from fusion_engine.training import resolve_device, train_member

    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cfg = InputConfig(size=args.size, mean=mean, std=std, interpolation="bilinear", crop_pct=0.875, crop_mode="center")
    augment = {"auto_augment": args.auto_augment, "interpolation": "bilinear"}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_folder(root, args.images)
        dataset = create_dataset("", root=str(root), split="train")
        paths = [Path(root / "train" / p) if not Path(p).is_absolute() else Path(p) for p, _ in dataset.reader.samples]
        labels = torch.tensor([t for _, t in dataset.reader.samples])
        train_set = ImageSet(paths, cfg, workers=args.workers)
        val = torch.zeros((1, 3, args.size, args.size), dtype=torch.uint8), labels[:1]
        loader = create_loader(dataset, input_size=(3, args.size, args.size), batch_size=args.batch_size,
                               is_training=True, use_prefetcher=False, auto_augment=args.auto_augment,
                               interpolation="bilinear", mean=mean, std=std, num_workers=args.workers,
                               persistent_workers=False, pin_memory=cuda)
        # the posterize op the engine's pipeline uses too: timm's own fails on Pillow 11+ at magnitude 10
        loader.dataset.transform = _safe_posterize(loader.dataset.transform)

        for name in args.models:
            def network():
                torch.manual_seed(0)
                if name == "head":
                    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 4))
                return timm.create_model(name, num_classes=4)

            spec = TrainSpec(epochs=1, batch_size=args.batch_size, optimizer="adamw", warmup_epochs=0,
                             label_smoothing=0.0, augment=augment, eval_batch_size=1)
            engine_rates: list[float] = []

            def engine():
                result = train_member(network(), cfg, spec, train_set, labels, val[0], val[1], seed=0,
                                      device=args.device, quiet=True)
                engine_rates.append(result.images_per_second)

            timm_rates: list[float] = []

            def bare():
                model = network().to(dev)
                if cuda:
                    model = model.to(memory_format=torch.channels_last)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
                model.train()
                t0 = time.perf_counter()
                seen = 0
                for x, y in loader:
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                        loss = nn.functional.cross_entropy(model(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    seen += len(x)
                sync()
                timm_rates.append(seen / (time.perf_counter() - t0))

            cpu: dict[str, list[float]] = {"engine": [], "timm": []}

            def timed_cpu(side, fn):
                def call():
                    before = cpu_seconds()
                    fn()
                    cpu[side].append((cpu_seconds() - before) / args.images * 1e3)
                return call

            side_by_side({"engine": timed_cpu("engine", engine), "timm": timed_cpu("timm", bare)},
                         repeats=args.repeats, warmup=1, sync=sync)
            e, t = max(engine_rates[1:]), max(timm_rates[1:])
            ce, ct = min(cpu["engine"][1:]), min(cpu["timm"][1:])
            report.add(f"{name} at {args.size} px, {args.workers} workers",
                       f"engine {e:7.1f} img/s   timm create_loader {t:7.1f} img/s   ratio {e / t:5.2f}   "
                       f"CPU per image: engine {ce:6.2f} ms, timm {ct:6.2f} ms",
                       model=name, engine_images_per_s=e, timm_images_per_s=t, ratio=e / t,
                       engine_cpu_ms_per_image=ce, timm_cpu_ms_per_image=ct,
                       engine_all=engine_rates, timm_all=timm_rates, engine_cpu_all=cpu["engine"],
                       timm_cpu_all=cpu["timm"], workers=args.workers, images=args.images)
            report.check(f"{name}: timm path", e / t >= 0.95, "engine >= 0.95x timm's create_loader, same transforms")
    report.finish()


if __name__ == "__main__":
    main()
