"""A registry written by fusion-engine 0.1 (before member cards were typed and the zoo became a
package) opens with this version: its members are listed, verified, reused and referenced, its
run is read, and its index can be rebuilt from its version-1 cards.

``tests/data/registry-0.1`` was made by the 0.1 code (commit b3de2a0) with
``tests/plugins/toy_plugin.py`` and the spec ``OLD_SPEC`` below (run folders' plots and report left out: they are drawn again here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import cli_json, summary, toy_spec_data, write_spec
from fusion_engine.cli import main
from fusion_engine.runner import run_experiment
from fusion_engine.zoo import Registry

OLD_REGISTRY = Path(__file__).parent / "data" / "registry-0.1"
OLD_RUN = "20261130-063007-toy-0.1-9208"
OLD_SPEC = toy_spec_data(name="toy-0.1", fusers=[{"name": "avg", "fuser": "toy-mean"},
                                                {"name": "stack", "fuser": "logistic-stacking"}])
OLD_SPEC["members"][1]["calibrate"] = "temperature"


@pytest.fixture
def old_registry(tmp_path) -> Path:
    return Path(shutil.copytree(OLD_REGISTRY, tmp_path / "registry"))


def test_its_members_list_and_verify(old_registry, capsys):
    listed = cli_json(capsys, "zoo", "list", "--registry", old_registry)
    assert sorted(m["name"] for m in listed) == ["net-a", "net-b"]
    for member in listed:
        shown = cli_json(capsys, "zoo", "show", member["key"], "--registry", old_registry)
        assert shown["check"] == "ok" and shown["card"]["version"] == 1
        assert shown["card"]["key"] == member["key"] and shown["runs"] == [OLD_RUN]


def test_its_run_reads_and_redraws(old_registry, capsys):
    capsys.readouterr()
    assert main(["leaderboard", OLD_RUN, "--registry", str(old_registry), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("rank,name,kind,members,accuracy")
    assert main(["report", OLD_RUN, "--registry", str(old_registry)]) == 0
    report = Path(capsys.readouterr().out.strip())
    assert report == old_registry / "runs" / OLD_RUN / "report.html"
    html = report.read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 4 + 3  # a confusion matrix per row, reliability, Pareto, curves
    # 0.1 stored no importance_: it comes from the stacker rebuilt through its plugin
    assert "share of the meta-learner's feature importance" in html


def test_its_members_are_referenced_and_score_as_they_did(old_registry, tmp_path):
    """Referenced by name, the 0.1 members give the 0.1 run's leaderboard again (every column but
    timings and names)."""
    by_ref = {**OLD_SPEC, "members": [{"name": "a", "zoo": "net-a"},
                                      {"name": "b", "zoo": "net-b", "calibrate": "temperature"}]}
    result = run_experiment(write_spec(tmp_path / "by-reference.yaml", by_ref), registry=old_registry, quiet=True)
    assert summary(result.run_dir)["reused"] == ["a", "b"]
    renamed = {"net-a": "a", "net-b": "b"}
    old = json.loads((old_registry / "runs" / OLD_RUN / "leaderboard.json").read_text())["rows"]
    new = {row["name"]: row for row in json.loads((result.run_dir / "leaderboard.json").read_text())["rows"]}
    skip = {"rank", "name", "members", "infer_ms_per_image", "train_seconds", "fit_seconds", "pareto"}
    for before in old:
        after = new[renamed.get(before["name"], before["name"])]
        assert {k: v for k, v in before.items() if k not in skip} == {k: after[k] for k in before if k not in skip}
        # 0.1 boards had no source column: its members were all trained by the engine
        assert after["source"] == ("trained" if before["kind"] == "member" else "")


def test_the_same_spec_trains_anew_under_this_versions_keys(old_registry, tmp_path):
    """Keys now include the code that trains a member (format 2), so 0.1's members are not
    served for them; they stay in the zoo, intact, beside the new ones."""
    result = run_experiment(write_spec(tmp_path / "spec.yaml", OLD_SPEC), registry=old_registry, quiet=True)
    assert summary(result.run_dir)["trained"] == ["net-a", "net-b"]
    with Registry(old_registry) as reg:
        cards = {e.key: reg.verify(e) for e in reg.entries()}
    assert sorted(c.version for c in cards.values()) == [1, 1, 2, 2]
    assert all(c.key_material["format"] == 2 and c.key_material["code"]["plugin"]["sha256"]
               for c in cards.values() if c.version == 2)


def test_its_index_is_rebuilt_from_version_1_cards(old_registry, capsys):
    keys = {e.key for e in Registry(old_registry, create=False).entries()}
    (old_registry / "index.sqlite").unlink()
    report = cli_json(capsys, "zoo", "gc", "--registry", old_registry)
    assert sorted(report["recovered"]) == sorted(keys) and report["removed"] == []
    with Registry(old_registry) as reg:
        assert {e.key for e in reg.entries()} == keys
        assert all(reg.verify(e).version == 1 for e in reg.entries())


def test_its_run_exports_and_predicts_its_stored_test_probabilities(old_registry, tmp_path, capsys):
    """Export (issue 14) of a 0.1 run: its rows are exported from the old zoo and predict what
    the run stored. The run's spec named the toy plugin at the path it had then; it is pointed at
    the plugin's path here, as a user whose files moved would."""
    import numpy as np

    import fusion_engine
    from conftest import TOY_PLUGIN
    from fusion_engine.runfolder import RunFolder

    spec_path = old_registry / "runs" / OLD_RUN / "spec.json"
    spec = json.loads(spec_path.read_text())
    spec["plugins"] = [str(TOY_PLUGIN)]
    spec_path.write_text(json.dumps(spec))
    out = tmp_path / "stack"
    assert main(["export", OLD_RUN, "stack", "--registry", str(old_registry), "--out", str(out), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    ens = fusion_engine.load(out, device="cpu")
    folder = RunFolder(old_registry / "runs" / OLD_RUN)
    record = fusion_engine.get_plugins([TOY_PLUGIN]).catalog().get("dataset", "toy-data").record
    dataset = record.load(record.params(n_per_class=20))
    where = {i: k for k, i in enumerate(dataset.ids)}
    images = dataset.images[[where[i] for i in folder.split["test"]["ids"]]]
    assert np.abs(ens.predict_proba(images) - folder.probabilities("test")["stack"]).max() <= 1e-5
    assert ens.card.members[1].temperature == folder.cards["net-b"].temperature is not None
