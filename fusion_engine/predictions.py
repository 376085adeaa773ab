"""Predictions made anywhere, read as a member's outputs.

A predictions file holds one row per sample: its id (the dataset's own: an image's path relative
to the dataset root for ``imagefolder`` and ``csv``, ``digits-0042`` for ``sklearn-digits``;
``fusion-engine split SPEC --out ids.csv`` writes them) and one value per class, logits or
probabilities (``kind``). Formats:

- CSV (``.csv``) and Parquet (``.parquet``, ``.pq``): an ``id`` column and one column per class,
  named by class name (any order; the dataset's classes, no others);
- NumPy (``.npz``, read without pickle): an ``ids`` array of strings and a ``logits`` or
  ``probabilities`` array ``(N, C)``, with ``class_names`` optional;
- safetensors (``.safetensors``): a ``logits`` or ``probabilities`` tensor ``(N, C)``, the ids
  as a JSON list in the header's metadata under ``ids``, class names optionally under
  ``class_names``.

Without class names in the file, its columns are in the member's ``class_names`` order, or the
order of ``classes.txt``/``classes.json`` beside it, or the dataset's. Every val and test id must
be there (train is optional: distillation uses it when present); ids must be unique; values
finite; probabilities in [0, 1] with rows summing to 1 (to 1e-4). Probabilities become logits as
``log(max(p, 1e-12))``: the softmax of those is ``p`` again (to the floor).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .errors import FusionEngineError
from .records import SCORED_SPLITS, SPLITS
from .weights import class_order, file_class_names

log = logging.getLogger("fusion_engine")

SUFFIXES = (".csv", ".parquet", ".pq", ".npz", ".safetensors")
PROBABILITY_FLOOR = 1e-12
SUM_TOLERANCE = 1e-4

__all__ = ["SUFFIXES", "read_predictions"]


def read_predictions(path: str | Path, *, kind: str, class_names: list[str] | None, dataset_classes: list[str],
                     ids: dict[str, list[str]]) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """A predictions file as logits ``(N, C)`` per split, rows in the order of ``ids[split]`` and
    columns in the order of ``dataset_classes``: ``val`` and ``test`` always, ``train`` when the
    file has every train id; and the class order the file's columns were read in (None: the
    dataset's). Any problem is a one-line :class:`FusionEngineError` naming the file, how many
    rows or classes are wrong and the first of them."""
    path = Path(path)
    what = f"predictions file {path}"
    file_ids, values, names = _read(path, kind)
    names = names or class_names or file_class_names(path)
    if values.ndim != 2:
        raise FusionEngineError(f"{what}: expected one row of {kind} per sample, got an array of shape {values.shape}")
    if names is None and values.shape[1] != len(dataset_classes):
        raise FusionEngineError(f"{what}: {values.shape[1]} columns of {kind} for the dataset's {len(dataset_classes)} "
                                "classes; name them (class columns, class_names: or classes.txt beside the file)")
    if names is not None and len(names) != values.shape[1]:
        raise FusionEngineError(f"{what}: {len(names)} class names for {values.shape[1]} columns of {kind}")
    order = class_order(names, dataset_classes, what=what)
    values = values[:, order].astype(np.float64)
    _check_ids(what, file_ids)
    _check_values(what, kind, file_ids, values)
    row = {sample: i for i, sample in enumerate(file_ids)}
    known = {sample for split in SPLITS for sample in ids[split]}
    foreign = [sample for sample in file_ids if sample not in known]
    if foreign:
        log.warning("%s: %d ids are not the dataset's and are ignored (%s)", what, len(foreign), _first(foreign))
    out = {}
    for split in SPLITS:
        lacking = [sample for sample in ids[split] if sample not in row]
        if lacking:
            if split not in SCORED_SPLITS:
                continue  # train is optional
            raise FusionEngineError(f"{what}: {len(lacking)} of the {len(ids[split])} {split} ids are missing "
                                    f"({_first(lacking)}); `fusion-engine split SPEC --out ids.csv` lists them")
        rows = values[[row[sample] for sample in ids[split]]]
        out[split] = (np.log(np.maximum(rows, PROBABILITY_FLOOR)) if kind == "probabilities" else rows).astype(np.float32)
    return out, (list(names) if names is not None else None)


def _read(path: Path, kind: str) -> tuple[list[str], np.ndarray, list[str] | None]:
    """``(ids, values, class names or None)`` from any of the formats."""
    suffix = path.suffix.lower()
    what = f"predictions file {path}"
    if suffix not in SUFFIXES:
        raise FusionEngineError(f"{what}: unknown format '{suffix}'; use {', '.join(SUFFIXES)}")
    try:
        if suffix in (".csv", ".parquet", ".pq"):
            import pandas as pd

            frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
            if "id" not in frame.columns:
                raise FusionEngineError(f"{what}: no 'id' column; found: {', '.join(map(str, frame.columns[:10]))}")
            classes = [str(c) for c in frame.columns if c != "id"]
            if not classes:
                raise FusionEngineError(f"{what}: no class columns beside 'id'")
            numeric = frame[classes].apply(pd.to_numeric, errors="coerce")
            bad = numeric.isna() & frame[classes].notna()
            if bad.any().any():
                column = bad.any()[bad.any()].index[0]
                raise FusionEngineError(f"{what}: column '{column}' holds values that are not numbers "
                                        f"({int(bad[column].sum())} rows, first id {frame['id'][bad[column]].iloc[0]})")
            return [str(i) for i in frame["id"]], numeric.to_numpy(np.float64), classes
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                if "ids" not in arrays or kind not in arrays:
                    raise FusionEngineError(f"{what}: expected arrays 'ids' and '{kind}', found "
                                            f"{', '.join(arrays.files) or 'none'}")
                names = [str(c) for c in arrays["class_names"]] if "class_names" in arrays else None
                return [str(i) for i in arrays["ids"]], np.asarray(arrays[kind], dtype=np.float64), names
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            if kind not in f.keys():
                raise FusionEngineError(f"{what}: expected a '{kind}' tensor, found {', '.join(f.keys()) or 'none'}")
            if "ids" not in meta:
                raise FusionEngineError(f"{what}: its metadata has no 'ids' (a JSON list of the rows' sample ids)")
            ids = json.loads(meta["ids"])
            names = json.loads(meta["class_names"]) if "class_names" in meta else None
            return [str(i) for i in ids], np.asarray(f.get_tensor(kind), dtype=np.float64), names
    except FusionEngineError:
        raise
    except Exception as exc:  # pandas, pyarrow, numpy and safetensors each have their own errors for a bad file
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise FusionEngineError(f"cannot read {what}: {text}") from None


def _check_ids(what: str, ids: list[str]) -> None:
    seen, repeated = set(), []
    for sample in ids:
        if sample in seen:
            repeated.append(sample)
        seen.add(sample)
    if repeated:
        raise FusionEngineError(f"{what}: {len(repeated)} ids appear more than once ({_first(sorted(set(repeated)))})")


def _check_values(what: str, kind: str, ids: list[str], values: np.ndarray) -> None:
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise FusionEngineError(f"{what}: {int(bad.sum())} rows hold NaN or infinite {kind} (first id "
                                f"{ids[int(np.argmax(bad))]})")
    if kind == "probabilities":
        outside = ((values < 0) | (values > 1)).any(axis=1)
        if outside.any():
            raise FusionEngineError(f"{what}: {int(outside.sum())} rows hold probabilities outside [0, 1] (first id "
                                    f"{ids[int(np.argmax(outside))]}); are they logits? (kind: logits)")
        off = np.abs(values.sum(axis=1) - 1) > SUM_TOLERANCE
        if off.any():
            i = int(np.argmax(off))
            raise FusionEngineError(f"{what}: {int(off.sum())} rows of probabilities do not sum to 1 (first id {ids[i]}: "
                                    f"{values[i].sum():.6g}); are they scores of a subset of classes, or logits?")


def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(map(str, items[:n])) + (", ..." if len(items) > n else "")
