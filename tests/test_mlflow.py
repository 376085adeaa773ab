"""The mlflow tracker, read back through MLflow's own client: a run is one MLflow run with a
nested run per member and fuser, every leaderboard column of every row is a metric, trained
members have their epoch curves, the run folder is the artifacts; reused members are logged as
reused; a tracking failure is one warning and the run completes; a user's own MLflow run is left
alone. Against SQLite databases in temporary folders (copies of one migrated template) and, once,
against ``mlflow server`` started on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest

from conftest import cli, summary, toy_spec_data, write_spec
from fusion_engine.runner import run_experiment
from fusion_engine.zoo import Registry

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install 'fusion-engine[mlflow]'")
from mlflow import MlflowClient  # noqa: E402

from fusion_engine_mlflow import values  # noqa: E402

TIMINGS = ["train_seconds", "fit_seconds", "infer_ms_per_image", "pareto"]
COSTS = ["n_params", "infer_ms_per_image", "train_seconds", "fit_seconds"]
#: MLflow's reads, quiet and quick in tests (the tracker sets its own limits for its calls)
QUIET = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
         "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """One migrated MLflow database for the session: a copy costs milliseconds, a new database
    1-1.5 s of CPU (MLflow migrates it)."""
    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(tmp_path, mlflow_template, monkeypatch) -> str:
    """A SQLite tracking URI of its own; no MLFLOW_TRACKING_URI; the current folder an empty
    ``cwd/`` (MLflow's defaults would write there)."""
    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(mlflow_template, db)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name, value in QUIET.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return f"sqlite:///{db}"


@dataclass
class Tracked:
    """An engine run and what MLflow holds of it."""

    run_dir: Path
    client: MlflowClient
    parent: object  # mlflow.entities.Run
    nested: dict  # run name -> mlflow.entities.Run

    @classmethod
    def read(cls, run_dir: Path, uri: str) -> "Tracked":
        client = MlflowClient(uri)
        note = summary(run_dir)["notes"]["mlflow"]
        parent = client.get_run(note["run_id"])
        found = client.search_runs([note["experiment_id"]], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        return cls(run_dir, client, parent, {r.info.run_name: r for r in found})

    def artifacts(self, path: str | None = None) -> list[str]:
        files = []
        for info in self.client.list_artifacts(self.parent.info.run_id, path):
            files += self.artifacts(info.path) if info.is_dir else [info.path]
        return files


def leaderboard(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "leaderboard.csv")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The toy spec tracked from the command line, ``--quiet``, training both members, into the
    default database (the registry's, created by this run), from an empty current folder."""
    root = tmp_path_factory.mktemp("mlflow-trained")
    (root / "cwd").mkdir()
    spec = write_spec(root / "spec.yaml", toy_spec_data(tracking={"mlflow": {"experiment": "toy-tracked"}}))
    out = cli("run", spec, "--registry", root / "reg", "--quiet", cwd=root / "cwd", env={"MLFLOW_TRACKING_URI": ""})
    assert out.returncode == 0, out.stderr
    run_dir = Path(out.stdout.strip())
    return out, root, Tracked.read(run_dir, f"sqlite:///{root / 'reg' / 'mlflow' / 'mlflow.db'}")


def test_a_run_is_one_mlflow_run_named_by_its_id_with_a_nested_run_per_member_and_fuser(trained):
    out, root, tracked = trained
    assert out.stderr == "" and out.stdout.splitlines() == [str(tracked.run_dir)]  # MLflow kept quiet
    assert list((root / "cwd").iterdir()) == []  # no ./mlruns, no ./mlflow.db
    record = summary(tracked.run_dir)
    parent = tracked.parent
    assert record["notes"]["mlflow"] == {
        "status": "ok", "tracking_uri": f"sqlite:///{root / 'reg' / 'mlflow' / 'mlflow.db'}", "experiment": "toy-tracked",
        "experiment_id": parent.info.experiment_id, "run_id": parent.info.run_id}
    assert (parent.info.run_name, parent.info.status) == (tracked.run_dir.name, "FINISHED")
    assert tracked.client.get_experiment(parent.info.experiment_id).artifact_location == \
        (root / "reg" / "mlflow" / "mlartifacts").as_uri()
    assert {name: (r.data.tags["fusion.kind"], r.info.status) for name, r in tracked.nested.items()} == {
        "net-a": ("member", "FINISHED"), "net-b": ("member", "FINISHED"),
        "avg": ("fuser", "FINISHED"), "avg-a": ("fuser", "FINISHED")}
    tags, params = parent.data.tags, parent.data.params
    assert tags["fusion.run_id"] == tracked.run_dir.name and tags["fusion.experiment"] == "toy"
    assert tags["fusion.data.fingerprint"] == record["data"]["fingerprint"]
    assert tags["fusion.version.torch"] == record["versions"]["torch"]
    assert tags["fusion.top_row"] == leaderboard(tracked.run_dir)["name"][0]
    assert (params["seed"], params["data.split.val"], params["members.net-b.train.optimizer"],
            params["members.net-b.params.width"], params["fusers.avg-a.members"]) == ("3", "0.25", "sgd", "6", '["net-a"]')


def test_every_leaderboard_column_of_every_row_is_on_its_nested_run(trained):
    _, _, tracked = trained
    board = leaderboard(tracked.run_dir)
    assert len(board) == len(tracked.nested) == 4
    numeric = [c for c in board.columns if pd.api.types.is_numeric_dtype(board[c])]
    assert {"accuracy", "nll", "val_accuracy", "delta_vs_best_member", "mcnemar_p", "rank", "pareto"} <= set(numeric)
    for row in board.to_dict(orient="records"):
        run = tracked.nested[row["name"]]
        for column in numeric:
            value = float(row[column])
            if column in COSTS and math.isnan(value):  # a member's fit_seconds: no value, no metric
                assert column not in run.data.metrics and row["kind"] == "member", (row["name"], column)
                continue
            logged = run.data.metrics[column]
            assert logged == pytest.approx(value, rel=1e-12) or math.isnan(logged) and math.isnan(value), column
        assert run.data.tags["fusion.members"] == row["members"] and run.data.tags["fusion.kind"] == row["kind"]
        assert run.data.tags.get("fusion.source") == ("trained" if row["kind"] == "member" else None)
        assert "fusion.unknown_costs" not in run.data.tags  # every cost was measured here
    top = board.iloc[0]
    assert tracked.parent.data.metrics["accuracy"] == pytest.approx(top["accuracy"])


def test_trained_members_have_params_and_epoch_curves(trained):
    _, _, tracked = trained
    for name in ("net-a", "net-b"):
        run, card = tracked.nested[name], json.loads((tracked.run_dir / "members" / name / "card.json").read_text())
        assert run.data.params["key"] == card["key"] and run.data.params["action"] == "trained"
        assert run.data.params["backbone"] == "toy-net" and run.data.params["train.epochs"] == "2"
        assert run.data.tags["fusion.action"] == "trained"
        for metric in ("train_loss", "val_loss", "val_accuracy", "lr"):
            history = tracked.client.get_metric_history(run.info.run_id, f"epoch/{metric}")
            assert [(m.step, m.value) for m in history] == [(e["epoch"], pytest.approx(e[metric])) for e in card["history"]]
    fuser = tracked.nested["avg-a"]
    assert (fuser.data.params["fuser"], fuser.data.params["members"]) == ("toy-mean", '["net-a"]')
    assert not [k for k in fuser.data.metrics if k.startswith("epoch/")]


def test_the_run_folder_is_the_runs_artifacts(trained, tmp_path):
    _, _, tracked = trained
    files = set(tracked.artifacts())
    plots = {f"plots/{p.name}" for p in (tracked.run_dir / "plots").glob("*.png")}
    assert plots and plots <= files
    assert {"leaderboard.csv", "leaderboard.md", "leaderboard.json", "report.html", "spec.yaml", "run.json", "run.log",
            "members/net-a/card.json", "fusers/avg.json"} <= files
    assert not [f for f in files if f.endswith(".safetensors")]  # the arrays stay in the run folder
    got = tracked.client.download_artifacts(tracked.parent.info.run_id, "leaderboard.csv", str(tmp_path))
    assert Path(got).read_bytes() == (tracked.run_dir / "leaderboard.csv").read_bytes()
    assert tracked.parent.data.tags["mlflow.note.content"] == (tracked.run_dir / "leaderboard.md").read_text()


def test_a_rerun_logs_reused_members_as_reused_and_changes_no_result(store, toy_run, toy_registry, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(tracking={"mlflow": {"tracking_uri": store}}))
    result = run_experiment(spec, registry=toy_registry, quiet=True)
    tracked = Tracked.read(result.run_dir, store)
    for name in ("net-a", "net-b"):
        run = tracked.nested[name]
        assert run.data.params["action"] == "reused" and run.data.tags["fusion.action"] == "reused"
        assert run.data.tags["fusion.trained_in_run"] == toy_run.run_dir.name
        assert not [k for k in run.data.metrics if k.startswith("epoch/")]  # no new training to show
        assert run.data.params["key"] == toy_run.keys[name]
    assert tracked.parent.info.experiment_id == tracked.client.get_experiment_by_name("toy").experiment_id
    boards = [leaderboard(d).drop(columns=TIMINGS) for d in (toy_run.run_dir, result.run_dir)]
    pd.testing.assert_frame_equal(*boards)


def test_members_from_weights_and_predictions_are_logged_by_source_with_their_unknown_costs(store, toy_run, toy_registry,
                                                                                           tmp_path):
    """net-a's weights run as they are, probabilities made elsewhere read from a CSV, and net-b
    reused: each member's nested run says where it came from; the costs the engine never saw are
    no metrics, and fusion.unknown_costs names them, on the members and on the fuser over them."""
    shutil.copy(Registry(toy_registry).member_dir(toy_run.keys["net-a"]) / "model.safetensors", tmp_path / "net.safetensors")
    split = json.loads((toy_run.run_dir / "split.json").read_text())
    ids = split["val"]["ids"] + split["test"]["ids"]
    proba = np.random.default_rng(0).dirichlet(np.ones(3), size=len(ids))
    pd.DataFrame(proba, columns=split["classes"]).assign(id=ids).to_csv(tmp_path / "made-elsewhere.csv", index=False)
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(
        tracking={"mlflow": {"tracking_uri": store}},
        members=[{"name": "net-b", "backbone": "toy-net", "params": {"width": 6}, "seed": 7,
                  "train": {"epochs": 2, "batch_size": 16, "optimizer": "sgd"}},
                 {"name": "ported", "backbone": "toy-net", "train": False, "weights": "net.safetensors"},
                 {"name": "sklearn", "predictions": "made-elsewhere.csv", "kind": "probabilities"}],
        fusers=[{"name": "avg", "fuser": "toy-mean"}]))
    result = run_experiment(spec, registry=toy_registry, quiet=True)
    tracked = Tracked.read(result.run_dir, store)
    board = leaderboard(result.run_dir).set_index("name")
    runs = tracked.nested
    assert {n: (r.data.params["source"], r.data.params["action"], r.data.tags["fusion.source"], r.data.tags["fusion.action"])
            for n, r in runs.items() if n != "avg"} == {
        "net-b": ("trained", "reused", "trained", "reused"), "ported": ("weights", "predicted", "weights", "predicted"),
        "sklearn": ("predictions", "read", "predictions", "read")}
    assert board.loc[["net-b", "ported", "sklearn"], "source"].tolist() == ["trained", "weights", "predictions"]
    ported, sklearn = runs["ported"].data, runs["sklearn"].data
    assert (ported.params["train"], ported.params["origin.file"], ported.params["backbone"]) == (
        "false", "net.safetensors", "toy-net")
    assert ported.params["origin.sha256"] == hashlib.sha256((tmp_path / "net.safetensors").read_bytes()).hexdigest()
    assert (sklearn.params["predictions"], sklearn.params["kind"], sklearn.params["origin.file"]) == (
        "made-elsewhere.csv", "probabilities", "made-elsewhere.csv")  # as the spec gave it
    assert not {"backbone", "n_params", "seed", "train"} & set(sklearn.params)
    assert not [k for r in runs.values() for k in r.data.metrics if k.startswith("epoch/")]  # nothing trained here
    # what the engine never saw is "unknown" on the leaderboard: no metric, a tag naming it
    assert ported.tags["fusion.unknown_costs"] == "train_seconds"
    assert sklearn.tags["fusion.unknown_costs"] == "n_params,infer_ms_per_image,train_seconds"
    assert runs["avg"].data.tags["fusion.unknown_costs"] == "n_params,infer_ms_per_image,train_seconds"
    assert "fusion.unknown_costs" not in runs["net-b"].data.tags
    for name, run in runs.items():
        unknown = set(run.data.tags.get("fusion.unknown_costs", "").split(",")) - {""}
        assert all(math.isnan(board.loc[name, c]) for c in unknown) and not unknown & set(run.data.metrics)
        known = [c for c in COSTS if not math.isnan(board.loc[name, c])]
        assert {c: run.data.metrics[c] for c in known} == pytest.approx(board.loc[name, known].to_dict()), name
    assert ported.metrics["accuracy"] == pytest.approx(board.loc["ported", "accuracy"])


def test_an_unreachable_server_is_one_warning_and_the_run_completes(toy_run, toy_registry):
    """Switched on by MLFLOW_TRACKING_URI alone, pointing at a port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    out = cli("run", toy_run.spec, "--registry", toy_registry, "--quiet", env={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 0
    error = f"cannot reach the MLflow tracking server at {uri}: [Errno 111] Connection refused"
    assert out.stderr == f"WARNING: tracking: mlflow failed in on_run_start, so this run goes on untracked by it: {error}\n"
    record = summary(out.stdout.strip())
    assert record["status"] == "complete" and record["reused"] == ["net-a", "net-b"]
    assert record["notes"]["mlflow"] == {"status": "failed", "tracking_uri": uri, "failed_in": "on_run_start",
                                         "error": error}


def test_a_database_that_cannot_be_written_is_one_warning(store, toy_registry, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(
        tracking={"mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"}}))
    record = summary(run_experiment(spec, registry=toy_registry, quiet=True).run_dir)
    assert record["status"] == "complete"
    assert record["warnings"] == [
        "tracking: mlflow failed in on_run_start, so this run goes on untracked by it: cannot use the MLflow database "
        f"{tmp_path / 'a-file' / 'mlflow.db'}: {tmp_path / 'a-file'} is a file, not a folder"]


def test_without_mlflow_installed_the_warning_says_how_to_install_it(toy_registry, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now fails
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(tracking={"mlflow": {}}))
    record = summary(run_experiment(spec, registry=toy_registry, quiet=True).run_dir)
    assert record["status"] == "complete" and record["warnings"] == [
        "tracking: mlflow failed in create, so this run goes on untracked by it: MLflow is not installed; "
        "pip install 'fusion-engine[mlflow]'"]


def test_a_failed_run_is_failed_in_mlflow_with_its_log(store, tmp_path):
    flag = tmp_path / "flag"
    flag.touch()
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(
        name="failing", tracking={"mlflow": {"tracking_uri": store}},
        members=[{"name": "flaky", "backbone": "flaky-net", "params": {"fail_while": str(flag)}, "train": {"epochs": 1}},
                 {"name": "steady", "backbone": "toy-net", "train": {"epochs": 1}}],
        fusers=[{"name": "avg", "fuser": "toy-mean"}]))
    with pytest.raises(Exception, match="1 of 2 members failed"):
        run_experiment(spec, registry=tmp_path / "reg", quiet=True)
    run_dir = next((tmp_path / "reg" / "runs").iterdir())
    tracked = Tracked.read(run_dir, store)
    assert tracked.parent.info.status == "FAILED" and summary(run_dir)["notes"]["mlflow"]["status"] == "ok"
    assert {name: r.info.status for name, r in tracked.nested.items()} == {"steady": "FAILED"}
    assert {"run.json", "run.log", "spec.yaml"} <= set(tracked.artifacts())


def test_a_users_active_mlflow_run_is_left_alone(store, toy_registry, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # the user's own MLflow, which also switches tracking on
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data())
    with mlflow.start_run(run_name="mine") as mine:
        result = run_experiment(spec, registry=toy_registry, quiet=True)
        assert mlflow.active_run().info.run_id == mine.info.run_id
    tracked = Tracked.read(result.run_dir, store)
    assert "mlflow.parentRunId" not in tracked.parent.data.tags and len(tracked.nested) == 4
    theirs = MlflowClient(store).get_run(mine.info.run_id)
    assert theirs.data.params == {} and theirs.data.metrics == {} and theirs.info.status == "FINISHED"


@pytest.mark.parametrize("params, message", [
    ({"tracking_uri": "http://"}, "tracking.mlflow.tracking_uri: names no host; write http://HOST:PORT (got 'http://')"),
    ({"tracking_uri": "sqlite:///:memory:"}, "tracking.mlflow.tracking_uri: name a database file; an in-memory "
                                             "database is gone when the run ends (got 'sqlite:///:memory:')"),
    ({"tracking_url": "http://x"}, "tracking.mlflow.tracking_url: unknown field (did you mean 'tracking_uri'?); allowed: "
                                   "tracking_uri, experiment, artifact_location, tags, timeout, retries"),
    ({"tags": {"team@x": "vision"}}, "tracking.mlflow.tags: tag name 'team@x': MLflow allows letters, digits, "
                                     "_ - . : / and spaces, up to 250 characters"),
    ({"timeout": True}, "tracking.mlflow.timeout: expected a number, not true or false (got True)"),
])
def test_bad_mlflow_params_are_one_line_errors_before_anything_runs(tmp_path, capsys, params, message):
    from fusion_engine.cli import main

    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(tracking={"mlflow": params}))
    assert main(["validate", str(spec)]) == 2
    assert capsys.readouterr().err == f"{spec}: {message}\n"


def test_paths_in_mlflow_params_are_relative_to_the_spec_file(tmp_path, monkeypatch):
    from fusion_engine.resolve import prepare

    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path / "specs" / "spec.yaml", toy_spec_data(tracking={"mlflow": {
        "tracking_uri": "sqlite:///track/mlflow.db", "artifact_location": "art"}}))
    params = prepare(spec)[0].trackers["mlflow"].params
    assert params.tracking_uri == f"sqlite:///{tmp_path / 'specs' / 'track' / 'mlflow.db'}"
    assert params.artifact_location == (tmp_path / "specs" / "art").as_uri()


def test_validate_and_plugins_never_import_mlflow(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(tracking={"mlflow": {}}))
    code = (f"import sys; from fusion_engine.cli import main; assert main(['validate', {str(spec)!r}]) == 0; "
            "assert main(['plugins']) == 0; assert 'mlflow' not in sys.modules, 'mlflow imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{spec}: ok (2 members, 2 fusers, dataset toy-data, tracked by mlflow)\n")


def test_names_and_values_are_made_what_mlflow_accepts(store):
    assert values.key("a+b//c/../d/") == "a_b/c/_/d"
    assert values.key("x" * 300) == "x" * 250 and values.key("ünï code:1") == "ünï code:1"
    assert values.text("y" * 7000).endswith("...") and len(values.text("y" * 7000)) == 6000
    assert values.text({"a": [1, None]}) == '{"a": [1, null]}' and values.text(True) == "true"
    # numpy values as numbers (through the engine's codec), an object JSON has no form for as its str
    assert values.text({"x": np.float32(0.5), "n": np.int64(3), "a": np.arange(2)}) == '{"x": 0.5, "n": 3, "a": [0, 1]}'
    assert values.text([Path("/p"), date(2026, 1, 2)]) == '["/p", "2026-01-02"]'
    assert values.flatten({"data": {"split": {"val": 0.2}}, "members": [{"name": "m", "lr": 1}], "mean": [0.5]}) == \
        {"data.split.val": 0.2, "members.m.lr": 1, "mean": [0.5]}
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("names")).info.run_id
    client.log_batch(run_id, params=values.params({"p+q": "x" * 7000, "p_q": "second", "bad@": {"a": 1}}),
                     metrics=values.metrics({"m//": float("nan"), "n": True, "t": "text"}, timestamp=0), synchronous=True)
    run = client.get_run(run_id)
    assert run.data.params == {"p_q": "x" * 5997 + "...", "bad_": '{"a": 1}'}
    assert math.isnan(run.data.metrics["m"]) and run.data.metrics["n"] == 1.0 and "t" not in run.data.metrics


# -- against a tracking server ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, mlflow_template):
    """``mlflow server`` on a free port of 127.0.0.1 (its artifacts proxied), stopped afterwards."""
    root = tmp_path_factory.mktemp("mlflow-server")
    shutil.copy(mlflow_template, root / "mlflow.db")
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
               str(root / "artifacts"), "--workers", "1"]
    uri = f"http://127.0.0.1:{port}"
    with serving(command, cwd=root, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                 ready=f"{uri}/health"):
        yield uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(command: list[str], *, cwd: Path, env: dict, ready: str) -> Iterator[None]:
    """``command`` (a server) started in its own process group, until ``ready`` answers 200;
    the group stopped afterwards (SIGTERM, then SIGKILL), waiting until it is gone."""
    import requests

    log = (cwd / "server.log").open("w")
    server = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (cwd / "server.log").read_text()
            try:
                if requests.get(ready, timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"{' '.join(command[1:3])} did not start in 120 s"
            time.sleep(0.25)
        yield
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        for _ in range(100):  # uvicorn's workers may outlive the leader for a moment
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        log.close()


def test_a_run_tracked_on_an_mlflow_server(mlflow_server, toy_registry, tmp_path, monkeypatch):
    for name, value in QUIET.items():
        monkeypatch.setenv(name, value)
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(tracking={"mlflow": {"tracking_uri": mlflow_server,
                                                                                 "tags": {"team": "vision"}}}))
    result = run_experiment(spec, registry=toy_registry, quiet=True)
    tracked = Tracked.read(result.run_dir, mlflow_server)
    assert tracked.parent.info.status == "FINISHED" and tracked.parent.data.tags["team"] == "vision"
    assert sorted(tracked.nested) == ["avg", "avg-a", "net-a", "net-b"]
    assert tracked.client.get_experiment(tracked.parent.info.experiment_id).artifact_location.startswith(
        "mlflow-artifacts:")  # the server's choice
    assert {"leaderboard.csv", "report.html"} <= set(tracked.artifacts())
    assert tracked.nested["net-a"].data.metrics["accuracy"] == pytest.approx(leaderboard(result.run_dir)
                                                                             .set_index("name").loc["net-a", "accuracy"])


# -- an exported ensemble as an MLflow pyfunc model (export --mlflow) ----------------------------------

def new_images(folder: Path) -> list[Path]:
    """Images the run never saw: RGB and grey PNGs and a JPEG, of several sizes."""
    from PIL import Image

    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (size, mode, suffix) in enumerate([(8, "RGB", ".png"), (13, "L", ".png"), (20, "RGB", ".jpg"),
                                              (8, "L", ".png"), (31, "RGB", ".png")]):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        paths.append(folder / f"new-{i}{suffix}")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(paths[-1])
    return paths


def b64(path: Path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode("ascii")


def proba_columns(frame: pd.DataFrame, classes: list[str]) -> np.ndarray:
    return frame[[f"proba_{c}" for c in classes]].to_numpy(dtype=np.float64)


@pytest.fixture(scope="module")
def logged_export(tmp_path_factory, toy_run):
    """The toy run's best fuser exported with ``--mlflow`` to a SQLite database of its own, from
    a fresh process; (stdout lines, export folder, tracking URI)."""
    root = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    out = cli("export", toy_run.run_dir.name, "--out", root / "export", "--registry", toy_run.registry, "-q",
              "--mlflow", "--mlflow-uri", uri, "--mlflow-experiment", "shipped", cwd=root, env=QUIET)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines(), root / "export", uri


def test_export_mlflow_logs_a_pyfunc_model_that_predicts_the_exports_probabilities(logged_export, tmp_path, monkeypatch):
    import fusion_engine

    lines, folder, uri = logged_export
    assert len(lines) == 2 and lines[0] == str(folder) and lines[1].startswith("runs:/") and lines[1].endswith("/model")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    model = mlflow.pyfunc.load_model(lines[1])
    ensemble = fusion_engine.load(folder)
    paths = new_images(tmp_path / "images")
    expected = ensemble.predict_proba(paths)
    by_path = model.predict(pd.DataFrame({"path": [str(p) for p in paths]}))
    by_bytes = model.predict(pd.DataFrame({"image_b64": [b64(p) for p in paths]}))
    for got in (by_path, by_bytes):
        assert list(got.columns) == ["class", "probability", *[f"proba_{c}" for c in ensemble.classes], "error"]
        np.testing.assert_allclose(proba_columns(got, ensemble.classes), expected, rtol=0, atol=1e-6)
        assert got["class"].tolist() == ensemble.predict(paths).tolist()
        np.testing.assert_allclose(got["probability"], expected.max(axis=1), rtol=0, atol=1e-6)
        assert got["error"].isna().all()
    # in-process, pixels: uint8 arrays (as a dataset holds them) in the image column
    from PIL import Image

    arrays = [np.asarray(Image.open(p)) for p in paths if p.suffix == ".png"]
    got = model.predict(pd.DataFrame({"image": arrays}))
    np.testing.assert_allclose(proba_columns(got, ensemble.classes), ensemble.predict_proba(arrays), rtol=0, atol=1e-6)
    assert list(model.metadata.get_input_schema().input_names()) == ["path", "image_b64", "image"]
    assert tmp_path.joinpath("images").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no ./mlruns


def test_an_unreadable_image_gets_its_row_and_the_others_are_predicted(logged_export, tmp_path, monkeypatch):
    lines, folder, uri = logged_export
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(lines[1])
    good = new_images(tmp_path)[0]
    got = model.predict(pd.DataFrame({"image_b64": [b64(good), "bm90IGFuIGltYWdl", "%%%"]}))
    assert got["class"].notna().tolist() == [True, False, False]
    assert got["error"].tolist()[0] is None
    assert got["error"][1] == "cannot read image row-1: not an image format Pillow can decode"
    assert got["error"][2] == "image_b64 is not base64"
    assert np.isnan(proba_columns(got, ["top", "bottom", "dark"])[1:]).all()
    with pytest.raises(Exception, match="give exactly one of the columns path, image_b64, image"):
        model.predict(pd.DataFrame({"path": [str(good)], "image_b64": [b64(good)]}))


def test_the_logged_model_holds_the_export_its_requirements_and_no_pickle(logged_export, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    lines, folder, uri = logged_export
    client = MlflowClient(uri)
    run = client.get_run(lines[1].split("/")[1])
    assert run.info.run_name == f"export avg of {run.data.tags['fusion.run_id']}" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "shipped"
    assert run.data.params["row"] == "avg" and run.data.params["members"] == "net-a,net-b"
    assert run.data.metrics["check/max_abs_diff"] < 1e-5
    local = Path(client.download_artifacts(run.info.run_id, "model", str(tmp_path)))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    exported = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {f"artifacts/export/{f}" for f in exported} <= files
    import yaml

    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    requirements = (local / "requirements.txt").read_text().splitlines()
    assert "fusion-engine[mlflow]==0.1.0" in requirements and f"mlflow=={mlflow.__version__}" in requirements


def test_a_bad_mlflow_uri_is_one_line_and_no_export_is_written(toy_run, tmp_path):
    args = ["export", toy_run.run_dir.name, "--registry", toy_run.registry, "--mlflow", "--out", tmp_path / "out"]
    for uri, message in [("foo://bar/baz", "cannot use the MLflow tracking URI foo://bar/baz: "),
                         ("http://127.0.0.1:9", "cannot reach the MLflow tracking server at http://127.0.0.1:9: "),
                         ("sqlite://x.db", "MLflow tracking URI 'sqlite://x.db': write sqlite:///relative/path.db or ")]:
        out = cli(*args, "--mlflow-uri", uri, cwd=tmp_path, env=QUIET)
        assert out.returncode == 2 and out.stdout == "", out.stderr
        assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(message), out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no temporary one, no ./mlruns
    out = cli("export", toy_run.run_dir.name, "--registry", toy_run.registry, "--out", tmp_path / "out",
              "--mlflow-uri", "sqlite:///x.db", cwd=tmp_path)
    assert (out.returncode, out.stderr) == (2, "--mlflow-uri needs --mlflow\n")


def test_log_ensemble_from_python_leaves_mlflows_global_state_alone(logged_export, store, tmp_path, monkeypatch):
    """``log_ensemble`` on a folder already exported: the model loads from its artifact location
    with no tracking URI; the user's active MLflow run and tracking URI are as they were."""
    from fusion_engine_mlflow.models import log_ensemble

    import fusion_engine

    _, folder, _ = logged_export
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'users.db'}")
    with mlflow.start_run() as mine:
        logged = log_ensemble(folder, tracking_uri=store, experiment="from-python")
        assert mlflow.active_run().info.run_id == mine.info.run_id
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'users.db'}"
    assert MlflowClient(f"sqlite:///{tmp_path / 'users.db'}").get_run(mine.info.run_id).data.params == {}
    assert logged.artifact_uri.startswith("file://") and logged.registered_uri is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    images = new_images(tmp_path / "images")
    got = mlflow.pyfunc.load_model(logged.artifact_uri).predict(pd.DataFrame({"path": [str(p) for p in images]}))
    np.testing.assert_allclose(proba_columns(got, ["top", "bottom", "dark"]), fusion_engine.load(folder).predict_proba(images),
                               rtol=0, atol=1e-6)
    assert MlflowClient(store).get_experiment_by_name("from-python").experiment_id == \
        MlflowClient(store).get_run(logged.run_id).info.experiment_id


def test_a_tracked_runs_export_nests_under_its_run_and_is_registered(trained, tmp_path, monkeypatch):
    """No URI: the registry's database, where the run was tracked; the export's MLflow run is a
    child of the run's, and the registered model loads by name."""
    _, root, tracked = trained
    out = cli("export", tracked.run_dir.name, "net-b", "--out", tmp_path / "net-b", "--registry", root / "reg", "-q",
              "--check", "0", "--mlflow", "--mlflow-register", "toy-classifier", cwd=tmp_path,
              env={"MLFLOW_TRACKING_URI": "", **QUIET})
    assert out.returncode == 0, out.stderr
    folder, model_uri, registered = out.stdout.splitlines()
    assert registered == "models:/toy-classifier/1"
    run = tracked.client.get_run(model_uri.split("/")[1])
    assert run.data.tags["mlflow.parentRunId"] == tracked.parent.info.run_id
    assert run.info.experiment_id == tracked.parent.info.experiment_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'reg' / 'mlflow' / 'mlflow.db'}")
    images = new_images(tmp_path / "images")
    got = mlflow.pyfunc.load_model(registered).predict(pd.DataFrame({"path": [str(p) for p in images]}))
    import fusion_engine

    np.testing.assert_allclose(proba_columns(got, ["top", "bottom", "dark"]), fusion_engine.load(folder).predict_proba(images),
                               rtol=0, atol=1e-6)


def test_mlflow_models_serve_answers_invocations_with_the_exports_probabilities(logged_export, tmp_path):
    """``mlflow models serve --env-manager local`` on 127.0.0.1, from the model's files (no
    tracking URI needed), as a client would call it: JSON with base64 images, or pixels."""
    import requests

    import fusion_engine

    lines, folder, uri = logged_export
    client = MlflowClient(uri)
    source = client.get_run(lines[1].split("/")[1]).info.artifact_uri + "/model"
    try:
        port = free_port()
    except OSError as exc:
        pytest.skip(f"cannot bind a port on 127.0.0.1: {exc}")
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", source, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    base = f"http://127.0.0.1:{port}"
    with serving(command, cwd=tmp_path, env=env, ready=f"{base}/ping"):
        images = new_images(tmp_path / "images")
        ensemble = fusion_engine.load(folder)
        expected = ensemble.predict_proba(images)
        answer = requests.post(f"{base}/invocations", json={"dataframe_split": {
            "columns": ["image_b64"], "data": [[b64(p)] for p in images]}}, timeout=60)
        assert answer.status_code == 200, answer.text
        got = pd.DataFrame(answer.json()["predictions"])
        np.testing.assert_allclose(proba_columns(got, ensemble.classes), expected, rtol=0, atol=1e-6)
        assert got["class"].tolist() == ensemble.predict(images).tolist()
        from PIL import Image

        arrays = [np.asarray(Image.open(p)) for p in images if p.suffix == ".png"]  # pixels, as nested lists
        answer = requests.post(f"{base}/invocations", json={"dataframe_records": [{"image": a.tolist()} for a in arrays]},
                               timeout=60)
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(proba_columns(pd.DataFrame(answer.json()["predictions"]), ensemble.classes),
                                   ensemble.predict_proba(arrays), rtol=0, atol=1e-6)
        answer = requests.post(f"{base}/invocations", json={"dataframe_records": [{"picture": "x"}]}, timeout=60)
        assert answer.status_code == 400 and "give exactly one of the columns path, image_b64, image" in answer.text
