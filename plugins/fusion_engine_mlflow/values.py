"""Engine values as MLflow takes them: names MLflow accepts, params as text within its limits,
metrics as floats, nested mappings flattened to dotted names.

MLflow refuses a name with characters outside ``\\w - . space : /`` or one that would resolve to
another path (``a//b``), caps names at 250 characters, and truncates a param longer than 6000
characters (a tag longer than 8000) with a warning; one batch with a name twice is refused
whole. Everything the tracker sends goes through here, so none of that can happen.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Iterable, Mapping

from fusion_engine import encode_json

MAX_KEY, MAX_PARAM, MAX_TAG = 250, 6000, 8000
_BAD = re.compile(r"[^\w\-. :/]")


def key(name: Any) -> str:
    """``name`` as an MLflow param, metric or tag name: other characters become ``_``, empty and
    ``.``/``..`` path parts go, and it is cut to 250 characters."""
    parts = [part for part in _BAD.sub("_", str(name)).split("/") if part]
    text = "/".join("_" if part in (".", "..") else part for part in parts)
    return text[:MAX_KEY] or "_"


def text(value: Any, limit: int = MAX_PARAM) -> str:
    """A param or tag value: strings as they are, anything else as JSON (numpy values as numbers,
    an object JSON has no form for as its ``str``), cut to ``limit``."""
    out = value if isinstance(value, str) else encode_json(value, fallback=str)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def number(value: Any) -> float | None:
    """A metric value: a number or boolean as a float (NaN stays NaN), else ``None``."""
    if isinstance(value, (bool, numbers.Number)) or (type(value).__module__ == "numpy" and hasattr(value, "item")):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted names (``data.split.val``); a list of mappings that all have a
    ``name`` by that name (``members.resnet18.backbone``); any other list is one value."""
    flat: dict[str, Any] = {}
    for name, value in data.items():
        path = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{path}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) and "name" in v for v in value):
            for item in value:
                flat.update(flatten({k: v for k, v in item.items() if k != "name"}, f"{path}.{item['name']}."))
        else:
            flat[path] = value
    return flat


def params(values: Mapping[str, Any]) -> list:
    """``mlflow.entities.Param`` for each value, names made valid, each name once."""
    from mlflow.entities import Param

    return [Param(k, text(v)) for k, v in unique(values).items()]


def tags(values: Mapping[str, Any]) -> list:
    """``mlflow.entities.RunTag`` for each value that is not ``None``, names made valid, each once."""
    from mlflow.entities import RunTag

    return [RunTag(k, text(v, MAX_TAG)) for k, v in unique(values).items() if v is not None]


def metrics(values: Mapping[str, Any], *, timestamp: int, step: int = 0) -> list:
    """``mlflow.entities.Metric`` for each numeric value (others are left out)."""
    from mlflow.entities import Metric

    out = []
    for k, v in unique(values).items():
        v = number(v)
        if v is not None:
            out.append(Metric(k, v, timestamp, int(step)))
    return out


def curves(history: Iterable[Mapping[str, Any]], *, timestamp: int, prefix: str = "epoch/") -> list:
    """Per-epoch values (``train_loss``, ``val_loss``, ``val_accuracy``, ``lr``, ``seconds``) as
    step metrics ``epoch/<name>``, the step being the epoch."""
    out = []
    for i, entry in enumerate(history, start=1):
        step = entry.get("epoch", i)
        out += metrics({f"{prefix}{k}": v for k, v in entry.items() if k != "epoch"}, timestamp=timestamp,
                       step=int(step) if number(step) is not None and math.isfinite(float(step)) else i)
    return out


def unique(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with valid names; of two names made alike, the first is kept."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        out.setdefault(key(name), value)
    return out
