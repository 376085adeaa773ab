"""Checkpoints: the full training state of a member after each finished epoch, for resuming it.

``checkpoints/<key>/state.json`` (JSON: epoch, history, optimizer scalars, RNG states as lists,
...) names the tensors file ``epoch-NNNNN.safetensors`` (weights, best weights, optimizer
tensors) and its sha256. The tensors are written and renamed first, then ``state.json`` is
replaced: it is the commit point, so a kill leaves the previous epoch's checkpoint whole.
:func:`snapshot` and :func:`restore` turn a training loop's state into those two parts and back;
on CPU a resumed run ends bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
from pathlib import Path

from .files import atomic_path, checksum, fsync_dir, write_atomic

log = logging.getLogger("fusion_engine")

CHECKPOINT_FORMAT = 1


class Checkpoint:
    """The checkpoint of the member ``key`` in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path, key: str):
        self.folder = Path(folder)
        self.key = key

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def peek(self) -> dict | None:
        """``state.json`` (the last finished epoch and history), without the tensors."""
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and state.get("key") == self.key else None

    def load(self) -> tuple[dict, dict] | None:
        """``(tensors, state)`` of the last finished epoch, or ``None`` (none, or damaged: warned)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        if not self.state_path.exists():
            return None
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            if state.get("format") != CHECKPOINT_FORMAT or state.get("key") != self.key:
                raise ValueError("written by another version or for another member")
            name = state["tensors"]
            if not re.fullmatch(r"epoch-\d{5}\.safetensors", name):
                raise ValueError(f"names an unexpected file {name!r}")
            data = (self.folder / name).read_bytes()
            if len(data) != state["bytes"] or hashlib.sha256(data).hexdigest() != state["sha256"]:
                raise ValueError(f"{name} does not match its checksum")
            tensors = load(data)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            log.warning("ignoring the damaged checkpoint in %s (%s); training from the start", self.folder, exc)
            self.clear()
            return None
        return tensors, state

    def save(self, tensors: dict, state: dict) -> None:
        """Write one epoch's state; the previous epoch's files go once this one is whole."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        epoch = int(state["epoch"])
        name = f"epoch-{epoch:05d}.safetensors"
        with atomic_path(self.folder / name, fsync=True) as tmp:
            save_file(tensors, str(tmp))
            written = checksum(tmp)
        write_atomic(self.state_path, json.dumps({"format": CHECKPOINT_FORMAT, "key": self.key, "tensors": name,
                                                  **written, **state}, allow_nan=False), fsync=True)
        fsync_dir(self.folder)
        for old in self.folder.iterdir():
            if old.name not in (name, "state.json"):
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def snapshot(module, optimizer, scheduler, order_gen, aug_gen, dev, *, epoch: int, history: list[dict],
              best_loss: float, best_epoch: int, best_state, train_time: float, images: int,
              elapsed: float, host_rng: dict | None = None) -> tuple[dict, dict]:
    """The training state after ``epoch``: tensors (for safetensors) and the rest (for JSON).

    Tensors: ``model/*`` (current weights), ``best/*`` (best epoch's), ``optim/<param>/<name>``.
    JSON: epoch, history, best loss and epoch, the optimizer's groups and scalar state, the
    scheduler's state, and the torch, data-order and augmentation RNG states as lists (and
    ``host_rng``, the Python and NumPy generators of batch augmentations, when given).
    """
    import torch

    tensors = {f"model/{k}": v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    if best_state is not None:
        tensors.update({f"best/{k}": v.detach().to("cpu", copy=True) for k, v in best_state.items()})
    opt = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for pid, values in opt["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{pid}/{name}"] = value.detach().to("cpu", copy=True)
            else:
                scalars.setdefault(str(pid), {})[name] = value
    rng = {"torch": torch.get_rng_state().tolist(), "order": order_gen.get_state().tolist(),
           "augment": aug_gen.get_state().tolist()}
    if dev.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(dev).tolist()
    if host_rng is not None:
        rng["host"] = host_rng
    state = {
        "epoch": epoch, "history": history, "best_loss": best_loss if math.isfinite(best_loss) else None,
        "best_epoch": best_epoch, "train_time": train_time, "images": images, "elapsed": elapsed,
        "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "rng": rng,
    }
    return tensors, state


def restore(saved: tuple[dict, dict], module, optimizer, scheduler, order_gen, aug_gen, dev) -> dict:
    """Put a :func:`snapshot` back; return the loop's bookkeeping."""
    import torch

    tensors, state = saved
    module.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    best_state = {k[len("best/"):]: v for k, v in tensors.items() if k.startswith("best/")} or None
    opt_state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim/"):
            _, pid, field_name = name.split("/", 2)
            opt_state.setdefault(int(pid), {})[field_name] = value
    for pid, values in state["optimizer"]["scalars"].items():
        opt_state.setdefault(int(pid), {}).update(values)
    # the implementation (fused or not) is this process's choice, not the checkpoint's
    implementation = {k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults}
    groups = [{**group, **implementation} for group in state["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    rng = state["rng"]
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    order_gen.set_state(torch.tensor(rng["order"], dtype=torch.uint8))
    aug_gen.set_state(torch.tensor(rng["augment"], dtype=torch.uint8))
    if dev.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8), dev)
    best_loss = state["best_loss"]
    return {"epoch": int(state["epoch"]), "history": list(state["history"]),
            "best_loss": math.inf if best_loss is None else float(best_loss), "best_epoch": int(state["best_epoch"]),
            "best_state": best_state, "train_time": float(state["train_time"]), "images": int(state["images"]),
            "elapsed": float(state["elapsed"]), "host_rng": rng.get("host")}
