"""Weights files trained elsewhere: read safely, checked against a network, mapped to a dataset's
classes.

A weights file is a state dict, as ``.safetensors`` (read as it is) or as a torch file (``.pth``,
``.pt``, ``.bin``) read with ``torch.load(weights_only=True)``, so no code in it ever runs. A
checkpoint that wraps the state dict (``{"state_dict": ...}``, ``{"model": ...}``, as training
scripts and Lightning save them) and a ``module.`` prefix (``DataParallel``) are unwrapped.

:func:`weights_mismatch` compares tensor names and shapes without loading a network, so a file that does
not fit is refused in one line before anything runs. :func:`class_order` maps the order of a
file's outputs to the dataset's classes (``class_names``, or ``classes.txt`` / ``classes.json``
beside the file).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import FusionEngineError, first_few, first_line

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
#: keys under which training scripts nest a state dict, tried in this order
CONTAINERS = ("state_dict", "model_state_dict", "model", "module", "net", "state_dict_ema", "model_ema")

__all__ = ["WEIGHT_SUFFIXES", "class_order", "file_class_names", "read_state_dict", "read_weight_shapes", "weights_mismatch"]


def read_state_dict(path: str | Path, *, sha256: str | None = None) -> dict[str, Any]:
    """The tensors of a weights file by name, unwrapped (see the module docstring).

    With ``sha256``, the file's bytes must still be the ones that hash to it (the ones a run
    checked and keyed the member by): the bytes are read once, compared, and loaded from memory,
    so a file replaced meanwhile is an error rather than another member under the same key.
    """
    import io

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FusionEngineError(f"cannot read weights file {path}: {exc.strerror or exc}") from None
    if sha256 is not None:
        import hashlib

        if hashlib.sha256(data).hexdigest() != sha256:
            raise FusionEngineError(f"weights file {path} changed after the run checked it (its sha256 is no longer "
                                    f"{sha256[:12]}...); run again to use the new file")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load

            state = load(data)
        else:
            import torch

            with warnings.catch_warnings():  # torch warns before it refuses a pickle: our error says it all
                warnings.simplefilter("ignore")
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FusionEngineError(f"cannot read weights file {path}: {_why(exc)}") from None
    return _unwrap(state, path)


def read_weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a weights file; for safetensors from its header alone."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return _unprefixed({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as exc:
            raise FusionEngineError(f"cannot read weights file {path}: {_why(exc)}") from None
    return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}


def weights_mismatch(expected: dict[str, tuple], found: dict[str, tuple], *, any_shape: Iterable[str] = ()) -> str | None:
    """What keeps ``found`` (a file's tensor shapes) from loading into a network whose state dict
    has ``expected``: the first missing, unexpected and mis-shaped tensors with their counts, in
    one line; None when they fit. Batch norms' ``num_batches_tracked`` counters are left out, and
    tensors under the ``any_shape`` prefixes (a classifier that is replaced, a stem adapted to
    other input channels) may have any shape."""
    free = tuple(f"{p}." for p in any_shape)

    def kept(names):
        return [k for k in names if not k.endswith("num_batches_tracked")]

    missing = [k for k in kept(expected) if k not in found]
    unexpected = [k for k in kept(found) if k not in expected]
    misshaped = [f"{k} (file {_dims(found[k])}, network {_dims(expected[k])})" for k in kept(expected)
                 if k in found and tuple(found[k]) != tuple(expected[k]) and not k.startswith(free)]
    problems = [f"{len(items)} {what} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
                for what, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
                if items]
    if not problems:
        return None
    return f"{'; '.join(problems)} (of the {len(kept(expected))} tensors the network has)"


def file_class_names(path: str | Path) -> list[str] | None:
    """The class order of a weights or predictions file, from ``classes.txt`` (one per line) or
    ``classes.json`` (a list) beside it; None when there is neither."""
    folder = Path(path).parent
    text_file, json_file = folder / "classes.txt", folder / "classes.json"
    try:
        if text_file.is_file():
            return [line.strip() for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if json_file.is_file():
            names = json.loads(json_file.read_text(encoding="utf-8"))
            if isinstance(names, list) and all(isinstance(n, (str, int)) for n in names):
                return [str(n) for n in names]
            raise FusionEngineError(f"{json_file}: expected a JSON list of class names")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FusionEngineError(f"cannot read the class names beside {path}: {_why(exc)}") from None
    return None


def class_order(given: list[str] | None, dataset: list[str], *, what: str) -> np.ndarray:
    """Column indices that put a file's outputs in the dataset's class order: ``out[:, order]``.

    ``given`` is the file's own class order (None: the dataset's). The two must hold the same
    classes; otherwise the error names the missing and the extra ones.
    """
    if given is None:
        return np.arange(len(dataset))
    given = [str(c) for c in given]
    repeated = sorted({c for c in given if given.count(c) > 1})
    if repeated:
        raise FusionEngineError(f"{what}: class names repeated: {', '.join(repeated)}")
    missing = [c for c in dataset if c not in given]
    extra = [c for c in given if c not in dataset]
    if missing or extra:
        parts = [f"{len(missing)} of the dataset's classes missing ({first_few(missing, 5)})" if missing else "",
                 f"{len(extra)} classes the dataset does not have ({first_few(extra, 5)})" if extra else ""]
        raise FusionEngineError(f"{what}: its classes are not the dataset's: {'; '.join(p for p in parts if p)}")
    return np.array([given.index(c) for c in dataset])


def _unwrap(state: Any, path: Path) -> dict[str, Any]:
    import torch

    for _ in range(3):  # a container of a container
        if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            return _unprefixed(state)
        if isinstance(state, dict):
            inner = next((state[k] for k in CONTAINERS if isinstance(state.get(k), dict)), None)
            if inner is not None:
                state = inner
                continue
        break
    if isinstance(state, dict):
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return _unprefixed(tensors)
    raise FusionEngineError(f"weights file {path} holds no state dict (tensors by name); save one with "
                            "safetensors.torch.save_file(model.state_dict(), ...) or torch.save(model.state_dict(), ...)")


def _unprefixed(state: dict) -> dict:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _why(exc: BaseException) -> str:
    text = first_line(exc)
    if "weights_only" in text or "Unpickl" in type(exc).__name__:
        return ("it holds pickled Python objects, which are never loaded (torch.load with weights_only=True refused "
                "it); save the state dict with safetensors or torch.save(model.state_dict())")
    return text


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"
