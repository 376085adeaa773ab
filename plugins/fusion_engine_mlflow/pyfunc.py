"""An exported ensemble as an MLflow ``pyfunc`` model: what ``mlflow.pyfunc.load_model`` and
``mlflow models serve`` run (docs/deploying.md, "MLflow").

:class:`EnsembleModel` loads the export folder, logged as the model's artifact ``ensemble``,
with :func:`fusion_engine.load` (checked against its ``SHA256SUMS`` as always), and predicts
through :meth:`fusion_engine.Ensemble.proba_batches`, the path ``fusion-engine predict`` and the
Python API take, so the model's probabilities are the export's.

Input: a DataFrame with exactly one of the columns

- ``path``: image files the predicting process can read;
- ``image_b64``: an image file's bytes (PNG, JPEG, ...), base64-encoded: what a client sends
  over HTTP;
- ``image``: in-process, each cell an image: file bytes, a PIL image, or a uint8 array
  ``(H, W)`` / ``(H, W, C)``; over HTTP, a nested list of 0..255 pixel values of that shape.

Output: one row per input row: ``class`` (the predicted class), ``probability`` (its
probability), ``proba_<class>`` for every class, and ``error``: empty, or why that row's image
could not be read (its class is then empty and its probabilities NaN; the other rows go on).

It predicts on CPU; ``mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})`` (or
``"auto"``) chooses otherwise.

Nothing engine-side is pickled: the model is logged "from code" (:data:`MODEL_CODE`, a file that
names :class:`EnsembleModel`), so MLflow stores that file, the export folder (safetensors and
JSON), and no ``python_model.pkl``.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

#: the models-from-code file MLflow logs and executes to make the model
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
#: the model's artifact that holds the export folder
ARTIFACT = "ensemble"
#: the input columns, one of which a request names
INPUT_COLUMNS = ("path", "image_b64", "image")
PROBA_PREFIX = "proba_"


def signature(classes: list[str]):
    """The model's signature: the three optional input columns (a request names one of them),
    and the output columns."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    inputs = Schema([ColSpec("string", "path", required=False), ColSpec("string", "image_b64", required=False),
                     ColSpec(AnyType(), "image", required=False)])
    outputs = Schema([ColSpec("string", "class"), ColSpec("double", "probability"),
                      *[ColSpec("double", PROBA_PREFIX + c) for c in classes], ColSpec("string", "error", required=False)])
    return ModelSignature(inputs=inputs, outputs=outputs)


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """The exported ensemble behind MLflow's pyfunc interface (see the module docstring)."""

    def load_context(self, context) -> None:
        import fusion_engine

        # CPU unless asked (load_model(uri, model_config={"device": "cuda"})): the export's
        # probabilities are promised on CPU, and a server's GPU may be busy with other work
        config = getattr(context, "model_config", None) or {}
        self.ensemble = fusion_engine.load(context.artifacts[ARTIFACT], device=str(config.get("device", "cpu")))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        with tempfile.TemporaryDirectory(prefix="fusion-engine-pyfunc-") as folder:
            items, errors = images_from_frame(model_input, Path(folder))
            return predictions(self.ensemble, items, errors, hide=folder + os.sep)


def images_from_frame(frame: Any, folder: Path) -> tuple[list[Any], dict[int, str]]:
    """The images a request's rows hold, and why each row that holds none could not be read
    (those rows get ``None`` in the list). Image file bytes are written to ``folder`` as
    ``row-<i>`` and given as paths: decoded exactly as the same file given by its path is (a
    JPEG's draft mode included)."""
    if isinstance(frame, dict):
        frame = pd.DataFrame(frame)
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"expected a DataFrame with one of the columns {', '.join(INPUT_COLUMNS)}; "
                         f"got {type(frame).__name__}")
    given = [c for c in INPUT_COLUMNS if c in frame.columns and frame[c].notna().any()]
    if not len(frame) and any(c in frame.columns for c in INPUT_COLUMNS):
        return [], {}
    if len(given) != 1:
        found = ", ".join(map(str, frame.columns)) or "none"
        raise ValueError(f"give exactly one of the columns {', '.join(INPUT_COLUMNS)} (path: image files; image_b64: "
                         f"base64 image file bytes; image: pixels); found columns: {found}")
    column = given[0]
    items: list[Any] = []
    errors: dict[int, str] = {}
    for i, value in enumerate(frame[column].tolist()):
        try:
            image = _image(column, value)
            if isinstance(image, bytes):
                path = folder / f"row-{i}"
                path.write_bytes(image)
                image = str(path)
            items.append(image)
        except ValueError as exc:
            items.append(None)
            errors[i] = str(exc)
    return items, errors


def _image(column: str, value: Any) -> Any:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise ValueError(f"no {column}")
    if column == "path":
        return str(value)
    if column == "image_b64":
        try:
            return base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image_b64 is not base64") from None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (list, np.ndarray)):  # pixels; over HTTP a nested list
        array = np.asarray(value)
        if array.ndim not in (2, 3) or (array.size and (array.min() < 0 or array.max() > 255)):
            raise ValueError(f"image pixels must be 0..255 of shape (H, W) or (H, W, C), got shape {array.shape}")
        return array.astype(np.uint8)
    return value  # a PIL image, or something the engine names as unreadable


def predictions(ensemble, items: list[Any], errors: dict[int, str], *, hide: str = "") -> pd.DataFrame:
    """The output frame for ``items``: rows in ``errors`` are not predicted, an image the
    ensemble cannot read gets its reason (``hide``, the temporary folder, cut out of it), and
    the others their probabilities."""
    classes = ensemble.classes
    proba = np.full((len(items), len(classes)), np.nan)
    errors = dict(errors)
    ok = [i for i in range(len(items)) if i not in errors]
    if ok:
        for batch in ensemble.proba_batches([items[i] for i in ok]):
            rows = [ok[batch.start + k] for k in range(len(batch.proba))]
            proba[rows] = batch.proba
            errors.update({ok[batch.start + k]: why for k, why in batch.errors.items()})
    best = np.argmax(np.nan_to_num(proba, nan=-1.0), axis=1)
    failed = np.array([i in errors for i in range(len(items))], dtype=bool)
    out = pd.DataFrame({
        "class": [None if failed[i] else classes[best[i]] for i in range(len(items))],
        "probability": proba[np.arange(len(items)), best],  # NaN for a row that failed
        **{PROBA_PREFIX + c: proba[:, k] for k, c in enumerate(classes)},
        "error": pd.Series([errors[i].replace(hide, "") if i in errors and hide else errors.get(i)
                            for i in range(len(items))], dtype=object),
    })
    return out
