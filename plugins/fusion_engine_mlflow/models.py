"""An exported ensemble logged to MLflow as a ``pyfunc`` model: :func:`log_ensemble`, and what
``fusion-engine export ... --mlflow`` calls (docs/deploying.md, "MLflow").

The model is saved "from code" (:mod:`.pyfunc`): its files are ``MLmodel``, the code file,
``artifacts/ensemble/`` (the export folder as it is: safetensors, JSON, checksums), and the
environment files, whose pip requirements name ``fusion-engine[mlflow]`` at this version, MLflow,
and any plugin distribution the ensemble's members and fuser come from. No pickle.

It goes to its own MLflow run (named ``export <row> of <run id>``) with the export's card as
params and tags and its check as a metric; that run is nested under the engine run's MLflow run
when the engine run was tracked in the same place. Only :class:`mlflow.MlflowClient` is used:
the model is saved to a temporary folder and uploaded as the run's ``model`` artifacts, and
registered (optional) through the client, so MLflow's global state (tracking URI, active run) is
left as it was. The connection fails fast and names the problem (:mod:`.connection`), before the
caller writes anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion_engine import FusionEngineError, RunFolder, load

from . import ENV, INSTALL_HINT, MlflowParams
from .connection import Connection, connect, redact
from .connection import tracking_uri as resolve_uri
from .tracker import NOTE

#: the run's artifact folder that holds the model
MODEL_PATH = "model"
PARENT_TAG = "mlflow.parentRunId"


@dataclass
class LoggedEnsemble:
    """Where a logged ensemble is. ``model_uri`` (``runs:/<run id>/model``) is what
    ``mlflow.pyfunc.load_model`` and ``mlflow models serve -m`` take with ``MLFLOW_TRACKING_URI``
    set to ``tracking_uri``; ``artifact_uri`` is where the files are; ``registered_uri`` is
    ``models:/<name>/<version>`` when the model was registered."""

    model_uri: str
    artifact_uri: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    registered_uri: str | None = None


class ModelTarget:
    """Where exported ensembles go: a checked connection, an experiment, a registered name.
    Made before an export writes anything, so that a bad URI or a backend that is not there
    stops the export before its folder exists."""

    def __init__(self, connection: Connection, experiment: str | None = None, registered_name: str | None = None):
        self.connection, self.experiment, self.registered_name = connection, experiment, registered_name

    def log(self, export_dir: str | Path, *, run_dir: str | Path | None = None) -> LoggedEnsemble:
        """Log the export folder ``export_dir``; its run nested under the engine run's MLflow run
        when ``run_dir`` (the engine run's folder) says that run was tracked in the same place."""
        ensemble = load(export_dir, device="cpu")  # checked against its SHA256SUMS, and it builds
        return _log(self.connection, ensemble, Path(export_dir), experiment=self.experiment,
                    registered_name=self.registered_name, parent_run_id=self._parent(run_dir))

    def _parent(self, run_dir: str | Path | None) -> str | None:
        if run_dir is None:
            return None
        try:
            note = RunFolder(Path(run_dir)).summary.get("notes", {}).get(NOTE) or {}
        except Exception:  # a run folder without run.json: nothing to nest under
            return None
        if note.get("status") == "ok" and note.get("run_id") and note.get("tracking_uri") == redact(self.connection.uri):
            return note["run_id"]
        return None


def model_target(tracking_uri: str | None = None, experiment: str | None = None, registered_name: str | None = None,
                 *, registry: str | Path | None = None) -> ModelTarget:
    """A :class:`ModelTarget` for ``tracking_uri`` (else ``$MLFLOW_TRACKING_URI``, else the
    database of ``registry``, where the tracker logs runs by default), checked: the URI is one
    MLflow takes, and the backend answers. A one-line :class:`~fusion_engine.FusionEngineError`
    otherwise."""
    from pydantic import ValidationError

    if importlib.util.find_spec("mlflow") is None:
        raise FusionEngineError(f"MLflow is not installed; {INSTALL_HINT}")
    try:
        params = MlflowParams.model_validate({"tracking_uri": tracking_uri, "experiment": experiment})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = {"tracking_uri": "tracking URI", "experiment": "experiment"}.get(str(first["loc"][0]), first["loc"][0])
        value = tracking_uri if field == "tracking URI" else experiment
        raise FusionEngineError(f"MLflow {field} {value!r}: {first['msg'].removeprefix('Value error, ')}") from None
    if registered_name is not None and not registered_name.strip():
        raise FusionEngineError("give the registered model a name, or leave it out")
    if params.tracking_uri is None and registry is None and not os.environ.get(ENV, "").strip():
        raise FusionEngineError(f"no MLflow tracking URI: pass one, or set {ENV}")
    uri = resolve_uri(params, Path(registry) if registry is not None else Path("."))
    try:
        connection = connect(params, uri)
        with connection.calls():
            connection.client.search_experiments(max_results=1)
    except FusionEngineError:
        raise
    except Exception as exc:  # MLflow's own, SQLAlchemy's, OSError: the backend is not usable
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise FusionEngineError(f"cannot use the MLflow tracking URI {redact(uri)}: {message[:300]}") from None
    return ModelTarget(connection, experiment=params.experiment, registered_name=registered_name)


def log_ensemble(export_dir: str | Path, *, tracking_uri: str | None = None, experiment: str | None = None,
                 registered_name: str | None = None, registry: str | Path | None = None,
                 run_dir: str | Path | None = None) -> LoggedEnsemble:
    """Log the export folder ``export_dir`` (written by ``fusion-engine export``) as an MLflow
    pyfunc model to ``tracking_uri`` (else ``$MLFLOW_TRACKING_URI``, else the database of
    ``registry``), in ``experiment`` (default: the export's experiment name), registered as
    ``registered_name`` when given. See :func:`model_target` and :meth:`ModelTarget.log`."""
    return model_target(tracking_uri, experiment, registered_name, registry=registry).log(export_dir, run_dir=run_dir)


def requirements(card) -> list[str]:
    """The model's pip requirements: fusion-engine with the ``mlflow`` extra, MLflow, and the
    plugin distributions its members and fuser come from (at the versions that exported them)."""
    import mlflow

    from fusion_engine import __version__

    found = [f"fusion-engine[mlflow]=={__version__}", f"mlflow=={mlflow.__version__}"]
    refs = [m.plugin for m in card.members] + ([card.fuser.plugin] if card.fuser is not None else [])
    for ref in refs:
        if ref.distribution and ref.distribution.lower().replace("_", "-") != "fusion-engine":
            pin = f"{ref.distribution}=={ref.version}" if ref.version else ref.distribution
            if pin not in found:
                found.append(pin)
    return found


def _log(conn: Connection, ensemble, export_dir: Path, *, experiment: str | None, registered_name: str | None,
         parent_run_id: str | None) -> LoggedEnsemble:
    from .pyfunc import ARTIFACT, MODEL_CODE, signature

    card = ensemble.card
    with conn.calls():
        import mlflow.pyfunc

        client = conn.client
        if parent_run_id is not None:
            experiment_id = client.get_run(parent_run_id).info.experiment_id
        else:
            experiment_id = conn.experiment_id(experiment or card.experiment, conn.params.artifact_location)
        tags = {"fusion.kind": "export", "fusion.run_id": card.run_id, "fusion.row": card.row,
                "fusion.experiment": card.experiment, "fusion.export_dir": str(export_dir.resolve()),
                "mlflow.source.type": "LOCAL", "mlflow.source.name": "fusion-engine export"}
        if parent_run_id is not None:
            tags[PARENT_TAG] = parent_run_id
        run = client.create_run(experiment_id, run_name=f"export {card.row} of {card.run_id}", tags=tags)
        run_id = run.info.run_id
        try:
            from mlflow.entities import Metric, Param

            params = {"row": card.row, "kind": card.kind, "members": ",".join(m.name for m in card.members),
                      "fuser": card.fuser.fuser if card.fuser else "", "classes": json.dumps(card.classes),
                      "resize": card.resize, "fusion_engine": card.fusion_engine}
            metrics = []
            if card.check:
                metrics.append(Metric("check/max_abs_diff", float(card.check["max_abs_diff"]), 0, 0))
            client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
            with tempfile.TemporaryDirectory(prefix="fusion-engine-mlflow-") as tmp:
                model_dir = Path(tmp) / MODEL_PATH
                mlflow.pyfunc.save_model(str(model_dir), python_model=str(MODEL_CODE),
                                         artifacts={ARTIFACT: str(export_dir.resolve())},
                                         signature=signature(card.classes), pip_requirements=requirements(card),
                                         metadata={"fusion_engine": {"run_id": card.run_id, "row": card.row,
                                                                     "classes": card.classes}})
                client.log_artifacts(run_id, str(model_dir), MODEL_PATH)
            artifact_uri = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_PATH}"
            registered = None
            if registered_name:
                registered = _register(client, registered_name, artifact_uri, run_id)
            client.set_terminated(run_id)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
    return LoggedEnsemble(model_uri=f"runs:/{run_id}/{MODEL_PATH}", artifact_uri=artifact_uri, run_id=run_id,
                          experiment_id=experiment_id, tracking_uri=redact(conn.uri), registered_uri=registered)


def _register(client: Any, name: str, source: str, run_id: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, source, run_id=run_id)
    return f"models:/{name}/{version.version}"
