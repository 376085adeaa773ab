"""The local executor (the default) and what every executor shares: a member that fails does
not stop the others, the run says which one and why in one line with exit status 1, and a
re-run trains only what failed."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from conftest import TOY_PLUGIN, cli, toy_spec_data, write_spec


def flaky_spec(path: Path, flag: Path, **fields) -> Path:
    """A member that fails while ``flag`` exists, and one that trains."""
    return write_spec(path, toy_spec_data(
        name="local-failure", seed=1, data={"dataset": "toy-data", "split": {"val": 0.25, "test": 0.25}},
        members=[{"name": "flaky", "backbone": "flaky-net", "params": {"fail_while": str(flag)},
                  "train": {"epochs": 1, "batch_size": 16}},
                 {"name": "steady", "backbone": "toy-net", "train": {"epochs": 1, "batch_size": 16}}],
        fusers=[{"name": "avg", "fuser": "toy-mean"}], **fields))


def test_a_failing_member_does_not_stop_the_others_and_a_rerun_trains_only_it(tmp_path):
    flag = tmp_path / "flag"
    flag.touch()
    spec = flaky_spec(tmp_path / "spec.yaml", flag)
    registry = tmp_path / "reg"

    out = cli("run", spec, "--registry", registry, "--quiet")
    assert out.returncode == 1
    assert out.stderr == (f"1 of 2 members failed: flaky: RuntimeError: flaky-net refuses to train while {flag} exists; "
                          "the other member is ready in the zoo, so a re-run trains only flaky\n")
    [run_dir] = (registry / "runs").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["status"], record["trained"], record["failed"]) == ("failed", ["steady"], ["flaky"])
    assert record["members"]["flaky"]["executor"] == "local"
    assert "Traceback" in (run_dir / "run.log").read_text()
    assert not (run_dir / "leaderboard.csv").exists()

    flag.unlink()
    out = cli("run", spec, "--registry", registry, "--quiet")
    assert out.returncode == 0, out.stderr
    record = json.loads((Path(out.stdout.strip()) / "run.json").read_text())
    assert (record["status"], record["trained"], record["reused"]) == ("complete", ["flaky"], ["steady"])


def test_a_job_an_executor_never_reports_fails_by_name_and_a_repeat_report_is_ignored(tmp_path):
    plugin = tmp_path / "sloppy.py"
    plugin.write_text(textwrap.dedent("""
        from fusion_engine import Executor, ExecutorRecord, JobOutcome, fit_member, hookimpl

        class Sloppy(Executor):
            name = "sloppy"

            def run(self, jobs, pixels, labels, *, quiet=False, console=None):
                first = jobs[0]  # reports the first job twice and never the second
                outcome = JobOutcome(first, result=fit_member(first, pixels(first.input), labels))
                yield outcome
                yield outcome

        @hookimpl
        def register_executors():
            return [ExecutorRecord("sloppy", lambda params: Sloppy())]
    """))
    spec = flaky_spec(tmp_path / "spec.yaml", tmp_path / "absent", plugins=[str(TOY_PLUGIN), str(plugin)],
                      executor="sloppy")
    out = cli("run", spec, "--registry", tmp_path / "reg", "--quiet")
    assert out.returncode == 1
    assert "executor sloppy reported flaky again, or a job it was not given; ignored" in out.stderr
    assert out.stderr.splitlines()[-1] == ("1 of 2 members failed: member steady: the sloppy executor never reported it; "
                                           "the other member is ready in the zoo, so a re-run trains only steady")


def test_a_malformed_executor_entry_is_one_line_even_with_executor_on_the_command_line(tmp_path):
    spec = flaky_spec(tmp_path / "spec.yaml", tmp_path / "absent", executor=["ray"])
    out = cli("run", spec, "--executor", "local")
    assert (out.returncode, out.stderr) == (
        2, f"{spec}: executor: Input should be a valid dictionary or instance of ExecutorSpec\n")
