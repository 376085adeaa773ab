"""The ``mlflow`` tracker: one MLflow run per engine run, and a nested run per member and fuser.

What lands where (docs/tracking.md has the full table):

- the engine run, named by the run id: params (the resolved spec, flattened: ``seed``,
  ``data.split.val``, ``members.<name>.train.lr``, ...), tags (``fusion.*``: run id, experiment,
  data fingerprint and split, library versions; ``mlflow.user``, ``mlflow.source.name``), the
  top leaderboard row's columns as metrics, the leaderboard as the run's description, and the
  run folder as its artifacts (leaderboard files, report.html, plots/, spec, run.json, run.log,
  predictions, cards; not the ``.safetensors`` arrays);
- a nested run per member (as it is ready): backbone, params, training config, seed, zoo key,
  ``source`` (``trained``, ``weights``, ``predictions``, ``zoo``), ``action`` (``trained``,
  ``predicted``, ``read`` or ``reused``), the file it came from; for a member trained in this
  run, its per-epoch ``epoch/train_loss``, ``epoch/val_loss``, ``epoch/val_accuracy``,
  ``epoch/lr`` and ``epoch/seconds`` as step metrics (a reused member's curves belong to the run that trained it,
  named by the tag ``fusion.trained_in_run``);
- a nested run per fuser: its plugin, params and members;
- every leaderboard column of every row, on that row's nested run: numbers as metrics, text
  (``kind``, ``source``, ``members``) as ``fusion.*`` tags; a cost the engine never saw (a
  member trained or predicted elsewhere) is no metric, and ``fusion.unknown_costs`` names it.

MLflow statuses follow the engine's: a complete run FINISHED, a failed one FAILED, an
interrupted one KILLED. Only :class:`mlflow.MlflowClient` is used, never MLflow's global state.
"""

from __future__ import annotations

import getpass
import logging
import math
import time
from pathlib import Path
from typing import Any

from fusion_engine import RunFolder, Tracker

from . import MlflowParams, values
from .connection import Connection, connect, redact, tracking_uri

log = logging.getLogger("fusion_engine")

#: the engine's run status -> MLflow's
STATUS = {"complete": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
PARENT_TAG = "mlflow.parentRunId"
#: the section of run.json (``notes.mlflow``) where the tracker says where the run went
NOTE = "mlflow"
#: run-folder files left out of the artifacts
UNUPLOADED = {".safetensors"}
#: the leaderboard's cost columns (docs/evaluation.md); one without a value is not logged
COSTS = ("n_params", "infer_ms_per_image", "train_seconds", "fit_seconds")


class MlflowTracker(Tracker):
    """One engine run, tracked (see the module docstring)."""

    def __init__(self, params: MlflowParams):
        self.params = params
        self.conn: Connection | None = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None  # the engine run's MLflow run
        self.open: dict[str, str] = {}  # leaderboard row name -> its nested MLflow run, until terminated

    # -- lifecycle ---------------------------------------------------------------------------------
    def on_run_start(self, run) -> None:
        uri = tracking_uri(self.params, run.registry)
        run.note(NOTE, tracking_uri=redact(uri))
        self.conn = connect(self.params, uri)
        spec = run.spec.spec
        experiment = self.params.experiment or spec.name
        summary = RunFolder(run.run_dir).summary
        with self.conn.calls():
            import mlflow

            client = self.conn.client
            self.experiment_id = self.conn.experiment_id(experiment, self.params.artifact_location)
            versions = {**summary.get("versions", {}), "mlflow": mlflow.__version__}
            tags = {"mlflow.user": _user(), "mlflow.source.name": summary.get("spec_file") or run.spec.file,
                    "mlflow.source.type": "LOCAL", "fusion.kind": "run", "fusion.run_id": run.run_id,
                    "fusion.experiment": spec.name, "fusion.registry": str(run.registry),
                    "fusion.run_dir": str(run.run_dir), **{f"fusion.version.{k}": v for k, v in versions.items()},
                    **self.params.tags}
            self.run_id = client.create_run(self.experiment_id, run_name=run.run_id,
                                            tags={t.key: t.value for t in values.tags(tags)}).info.run_id
            run.note(NOTE, experiment=experiment, experiment_id=self.experiment_id, run_id=self.run_id)
            resolved = {k: v for k, v in run.spec.resolved_dict().items() if k != "tracking"}
            client.log_batch(self.run_id, params=values.params(values.flatten(resolved)), synchronous=True)
        log.info("mlflow: run %s tracked as MLflow run %s in experiment %s at %s", run.run_id, self.run_id,
                 experiment, redact(uri))

    def on_member_ready(self, run, member) -> None:
        card = member.card
        spec_entry = next((m for m in run.spec.spec.members if m.name == member.name), None)
        # as the leaderboard's source column says: trained, weights, predictions or zoo
        source = spec_entry.source if spec_entry is not None else card.source
        origin = card.origin  # the weights or predictions file it came from
        tags = {"fusion.kind": "member", "fusion.action": member.action, "fusion.source": source,
                "fusion.key": member.key, "fusion.backbone": member.backbone or None,
                "fusion.trained_in_run": card.run_id if card.source == "trained" else None,
                "fusion.resumed_from_epoch": member.resumed_from_epoch, "fusion.origin.file": origin.file if origin is not None else None,
                "fusion.data.fingerprint": card.data.fingerprint, "fusion.data.split_sha256": card.data.split_sha256,
                **{f"fusion.version.{k}": v for k, v in card.versions.items()}}
        # the card's spec: params and train (false: run from its weights), or predictions and kind
        made = {k: v for k, v in card.spec.model_dump(mode="json").items()
                if k not in ("name", "backbone", "seed") and v is not None}
        params = {"backbone": member.backbone or None, "key": member.key, "action": member.action, "source": source,
                  "seed": card.spec.seed, "best_epoch": member.best_epoch, "n_params": member.n_params,
                  **values.flatten(made), **{f"origin.{k}": v for k, v in (origin.model_dump(mode="json") if origin is not None else {}).items()}}
        if spec_entry is not None:
            params.update(calibrate=spec_entry.calibrate, zoo=spec_entry.zoo,
                          infer_ms_per_image=spec_entry.infer_ms_per_image)
        now = _now()
        metrics = values.curves(member.history, timestamp=now) if member.action == "trained" else []
        if member.temperature is not None:
            metrics += values.metrics({"temperature": member.temperature}, timestamp=now)
        with self.conn.calls():
            row_run = self._nested(run, member.name, tags)
            self.conn.client.log_batch(row_run, metrics=metrics, synchronous=True,
                                       params=values.params({k: v for k, v in params.items() if v is not None}))

    def on_run_end(self, run, leaderboard) -> None:
        fusers = {f["name"]: f for f in run.spec.resolved_dict().get("fusers", [])}
        rows = leaderboard.to_dict(orient="records")
        now = _now()
        with self.conn.calls():
            client = self.conn.client
            for row in rows:
                name = str(row["name"])
                texts = {f"fusion.{k}": v for k, v in row.items()
                         if k != "name" and values.number(v) is None and v not in ("", None)}
                unknown = [c for c in empty_costs(row) if c != "fit_seconds"]
                if unknown:  # "unknown" on the leaderboard: no metric, and named here
                    texts["fusion.unknown_costs"] = ",".join(unknown)
                row_run = self.open.get(name)
                if row_run is None:  # a fuser (members have their nested run already)
                    row_run = self._nested(run, name, {"fusion.kind": row.get("kind", "fuser")})
                    if name in fusers:
                        entry = {k: v for k, v in fusers[name].items() if k != "name"}
                        client.log_batch(row_run, params=values.params(values.flatten(entry)), synchronous=True)
                client.log_batch(row_run, metrics=row_metrics(row, timestamp=now), tags=values.tags(texts),
                                 synchronous=True)
                client.set_terminated(row_run, "FINISHED")
                self.open.pop(name, None)
            folder = RunFolder(run.run_dir)
            data = folder.summary.get("data", {})
            tags = {"fusion.data.dataset": run.spec.spec.data.dataset, "fusion.data.fingerprint": data.get("fingerprint"),
                    "fusion.data.split_sha256": data.get("split_sha256"), "fusion.data.classes": data.get("classes"),
                    "fusion.data.split_sizes": data.get("split_sizes"),
                    "fusion.ranked_by": leaderboard.attrs.get("ranked_by", run.spec.spec.rank_by)}
            if rows:
                tags["fusion.top_row"] = rows[0]["name"]
            try:  # shown as the run's description in MLflow's UI
                tags["mlflow.note.content"] = folder.leaderboard_text("md")
            except FileNotFoundError:
                pass
            client.log_batch(self.run_id, metrics=row_metrics(rows[0], timestamp=now) if rows else [],
                             tags=values.tags(tags), synchronous=True)

    def on_run_finished(self, run, status: str) -> None:
        if self.run_id is None:
            return
        mlflow_status = STATUS.get(status, "FAILED")
        with self.conn.calls():
            client = self.conn.client
            upload_error = None
            try:  # the run folder as it is: a failed run's run.json and run.log say why
                for path in artifact_files(run.run_dir):
                    folder = path.parent.relative_to(run.run_dir).as_posix()
                    client.log_artifact(self.run_id, str(path), None if folder == "." else folder)
            except Exception as exc:
                upload_error = exc
            for row_run in self.open.values():  # members of a run that failed before its leaderboard
                client.set_terminated(row_run, mlflow_status)
            self.open.clear()
            client.set_terminated(self.run_id, mlflow_status)
        if upload_error is not None:
            raise upload_error

    # -- helpers -----------------------------------------------------------------------------------
    def _nested(self, run, name: str, tags: dict[str, Any]) -> str:
        """A nested run under the engine's, named ``name``, kept open until terminated."""
        tags = {PARENT_TAG: self.run_id, "fusion.run_id": run.run_id, "fusion.name": name, **tags}
        row_run = self.conn.client.create_run(self.experiment_id, run_name=name,
                                              tags={t.key: t.value for t in values.tags(tags)}).info.run_id
        self.open[name] = row_run
        return row_run


def empty_costs(row: dict[str, Any]) -> list[str]:
    """The cost columns of a leaderboard row without a value: costs the engine never saw (a
    member trained or predicted elsewhere, a fuser over one: "unknown" on the leaderboard), and
    a member's ``fit_seconds`` (it fits nothing)."""
    return [c for c in COSTS if c in row and _no_value(row[c])]


def row_metrics(row: dict[str, Any], *, timestamp: int) -> list:
    """A leaderboard row's numeric columns as metrics, its costs without a value left out (a NaN
    would be charted and sorted as a number in MLflow)."""
    empty = set(empty_costs(row))
    return values.metrics({k: v for k, v in row.items() if k not in empty}, timestamp=timestamp)


def artifact_files(run_dir: Path) -> list[Path]:
    """What of a run folder is uploaded: every file but the arrays (``*.safetensors``: logits and
    probabilities, which grow with the test set and stay in the run folder)."""
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.rglob("*") if p.is_file() and p.suffix not in UNUPLOADED)


def _no_value(value: Any) -> bool:
    """None or NaN: a leaderboard cell left empty (a column that holds a None is not numeric)."""
    number = values.number(value)
    return value is None or number is not None and math.isnan(number)


def _now() -> int:
    return int(time.time() * 1000)


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in some containers
        return None
