"""One experiment, end to end: spec -> plugins -> data -> members -> fusers -> leaderboard.

The evaluation protocol lives here. The data are split once; members train on train, choose
their best epoch on val, and predict val and test once; fusers see member logits only, are
fitted on val and scored on val out-of-fold; test is touched only to score, and every row is
scored on the same test samples.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FusionEngineError
from .leaderboard import Row, build_leaderboard, print_leaderboard, write_leaderboard
from .plugins import Plugins, get_plugins
from .records import ImageDataset, InputConfig
from .spec import ResolvedSpec, load_spec, resolve_spec

log = logging.getLogger("fusion_engine")

REGISTRY_ENV = "FUSION_ENGINE_REGISTRY"
SPLITS = ("val", "test")


@dataclass
class MemberResult:
    """A trained member and its outputs on val and test."""

    name: str
    backbone: str
    logits: dict[str, np.ndarray]
    input: InputConfig
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    train_seconds: float = 0.0
    predict_seconds: float = 0.0
    n_params: int = 0


@dataclass
class RunContext:
    """What lifecycle hooks see of a run."""

    spec: ResolvedSpec
    run_id: str
    run_dir: Path
    registry: Path
    plugins: Plugins
    class_names: list[str] = field(default_factory=list)
    split_sizes: dict[str, int] = field(default_factory=dict)


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    leaderboard: Any  # pandas.DataFrame
    members: dict[str, MemberResult]


def resolve_registry(registry: str | os.PathLike | None = None) -> Path:
    """``--registry`` first, then ``$FUSION_ENGINE_REGISTRY``, then ``./registry``."""
    return Path(registry or os.environ.get(REGISTRY_ENV) or "registry")


def prepare(spec_path: str | os.PathLike) -> tuple[ResolvedSpec, Plugins]:
    """Load a spec, load the plugins it lists, and bind every name; imports no torch."""
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    base_dir = spec_path.resolve().parent
    try:
        plugins = get_plugins([base_dir / p for p in spec.plugins])
    except FusionEngineError as exc:
        raise type(exc)(f"{spec_path}: plugins: {exc}") from None
    resolved = resolve_spec(spec, plugins.catalog(), file=str(spec_path), base_dir=base_dir)
    return resolved, plugins


def run_experiment(
    spec_path: str | os.PathLike,
    *,
    registry: str | os.PathLike | None = None,
    device: str | None = None,
    quiet: bool = False,
) -> RunResult:
    """Run the experiment a spec file describes and write its run folder."""
    resolved, plugins = prepare(spec_path)
    spec = resolved.spec
    device = device or spec.device
    registry_dir = resolve_registry(registry)
    run_id = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{spec.name}-{secrets.token_hex(2)}"
    run_dir = registry_dir / "runs" / run_id
    try:
        run_dir.mkdir(parents=True)
    except OSError as exc:
        raise FusionEngineError(f"cannot create run folder {run_dir}: {exc.strerror}") from None

    from rich.console import Console

    from .data import dataset_fingerprint

    console = Console(stderr=True, quiet=quiet)
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    previous_level = log.level
    log.setLevel(logging.INFO)
    started = time.perf_counter()
    record: dict[str, Any] = {
        "run_id": run_id,
        "experiment": spec.name,
        "spec_file": str(Path(spec_path).resolve()),
        "status": "running",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "versions": _versions(),
    }
    ctx = RunContext(resolved, run_id, run_dir, registry_dir, plugins)
    try:
        write_json(run_dir / "spec.json", resolved.resolved_dict())
        _write_text(run_dir / "spec.yaml", _to_yaml(resolved.resolved_dict()))
        write_json(run_dir / "run.json", record)
        plugins.hook.on_run_start(run=ctx)

        dataset, indices, y = _load_data(resolved, ctx, console)
        record["data"] = {"split_sizes": ctx.split_sizes, "classes": ctx.class_names, "fingerprint": dataset_fingerprint(dataset)}
        _write_split(run_dir, dataset, indices)

        members = _train_members(resolved, ctx, dataset, indices, y, device, quiet, console)
        rows = [
            Row(name=m.name, kind="member", members=[m.name], proba={s: _softmax(m.logits[s]) for s in SPLITS},
                extra={"seconds": m.train_seconds})
            for m in members.values()
        ]
        rows += _fit_fusers(resolved, ctx, members, y, console)

        metrics = [p.record for p in plugins.catalog().records["metric"].values()]
        leaderboard = build_leaderboard(rows, y, metrics)
        meta = {"run_id": run_id, "experiment": spec.name, "ranked_by": "accuracy", "scored_on": "test",
                "split_sizes": ctx.split_sizes}
        write_leaderboard(leaderboard, run_dir, meta=meta)
        _write_predictions(run_dir, dataset, indices, y, rows)
        if not quiet:
            print_leaderboard(leaderboard, title=f"{spec.name}: scored on {ctx.split_sizes['test']} test samples")
        plugins.hook.on_run_end(run=ctx, leaderboard=leaderboard)
        record.update(status="complete", seconds=round(time.perf_counter() - started, 3),
                      trained=list(members), fusers=[f.name for f in spec.fusers])
        write_json(run_dir / "run.json", record)
        log.info("run %s complete in %.1fs", run_id, time.perf_counter() - started)
        return RunResult(run_id, run_dir, leaderboard, members)
    except BaseException as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}", seconds=round(time.perf_counter() - started, 3))
        write_json(run_dir / "run.json", record)
        log.error("run %s failed: %s", run_id, record["error"])
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(previous_level)


# -- steps ----------------------------------------------------------------------------------------

def _load_data(resolved: ResolvedSpec, ctx: RunContext, console) -> tuple[ImageDataset, dict, dict]:
    from .data import split_indices

    ds_entry = resolved.dataset
    console.log(f"loading dataset [bold]{resolved.spec.data.dataset}[/]")
    dataset = ds_entry.record.load(ds_entry.params, base_dir=resolved.base_dir)
    if not isinstance(dataset, ImageDataset):
        raise FusionEngineError(f"dataset plugin {ds_entry.provided.plugin} returned {type(dataset).__name__}, expected ImageDataset")
    if dataset.split is not None and "split" in resolved.spec.data.model_fields_set:
        log.warning("dataset '%s' brings its own train/val/test split; data.split is ignored", resolved.spec.data.dataset)
    indices = split_indices(dataset, resolved.spec.data.split, resolved.spec.seed)
    ctx.class_names = list(dataset.class_names)
    ctx.split_sizes = {k: int(len(v)) for k, v in indices.items()}
    y = {s: dataset.labels[indices[s]] for s in SPLITS}
    log.info("dataset %s: %s, %d classes", resolved.spec.data.dataset, ctx.split_sizes, len(ctx.class_names))
    return dataset, indices, y


def _train_members(resolved, ctx, dataset, indices, y, device, quiet, console) -> dict[str, MemberResult]:
    import torch
    from safetensors.torch import save_file

    from .data import load_images
    from .training import predict_logits, train_member

    spec = resolved.spec
    image_cache: dict[tuple[int, int], Any] = {}
    results: dict[str, MemberResult] = {}
    num_classes = len(dataset.class_names)
    for i, (mspec, entry) in enumerate(zip(spec.members, resolved.members), start=1):
        seed = spec.seed if mspec.seed is None else mspec.seed
        console.log(f"member {i}/{len(spec.members)}: training [bold]{mspec.name}[/] ({mspec.backbone})")
        torch.manual_seed(seed)
        built = entry.record.build(entry.params, num_classes=num_classes, image_size=spec.data.image_size)
        cfg = _input_config(built.input, spec.data)
        key = (cfg.size, cfg.in_chans)
        if key not in image_cache:
            order = np.concatenate([indices["train"], indices["val"], indices["test"]])
            images = load_images(dataset.images, order, cfg.size, cfg.in_chans)
            bounds = np.cumsum([0, len(indices["train"]), len(indices["val"])])
            image_cache[key] = {"train": images[: bounds[1]], "val": images[bounds[1]: bounds[2]], "test": images[bounds[2]:]}
        x = image_cache[key]
        y_t = {s: torch.as_tensor(dataset.labels[indices[s]]) for s in ("train", "val", "test")}
        result = train_member(
            built.module, cfg, mspec.train, x["train"], y_t["train"], x["val"], y_t["val"],
            seed=seed, device=device, label=mspec.name, quiet=quiet,
        )
        built.module.load_state_dict(result.state_dict)
        t0 = time.perf_counter()
        logits = {s: predict_logits(built.module, cfg, x[s], batch_size=mspec.train.eval_batch_size, device=device) for s in SPLITS}
        predict_seconds = time.perf_counter() - t0
        member = MemberResult(
            name=mspec.name, backbone=mspec.backbone, logits=logits, input=cfg, history=result.history,
            best_epoch=result.best_epoch, train_seconds=result.train_seconds, predict_seconds=predict_seconds,
            n_params=sum(p.numel() for p in built.module.parameters()),
        )
        out = ctx.run_dir / "members" / mspec.name
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in result.state_dict.items()}, str(out / "model.safetensors"))
        save_file({f"{s}_logits": torch.from_numpy(logits[s]) for s in SPLITS}, str(out / "outputs.safetensors"))
        write_json(out / "card.json", {
            "name": mspec.name, "backbone": mspec.backbone, "plugin": entry.provided.plugin,
            "params": entry.params.model_dump(mode="json"), "train": mspec.train.model_dump(mode="json"),
            "seed": seed, "input": {"size": cfg.size, "mean": cfg.mean, "std": cfg.std, "in_chans": cfg.in_chans},
            "best_epoch": result.best_epoch, "history": result.history, "n_params": member.n_params,
            "train_seconds": round(result.train_seconds, 3), "predict_seconds": round(predict_seconds, 3),
            "val_accuracy": float(np.mean(np.argmax(logits["val"], 1) == y["val"])),
        })
        log.info("member %s: best epoch %s, val accuracy %.4f, %.1fs", mspec.name, result.best_epoch,
                 float(np.mean(np.argmax(logits["val"], 1) == y["val"])), result.train_seconds)
        ctx.plugins.hook.on_member_ready(run=ctx, member=member)
        results[mspec.name] = member
    return results


def _input_config(cfg: InputConfig, data) -> InputConfig:
    """The backbone's input config with the spec's overrides applied."""
    mean = tuple(data.mean) if data.mean is not None else tuple(cfg.mean)
    std = tuple(data.std) if data.std is not None else tuple(cfg.std)
    for label, values in (("mean", mean), ("std", std)):
        if len(values) != cfg.in_chans:
            raise FusionEngineError(f"data.{label} has {len(values)} values but the backbone takes {cfg.in_chans} channels")
    return InputConfig(size=data.image_size or cfg.size, mean=mean, std=std, in_chans=cfg.in_chans)


def _fit_fusers(resolved, ctx, members: dict[str, MemberResult], y, console) -> list[Row]:
    """Fit every fuser on val; one BLAS thread, as small fits oversubscribe cores otherwise."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _fit_fusers_unlimited(resolved, ctx, members, y, console)


def _fit_fusers_unlimited(resolved, ctx, members: dict[str, MemberResult], y, console) -> list[Row]:
    from .crossfit import cross_val_proba

    rows = []
    out = ctx.run_dir / "fusers"
    for fspec, entry in zip(resolved.spec.fusers, resolved.fusers):
        names = fspec.members or list(members)
        logits = {s: np.stack([members[n].logits[s] for n in names]) for s in SPLITS}
        fuser = entry.record.cls(**entry.params.model_dump())
        console.log(f"fitting fuser [bold]{fspec.name}[/] ({fspec.fuser}) on {len(names)} members")
        if fuser.requires_fit:
            val_proba = cross_val_proba(fuser, logits["val"], y["val"], seed=resolved.spec.seed)
        t0 = time.perf_counter()
        fuser.fit(logits["val"], y["val"])
        fit_seconds = time.perf_counter() - t0
        if not fuser.requires_fit:
            val_proba = fuser.predict_proba(logits["val"])
        test_proba = fuser.predict_proba(logits["test"])
        weights = getattr(fuser, "weights_", None)
        out.mkdir(exist_ok=True)
        write_json(out / f"{fspec.name}.json", {
            "name": fspec.name, "fuser": fspec.fuser, "plugin": entry.provided.plugin, "members": names,
            "params": entry.params.model_dump(mode="json"), "state": fuser.get_state(),
        })
        rows.append(Row(
            name=fspec.name, kind="fuser", members=names, proba={"val": val_proba, "test": test_proba},
            weights=None if weights is None else [float(w) for w in weights], extra={"seconds": fit_seconds},
        ))
    return rows


# -- outputs --------------------------------------------------------------------------------------

def _write_split(run_dir: Path, dataset: ImageDataset, indices: dict) -> None:
    write_json(run_dir / "split.json", {
        "classes": list(dataset.class_names),
        **{s: {"ids": [dataset.ids[i] for i in idx], "labels": dataset.labels[idx].tolist()} for s, idx in indices.items()},
    })


def _write_predictions(run_dir: Path, dataset: ImageDataset, indices: dict, y: dict, rows: list[Row]) -> None:
    """``predictions_{val,test}.csv``: per sample, the label and each row's predicted class."""
    import pandas as pd

    for s in SPLITS:
        df = pd.DataFrame({"id": [dataset.ids[i] for i in indices[s]], "label": y[s]})
        for row in rows:
            df[row.name] = np.argmax(row.proba[s], axis=1)
        df.to_csv(run_dir / f"predictions_{s}.csv", index=False)


def _softmax(logits: np.ndarray) -> np.ndarray:
    from scipy.special import softmax

    return softmax(logits.astype(np.float64), axis=1)


def write_json(path: Path, data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Write whole or not at all: a temporary file moved into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _to_yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("fusion-engine", "torch", "timm", "numpy", "scikit-learn", "xgboost"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
