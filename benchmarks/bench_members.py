"""The engine's member training and inference against bare PyTorch, side by side.

For each architecture, the network the engine builds (through its timm backbone plugin) runs
next to a bare ``timm.create_model`` of the same architecture, holding the same weights, on the
same images and batch size, in one process, timed alternately:

- inference: ``fusion_engine.training.predict_logits`` on uint8 images (the engine normalises
  each batch itself) against a bare ``torch.inference_mode()`` loop over float tensors that are
  already normalised, which is the best case for the baseline;
- training: ``fusion_engine.training.train_member`` (augmentation off, one epoch, the smallest
  val set, no checkpoint) against a minimal loop: shuffle, index a batch of pre-normalised
  floats, forward, cross-entropy, backward, AdamW step. Both from the same initial weights, in
  images per second of wall-clock time, the engine's set-up, schedule and validation included.

Each side runs ``--repeats`` times, interleaved with the other; the fastest of each is compared.

    python benchmarks/bench_members.py [--archs resnet18 mobilenetv2] [--size 32] [--json out.json]
"""

from __future__ import annotations

import copy

from _common import Report, best, parser, side_by_side


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet18", "mobilenetv2_100"], help="timm architectures")
    p.add_argument("--size", type=int, default=32, help="image size in pixels")
    p.add_argument("--images", type=int, default=2048, help="images per inference call")
    p.add_argument("--train-images", type=int, default=1024, help="training images per epoch")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (inference uses 256)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    report = Report("members", args)

    import timm
    import torch

    from fusion_engine.plugins import get_plugins
    from fusion_engine.spec import TrainSpec
    from fusion_engine.training import _Normaliser, predict_logits, resolve_device, train_member

    dev = resolve_device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    timm_plugin = get_plugins().catalog().get("backbone", "timm").record
    gen = torch.Generator().manual_seed(0)
    num_classes = 10
    for arch in args.archs:
        built = timm_plugin.build(timm_plugin.params(model=arch, small_input=False), num_classes=num_classes,
                                  image_size=args.size)
        cfg = built.input
        bare = timm.create_model(arch, num_classes=num_classes).to(dev)
        bare.load_state_dict(built.module.state_dict())
        normalise = _Normaliser(cfg, dev)

        # -- inference -------------------------------------------------------------------------
        x = torch.randint(0, 256, (args.images, cfg.in_chans, cfg.size, cfg.size), dtype=torch.uint8, generator=gen)
        x_float = torch.cat([normalise(x[i:i + 256].to(dev)) for i in range(0, len(x), 256)])
        batches = list(torch.split(x_float, 256))

        def engine_predict():
            predict_logits(built.module, cfg, x, batch_size=256, device=str(dev))

        def bare_predict():
            bare.eval()
            with torch.inference_mode():
                for xb in batches:
                    bare(xb)

        t = side_by_side({"engine": engine_predict, "bare": bare_predict}, args.repeats, sync=sync)
        engine_s, bare_s = best(t["engine"]), best(t["bare"])
        ratio = bare_s / engine_s
        report.add(f"{arch} inference ({cfg.size}px, batch 256)",
                   f"engine {args.images / engine_s:7.0f} img/s  bare {args.images / bare_s:7.0f} img/s  ratio {ratio:.3f}",
                   arch=arch, kind="inference", engine_images_per_second=args.images / engine_s,
                   bare_images_per_second=args.images / bare_s, ratio=ratio)
        report.check(f"{arch} inference", ratio >= 0.95, f">= 0.95x bare timm in inference_mode (got {ratio:.3f})")

        # -- training --------------------------------------------------------------------------
        n = args.train_images
        xt = torch.randint(0, 256, (n, cfg.in_chans, cfg.size, cfg.size), dtype=torch.uint8, generator=gen)
        yt = torch.randint(0, num_classes, (n,), generator=gen)
        xt_float = torch.cat([normalise(xt[i:i + 256].to(dev)) for i in range(0, n, 256)])
        yt_dev = yt.to(dev)
        x_val, y_val = xt[:1], yt[:1]
        train = TrainSpec(epochs=1, batch_size=args.batch_size, optimizer="adamw", lr=1e-3, weight_decay=0.0,
                          warmup_epochs=0, schedule="constant", label_smoothing=0.0,
                          augment={"shift": 0.0, "hflip": False})
        initial = copy.deepcopy(built.module.state_dict())

        def engine_train():
            built.module.load_state_dict(initial)
            train_member(built.module, cfg, train, xt, yt, x_val, y_val, seed=0, device=str(dev), quiet=True)

        def bare_train():
            bare.load_state_dict(initial)
            bare.train()
            optimizer = torch.optim.AdamW(bare.parameters(), lr=1e-3, weight_decay=0.0)
            criterion = torch.nn.CrossEntropyLoss()
            for idx in torch.randperm(n, device=dev).split(args.batch_size):
                loss = criterion(bare(xt_float[idx]), yt_dev[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        t = side_by_side({"engine": engine_train, "bare": bare_train}, args.repeats, sync=sync)
        engine_s, bare_s = best(t["engine"]), best(t["bare"])
        ratio = bare_s / engine_s
        report.add(f"{arch} training ({cfg.size}px, batch {args.batch_size})",
                   f"engine {n / engine_s:7.0f} img/s  bare {n / bare_s:7.0f} img/s  ratio {ratio:.3f}",
                   arch=arch, kind="training", engine_images_per_second=n / engine_s,
                   bare_images_per_second=n / bare_s, ratio=ratio)
        report.check(f"{arch} training", ratio >= 0.90, f">= 0.90x a bare training loop (got {ratio:.3f})")
    report.finish()


if __name__ == "__main__":
    main()
