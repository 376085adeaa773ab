"""The model zoo: reuse by key, members by reference, integrity, security, and the registry CLI.

Runs here are in-process on the toy plugin (a second each); kills and concurrent runs, which
need real processes, are in test_zoo_crash.py. Every assertion is on the run record and the
files, never on time.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import cli_json, summary, toy_spec_data, write_spec
from fusion_engine import FusionEngineError
from fusion_engine.cli import main
from fusion_engine.runner import run_experiment
from fusion_engine.zoo import Registry, ZooError, check_key, key_material, member_key, tree_bytes


def run(spec: Path, registry: Path) -> dict:
    """Run in-process; the run's summary (run.json)."""
    return summary(run_experiment(spec, registry=registry, quiet=True).run_dir)


def integrity(registry: Path) -> str:
    """SQLite's check of the registry's index: ``ok`` when sound."""
    with Registry(registry, create=False) as reg:
        return reg.index.integrity_check()


def keys(record: dict) -> dict[str, str]:
    return {name: m["key"] for name, m in record["members"].items()}


def toy(folder: Path, **fields) -> Path:
    """The toy spec, ``fields`` replaced, written into ``folder``."""
    return write_spec(folder / "spec.yaml", toy_spec_data(**fields))


def toy_with(folder: Path, change) -> Path:
    """The toy spec after ``change(data)`` edits it in place, written into ``folder``."""
    data = toy_spec_data()
    change(data)
    return write_spec(folder / "spec.yaml", data)


def referencing(folder: Path, a: str = "net-a", b: str = "net-b", **data) -> Path:
    """A spec whose members are taken from the zoo: ``a`` by name, ``b`` calibrated."""
    return toy(folder, name="zooref", members=[{"name": "a-by-name", "zoo": a},
                                              {"name": "b-by-prefix", "zoo": b, "calibrate": "temperature"}],
               fusers=[{"name": "both", "fuser": "toy-mean"}], **data)


@pytest.fixture
def trained(toy_run):
    """The session's toy run: its registry (read only) and its summary."""
    return toy_run.registry, toy_run.summary


@pytest.fixture
def registry(toy_registry) -> Path:
    """A private copy of the trained registry."""
    return toy_registry


# -- reuse -----------------------------------------------------------------------------------------

def test_a_first_run_trains_predicts_and_stores_every_member(trained):
    reg, record = trained
    assert record["trained"] == ["net-a", "net-b"] and record["predicted"] == ["net-a", "net-b"]
    assert record["reused"] == []
    assert {m["action"] for m in record["members"].values()} == {"trained"}
    for name, key in keys(record).items():
        folder = reg / "zoo" / key
        assert sorted(p.name for p in folder.iterdir()) == ["card.json", "ids.json", "model.safetensors", "outputs.safetensors"]
        card = json.loads((folder / "card.json").read_text())
        assert card["key"] == key and member_key(card["key_material"]) == key
        assert card["name"] == name and card["metrics"]["val_accuracy"] is not None
        assert card["n_params"] > 0 and card["best_epoch"] in (1, 2) and len(card["history"]) == 2
        assert card["input"]["in_chans"] == 1 and "torch" in card["versions"]
        assert set(card["files"]) == {"model.safetensors", "outputs.safetensors", "ids.json"}
        run_card = json.loads((Path(record["registry"]) / "runs" / record["run_id"] / "members" / name / "card.json").read_text())
        assert run_card["key"] == key and run_card["zoo"] == f"zoo/{key}"
    assert not any((reg / "checkpoints").iterdir()) and not any((reg / "tmp").iterdir())
    assert integrity(reg) == "ok"


def test_a_second_run_of_the_same_spec_trains_nothing_and_predicts_nothing(trained, registry, tmp_path):
    _, first = trained
    spec = toy(tmp_path)
    second = run(spec, registry)
    assert second["status"] == "complete"
    assert second["trained"] == [] and second["predicted"] == []
    assert second["reused"] == ["net-a", "net-b"]
    assert keys(second) == keys(first)
    assert all(m["action"] == "reused" for m in second["members"].values())
    # the same logits, so the same leaderboard
    import pandas as pd

    boards = [pd.read_csv(registry / "runs" / r["run_id"] / "leaderboard.csv") for r in (first, second)]
    cols = ["name", "accuracy", "nll", "val_accuracy"]
    pd.testing.assert_frame_equal(boards[0][cols], boards[1][cols])
    log = (registry / "runs" / second["run_id"] / "run.log").read_text()
    assert "net-a: reused" in log


def test_adding_a_fuser_trains_nothing(registry, tmp_path):
    spec = toy_with(tmp_path, lambda d: d["fusers"].append({"name": "only-b", "fuser": "toy-mean", "members": ["net-b"]}))
    record = run(spec, registry)
    assert record["trained"] == [] and record["fusers"] == ["avg", "avg-a", "only-b"]


def test_changing_one_member_retrains_only_that_member(trained, registry, tmp_path):
    _, first = trained
    record = run(toy_with(tmp_path, lambda d: d["members"][1]["train"].update(epochs=3)), registry)
    assert record["trained"] == ["net-b"] and record["reused"] == ["net-a"]
    assert keys(record)["net-a"] == keys(first)["net-a"] and keys(record)["net-b"] != keys(first)["net-b"]


def test_renaming_a_member_or_calibrating_it_reuses_it(trained, registry, tmp_path):
    _, first = trained
    def rename_and_calibrate(data):
        data["members"][0]["name"] = "renamed"
        data["members"][1]["calibrate"] = "temperature"
        data["fusers"] = [{"name": "avg", "fuser": "toy-mean"}]

    record = run(toy_with(tmp_path, rename_and_calibrate), registry)
    assert record["trained"] == []
    assert keys(record) == {"renamed": keys(first)["net-a"], "net-b": keys(first)["net-b"]}
    card = json.loads((registry / "runs" / record["run_id"] / "members" / "net-b" / "card.json").read_text())
    assert card["temperature"] > 0 and card["action"] == "reused"


def test_the_key_covers_what_decides_a_member_and_resolves_defaults(tmp_path, registry):
    code = {"engine": "0.1.0", "plugin": {"distribution": "p", "version": "1"}, "torch": "2.14", "timm": "1.0.31"}
    base = dict(backbone="toy-net", params={"width": 4}, train={"epochs": 2}, seed=0, image_size=None, mean=None,
                std=None, fingerprint="f" * 64, split="s" * 64, code=code)
    key = member_key(key_material(**base))
    for change in ({"seed": 1}, {"params": {"width": 5}}, {"train": {"epochs": 3}}, {"fingerprint": "e" * 64},
                   {"split": "t" * 64}, {"image_size": 16}, {"mean": [0.5]}, {"backbone": "other"},
                   {"code": {**code, "plugin": {"distribution": "p", "version": "2"}}}, {"code": {**code, "torch": "2.15"}},
                   {"code": {**code, "engine": "0.2.0"}}, {"code": {**code, "timm": "1.0.32"}}):
        assert member_key(key_material(**{**base, **change})) != key, change
    # writing out the default lr and weight decay is the same member as leaving them out
    spec = toy_with(tmp_path, lambda d: d["members"][0]["train"].update(lr=0.002, weight_decay=0.05))
    assert run(spec, registry)["trained"] == []


# -- members by reference --------------------------------------------------------------------------

def test_members_from_the_zoo_by_name_and_key_prefix(trained, registry, tmp_path):
    _, first = trained
    key_b = keys(first)["net-b"]
    spec = referencing(tmp_path, b=key_b[:10])
    record = run(spec, registry)
    assert record["trained"] == [] and record["predicted"] == []
    assert record["members"] == {
        "a-by-name": {"key": keys(first)["net-a"], "action": "reused", "source": "zoo"},
        "b-by-prefix": {"key": key_b, "action": "reused", "source": "zoo"},
    }
    from safetensors.numpy import load_file

    stored = load_file(registry / "zoo" / keys(first)["net-a"] / "outputs.safetensors")
    used = load_file(registry / "runs" / record["run_id"] / "members" / "a-by-name" / "outputs.safetensors")
    np.testing.assert_array_equal(stored["test_logits"], used["test_logits"])
    spec_json = json.loads((registry / "runs" / record["run_id"] / "spec.json").read_text())
    assert spec_json["members"][0]["zoo"] == "net-a" and spec_json["members"][0]["backbone"] is None
    # validate checks it against the registry it is given
    assert main(["validate", str(spec), "--registry", str(registry)]) == 0
    assert main(["validate", str(spec), "--registry", str(tmp_path / "elsewhere")]) == 2


def test_a_reference_trained_on_other_data_is_an_error_naming_both(trained, registry, tmp_path):
    spec = referencing(tmp_path, data={"dataset": "toy-data", "params": {"n_per_class": 24},
                                       "split": {"val": 0.25, "test": 0.25}})
    with pytest.raises(FusionEngineError) as err:
        run(spec, registry)
    message = str(err.value)
    first_record = trained[1]
    assert message.startswith(f"{spec}: members.0.zoo: zoo member {keys(first_record)['net-a'][:12]}")
    assert "trained on other data: data fingerprint" in message and "split" in message
    assert first_record["data"]["fingerprint"][:16] in message and "(this run: " in message


def test_an_ambiguous_reference_lists_the_candidates(registry, tmp_path):
    second = run(toy_with(tmp_path / "b", lambda d: d["members"][0].update(seed=11)), registry)
    assert second["trained"] == ["net-a"]
    spec = referencing(tmp_path)
    with pytest.raises(FusionEngineError, match=r"members\.0\.zoo: 'net-a' is ambiguous: 2 zoo members match") as err:
        run(spec, registry)
    with Registry(registry) as reg:
        for entry in reg.find("net-a"):
            assert entry.key[:16] in str(err.value)


def test_a_missing_reference_fails_before_making_a_run(tmp_path):
    spec = referencing(tmp_path, b="deadbeef00")
    with pytest.raises(FusionEngineError, match=r"members\.0\.zoo: no zoo member matches 'net-a'"):
        run(spec, tmp_path / "empty-reg")
    assert not (tmp_path / "empty-reg").exists()


@pytest.mark.parametrize("member, message", [
    ("{name: x}", "members.0: give a backbone (to train, or with train: false and weights: FILE to run), "
                  "predictions: FILE (outputs made elsewhere) or zoo: KEY or NAME (a stored member)"),
    ("{name: x, backbone: toy-net, zoo: net-a}", "members.0: give one of backbone, predictions and zoo, not backbone and zoo"),
    ("{name: x, zoo: net-a, train: {epochs: 3}}", "members.0: a zoo member comes trained: remove train"),
    ("{name: x, zoo: ../../etc/passwd}", "members.0.zoo: String should match pattern"),
    ("{name: ../x, backbone: toy-net}", "members.0.name: String should match pattern"),
])
def test_spec_errors_for_zoo_members(tmp_path, capsys, member, message):
    data = toy_spec_data(members=[yaml.safe_load(member)])
    del data["fusers"]
    spec = write_spec(tmp_path / "spec.yaml", data)
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{spec}: {message}") and err.count("\n") == 1


# -- integrity and security ------------------------------------------------------------------------

def test_a_truncated_weights_file_is_detected_and_the_member_retrained(trained, registry, tmp_path):
    key = keys(trained[1])["net-a"]
    weights = registry / "zoo" / key / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    record = run(toy(tmp_path), registry)
    assert record["trained"] == ["net-a"] and record["reused"] == ["net-b"]
    assert keys(record)["net-a"] == key
    assert any("damaged: model.safetensors" in w and "truncated" in w for w in record["warnings"]), record["warnings"]
    assert weights.read_bytes() == data  # retrained on CPU: the very same weights
    with Registry(registry) as reg:
        reg.verify(reg.get(key))
    assert integrity(registry) == "ok"


def test_truncated_logits_of_a_referenced_member_are_reported_not_used(trained, registry, tmp_path):
    key = keys(trained[1])["net-b"]
    outputs = registry / "zoo" / key / "outputs.safetensors"
    outputs.write_bytes(outputs.read_bytes()[:-10])
    spec = referencing(tmp_path, b=key[:12])
    with pytest.raises(FusionEngineError, match=rf"members\.1\.zoo: zoo member {key[:12]}… is damaged: outputs.safetensors"):
        run(spec, registry)


class _Exploit:
    """Unpickling this creates a file: the test checks it never appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("plant", ["over-weights", "pkl-file", "pt-file"])
def test_a_planted_pickle_is_refused_and_never_loaded(trained, registry, tmp_path, capsys, plant):
    key = keys(trained[1])["net-a"]
    folder = registry / "zoo" / key
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Exploit(marker))
    if plant == "over-weights":
        (folder / "model.safetensors").write_bytes(payload)
        expected = "model.safetensors holds a pickle"
    elif plant == "pkl-file":
        (folder / "model.pkl").write_bytes(payload)
        expected = "model.pkl is not one of the files this member was stored with"
    else:
        import torch

        torch.save({"w": torch.zeros(2)}, folder / "weights.pt")
        expected = "weights.pt is not one of the files"
    with pytest.raises(FusionEngineError) as err:
        run(toy(tmp_path), registry)
    assert expected in str(err.value) and "refuses this member" in str(err.value)
    assert f"fusion-engine zoo rm {key[:16]}" in str(err.value)
    assert main(["zoo", "show", key[:12], "--registry", str(registry)]) == 1
    assert "check: zoo member" in capsys.readouterr().out
    assert not marker.exists()
    # the user removes it as told; the next run trains it again
    assert main(["zoo", "rm", key[:16], "--registry", str(registry)]) == 0
    assert run(toy(tmp_path), registry)["trained"] == ["net-a"]


def test_the_engine_never_unpickles():
    """No module of the core or of a first-party plugin reads or writes a pickle. (The ray
    executor hands jobs to Ray, which pickles its task arguments in memory: that is Ray's wire
    format, nothing the engine stores.)"""
    repo = Path(__file__).parent.parent
    files = [p for p in [*(repo / "fusion_engine").rglob("*.py"), *(repo / "plugins").rglob("*.py")]
             if p.name != "ray_executor.py"]
    assert len(files) > 30
    loads = 0
    for path in files:
        text = path.read_text()
        for forbidden in ("import pickle", "pickle.load", "pickle.dump", "allow_pickle=True"):
            assert forbidden not in text, (path, forbidden)
        # Every np.load / torch.load call, read as code (not text), says so in a keyword.
        for node in ast.walk(ast.parse(text)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)):
                continue
            keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
            if node.func.value.id == "np":
                assert keywords.get("allow_pickle") is False, (path, node.lineno)
                loads += 1
            elif node.func.value.id == "torch":
                assert keywords.get("weights_only") is True, (path, node.lineno)
                loads += 1
    assert loads >= 2  # the readers of .npz predictions and of .pt weights are among them


def test_keys_run_ids_and_links_cannot_reach_outside_the_registry(trained, registry, tmp_path, capsys):
    for bad in ("../" * 3 + "etc", "a" * 63 + "/", "A" * 64, "/etc/passwd", ""):
        with pytest.raises(ZooError):
            check_key(bad)
    with Registry(registry) as reg:
        with pytest.raises(ZooError):
            reg.member_dir("../../x")
        with pytest.raises(ZooError):
            reg.run_dir("../../outside")
        with pytest.raises(ZooError):
            reg.checkpoint_dir("..")
    for args in (["zoo", "show", "../../etc"], ["zoo", "rm", "../../etc"], ["leaderboard", "../../etc"]):
        assert main([*args, "--registry", str(registry)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
    # an artifact folder replaced by a link to somewhere else is refused
    key = keys(trained[1])["net-a"]
    outside = tmp_path / "outside"
    shutil.move(registry / "zoo" / key, outside)
    (registry / "zoo" / key).symlink_to(outside, target_is_directory=True)
    with pytest.raises(FusionEngineError, match="leads outside"):
        run(toy(tmp_path), registry)


def test_a_newer_index_schema_is_refused(registry):
    with sqlite3.connect(registry / "index.sqlite") as con:
        con.execute("PRAGMA user_version = 99")
    with pytest.raises(ZooError, match="schema version 99, newer than this fusion-engine reads"):
        Registry(registry).entries()


# -- the CLI ---------------------------------------------------------------------------------------

def test_zoo_list_show_and_rm(trained, registry, capsys):
    first = trained[1]
    listed = cli_json(capsys, "zoo", "list", "--registry", registry)
    assert sorted(e["name"] for e in listed) == ["net-a", "net-b"]
    entry = next(e for e in listed if e["name"] == "net-a")
    assert entry["key"] == keys(first)["net-a"] and entry["runs"] == 1 and entry["experiment"] == "toy"
    assert entry["bytes"] == tree_bytes(registry / "zoo" / entry["key"])

    shown = cli_json(capsys, "zoo", "show", entry["key"][:8], "--registry", registry)
    assert shown["check"] == "ok" and shown["runs"] == [first["run_id"]]
    assert shown["card"]["spec"]["backbone"] == "toy-net" and len(shown["card"]["history"]) == 2
    assert set(shown["files"]) == {"model.safetensors", "outputs.safetensors", "ids.json", "card.json"}
    assert cli_json(capsys, "zoo", "show", "net-b", "--registry", registry)["name"] == "net-b"

    removed = cli_json(capsys, "zoo", "rm", entry["key"][:12], "--registry", registry)
    assert removed == {"removed": entry["key"], "name": "net-a", "bytes_freed": entry["bytes"]}
    assert not (registry / "zoo" / entry["key"]).exists()
    assert [e["name"] for e in cli_json(capsys, "zoo", "list", "--registry", registry)] == ["net-b"]
    assert main(["zoo", "rm", entry["key"], "--registry", str(registry)]) == 2
    assert "no zoo member matches" in capsys.readouterr().err
    assert integrity(registry) == "ok"


def test_zoo_rm_refuses_a_member_in_use(trained, registry, capsys):
    key = keys(trained[1])["net-a"]
    with Registry(registry) as reg, reg.lock(key):  # as a running run holds it
        assert main(["zoo", "rm", key, "--registry", str(registry)]) == 2
    assert "in use by a running run" in capsys.readouterr().err
    assert (registry / "zoo" / key).is_dir()


def test_zoo_gc_frees_exactly_what_it_reports(trained, registry, capsys):
    key_a, key_b = keys(trained[1]).values()
    junk = {
        # a temporary folder left by a run killed while writing
        registry / "tmp" / f"{key_a}.x1y2.new": {"model.safetensors": 3000, "outputs.safetensors": 500},
        # a complete folder the index does not list
        registry / "zoo" / ("c" * 64): {"model.safetensors": 2000, "card.json": 100},
        # the checkpoint of a member already stored
        registry / "checkpoints" / key_b: {"state.json": 700, "epoch-00002.safetensors": 4000},
    }
    for folder, files in junk.items():
        folder.mkdir(parents=True)
        for name, size in files.items():
            (folder / name).write_bytes(b"x" * size)
    resumable = registry / "checkpoints" / ("d" * 64)
    resumable.mkdir()
    (resumable / "state.json").write_bytes(b"{}" * 50)
    busy = registry / "tmp" / f"{'e' * 64}.busy.new"
    busy.mkdir()
    (busy / "model.safetensors").write_bytes(b"y" * 64)

    before = tree_bytes(registry)
    with Registry(registry) as reg, reg.lock("e" * 64):  # a live run writing that one
        report = cli_json(capsys, "zoo", "gc", "--registry", registry)
    expected = sum(sum(files.values()) for files in junk.values())
    assert report["bytes_freed"] == expected == before - tree_bytes(registry)
    assert sorted(r["what"] for r in report["removed"]) == [
        "checkpoint of a stored member", "temporary", "unindexed member that fails its checks"]
    assert report["kept_in_use"] == [f"tmp/{busy.name}"]
    assert not any(folder.exists() for folder in junk) and resumable.exists() and busy.exists()

    again = cli_json(capsys, "zoo", "gc", "--checkpoints", "--registry", registry)
    assert again["bytes_freed"] == 100 + 64 and not resumable.exists() and not busy.exists()
    assert cli_json(capsys, "zoo", "gc", "--registry", registry)["bytes_freed"] == 0
    with Registry(registry) as reg:  # what runs read is untouched
        for key in (key_a, key_b):
            reg.verify(reg.get(key))
    assert integrity(registry) == "ok"


def test_zoo_gc_indexes_intact_members_the_index_lost_instead_of_deleting_them(trained, registry, capsys):
    (registry / "index.sqlite").unlink()
    report = cli_json(capsys, "zoo", "gc", "--registry", registry)
    assert sorted(report["recovered"]) == sorted(keys(trained[1]).values()) and report["bytes_freed"] == 0
    listed = cli_json(capsys, "zoo", "list", "--registry", registry)
    assert sorted(e["name"] for e in listed) == ["net-a", "net-b"]
    assert integrity(registry) == "ok"


def test_zoo_gc_dry_run_removes_nothing(registry, capsys):
    leftover = registry / "tmp" / f"{'f' * 64}.z.new"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"z" * 10)
    report = cli_json(capsys, "zoo", "gc", "--dry-run", "--registry", registry)
    assert report["dry_run"] and report["bytes_freed"] == 10 and leftover.exists()


def test_runs_list(trained, registry, tmp_path, capsys):
    second = run(toy(tmp_path), registry)
    runs = cli_json(capsys, "runs", "list", "--registry", registry)
    assert [r["run_id"] for r in runs] == [trained[1]["run_id"], second["run_id"]]
    assert [(r["status"], r["n_members"], r["n_trained"], r["n_reused"], r["n_fusers"]) for r in runs] == [
        ("complete", 2, 2, 0, 2), ("complete", 2, 0, 2, 2)]
    assert all(r["experiment"] == "toy" and r["created"] for r in runs)
    assert main(["runs", "list", "--registry", str(registry)]) == 0
    assert second["run_id"] in capsys.readouterr().out
    assert cli_json(capsys, "runs", "list", "--registry", tmp_path / "nothing-here") == []
    assert not (tmp_path / "nothing-here").exists()


def test_leaderboard_command_reads_the_registry_in_every_format(trained, registry, capsys):
    run_id = trained[1]["run_id"]
    run_dir = registry / "runs" / run_id
    for fmt, name in (("csv", "leaderboard.csv"), ("md", "leaderboard.md"), ("json", "leaderboard.json")):
        capsys.readouterr()
        assert main(["leaderboard", run_id[:17], "--format", fmt, "--registry", str(registry)]) == 0
        assert capsys.readouterr().out == (run_dir / name).read_text()
    assert main(["leaderboard", "--experiment", "toy", "--registry", str(registry)]) == 0
    table = capsys.readouterr().out
    assert run_id in table and "net-a" in table and "avg" in table
    assert main(["leaderboard", "--registry", str(registry), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_id"] == run_id
    assert main(["leaderboard", "--experiment", "nope", "--registry", str(registry)]) == 2
    assert capsys.readouterr().err.startswith("no complete run of experiment 'nope'")


# -- resuming training -----------------------------------------------------------------------------

class Interrupt(BaseException):
    """Stands in for a kill inside one process (test_zoo_crash.py kills real processes)."""


def test_an_interrupted_member_resumes_from_its_checkpoint_and_ends_as_if_never_stopped(tmp_path, monkeypatch):
    import fusion_engine.training as training
    from safetensors.numpy import load_file

    def four_epochs(data):
        data["members"][0]["train"]["epochs"] = 4

    reference = run(toy_with(tmp_path / "ref", four_epochs), tmp_path / "ref-reg")
    key = keys(reference)["net-a"]

    evaluate, calls = training._evaluate, []

    def stop_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt()
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "_evaluate", stop_in_epoch_3)
    reg = tmp_path / "reg"
    spec = toy_with(tmp_path, four_epochs)
    with pytest.raises(Interrupt):
        run(spec, reg)
    state = json.loads((reg / "checkpoints" / key / "state.json").read_text())
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert [p.name for p in (reg / "checkpoints" / key).glob("*.safetensors")] == ["epoch-00002.safetensors"]
    monkeypatch.setattr(training, "_evaluate", evaluate)

    record = run(spec, reg)
    assert record["members"]["net-a"] == {"key": key, "action": "trained", "source": "trained", "resumed_from_epoch": 2, "executor": "local"}
    assert not (reg / "checkpoints" / key).exists()
    cards = [json.loads((r / "zoo" / key / "card.json").read_text()) for r in (tmp_path / "ref-reg", reg)]
    strip = [[{k: v for k, v in h.items() if k != "seconds"} for h in c["history"]] for c in cards]
    assert strip[0] == strip[1] and len(strip[1]) == 4
    weights = [load_file(r / "zoo" / key / "model.safetensors") for r in (tmp_path / "ref-reg", reg)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        np.testing.assert_array_equal(weights[0][name], weights[1][name])
    logits = [load_file(r / "zoo" / key / "outputs.safetensors") for r in (tmp_path / "ref-reg", reg)]
    np.testing.assert_array_equal(logits[0]["test_logits"], logits[1]["test_logits"])


class _StopAfter:
    """A checkpoint that stops the process (as a kill would) right after saving epoch ``n``."""

    def __init__(self, inner, n: int | None):
        self.inner, self.n = inner, n

    def load(self):
        return self.inner.load()

    def save(self, tensors, state):
        self.inner.save(tensors, state)
        if state["epoch"] == self.n:
            raise Interrupt()


@pytest.mark.parametrize("optimizer, stop_after, extra", [
    ("adamw", 2, {}),
    ("sgd", 1, {"augment": {"shift": 0.25, "hflip": True}}),
    ("adamw", 3, {"patience": 1, "lr": 0.5}),  # early stopping decided before or at the interruption
    ("adamw", 2, {"augment": {"mixup": 0.4, "cutmix": 1.0, "re_prob": 0.5}}),  # their generators resume too
])
def test_training_resumed_from_a_checkpoint_equals_uninterrupted_training(tmp_path, optimizer, stop_after, extra):
    """BatchNorm buffers, dropout and augmentation RNG, optimizer and scheduler state all resume."""
    import torch
    from torch import nn

    from fusion_engine import InputConfig
    from fusion_engine.spec import TrainSpec
    from fusion_engine.training import train_member
    from fusion_engine.checkpoint import Checkpoint

    cfg = InputConfig(size=8, mean=(0.5,), std=(0.25,), in_chans=1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (48, 1, 8, 8), generator=gen, dtype=torch.uint8)
    y = torch.arange(48) % 3
    spec = TrainSpec(epochs=5, batch_size=16, optimizer=optimizer, **extra)

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                             nn.Flatten(), nn.Linear(4 * 64, 3))

    def train(checkpoint=None):
        return train_member(net(), cfg, spec, x[:32], y[:32], x[32:], y[32:], seed=5, device="cpu", quiet=True,
                            checkpoint=checkpoint)

    whole = train()
    ckpt = Checkpoint(tmp_path / "ckpt", "k" * 64)
    if stop_after <= len(whole.history):
        with pytest.raises(Interrupt):
            train(_StopAfter(ckpt, stop_after))
        assert ckpt.peek()["epoch"] == stop_after
    resumed = train(ckpt)
    assert resumed.resumed_from_epoch == min(stop_after, len(whole.history))
    strip = [[{k: v for k, v in h.items() if k != "seconds"} for h in r.history] for r in (whole, resumed)]
    assert strip[0] == strip[1] and resumed.best_epoch == whole.best_epoch
    assert whole.state_dict.keys() == resumed.state_dict.keys()
    for name, value in whole.state_dict.items():
        assert torch.equal(value, resumed.state_dict[name]), name


def test_a_damaged_checkpoint_is_ignored_with_a_warning(tmp_path, caplog):
    from fusion_engine.checkpoint import Checkpoint

    import torch

    ckpt = Checkpoint(tmp_path / "ckpt", "k" * 64)
    ckpt.save({"w": torch.ones(3)}, {"epoch": 2, "history": []})
    tensors, state = ckpt.load()
    assert state["epoch"] == 2 and torch.equal(tensors["w"], torch.ones(3))
    data_file = tmp_path / "ckpt" / "epoch-00002.safetensors"
    data_file.write_bytes(pickle.dumps({"w": [1, 2, 3]}))  # a pickle where the tensors were
    assert ckpt.load() is None and not (tmp_path / "ckpt").exists()
