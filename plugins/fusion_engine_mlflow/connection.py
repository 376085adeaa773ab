"""A connection to an MLflow tracking backend that fails fast, and MLflow calls that stay quiet.

MLflow's own defaults suit a long-lived service, not a run that must not wait on tracking: a
request to an HTTP server that is down is retried for about four minutes (seven retries with
backoff, two minutes' timeout each), and a SQLite database in a folder that cannot be written
is retried for about a hundred seconds. So, before MLflow is asked anything:

- an HTTP(S) server must answer ``GET /health`` within ``timeout`` seconds (any answer will do:
  it is there);
- a SQLite database's folder is made, and it (or the database file) must be writable.

Every MLflow call then runs inside :meth:`Connection.calls`, which bounds HTTP requests to
``timeout`` seconds and ``retries`` retries (a spec's values, else MLflow's own environment
variables when set, else the defaults), keeps MLflow's output off stdout and stderr (the run's
URL, progress bars, its INFO log and library warnings), and puts everything back afterwards.
The :class:`~mlflow.MlflowClient` is used alone, never MLflow's global state (``set_tracking_uri``,
``start_run``), so a run started from a user's own code leaves their active MLflow run as it was.

This is what both the tracker and, later, the logging of an exported ensemble need.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

from fusion_engine import FusionEngineError

from . import ENV, MlflowParams, check_uri

#: beside a SQLite database: MLflow's own name for a server's artifact folder
ARTIFACTS_FOLDER = "mlartifacts"
#: MLflow's chatter, quiet while the tracker calls it (the database migrations log at INFO)
QUIET_LOGGERS = ("mlflow", "alembic")


@dataclass
class Connection:
    """An MLflow client for ``uri``, and how its calls are bounded."""

    uri: str
    client: Any  # mlflow.MlflowClient
    params: MlflowParams

    @contextmanager
    def calls(self) -> Iterator[None]:
        """MLflow calls with HTTP requests bounded and MLflow's output quiet."""
        with quiet_mlflow(self.params):
            yield

    def experiment_id(self, name: str, artifact_location: str | None = None) -> str:
        """The id of the experiment ``name``, created (keeping artifacts at ``artifact_location``,
        else :func:`default_artifact_location`) when it does not exist."""
        from mlflow.exceptions import MlflowException

        client = self.client
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name, artifact_location=artifact_location
                                                or default_artifact_location(self.uri))
            except MlflowException:
                experiment = client.get_experiment_by_name(name)  # another run made it meanwhile
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise FusionEngineError(f"the MLflow experiment '{name}' is deleted; restore it (mlflow experiments "
                                    f"restore --experiment-id {experiment.experiment_id}) or name another")
        return experiment.experiment_id


def tracking_uri(params: MlflowParams, registry: Path) -> str:
    """Where runs go: the spec's ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite
    database in the registry (``<registry>/mlflow/mlflow.db``)."""
    if params.tracking_uri:
        return params.tracking_uri
    from_env = os.environ.get(ENV, "").strip()
    if from_env:
        try:
            return check_uri(from_env)
        except ValueError as exc:
            raise FusionEngineError(f"{ENV}={from_env!r}: {exc}") from None
    return "sqlite:///" + str((Path(registry) / "mlflow" / "mlflow.db").resolve())


def connect(params: MlflowParams, uri: str) -> Connection:
    """A :class:`Connection` to ``uri``, once the backend is known to be there (see the module
    docstring); a :class:`~fusion_engine.FusionEngineError` naming the problem otherwise."""
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        check_server(uri, timeout=params.timeout)
    elif scheme == "sqlite":
        check_database(Path(uri[len("sqlite:///"):]))
    with quiet_mlflow(params):
        from mlflow import MlflowClient  # imported by quiet_mlflow

        return Connection(uri, MlflowClient(tracking_uri=uri), params)


def check_server(uri: str, *, timeout: float) -> None:
    """An HTTP(S) tracking server answers (any status: a proxy without ``/health`` is there too)."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.Timeout:
        raise FusionEngineError(f"the MLflow tracking server at {redact(uri)} did not answer in {timeout} s") from None
    except requests.RequestException as exc:
        raise FusionEngineError(f"cannot reach the MLflow tracking server at {redact(uri)}: {_reason(exc)}") from None


def check_database(path: Path) -> None:
    """A SQLite database that can be written: its folder made, and writable (MLflow would retry
    an unwritable one for about a hundred seconds)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FusionEngineError(f"cannot use the MLflow database {path}: {path.parent} is a file, not a folder") from None
    except OSError as exc:
        raise FusionEngineError(f"cannot make the folder of the MLflow database {path}: {exc.strerror}") from None
    target = path if path.exists() else path.parent
    if not os.access(target, os.W_OK):
        raise FusionEngineError(f"cannot write the MLflow database {path}: {target} is not writable")


def default_artifact_location(uri: str) -> str | None:
    """``mlartifacts/`` beside a SQLite database. MLflow's default would be ``./mlruns`` of the
    folder the run happens to start in. Other backends choose their own (a server its
    ``--artifacts-destination``)."""
    if urlsplit(uri).scheme.lower() == "sqlite":
        return (Path(uri[len("sqlite:///"):]).parent / ARTIFACTS_FOLDER).resolve().as_uri()
    return None


def redact(uri: str) -> str:
    """``uri`` without a password it may carry (``https://user:secret@host``)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


@contextmanager
def quiet_mlflow(params: MlflowParams) -> Iterator[None]:
    """MLflow's HTTP limits, URL printing and progress bars set for the block; its loggers at
    WARNING and its Python warnings ignored; all put back afterwards."""
    env = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    for field, variable in (("timeout", "MLFLOW_HTTP_REQUEST_TIMEOUT"), ("retries", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")):
        if field in params.model_fields_set or variable not in os.environ:  # the spec, else the user's, else ours
            env[variable] = str(getattr(params, field))
    saved_env = {name: os.environ.get(name) for name in env}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mlflow  # noqa: F401  (it sets up its loggers when imported: before their levels are saved)
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    saved_levels = [logger.level for logger in loggers]
    os.environ.update(env)
    for logger in loggers:
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for logger, level in zip(loggers, saved_levels):
            logger.setLevel(level)


def _reason(exc: Exception) -> str:
    """``[Errno 111] Connection refused`` out of requests' long error chain, or the error's type."""
    found = re.search(r"\[Errno -?\d+\][^'\")]*", str(exc))
    if found:
        return found.group(0).strip()
    if "NameResolutionError" in str(exc) or "Name or service not known" in str(exc):
        return "the host name does not resolve"
    return type(exc).__name__
