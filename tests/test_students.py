"""Distillation: students taught by a fuser or a member, from outputs on train; stored in the
zoo under a key holding their teacher's identity; and blind to test."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import cli, summary, toy_spec_data, write_spec

STACK = {"name": "stack", "fuser": "logistic-stacking"}


def student(name: str = "pupil", teacher: str = "stack", **fields) -> dict:
    return {"name": name, "backbone": "toy-net", "params": {"width": 5}, "teacher": teacher,
            "train": {"epochs": 3, "batch_size": 16}, **fields}


def run(spec_path, registry):
    from fusion_engine.runner import run_experiment

    return run_experiment(spec_path, registry=registry, quiet=True)


def rows(result) -> dict[str, dict]:
    board = json.loads((result.run_dir / "leaderboard.json").read_text())
    return {r["name"]: r for r in board["rows"]}


def test_a_student_learns_from_a_fuser_or_a_member_and_the_zoo_keeps_it(tmp_path):
    registry = tmp_path / "registry"
    data = toy_spec_data(fusers=[{"name": "avg", "fuser": "toy-mean"}, STACK],
                         students=[student(), student("echo", teacher="net-a")])
    spec = write_spec(tmp_path / "spec.yaml", data)
    first = run(spec, registry)

    board = rows(first)
    for name, teacher in (("pupil", "stack"), ("echo", "net-a")):
        row = board[name]
        assert (row["kind"], row["source"], row["teacher"]) == ("student", "student", teacher)
        assert row["infer_ms_per_image"] > 0 and row["train_seconds"] > 0 and row["n_params"] > 0
        assert 0 <= row["accuracy_lo"] <= row["accuracy"] <= row["accuracy_hi"] <= 1
    assert board["pupil"]["n_params"] < board["net-b"]["n_params"]  # width 5 against net-b's 6
    assert first.leaderboard.attrs["best_member"] in ("net-a", "net-b")  # a student is never the best member

    run_json = summary(first.run_dir)
    assert run_json["trained"] == ["net-a", "net-b", "pupil", "echo"]
    assert run_json["members"]["pupil"]["teacher"] == "stack"
    # the teacher's members predicted train once, stored in the zoo beside val and test
    n_train = run_json["data"]["split_sizes"]["train"]
    for name in ("net-a", "net-b"):
        stored = load_file(str(registry / "zoo" / run_json["members"][name]["key"] / "outputs.safetensors"))
        assert stored["train_logits"].shape == (n_train, 3)
    card = json.loads((registry / "zoo" / run_json["members"]["pupil"]["key"] / "card.json").read_text())
    assert card["source"] == "student"
    assert card["teacher"]["name"] == "stack" and card["teacher"]["kind"] == "fuser"
    assert card["teacher"]["members"] == {n: run_json["members"][n]["key"] for n in ("net-a", "net-b")}
    assert card["teacher"]["distill"] == {"alpha": 0.9, "temperature": 4.0}
    assert card["key_material"]["source"]["student"]["targets_sha256"] == card["teacher"]["targets_sha256"]
    echo = json.loads((registry / "zoo" / run_json["members"]["echo"]["key"] / "card.json").read_text())
    assert echo["teacher"]["kind"] == "member" and echo["teacher"]["fuser"] is None
    assert (registry / "runs" / first.run_id / "members" / "pupil" / "card.json").is_file()
    assert not [w for w in run_json["warnings"] if "could not draw" in w]
    assert "pupil" in (first.run_dir / "report.html").read_text()

    # the same spec again: everything comes from the zoo
    again = run(spec, registry)
    assert summary(again.run_dir)["trained"] == []
    assert summary(again.run_dir)["reused"] == ["net-a", "net-b", "pupil", "echo"]
    assert rows(again)["pupil"]["accuracy"] == board["pupil"]["accuracy"]

    # another distillation setting, another teacher: other students; the members are reused
    data["students"][0]["distill"] = {"alpha": 0.5}
    data["students"][1]["teacher"] = "net-b"
    changed = run(write_spec(tmp_path / "spec.yaml", data), registry)
    assert summary(changed.run_dir)["trained"] == ["pupil", "echo"]
    for name in ("pupil", "echo"):
        assert summary(changed.run_dir)["members"][name]["key"] != run_json["members"][name]["key"]

    # renaming a teacher (and its members) is no new teacher: nothing is trained
    renamed = {**data, "fusers": [{"name": "avg", "fuser": "toy-mean"}, {**STACK, "name": "stacked"}],
               "students": [{**data["students"][0], "teacher": "stacked"}]}
    again = run(write_spec(tmp_path / "renamed.yaml", renamed), registry)
    assert summary(again.run_dir)["trained"] == []


def test_members_stored_before_a_student_needed_them_predict_train_once(tmp_path, toy_registry, toy_run):
    """The toy registry holds net-a and net-b with val and test outputs only: a spec that adds a
    student reuses them, predicting train once (no training), and stores them with it."""
    before = summary(toy_run.run_dir)["members"]["net-a"]["key"]
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(students=[student(teacher="avg")]))
    result = run(spec, toy_registry)
    run_json = summary(result.run_dir)
    assert run_json["trained"] == ["pupil"]
    assert run_json["members"]["net-a"] == {**run_json["members"]["net-a"], "key": before, "action": "reused"}
    stored = load_file(str(toy_registry / "zoo" / before / "outputs.safetensors"))
    assert stored["train_logits"].shape == (run_json["data"]["split_sizes"]["train"], 3)


def test_members_alike_but_in_name_predict_train_for_the_one_that_teaches(tmp_path):
    """Two members that differ only in name share a key and are trained once; when only the
    second teaches, the one job still predicts train."""
    twin = {**toy_spec_data()["members"][0], "name": "net-a2"}
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(
        members=[toy_spec_data()["members"][0], twin], fusers=[], students=[student(teacher="net-a2")]))
    result = run(spec, tmp_path / "registry")
    run_json = summary(result.run_dir)
    assert run_json["members"]["net-a"]["key"] == run_json["members"]["net-a2"]["key"]
    assert rows(result)["pupil"]["teacher"] == "net-a2"


def test_distillation_loss_is_hintons():
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, checked against numpy."""
    import torch

    from fusion_engine.training import DistillationLoss

    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(6, 4)), dtype=torch.float32)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    teacher = torch.softmax(torch.tensor(rng.normal(size=(6, 4)), dtype=torch.float32), dim=1)

    def target(loss):
        return torch.cat([labels.float()[:, None], loss.soften(teacher)], dim=1)

    hard_only = DistillationLoss(0.0, alpha=0.0, temperature=4.0)
    assert float(hard_only(logits, target(hard_only))) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)

    t = 3.0
    soft_only = DistillationLoss(0.0, alpha=1.0, temperature=t)
    p = np.exp(np.log(teacher.numpy()) / t)
    p /= p.sum(axis=1, keepdims=True)
    z = logits.numpy() / t
    log_q = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    expected = t * t * np.mean(np.sum(p * (np.log(p) - log_q), axis=1))
    assert float(soft_only(logits, target(soft_only))) == pytest.approx(expected, rel=1e-5)

    # a student that already matches its teacher pays nothing on the soft term
    matched = torch.log(teacher)
    assert float(soft_only(matched, target(soft_only))) == pytest.approx(0.0, abs=1e-6)


def test_a_zoo_member_stored_without_train_outputs_cannot_teach(toy_registry, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(
        members=[{"name": "old-a", "zoo": "net-a"}, toy_spec_data()["members"][1]], fusers=[],
        students=[student(teacher="old-a")]))
    out = cli("validate", spec, "--registry", toy_registry)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert "students.0.teacher" in out.stderr and "stored without outputs on train" in out.stderr


def test_the_student_never_sees_test(tmp_path):
    """The same student, taught with the test labels scrambled: the same val scores every epoch
    and the same chosen epoch; only its test score moves."""
    results = []
    for scramble in (False, True):
        data = toy_spec_data(fusers=[STACK], students=[student()],
                             data={"dataset": "toy-data", "params": {"n_per_class": 20, "own_split": True,
                                                                      "scramble_test": scramble}})
        spec = write_spec(tmp_path / f"spec-{scramble}.yaml", data)
        result = run(spec, tmp_path / f"registry-{scramble}")
        card = json.loads((result.run_dir / "members" / "pupil" / "card.json").read_text())
        results.append((card, rows(result)))
    (plain, plain_rows), (scrambled, scrambled_rows) = results
    assert plain["best_epoch"] == scrambled["best_epoch"]
    assert [h["val_loss"] for h in plain["history"]] == [h["val_loss"] for h in scrambled["history"]]
    assert plain_rows["pupil"]["val_accuracy"] == scrambled_rows["pupil"]["val_accuracy"]
    assert plain_rows["stack"]["val_accuracy"] == scrambled_rows["stack"]["val_accuracy"]
    assert plain_rows["pupil"]["accuracy"] != scrambled_rows["pupil"]["accuracy"]


def test_students_bad_input_is_one_line_before_a_run(tmp_path):
    import pandas as pd

    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(students=[student(teacher="stak")]))
    out = cli("validate", spec)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert "students.0.teacher" in out.stderr and "no fuser or member named 'stak'" in out.stderr

    # a member read from predictions teaches only with rows for train in its file
    cli("split", write_spec(tmp_path / "plain.yaml", toy_spec_data()), "--out", tmp_path / "split.csv")
    split = pd.read_csv(tmp_path / "split.csv", dtype={"id": str})
    scored = split[split["split"] != "train"]
    frame = pd.DataFrame(np.random.default_rng(0).normal(size=(len(scored), 3)), columns=["top", "bottom", "dark"])
    frame.insert(0, "id", scored["id"].to_list())
    predictions = tmp_path / "preds.csv"
    frame.to_csv(predictions, index=False)
    members = [toy_spec_data()["members"][0], {"name": "outside", "predictions": str(predictions), "kind": "logits"}]
    spec = write_spec(tmp_path / "spec2.yaml", toy_spec_data(members=members, students=[student(teacher="avg")]))
    out = cli("validate", spec)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert "student pupil" in out.stderr and "has no rows for the train split" in out.stderr
    out = cli("run", spec, "--registry", tmp_path / "registry")
    assert out.returncode == 2 and not (tmp_path / "registry" / "runs").exists()


def test_a_student_cannot_mix_images_its_teacher_scored_whole(tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(
        fusers=[STACK], students=[student(train={"epochs": 1, "augment": {"cutmix": 1.0}})]))
    out = cli("validate", spec)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "students.0.train.augment.cutmix" in out.stderr and "cannot be used with distillation" in out.stderr
