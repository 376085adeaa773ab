"""The one JSON codec: how the engine's values (numpy arrays and scalars, paths, pandas frames)
become JSON, in four modes, each for one use.

- **plain** (:func:`encode_json`, and :func:`fusion_engine.files.write_json` for every JSON file
  the engine writes): a numpy scalar is its Python number, an array a plain (nested) list, a
  path its string; any other object is an error, so nothing is written that cannot be read back.
- **tagged** (:func:`to_jsonable` and back :func:`from_jsonable`): an array is
  ``{"__ndarray__": [...], "dtype": "..."}``, so it comes back as the same array; for what must
  round-trip, a fitted fuser's learned state.
- **text** (``encode_json(value, fallback=str)``): as plain, any other object as its ``str``;
  for showing values (the CLI's ``--json``, MLflow params), never for a file read back.
- **frame rows** (:func:`frame_rows`): a pandas frame's rows as pandas' own encoder writes them,
  NaN as null and floats to 15 decimal places: the values ``leaderboard.json`` has always held.
  (Python's ``round`` is not a substitute: pandas rounds by its own rule, and about one float in
  fifty comes out one digit apart.)
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np

__all__ = ["encode_json", "frame_rows", "from_jsonable", "plain", "to_jsonable"]


def plain(value: Any) -> Any:
    """``json.dumps``' ``default`` in plain mode: numpy scalars as numbers, arrays as plain lists,
    paths as strings; a TypeError for anything else."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def encode_json(value: Any, *, indent: int | None = None, fallback: Callable[[Any], Any] | None = None,
                sort_keys: bool = False, allow_nan: bool = True) -> str:
    """``value`` as JSON text in plain mode; with ``fallback`` (text mode, ``fallback=str``), an
    object plain mode cannot encode is encoded as what ``fallback`` makes of it."""
    default = plain if fallback is None else _with_fallback(fallback)
    return json.dumps(value, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan, default=default)


def _with_fallback(fallback: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def default(value: Any) -> Any:
        try:
            return plain(value)
        except TypeError:
            return fallback(value)

    return default


def to_jsonable(value: Any) -> Any:
    """``value`` in tagged mode: arrays tagged with their dtype, numpy scalars as numbers, paths as
    strings, containers walked; a TypeError for anything else."""
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} as JSON")


def from_jsonable(value: Any) -> Any:
    """The inverse of :func:`to_jsonable`: tagged arrays become numpy arrays again."""
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=value.get("dtype", "float64"))
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value


def frame_rows(df) -> list[dict[str, Any]]:
    """A pandas frame's rows in frame-rows mode (see the module): one dict per row, column order
    kept."""
    return json.loads(df.to_json(orient="records", double_precision=15))
