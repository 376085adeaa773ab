"""Fusion's cost against the members' own: every fuser, fitted and applied as a run does it.

A run fits each fuser on the members' val logits (plus the out-of-fold scoring of val that the
leaderboard shows) and applies it to test. This script times exactly that code
(``fusion_engine.fusion.fit_fusers``, every first-party fuser of the quickstart) on simulated
member logits with N val and N test samples, K members and C classes, and sets it against the
time the members themselves take to predict those 2N samples: ResNet-18 and MobileNetV2 with
small-input stems, alternating, K in all, at ``--size`` pixels (32: CIFAR-10's size; the
quickstart's 16 px members are 4x cheaper to run, so fusion weighs 4x more against them).

Then the scaling: the fusers' time for K = 2..16 at N = 10,000, and for N = 1k..100k at K = 5,
with the fitted exponent of time ~ size^b (b = 1 is linear).

    python benchmarks/bench_fusers.py [--quick] [--json out.json]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from _common import Report, median, parser

FUSERS = """
fusers:
  - {name: mean, fuser: mean}
  - {name: geometric-mean, fuser: mean, params: {space: logprob}}
  - {name: vote, fuser: vote}
  - {name: weighted, fuser: weighted}
  - {name: caruana, fuser: caruana}
  - {name: stack-lr, fuser: logistic-stacking, params: {cv: 5}}
  - {name: stack-xgb, fuser: xgboost-stacking, params: {cv: 5}}
  - {name: vote-t, fuser: vote, temperature: true}
"""


def simulate(n: int, k: int, c: int, seed: int = 0) -> tuple[dict, dict]:
    """K members of varied skill (about 60-95% accuracy) on N val and N test samples: their logits
    by member and split, and the labels by split."""
    rng = np.random.default_rng(seed)
    y = {s: rng.integers(0, c, n) for s in ("val", "test")}
    members = {}
    for j in range(k):
        signal = 1.0 + 2.5 * j / max(1, k - 1)
        logits = {}
        for s in ("val", "test"):
            z = rng.normal(size=(n, c)).astype(np.float32)
            z[np.arange(n), y[s]] += signal
            logits[s] = z
        members[f"m{j}"] = logits
    return members, y


def fuser_seconds(resolved, logits, y) -> tuple[float, dict]:
    from fusion_engine.fusion import fit_fusers

    t0 = time.perf_counter()
    fitted = list(fit_fusers(resolved.bound_fusers, logits, y, resolved.spec.seed))
    total = time.perf_counter() - t0
    return total, {f.name: f.fit_seconds for f in fitted}


def member_predict_seconds(n_images: int, k: int, size: int, repeats: int) -> tuple[float, dict]:
    """Seconds for K members to predict ``n_images`` images of ``size`` px (batch 256)."""
    import torch

    from fusion_engine.plugins import get_plugins
    from fusion_engine.training import predict_logits

    torch.manual_seed(0)
    x = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8)
    catalog = get_plugins().catalog()
    per_arch = {}
    for arch in ("resnet18", "mobilenetv2"):
        record = catalog.get("backbone", arch).record
        built = record.build(record.params(small_input=True), num_classes=10, image_size=size)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            predict_logits(built.module, built.input, x, batch_size=256, device="cpu")
            times.append(time.perf_counter() - t0)
        per_arch[arch] = median(times)
    archs = [("resnet18", "mobilenetv2")[j % 2] for j in range(k)]
    return sum(per_arch[a] for a in archs), per_arch


def slope(sizes: list[int], seconds: list[float]) -> float:
    """b in seconds ~ a * size^b, least squares on the logs."""
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer, smaller sizes (a minute or two)")
    p.add_argument("--size", type=int, default=32, help="the members' image size in pixels")
    p.add_argument("--only-cost", action="store_true", help="the cost against the members only, no scaling")
    args = p.parse_args()
    report = Report("fusers", args)

    from fusion_engine.resolve import prepare

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = tmp / "fusers.yaml"
        spec.write_text("name: bench-fusers\ndata: {dataset: sklearn-digits}\n"
                        "members:\n  - {name: a, backbone: resnet18}\n" + FUSERS, encoding="utf-8")
        resolved, _ = prepare(spec)

        n, k, c = 10_000, 5, 10
        fuser_seconds(resolved, *simulate(1_000, 2, c))  # untimed: imports scikit-learn and XGBoost
        members, y = simulate(n, k, c)
        fuser_times = [fuser_seconds(resolved, members, y) for _ in range(max(1, args.repeats // 2))]
        fusers = median([t for t, _ in fuser_times])
        members_s, per_arch = member_predict_seconds(2 * n, k, args.size, repeats=1)
        ratio = fusers / members_s
        report.add(f"members predict 2N images (N={n}, K={k}, {args.size}px)", f"{members_s:8.2f} s  "
                   f"(resnet18 {per_arch['resnet18']:.2f} s, mobilenetv2 {per_arch['mobilenetv2']:.2f} s per member)",
                   seconds=members_s, per_member=per_arch, n=n, k=k, c=c, size=args.size)
        report.add(f"all {len(resolved.fusers)} fusers fit + score + apply", f"{fusers:8.2f} s  "
                   f"= {100 * ratio:.1f}% of the members' time", seconds=fusers, ratio=ratio)
        for name, s in fuser_times[0][1].items():
            report.add(f"  {name} (fit once)", f"{s:8.3f} s", fuser=name, fit_seconds=s)
        report.check("fusion cost", ratio <= 0.05,
                     f"<= 5% of the members' predict time at {args.size}px (got {100 * ratio:.1f}%)")
        if args.only_cost:
            report.finish()
            return

        ks = [2, 4, 8] if args.quick else [2, 4, 8, 16]
        k_times = [fuser_seconds(resolved, *simulate(n, kk, c))[0] for kk in ks]
        for kk, s in zip(ks, k_times):
            report.add(f"fusers at K={kk}, N={n}", f"{s:8.2f} s", k=kk, n=n, seconds=s)
        b_k = slope(ks, k_times)
        report.add("  exponent in K", f"{b_k:8.2f}", exponent_k=b_k)

        ns = [1_000, 3_000, 10_000, 30_000] if args.quick else [1_000, 3_000, 10_000, 30_000, 100_000]
        n_times = [fuser_seconds(resolved, *simulate(nn, k, c))[0] for nn in ns]
        for nn, s in zip(ns, n_times):
            report.add(f"fusers at N={nn}, K={k}", f"{s:8.2f} s", k=k, n=nn, seconds=s)
        b_n = slope(ns[1:], n_times[1:])  # the smallest size is dominated by fixed costs
        report.add("  exponent in N (from N=3k)", f"{b_n:8.2f}", exponent_n=b_n)
        report.check("linear in K and N", b_k <= 1.15 and b_n <= 1.15, f"exponents <= 1.15 (K {b_k:.2f}, N {b_n:.2f})")
    report.finish()


if __name__ == "__main__":
    main()
