"""The run folder has one owner, :class:`RunFolder`: what it writes is byte for byte what earlier
versions wrote (leaderboard.json, members' card.json), what it reads includes folders those
versions left, and plots and report are written through it, whole."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fusion_engine import FusionEngineError, RunFolder, RunMemberCard, encode_json
from fusion_engine.jsoncodec import from_jsonable, plain, to_jsonable
from fusion_engine.members import MemberResult
from fusion_engine.plots import write_plots
from fusion_engine.report import write_report
from fusion_engine.zoo.store import read_card

OLD_RUN = Path(__file__).parent / "data" / "registry-0.1" / "runs" / "20261130-063007-toy-0.1-9208"
OLD_ZOO = OLD_RUN.parent.parent / "zoo"


def awkward_board() -> pd.DataFrame:
    """A leaderboard with what formats differ on: NaN, None, floats of 17 digits, tiny and huge
    floats, float32, numpy ints, booleans."""
    df = pd.DataFrame({"name": ["a", "b", "c"], "kind": ["member", "fuser", None],
                       "accuracy": [0.1 + 0.2, np.nan, 0.5495936876730595], "tiny": [1e-17, 3.3e-16, 0.0],
                       "huge": [1e17, 12345678901234567.0, -9.87654321e20],
                       "f32": np.array([0.1, 0.7, np.nan], dtype=np.float32), "n": np.array([1, 2, 3], dtype=np.int64),
                       "pareto": [True, False, True], "mixed": [None, 1.5, "x"]})
    df.attrs = {"ranked_by": "accuracy", "best_member": "a", "n_bootstrap": 10}
    return df


def test_leaderboard_json_is_byte_for_byte_what_pandas_wrote_before(tmp_path):
    """Before the codec, leaderboard.json was pandas' ``to_json`` (15 decimals) re-indented by
    ``json.dumps``; the file is the same bytes now."""
    df = awkward_board()
    RunFolder(tmp_path).write_leaderboard(df, meta={"run_id": "r", "experiment": "e"})
    before = json.dumps({"run_id": "r", "experiment": "e", **df.attrs,
                         "rows": json.loads(df.to_json(orient="records", double_precision=15))}, indent=2) + "\n"
    assert (tmp_path / "leaderboard.json").read_text(encoding="utf-8") == before
    rows = json.loads(before)["rows"]
    assert rows[0]["accuracy"] == 0.3 and rows[1]["accuracy"] is None and rows[2]["accuracy"] == 0.54959368767306
    assert not list(tmp_path.glob(".*.tmp"))


def test_leaderboard_text_is_each_file_as_written(tmp_path):
    folder = RunFolder(tmp_path)
    paths = folder.write_leaderboard(awkward_board(), meta={})
    for fmt, path in zip(("csv", "md", "json"), paths):
        assert folder.leaderboard_text(fmt) == path.read_text(encoding="utf-8") != ""
    (tmp_path / "leaderboard.md").unlink()
    with pytest.raises(FileNotFoundError):
        folder.leaderboard_text("md")
    with pytest.raises(ValueError, match="not 'html'"):
        folder.leaderboard_text("html")


def members(zoo: Path) -> list[MemberResult]:
    """Members as a run leaves them: trained, reused with a numpy temperature, read from
    predictions (no input, no history), with numpy values in its history."""
    logits = {s: np.zeros((3, 2), dtype=np.float32) for s in ("val", "test")}
    key = sorted(p.name for p in zoo.iterdir())[0]
    card = read_card(zoo / key, key)
    return [
        MemberResult("trained", card, logits, action="trained"),
        MemberResult("reused", card, logits, action="reused", resumed_from_epoch=3, temperature=np.float64(0.123)),
        MemberResult("read", card.model_copy(update={"input": None, "history": [], "best_epoch": None,
                                                     "n_params": None, "source": "predictions"}), logits, action="read"),
        MemberResult("numpy", card.model_copy(update={"history": [{"epoch": np.int64(1), "val_loss": np.float32(0.5),
                                                                   "lr": float("nan")}]}), logits, temperature=1.5),
    ]


def test_member_cards_are_written_as_before_and_read_back_typed(tmp_path):
    folder = RunFolder.create(tmp_path / "run")
    written = members(OLD_ZOO)
    for member in written:
        folder.write_member(member, f"zoo/{member.key}")
    for member in written:
        inp = member.input
        # the dict the runner wrote before the card was typed, field for field
        before = {"name": member.name, "key": member.key, "action": member.action, "source": member.source,
                  "zoo": f"zoo/{member.key}", "backbone": member.backbone, "temperature": member.temperature,
                  "resumed_from_epoch": member.resumed_from_epoch,
                  "input": None if inp is None else {"size": inp.size, "mean": list(inp.mean), "std": list(inp.std),
                                                     "in_chans": inp.in_chans},
                  "best_epoch": member.best_epoch, "history": member.history, "n_params": member.n_params,
                  "train_seconds": round(member.train_seconds, 3), "predict_seconds": round(member.predict_seconds, 3)}
        path = folder.path / "members" / member.name / "card.json"
        assert path.read_text(encoding="utf-8") == encode_json(before, indent=2) + "\n"
        card = folder.cards[member.name]
        assert isinstance(card, RunMemberCard) and card.to_json() == json.loads(path.read_text())
    assert folder.cards["reused"].temperature == 0.123 and folder.cards["reused"].resumed_from_epoch == 3
    assert folder.cards["read"].input is None and folder.cards["read"].source == "predictions"
    assert folder.cards["trained"].input.size == 8 and folder.cards["trained"].history[0]["epoch"] == 1


def test_a_run_folder_written_by_0_1_reads_its_cards(tmp_path):
    cards = RunFolder(OLD_RUN).cards
    assert list(cards) == ["net-a", "net-b"]
    for name, card in cards.items():
        on_disk = json.loads((OLD_RUN / "members" / name / "card.json").read_text())
        assert card.to_json() == on_disk and "source" not in on_disk and card.source == "trained"
        assert card.action == "trained" and card.input.size == 8 and len(card.history) == card.best_epoch == 2
    assert cards["net-b"].temperature == pytest.approx(0.11004534172561177) and cards["net-a"].temperature is None


def test_a_card_from_before_the_zoo_keeps_what_this_version_does_not_know(tmp_path):
    path = tmp_path / "members" / "m" / "card.json"
    path.parent.mkdir(parents=True)
    old = {"name": "m", "backbone": "timm", "plugin": "fusion_engine_timm", "params": {"model": "m"}, "history": [],
           "best_epoch": 4, "n_params": 10, "train_seconds": 1.0, "predict_seconds": 0.1, "val_accuracy": 0.8}
    path.write_text(json.dumps(old))
    card = RunFolder(tmp_path).cards["m"]
    assert card.action is None and card.key is None and card.val_accuracy == 0.8
    assert card.to_json() == old


def test_a_card_that_does_not_read_names_its_file(tmp_path):
    path = tmp_path / "members" / "m" / "card.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"best_epoch": "last"}))
    with pytest.raises(FusionEngineError, match=r"members/m/card.json: does not read as a run's member card \(best_epoch"):
        RunFolder(tmp_path).cards


def test_plots_and_report_are_written_whole_into_the_folder(tmp_path):
    """Plots drawn by forked workers and the report land in the run folder, no temporary file
    left behind."""
    run = Path(shutil.copytree(OLD_RUN, tmp_path / OLD_RUN.name))
    plots = write_plots(run, processes=2)
    report = write_report(run, plots)
    assert sorted(p.path.name for p in plots) == sorted(
        ["confusion_avg.png", "confusion_net-a.png", "confusion_net-b.png", "confusion_stack.png", "pareto.png",
         "reliability.png", "training_curves.png"])
    assert {p.path.parent for p in plots} == {run / "plots"} and report == run / "report.html"
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(p.path.name for p in plots)
    assert not [p for p in run.rglob(".*") if p.name.endswith(".tmp")]


def test_the_codec_modes():
    value = {"a": np.arange(3, dtype=np.int32), "x": np.float32(0.5), "n": np.int64(7), "p": Path("/tmp/f")}
    assert json.loads(encode_json(value)) == {"a": [0, 1, 2], "x": 0.5, "n": 7, "p": "/tmp/f"}
    tagged = to_jsonable(value)
    assert tagged["a"] == {"__ndarray__": [0, 1, 2], "dtype": "int32"}
    back = from_jsonable(json.loads(json.dumps(tagged)))
    assert back["a"].dtype == np.int32 and back["a"].tolist() == [0, 1, 2]
    with pytest.raises(TypeError):
        encode_json({"o": object()})
    with pytest.raises(TypeError):
        plain(object())
    assert encode_json({"o": _Named(), "x": np.float32(0.25)}, fallback=str) == '{"o": "named", "x": 0.25}'


class _Named:
    def __str__(self) -> str:
        return "named"


def test_a_run_card_read_as_a_dict_still_answers_with_a_deprecation_warning(tmp_path):
    card = RunMemberCard(name="m", temperature=1.5)
    with pytest.warns(DeprecationWarning, match=r"read card\.temperature"):
        assert card["temperature"] == 1.5
    with pytest.warns(DeprecationWarning):
        assert card.get("best_epoch", "none") == "none" and card.get("name") == "m"
    with pytest.warns(DeprecationWarning), pytest.raises(KeyError):
        card["best_epoch"]
