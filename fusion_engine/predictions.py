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
finite; probabilities in [0, 1] with rows summing to 1 (to 1e-2: rows written rounded are
renormalised, with a warning). Probabilities become logits as ``log(max(p, 1e-12))``: the
softmax of those is ``p`` again (to the floor).

A file that names its classes (CSV and Parquet columns, ``class_names`` in an ``.npz`` or in
safetensors metadata) is read by those names; a member's ``class_names`` that contradicts them
is an error rather than silently one or the other.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np

from .errors import FusionEngineError, first_few, first_line
from .records import SCORED_SPLITS, SPLITS
from .weights import class_order, file_class_names

log = logging.getLogger("fusion_engine")

SUFFIXES = (".csv", ".parquet", ".pq", ".npz", ".safetensors")
PROBABILITY_FLOOR = 1e-12
#: rows of probabilities may miss 1 by this much (written rounded) and are renormalised
SUM_TOLERANCE = 1e-2

__all__ = ["SUFFIXES", "read_predictions"]


def read_predictions(path: str | Path, *, kind: str, class_names: list[str] | None, dataset_classes: list[str],
                     ids: dict[str, list[str]], data: bytes | None = None) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """A predictions file as logits ``(N, C)`` per split, rows in the order of ``ids[split]`` and
    columns in the order of ``dataset_classes``: ``val`` and ``test`` always, ``train`` when the
    file has every train id; and the class order the file's columns were read in (None: the
    dataset's). ``data``: the file's bytes, when the caller has read them (and hashed those very
    bytes). Any problem is a one-line :class:`FusionEngineError` naming the file, how many rows
    or classes are wrong and the first of them."""
    path = Path(path)
    what = f"predictions file {path}"
    file_ids, values, names = _read(path, kind, path.read_bytes() if data is None else data)
    if names is not None and class_names is not None and list(map(str, class_names)) != list(names):
        raise FusionEngineError(f"{what} names its classes ({first_few(names)}) and the member's class_names "
                                f"({first_few(list(map(str, class_names)))}) differ; drop class_names: the file's own "
                                "names are what it is read by")
    names = names or class_names or file_class_names(path)
    if values.ndim != 2:
        raise FusionEngineError(f"{what}: expected one row of {kind} per sample, got an array of shape {values.shape}")
    if values.shape[0] != len(file_ids):
        raise FusionEngineError(f"{what}: {len(file_ids)} ids for {values.shape[0]} rows of {kind}; give one id per row")
    if names is None and values.shape[1] != len(dataset_classes):
        raise FusionEngineError(f"{what}: {values.shape[1]} columns of {kind} for the dataset's {len(dataset_classes)} "
                                "classes; name them (class columns, class_names: or classes.txt beside the file)")
    if names is not None and len(names) != values.shape[1]:
        raise FusionEngineError(f"{what}: {len(names)} class names for {values.shape[1]} columns of {kind}")
    order = class_order(names, dataset_classes, what=what)
    values = values[:, order].astype(np.float64)
    _check_ids(what, file_ids)
    values = _check_values(what, kind, file_ids, values)
    row = {sample: i for i, sample in enumerate(file_ids)}
    known = {sample for split in SPLITS for sample in ids[split]}
    foreign = [sample for sample in file_ids if sample not in known]
    if foreign:
        log.warning("%s: %d ids are not the dataset's and are ignored (%s)", what, len(foreign), first_few(foreign))
    out = {}
    for split in SPLITS:
        lacking = [sample for sample in ids[split] if sample not in row]
        if lacking:
            if split not in SCORED_SPLITS:  # train is optional, but all of it: a student distils from every row
                if len(lacking) < len(ids[split]):
                    log.warning("%s: %d of the %d %s ids are missing (%s), so its %s outputs are left out (a "
                                "student cannot distil from it); give every %s row, or none", what, len(lacking),
                                len(ids[split]), split, first_few(lacking), split, split)
                continue
            raise FusionEngineError(f"{what}: {len(lacking)} of the {len(ids[split])} {split} ids are missing "
                                    f"({first_few(lacking)}); `fusion-engine split SPEC --out ids.csv` lists them")
        rows = values[[row[sample] for sample in ids[split]]]
        out[split] = (np.log(np.maximum(rows, PROBABILITY_FLOOR)) if kind == "probabilities" else rows).astype(np.float32)
    return out, (list(names) if names is not None else None)


def _read(path: Path, kind: str, data: bytes) -> tuple[list[str], np.ndarray, list[str] | None]:
    """``(ids, values, class names or None)`` from any of the formats, parsed from ``data``."""
    suffix = path.suffix.lower()
    what = f"predictions file {path}"
    if suffix not in SUFFIXES:
        raise FusionEngineError(f"{what}: unknown format '{suffix}'; use {', '.join(SUFFIXES)}")
    try:
        if suffix in (".csv", ".parquet", ".pq"):
            import pandas as pd

            frame = (pd.read_csv(io.BytesIO(data), dtype={"id": str}, keep_default_na=False, na_values=[""])
                     if suffix == ".csv" else pd.read_parquet(io.BytesIO(data)))
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
            buffer = io.BytesIO(data)
            with np.load(buffer, allow_pickle=False) as arrays:
                if "ids" not in arrays or kind not in arrays:
                    raise FusionEngineError(f"{what}: expected arrays 'ids' and '{kind}', found "
                                            f"{', '.join(arrays.files) or 'none'}")
                ids = arrays["ids"]
                if ids.ndim != 1:
                    raise FusionEngineError(f"{what}: 'ids' must be one-dimensional, got shape {ids.shape}")
                names = [str(c) for c in arrays["class_names"]] if "class_names" in arrays else None
                return [str(i) for i in ids], np.asarray(arrays[kind], dtype=np.float64), names
        from safetensors.numpy import load

        tensors = load(data)
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + size]).get("__metadata__") or {}
        if kind not in tensors:
            raise FusionEngineError(f"{what}: expected a '{kind}' tensor, found {', '.join(tensors) or 'none'}")
        if "ids" not in meta:
            raise FusionEngineError(f"{what}: its metadata has no 'ids' (a JSON list of the rows' sample ids)")
        ids = _json_list(what, meta, "ids")
        names = _json_list(what, meta, "class_names") if "class_names" in meta else None
        return [str(i) for i in ids], np.asarray(tensors[kind], dtype=np.float64), names
    except FusionEngineError:
        raise
    except Exception as exc:  # pandas, pyarrow, numpy and safetensors each have their own errors for a bad file
        raise FusionEngineError(f"cannot read {what}: {first_line(exc)}") from None


def _json_list(what: str, meta: dict, name: str) -> list:
    try:
        value = json.loads(meta[name])
    except ValueError:
        value = None
    if not isinstance(value, list) or any(isinstance(v, (list, dict)) for v in value):
        raise FusionEngineError(f"{what}: its metadata '{name}' must be a JSON list of strings")
    return value


def _check_ids(what: str, ids: list[str]) -> None:
    seen, repeated = set(), []
    for sample in ids:
        if sample in seen:
            repeated.append(sample)
        seen.add(sample)
    if repeated:
        raise FusionEngineError(f"{what}: {len(repeated)} ids appear more than once ({first_few(sorted(set(repeated)))})")


def _check_values(what: str, kind: str, ids: list[str], values: np.ndarray) -> np.ndarray:
    """``values`` checked; rows of probabilities a little off 1 (written rounded) renormalised."""
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise FusionEngineError(f"{what}: {int(bad.sum())} rows hold NaN or infinite {kind} (first id "
                                f"{ids[int(np.argmax(bad))]})")
    if kind == "logits" and ((values >= 0) & (values <= 1)).all() and np.allclose(values.sum(axis=1), 1, atol=1e-3):
        log.warning("%s: every row lies in [0, 1] and sums to 1, which looks like probabilities; they are read as "
                    "logits, as kind: logits says (kind: probabilities reads them as probabilities)", what)
    if kind == "probabilities":
        outside = ((values < 0) | (values > 1)).any(axis=1)
        if outside.any():
            raise FusionEngineError(f"{what}: {int(outside.sum())} rows hold probabilities outside [0, 1] (first id "
                                    f"{ids[int(np.argmax(outside))]}); are they logits? (kind: logits)")
        sums = values.sum(axis=1)
        off = np.abs(sums - 1) > SUM_TOLERANCE
        if off.any():
            i = int(np.argmax(off))
            raise FusionEngineError(f"{what}: {int(off.sum())} rows of probabilities do not sum to 1 (first id {ids[i]}: "
                                    f"{sums[i]:.6g}); are they scores of a subset of classes, or logits?")
        rounded = np.abs(sums - 1) > 1e-6
        if rounded.any():
            log.warning("%s: %d rows of probabilities sum to 1 only to %.1g (written rounded?); renormalised",
                        what, int(rounded.sum()), float(np.abs(sums - 1).max()))
            values = values / sums[:, None]
    return values
