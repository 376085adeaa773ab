"""Trackers, whatever their plugin: switched on by the spec or the environment, validated like any
plugin's params, and never able to fail a run or change its results (a tracker that raises is
one warning, and run.json says so). Uses the list tracker, tests/plugins/list_tracker.py."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import LIST_TRACKER, TOY_PLUGIN, cli, run_list_tracker, summary, toy_spec_data, write_spec

TIMINGS = ["train_seconds", "fit_seconds", "infer_ms_per_image", "pareto"]


@pytest.mark.parametrize("fail_in", ["create", "on_member_ready", "on_run_finished"])
def test_a_tracker_that_raises_is_one_warning_and_the_run_and_its_results_stand(tmp_path, toy_run, toy_registry,
                                                                                   fail_in):
    run_dir, events = run_list_tracker(tmp_path, toy_registry, {"list": {"fail_in": fail_in}})
    record = summary(run_dir)
    assert record["status"] == "complete"
    error = "ConnectionError: no tracking today" if fail_in == "create" else f"RuntimeError: broken in {fail_in}"
    assert record["notes"]["list"]["status"] == "failed"
    assert record["notes"]["list"]["failed_in"] == fail_in and record["notes"]["list"]["error"] == error
    assert record["warnings"] == [f"tracking: list failed in {fail_in}, so this run goes on untracked by it: {error}"]
    # called no more after it failed
    heard = [name for name, _ in events]
    assert heard == [] if fail_in == "create" else heard[-1] == fail_in and heard.count(fail_in) == 1
    boards = [pd.read_csv(d / "leaderboard.csv").drop(columns=TIMINGS) for d in (toy_run.run_dir, run_dir)]
    pd.testing.assert_frame_equal(*boards)
    assert (run_dir / "report.html").is_file()


def test_the_warning_is_one_line_on_stderr_and_the_exit_status_is_zero(tmp_path, toy_registry):
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(plugins=[str(TOY_PLUGIN), str(LIST_TRACKER)],
                                                            tracking={"list": {"fail_in": "on_run_end"}}))
    out = cli("run", spec, "--registry", toy_registry, "--quiet")
    assert out.returncode == 0
    assert out.stderr == ("WARNING: tracking: list failed in on_run_end, so this run goes on untracked by it: "
                          "RuntimeError: broken in on_run_end\n")


def test_the_environment_switches_a_tracker_on_and_the_spec_can_keep_it_off(tmp_path, toy_registry, monkeypatch):
    _, events = run_list_tracker(tmp_path, toy_registry)
    assert events == []
    monkeypatch.setenv("FE_TEST_LIST_TRACKER", "1")
    run_dir, events = run_list_tracker(tmp_path, toy_registry)
    assert [e[0] for e in events][:2] == ["on_run_start", "on_member_ready"]
    assert summary(run_dir)["notes"]["list"]["status"] == "ok"
    run_dir, events = run_list_tracker(tmp_path, toy_registry, {"list": False})
    assert events == [] and "list" not in summary(run_dir)["notes"]
    assert "tracking:\n  list: false\n" in (run_dir / "spec.yaml").read_text()


@pytest.mark.parametrize("tracking, message", [
    ({"lists": {}}, "tracking.lists: unknown tracker 'lists' (did you mean 'list'?); installed: list, mlflow"),
    ({"list": {"fail": "x"}}, "tracking.list.fail: unknown field (did you mean 'fail_in'?); allowed: fail_in"),
    ({"list": {}, "List": {}}, "tracking.List: names the tracker 'list' again; give it once"),
    ({"list": 1}, "tracking.list: give the tracker's params as a mapping, or true or false to switch it on or off "
                  "(got 1)"),
    ("list", "tracking: Input should be a valid dictionary (got 'list')"),
])
def test_a_bad_tracking_section_is_a_one_line_error_before_anything_runs(tmp_path, tracking, message):
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(plugins=[str(TOY_PLUGIN), str(LIST_TRACKER)],
                                                            tracking=tracking))
    out = cli("validate", spec)
    assert (out.returncode, out.stderr) == (2, f"{spec}: {message}\n")


def test_validate_and_plugins_name_the_trackers(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(plugins=[str(TOY_PLUGIN), str(LIST_TRACKER)],
                                                            tracking={"list": {}}))
    out = cli("validate", spec)
    assert out.returncode == 0 and out.stdout.strip().endswith("dataset toy-data, tracked by list)")
    out = cli("plugins", "--params", "list", "--spec", spec)
    assert out.returncode == 0 and "tracker list" in out.stdout and "fail_in" in out.stdout
