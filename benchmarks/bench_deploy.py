"""An exported ensemble's prediction against doing it by hand, and ONNX Runtime against torch.

1. ``fusion_engine.load(DIR).predict_proba(images)`` (decoding checks, members through the
   engine's prediction code, the fuser) against the bare members run one after another in
   ``torch.inference_mode`` on the same uint8 batches (normalised by hand): the goal is >= 0.95x. ResNet-18 + MobileNetV2 with small-input stems at 32 px, fused by a mean.
2. The same ensemble in ONNX Runtime (``load(DIR, runtime="onnx")``, the folder's
   ``model.onnx``) against torch eager (``runtime="torch"``), at 32 px (small-input stems) and
   224 px (stock stems): reported side by side.

The export folders are made the way ``fusion-engine export`` makes them, from freshly built
networks (speed does not depend on what the weights learned), so no run is needed.

    python benchmarks/bench_deploy.py [--quick] [--json out.json]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from _common import Report, best, parser, side_by_side

MEMBERS = (("resnet18", "resnet18"), ("mobilenetv2", "mobilenetv2"))
N_CLASSES = 10


def make_export(folder: Path, size: int, *, onnx: bool) -> Path:
    """An export folder of ResNet-18 + MobileNetV2 at ``size`` px fused by a mean, as
    ``fusion-engine export`` writes one (card, weights, fuser state, checksums, model.onnx)."""
    import torch
    from safetensors.torch import save_file

    import fusion_engine
    from fusion_engine.deploy.card import (ExportCard, ExportedFuser, ExportedInput, ExportedMember, PluginRef,
                                           write_sums)
    from fusion_engine.deploy.onnx_file import write_onnx
    from fusion_engine.files import write_json
    from fusion_engine_fusers import Mean

    catalog = fusion_engine.get_plugins().catalog()
    folder.mkdir(parents=True)
    members = []
    for i, (name, backbone) in enumerate(MEMBERS):
        provided = catalog.get("backbone", backbone)
        params = provided.record.params(small_input=size <= 64)
        torch.manual_seed(i)
        built = provided.record.build(params, num_classes=N_CLASSES, image_size=size)
        (folder / "members" / name).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in built.module.state_dict().items()},
                  str(folder / "members" / name / "model.safetensors"))
        cfg = built.input
        members.append(ExportedMember(
            name=name, backbone=backbone, plugin=PluginRef(plugin=provided.plugin, **provided.code),
            params=params.model_dump(mode="json"), image_size=size, num_classes=N_CLASSES, seed=i,
            input=ExportedInput(size=cfg.size, mean=list(cfg.mean), std=list(cfg.std), in_chans=cfg.in_chans),
            weights=f"members/{name}/model.safetensors"))
    fuser = Mean().fit(np.zeros((len(MEMBERS), 2, N_CLASSES)), np.array([0, 1]))
    write_json(folder / "fuser.json", {"state": fuser.get_state()})
    mean = catalog.get("fuser", "mean")
    card = ExportCard(fusion_engine=fusion_engine.__version__, created="", run_id="benchmark", experiment="benchmark",
                      row="mean", kind="fuser", classes=[str(c) for c in range(N_CLASSES)], resize="tensor",
                      members=members, fuser=ExportedFuser(name="mean", fuser="mean",
                                                          plugin=PluginRef(plugin=mean.plugin, **mean.code)))
    write_json(folder / "ensemble.json", card.to_json())
    if onnx:
        from fusion_engine.deploy.ensemble import Ensemble

        card.onnx = write_onnx(Ensemble(folder, card, device="cpu"), folder)
        write_json(folder / "ensemble.json", card.to_json())
    write_sums(folder)
    return folder


def bare_members(folder: Path):
    """The members as a user would run them by hand: timm modules with the weights, eval mode."""
    import torch
    from safetensors.torch import load_file

    import fusion_engine

    ens = fusion_engine.load(folder, device="cpu")
    modules = []
    for member in ens.card.members:
        provided = fusion_engine.get_plugins().catalog().get("backbone", member.backbone)
        built = provided.record.build(provided.record.params(**member.params), num_classes=N_CLASSES,
                                      image_size=member.image_size)
        built.module.load_state_dict(load_file(str(folder / member.weights)))
        cfg = member.input
        modules.append((built.module.eval(), torch.tensor(cfg.mean).view(1, -1, 1, 1),
                        torch.tensor(cfg.std).view(1, -1, 1, 1)))

    def run(x, batch: int):
        with torch.inference_mode():
            for start in range(0, len(x), batch):
                xb = x[start:start + batch]
                for module, mean, std in modules:
                    module((xb.float() / 255 - mean) / std)

    return run


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer images and repeats")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    import torch

    import fusion_engine

    report = Report("deploy", args)
    repeats = 2 if args.quick else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # 1. the exported ensemble against the bare members
        n = 256 if args.quick else 1024
        folder = make_export(root / "e32", 32, onnx=True)
        x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))
        ens = fusion_engine.load(folder, device="cpu")
        bare = bare_members(folder)
        times = side_by_side({"export": lambda: ens.predict_proba(x, batch_size=args.batch),
                              "bare": lambda: bare(x, args.batch)}, repeats)
        ratio = best(times["bare"]) / best(times["export"])
        report.add("exported ensemble vs bare members, 32 px",
                   f"{n / best(times['export']):7.0f} img/s vs {n / best(times['bare']):7.0f} img/s bare = {ratio:.2f}x",
                   export_seconds=best(times["export"]), bare_seconds=best(times["bare"]), images=n, ratio=ratio)
        report.check("exported ensemble prediction", ratio >= 0.95, ">= 0.95x the bare members in inference_mode")
        # 2. ONNX Runtime against torch eager, 32 and 224 px
        for size, n in ((32, 256 if args.quick else 1024), (224, 64 if args.quick else 128)):
            folder = root / f"e{size}" if size == 32 else make_export(root / f"e{size}", size, onnx=True)
            x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (n, 3, size, size), dtype=np.uint8))
            eager = fusion_engine.load(folder, device="cpu")
            ort = fusion_engine.load(folder, runtime="onnx", device="cpu")
            diff = float(np.abs(eager.predict_proba(x[:16]) - ort.predict_proba(x[:16])).max())
            times = side_by_side({"onnx": lambda: ort.predict_proba(x, batch_size=args.batch),
                                  "torch": lambda: eager.predict_proba(x, batch_size=args.batch)}, repeats)
            speedup = best(times["torch"]) / best(times["onnx"])
            report.add(f"ONNX Runtime vs torch eager, {size} px",
                       f"{n / best(times['onnx']):7.0f} img/s vs {n / best(times['torch']):7.0f} img/s = {speedup:.2f}x "
                       f"(max |diff| {diff:.1e})",
                       size=size, images=n, onnx_seconds=best(times["onnx"]), torch_seconds=best(times["torch"]),
                       speedup=speedup, max_abs_diff=diff)
    report.finish()


if __name__ == "__main__":
    main()
