"""Where a member's training time goes: torch.profiler over the engine's training loop.

Trains a quickstart-like member (ResNet-18, small-input stem, 16 px, augmentation on) for one
epoch on random images under ``torch.profiler`` and prints the operators that took the most CPU
time, then the share of the network's own work (convolutions, batch norm, activations), the optimizer's
step and the engine's per-batch data work (indexing the batch, the augmentation gather,
normalisation).

    python benchmarks/profile_training.py [--arch resnet18] [--size 16] [--images 1024]

For a whole run, sample it from the outside with py-spy (``pip install py-spy``):

    py-spy record -o run.svg -- python -m fusion_engine run experiments/quickstart.yaml
"""

from __future__ import annotations

from _common import parser


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from fusion_engine.plugins import get_plugins
    from fusion_engine.spec import TrainSpec
    from fusion_engine.training import train_member

    record = get_plugins().catalog().get("backbone", "timm").record
    built = record.build(record.params(model=args.arch, small_input=True), num_classes=10, image_size=args.size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (args.images,), generator=gen)
    train = TrainSpec(epochs=1, batch_size=64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_member(built.module, built.input, train, x, y, x[:256], y[:256], seed=0, device="cpu", quiet=True)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    total = sum(e.self_cpu_time_total for e in events)
    by_key = {e.key: e for e in events}

    def cpu_total(*keys: str) -> float:
        return sum(by_key[k].cpu_time_total for k in keys if k in by_key)

    shares = {
        "the optimizer's step (AdamW)": sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step#")),
        "batch data work (index, pad, random offsets, normalise)": cpu_total(
            "aten::index", "aten::constant_pad_nd", "aten::randint", "aten::randperm", "aten::addcmul"),
        "dtype conversions and copies (uint8 to float, best weights)": cpu_total("aten::_to_copy"),
    }
    model = cpu_total("aten::convolution_backward", "aten::mkldnn_convolution", "aten::native_batch_norm",
                      "aten::native_batch_norm_backward", "aten::threshold_backward", "aten::relu_", "aten::addmm",
                      "aten::mm", "aten::adaptive_avg_pool2d", "aten::mean")
    print(f"{'convolutions, batch norm, activations (forward and backward)':<60} {100 * model / total:5.1f}% of CPU time")
    for what, t in shares.items():
        print(f"{what:<60} {100 * t / total:5.1f}%")


if __name__ == "__main__":
    main()
