"""Crash safety and concurrency with real processes: ``kill -9`` at chosen points, then a re-run;
two runs at once on one registry. Assertions are on run records, the index and the files."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import latest_run, toy_spec_data, write_spec
from test_zoo import integrity, keys, run

# Every run here is a process of its own, killed with SIGKILL where a test says. They are forked
# from a forkserver that has imported torch, timm and scikit-learn once (it computes nothing, so
# forking it is safe), which makes a run start in well under a second instead of several.
CTX = multiprocessing.get_context("forkserver")
PRELOAD = ["torch", "timm.optim", "sklearn.model_selection", "safetensors.torch", "fusion_engine.cli",
           "fusion_engine.runner", "fusion_engine.training", "fusion_engine.zoo", "fusion_engine_timm",
           "fusion_engine_fusers", "fusion_engine_metrics", "fusion_engine_datasets", "test_zoo_crash"]

SPEC = toy_spec_data(fusers=[{"name": "avg", "fuser": "toy-mean"}])
SPEC["members"][0]["train"]["epochs"] = 3


def _child(argv: list[str], kill_at: str | None, output: str, kill_after: float | None = None) -> None:
    """The CLI in a fresh process, which SIGKILLs itself on the Nth call of ``kill_at``
    (``module:attribute:N``, the attribute may be ``Class.method``) or ``kill_after`` seconds."""
    import contextlib
    import importlib
    import threading

    import torch

    torch.set_num_threads(1)
    if kill_after is not None:
        timer = threading.Timer(kill_after, os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True  # a run that finishes first exits normally
        timer.start()
    if kill_at:
        module_name, attribute, nth = kill_at.split(":")
        owner = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original, calls = getattr(owner, name), [0]

        def killer(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)

        setattr(owner, name, killer)
    from fusion_engine.cli import main

    with open(output, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(argv)
    sys.exit(code)


class Run:
    """A run in its own process; ``wait()`` gives its exit code (-9 when killed) and output."""

    count = 0

    def __init__(self, spec: Path, registry: Path, kill_at: str | None = None, *args: str,
                 kill_after: float | None = None):
        Run.count += 1
        self.output = registry.parent / f"out-{Run.count}.txt"
        argv = [*args] if args else ["run", str(spec), "--registry", str(registry), "--quiet"]
        self.process = CTX.Process(target=_child, args=(argv, kill_at, str(self.output), kill_after))
        self.process.start()

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        self.process.join(timeout)
        return self.process.exitcode, self.output.read_text() if self.output.exists() else ""

    def running(self) -> bool:
        return self.process.is_alive()


@pytest.fixture(scope="module", autouse=True)
def forkserver():
    CTX.set_forkserver_preload(PRELOAD)


def attempt(spec: Path, registry: Path, kill_at: str | None = None) -> tuple[int, str]:
    return Run(spec, registry, kill_at).wait()


def cli(registry: Path, *args: str) -> object:
    code, out = Run(None, registry, None, *args, "--registry", str(registry), "--json").wait()
    assert code == 0, out
    return json.loads(out)


def indexed(registry: Path) -> set[str]:
    with sqlite3.connect(registry / "index.sqlite") as con:
        return {row[0] for row in con.execute("SELECT key FROM members")}


def test_a_run_killed_at_each_stage_is_rerun_to_completion(tmp_path):
    # torch threads as in the subprocesses, so the uninterrupted reference computes the same floats
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run(write_spec(tmp_path / "ref" / "spec.yaml", SPEC), tmp_path / "ref-reg")
    finally:
        torch.set_num_threads(threads)
    key_a, key_b = keys(reference)["net-a"], keys(reference)["net-b"]
    spec = write_spec(tmp_path / "spec.yaml", SPEC)
    reg = tmp_path / "reg"
    checkpoint = reg / "checkpoints" / key_a / "state.json"

    # 1. killed while training net-a: in epoch 2's validation, after epoch 1 was checkpointed
    code, out = attempt(spec, reg, "fusion_engine.training:_evaluate:2")
    assert code == -signal.SIGKILL, out
    assert json.loads(checkpoint.read_text())["epoch"] == 1
    assert indexed(reg) == set() and integrity(reg) == "ok"

    # 2. resumed after epoch 1, trained to the end, killed while predicting test
    code, out = attempt(spec, reg, "fusion_engine.training:predict_logits:2")
    assert code == -signal.SIGKILL, out
    assert "resuming net-a after epoch 1 from its checkpoint" in (latest_run(reg) / "run.log").read_text()
    assert json.loads(checkpoint.read_text())["epoch"] == 3
    assert indexed(reg) == set()

    # 3. killed while writing net-a's artifact (weights written, logits not yet sealed)
    code, out = attempt(spec, reg, "fusion_engine.zoo.store:seal:2")
    assert code == -signal.SIGKILL, out
    leftovers = list((reg / "tmp").iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(key_a)
    assert not (reg / "zoo" / key_a).exists() and indexed(reg) == set()

    # 4. killed after net-a's folder was moved into the zoo, before the index row was written
    code, out = attempt(spec, reg, "fusion_engine.zoo.index:Index.insert:1")
    assert code == -signal.SIGKILL, out
    assert (reg / "zoo" / key_a / "card.json").is_file() and indexed(reg) == set()

    # 5. net-a recovered from its folder, net-b trained; killed before the fusers
    code, out = attempt(spec, reg, "fusion_engine.runner:fit_fusers:1")
    assert code == -signal.SIGKILL, out
    assert "recovered zoo member" in (latest_run(reg) / "run.log").read_text()
    assert indexed(reg) == {key_a, key_b} and not checkpoint.exists()

    # 6. the re-run completes, reusing everything that finished
    code, out = attempt(spec, reg)
    assert code == 0, out
    record = json.loads((Path(out.strip().splitlines()[-1]) / "run.json").read_text())
    assert record["status"] == "complete" and record["trained"] == [] and record["reused"] == ["net-a", "net-b"]
    assert integrity(reg) == "ok"
    assert not any((reg / "checkpoints").iterdir())

    assert [r["status"] for r in cli(reg, "runs", "list")] == ["interrupted"] * 5 + ["complete"]
    gc = cli(reg, "zoo", "gc")
    assert [r["what"] for r in gc["removed"]].count("temporary") == 1 and gc["bytes_freed"] > 0
    assert not any((reg / "tmp").iterdir())

    # what survived five kills is what an uninterrupted run trains
    from safetensors.numpy import load_file

    for key in (key_a, key_b):
        ours, theirs = (load_file(r / "zoo" / key / "model.safetensors") for r in (reg, tmp_path / "ref-reg"))
        assert ours.keys() == theirs.keys()
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name])
        cards = [json.loads((r / "zoo" / key / "card.json").read_text()) for r in (reg, tmp_path / "ref-reg")]
        assert [[{k: v for k, v in h.items() if k != "seconds"} for h in c["history"]] for c in cards] == \
            [[{k: v for k, v in h.items() if k != "seconds"} for h in cards[1]["history"]]] * 2


def test_two_runs_at_once_on_one_registry_train_a_shared_member_once(tmp_path):
    from fusion_engine.zoo import Registry

    # spec A: net-a and net-b; spec B: the same net-a and a net-c of its own
    spec_a = write_spec(tmp_path / "a" / "spec.yaml", SPEC)
    other = toy_spec_data(name="toy-b", members=[SPEC["members"][0], {**SPEC["members"][1], "name": "net-c", "seed": 8}],
                          fusers=SPEC["fusers"])
    spec_b = write_spec(tmp_path / "b" / "spec.yaml", other)
    key_a = keys(run(write_spec(tmp_path / "probe" / "spec.yaml", SPEC), tmp_path / "probe-reg"))["net-a"]
    reg = tmp_path / "reg"

    # hold net-a's lock, as a third run training it would, until both runs wait for it
    registry = Registry(reg)
    with registry.lock(key_a):
        runs = [Run(spec_a, reg), Run(spec_b, reg)]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            logs = [p / "run.log" for p in (reg / "runs").iterdir()] if (reg / "runs").exists() else []
            waiting = [log for log in logs if log.exists() and "waiting for the lock of net-a" in log.read_text()]
            if len(waiting) == 2 or not all(r.running() for r in runs):
                break
            time.sleep(0.05)
        assert len(waiting) == 2, [r.wait(0) for r in runs if not r.running()]
    registry.close()
    results = [r.wait() for r in runs]
    assert [code for code, _ in results] == [0, 0], results

    records = [json.loads((Path(out.strip().splitlines()[-1]) / "run.json").read_text()) for _, out in results]
    actions = [r["members"]["net-a"]["action"] for r in records]
    assert sorted(actions) == ["reused", "trained"], actions  # trained once, by whichever got the lock
    assert records[0]["members"]["net-b"]["action"] == "trained" and records[1]["members"]["net-c"]["action"] == "trained"
    assert {r["members"]["net-a"]["key"] for r in records} == {key_a}
    assert len(indexed(reg)) == 3 and integrity(reg) == "ok"
    assert all(r["status"] == "complete" for r in records)
    assert not any((reg / "tmp").iterdir()) and not any((reg / "checkpoints").iterdir())


def test_runs_killed_at_random_moments_leave_a_registry_that_completes_the_same(tmp_path):
    import random

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run(write_spec(tmp_path / "ref" / "spec.yaml", SPEC), tmp_path / "ref-reg")
    finally:
        torch.set_num_threads(threads)
    spec = write_spec(tmp_path / "spec.yaml", SPEC)
    reg = tmp_path / "reg"
    rng = random.Random(20240611)
    for _ in range(6):
        code, out = Run(spec, reg, kill_after=rng.uniform(0.05, 1.5)).wait()
        assert code in (0, -signal.SIGKILL), out
        if (reg / "index.sqlite").exists():
            assert integrity(reg) == "ok"
    code, out = attempt(spec, reg)
    assert code == 0, out
    record = json.loads((Path(out.strip().splitlines()[-1]) / "run.json").read_text())
    assert record["status"] == "complete" and keys(record) == keys(reference)
    assert integrity(reg) == "ok" and indexed(reg) == set(keys(reference).values())
    from fusion_engine.zoo import Registry
    from safetensors.numpy import load_file

    with Registry(reg) as registry:
        for key in keys(reference).values():
            registry.verify(registry.get(key))
            ours, theirs = (load_file(r / "zoo" / key / "model.safetensors") for r in (reg, tmp_path / "ref-reg"))
            for name in theirs:
                np.testing.assert_array_equal(ours[name], theirs[name])
