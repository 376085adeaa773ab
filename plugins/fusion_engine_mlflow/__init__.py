"""fusion-engine first-party plugin: track every run in MLflow (docs/tracking.md).

The ``mlflow`` tracker is on when a spec says ``tracking: {mlflow: {...}}``, or when
``MLFLOW_TRACKING_URI`` is set and the spec does not name it (``tracking: {mlflow: false}``
keeps it off). Each engine run becomes one MLflow run, named by the run id, with a nested run
per member and per fuser (:mod:`.tracker`). Needs ``pip install 'fusion-engine[mlflow]'``;
MLflow is imported only when a run is tracked, so ``validate`` and ``plugins`` stay fast.

Tracking never fails a run: the core contains whatever the tracker raises
(:mod:`fusion_engine.tracking`), and the tracker makes sure a failure is quick, checking that
an HTTP server answers and that a SQLite database can be written before it starts
(:mod:`.connection`).

An exported ensemble is logged as an MLflow ``pyfunc`` model by :mod:`.models`
(``fusion-engine export ... --mlflow``, or :func:`.models.log_ensemble`); :mod:`.pyfunc` is the
model MLflow loads and serves.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator

from fusion_engine import FusionEngineError, Params, TrackerRecord, hookimpl

#: switches the tracker on when a spec's ``tracking:`` does not name it; also the default URI
ENV = "MLFLOW_TRACKING_URI"
INSTALL_HINT = "pip install 'fusion-engine[mlflow]'"
#: what MLflow allows in a tag's (or param's, or metric's) name
KEY_PATTERN = re.compile(r"^[\w\-. :/]{1,250}$")


class MlflowParams(Params):
    tracking_uri: Optional[str] = Field(
        None, description="where runs go: http(s)://HOST:PORT, sqlite:///PATH.db (relative to the spec's folder), "
                          "or any URI MLflow takes; default: $MLFLOW_TRACKING_URI, else "
                          "sqlite:///<registry>/mlflow/mlflow.db")
    experiment: Optional[str] = Field(None, min_length=1, description="the MLflow experiment; default: the spec's name")
    artifact_location: Optional[str] = Field(
        None, description="where a new experiment keeps artifacts: a folder (relative to the spec's folder) or a URI; "
                          "default: mlartifacts/ beside a SQLite database, the server's choice for a server")
    tags: dict[str, str] = Field(default_factory=dict, description="more tags for the run's MLflow run")
    timeout: int = Field(10, ge=1, description="seconds an HTTP tracking server has to answer each request")
    retries: int = Field(2, ge=0, le=10, description="times a failed request to an HTTP tracking server is retried")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if value is None:
            return None
        return check_uri(value, base_dir=(info.context or {}).get("base_dir"))

    @field_validator("artifact_location")
    @classmethod
    def _location(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if value is None:
            return None
        value = value.strip()
        if not value:
            raise ValueError("give a folder or a URI, or leave artifact_location out")
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", value):  # a URI (file:, s3:, mlflow-artifacts:, ...)
            return value
        base_dir = (info.context or {}).get("base_dir")
        path = Path(value).expanduser()
        return (Path(base_dir) / path if base_dir and not path.is_absolute() else path).resolve().as_uri()

    @field_validator("tags")
    @classmethod
    def _tag_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not KEY_PATTERN.match(name):
                raise ValueError(f"tag name {name!r}: MLflow allows letters, digits, _ - . : / and spaces, "
                                 "up to 250 characters")
        return value


def check_uri(uri: str, *, base_dir: str | Path | None = None) -> str:
    """A tracking URI checked for the mistakes that need no MLflow to see, and a relative
    SQLite path made absolute against ``base_dir`` (else the current folder)."""
    uri = uri.strip()
    if not uri:
        raise ValueError("give a tracking URI, or leave tracking_uri out")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https") and not parts.hostname:
        raise ValueError(f"names no host; write {scheme}://HOST:PORT")
    if scheme == "sqlite":
        if not uri.lower().startswith("sqlite:///"):
            raise ValueError("write sqlite:///relative/path.db or sqlite:////absolute/path.db")
        path = uri[len("sqlite:///"):]
        if not path or path.startswith(":memory:"):
            raise ValueError("name a database file; an in-memory database is gone when the run ends")
        if not Path(path).is_absolute():
            return "sqlite:///" + str((Path(base_dir or ".") / path).resolve())
    return uri


def _create(params: MlflowParams):
    # found, not imported: importing MLflow takes seconds, and waits until a backend is known to answer
    if importlib.util.find_spec("mlflow") is None:
        raise FusionEngineError(f"MLflow is not installed; {INSTALL_HINT}")
    from .tracker import MlflowTracker

    return MlflowTracker(params)


@hookimpl
def register_trackers():
    return [TrackerRecord("mlflow", _create, MlflowParams, env=ENV,
                          description=f"each run, member and fuser as MLflow runs; on with tracking: {{mlflow: ...}} "
                                      f"or when {ENV} is set")]
