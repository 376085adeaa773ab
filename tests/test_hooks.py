"""Each hook, exercised the way a plugin uses it; and the meta-tests that keep hooks documented
and tested (every hook appears in docs/plugins.md with its signature and has a test_hook_* here)."""

from __future__ import annotations

import inspect
import re
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fusion_engine
from conftest import TOY_PLUGIN, latest_run, loaded, run_list_tracker, summary, toy_spec_data, write_spec
from fusion_engine import hookspecs
from fusion_engine.plugins import get_plugins
from fusion_engine.runner import run_experiment

ROOT = Path(__file__).parent.parent
HOOKS = sorted(name for name, fn in vars(hookspecs).items()
               if callable(fn) and hasattr(fn, "fusion_engine_spec"))


def test_hooks_are_the_documented_set():
    assert HOOKS == ["on_member_ready", "on_run_end", "on_run_finished", "on_run_start", "register_backbones",
                     "register_datasets", "register_executors", "register_fusers", "register_metrics",
                     "register_trackers"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook):
    signature = f"{hook}{inspect.signature(getattr(hookspecs, hook))}"
    assert f"`{signature}`" in (ROOT / "docs" / "plugins.md").read_text()


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    source = Path(__file__).read_text()
    assert re.search(rf"^def test_hook_{hook}\b", source, re.M), f"no test_hook_{hook}"


def plugin_file(tmp_path, source: str) -> Path:
    path = tmp_path / "plugin.py"
    path.write_text(textwrap.dedent(source))
    return path


def test_hook_register_backbones():
    record = get_plugins([TOY_PLUGIN], entry_points=False).catalog().get("backbone", "toy-net").record
    built = record.build(record.params(width=3), num_classes=5, image_size=12)
    import torch

    assert built.module(torch.zeros(2, 1, 12, 12)).shape == (2, 5)
    assert built.input.size == 12 and built.input.in_chans == 1


def test_hook_register_fusers():
    record = get_plugins([TOY_PLUGIN], entry_points=False).catalog().get("fuser", "toy-mean").record
    logits = np.log(np.array([[[0.8, 0.2]], [[0.4, 0.6]]]))
    assert np.allclose(record.cls().predict_proba(logits), [[0.6, 0.4]])


def test_hook_register_datasets(tmp_path):
    record = get_plugins([TOY_PLUGIN], entry_points=False).catalog().get("dataset", "toy-data").record
    dataset = record.load(record.params(n_per_class=5), base_dir=tmp_path)
    assert dataset.class_names == ["top", "bottom", "dark"] and len(dataset.ids) == 15


def test_hook_register_executors(tmp_path):
    """A third-party executor: runs the jobs in reverse on threads, and is what the run reports."""
    plugin = plugin_file(tmp_path, """
        from concurrent.futures import ThreadPoolExecutor, as_completed
        from pydantic import Field
        from fusion_engine import Executor, ExecutorRecord, JobOutcome, Params, fit_member, hookimpl

        class ThreadParams(Params):
            threads: int = Field(2, ge=1)

        class Threads(Executor):
            name = "threads"
            seen = []

            def __init__(self, params):
                self.threads = params.threads

            def run(self, jobs, pixels, labels, *, quiet=False, console=None):
                with ThreadPoolExecutor(self.threads) as pool:
                    futures = {pool.submit(fit_member, job, pixels(job.input), labels): job for job in reversed(jobs)}
                    for future in as_completed(futures):
                        Threads.seen.append(futures[future].name)
                        yield JobOutcome(futures[future], result=future.result())

        @hookimpl
        def register_executors():
            return [ExecutorRecord("threads", Threads, ThreadParams)]
    """)
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(
        name="threads", plugins=[str(TOY_PLUGIN), str(plugin)], executor={"name": "threads", "params": {"threads": 2}},
        data={"dataset": "toy-data"}, fusers=[],
        members=[{"name": "a", "backbone": "toy-net", "train": {"epochs": 1}},
                 {"name": "b", "backbone": "toy-net", "seed": 5, "train": {"epochs": 1}}]))
    result = run_experiment(spec, registry=tmp_path / "reg", quiet=True)
    record = __import__("json").loads((result.run_dir / "run.json").read_text())
    assert record["executor"] == "threads" and sorted(record["trained"]) == ["a", "b"]
    assert {m["executor"] for m in record["members"].values()} == {"threads"}
    assert sorted(sys.modules[next(n for n in sys.modules if n.startswith("fusion_engine_local_plugin_"))]
                  .Threads.seen) == ["a", "b"]


def test_hook_register_metrics(tmp_path):
    plugin = plugin_file(tmp_path, """
        import numpy as np
        from fusion_engine import hookimpl, MetricRecord

        @hookimpl
        def register_metrics():
            return [MetricRecord("max_proba", lambda y, p: float(np.max(p, axis=1).mean()))]
    """)
    record = get_plugins([plugin]).catalog().get("metric", "max-proba").record
    assert record.fn(np.array([0]), np.array([[0.25, 0.75]])) == 0.75


LIFECYCLE = """
    from fusion_engine import hookimpl
    EVENTS = []

    @hookimpl
    def on_run_start(run):
        EVENTS.append(("start", run.run_id, sorted(p.name for p in run.run_dir.iterdir())))

    @hookimpl
    def on_member_ready(run, member):
        EVENTS.append(("member", member.name, member.best_epoch, member.logits["val"].shape))

    @hookimpl
    def on_run_end(run, leaderboard):
        EVENTS.append(("end", list(leaderboard["name"]), run.split_sizes))
        run.note("tracker", rows=len(leaderboard))

    @hookimpl
    def on_run_finished(run, status):
        EVENTS.append(("finished", status, (run.run_dir / "report.html").is_file()))
        run.note("tracker", finished=status)
"""


@pytest.fixture(scope="module")
def lifecycle_run(toy_run, tmp_path_factory):
    """The toy spec with a tracker plugin, on a copy of the toy registry (its members are reused)."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    (tmp / "tracker.py").write_text(textwrap.dedent(LIFECYCLE))
    spec = write_spec(tmp / "spec.yaml", toy_spec_data(name="hooks", plugins=[str(TOY_PLUGIN), "tracker.py"]))
    registry = shutil.copytree(toy_run.registry, tmp / "reg")
    result = run_experiment(spec, registry=registry, quiet=True)
    tracker = next(m for name, m in sys.modules.items() if name.startswith("fusion_engine_local_tracker"))
    return result, tracker.EVENTS


def test_hook_on_run_start(lifecycle_run):
    result, events = lifecycle_run
    kind, run_id, files = events[0]
    assert (kind, run_id) == ("start", result.run_id)
    assert "spec.yaml" in files and "leaderboard.csv" not in files


def test_hook_on_member_ready(lifecycle_run):
    _, events = lifecycle_run
    assert [e[:2] for e in events[1:3]] == [("member", "net-a"), ("member", "net-b")]
    assert all(e[2] in (1, 2) and e[3] == (15, 3) for e in events[1:3])


def test_hook_on_run_end(lifecycle_run):
    _, events = lifecycle_run
    kind, names, split_sizes = events[3]
    assert kind == "end" and sorted(names) == ["avg", "avg-a", "net-a", "net-b"]
    assert split_sizes == {"train": 30, "val": 15, "test": 15}


def test_hook_on_run_finished(lifecycle_run):
    """Last, after the report is drawn; what it notes reaches run.json."""
    result, events = lifecycle_run
    assert events[4:] == [("finished", "complete", True)]
    assert summary(result.run_dir)["notes"]["tracker"] == {"rows": 4, "finished": "complete"}


def test_on_run_finished_hears_a_failed_run_and_cannot_change_its_outcome(tmp_path, toy_registry):
    plugin = plugin_file(tmp_path, """
        from fusion_engine import hookimpl
        SEEN = []

        @hookimpl
        def on_member_ready(run, member):
            raise RuntimeError("a plugin's hook raising aborts the run")

        @hookimpl
        def on_run_finished(run, status):
            SEEN.append(status)
            raise ValueError("too late to matter")
    """)
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(name="late", plugins=[str(TOY_PLUGIN), str(plugin)]))
    with pytest.raises(RuntimeError, match="aborts the run"):
        run_experiment(spec, registry=toy_registry, quiet=True)
    record = summary(latest_run(toy_registry))
    assert record["status"] == "failed" and record["error"] == "RuntimeError: a plugin's hook raising aborts the run"
    assert record["warnings"][-1] == "a plugin's on_run_finished failed: ValueError: too late to matter"
    assert loaded(plugin).SEEN == ["failed"]


def test_hook_register_trackers(tmp_path, toy_registry):
    run_dir, events = run_list_tracker(tmp_path, toy_registry, {"list": {}})
    assert events == [("on_run_start", run_dir.name), ("on_member_ready", "net-a"), ("on_member_ready", "net-b"),
                      ("on_run_end", 4), ("on_run_finished", ("complete", True))]
    record = summary(run_dir)
    assert record["notes"]["list"] == {"status": "ok", "heard": "start"} and record["warnings"] == []
    assert (run_dir / "spec.yaml").read_text().endswith("tracking:\n  list:\n    fail_in: null\n")


def test_public_api_exports_resolve():
    for name in fusion_engine.__all__:
        assert getattr(fusion_engine, name) is not None
