"""Members from anywhere: a network trained with a plain PyTorch loop outside the engine, run as it
is from its weights file; a scikit-learn classifier's probabilities, read from a CSV; both fused
with a member the engine trains, and the fused row checked against the same fusion done by hand
in numpy. Then: class orders, moving and changing files, sharing members between registries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import load_file as load_arrays
from safetensors.torch import save_file
from scipy.special import softmax

from conftest import cli, summary, write_spec
from fusion_engine.cli import main
from fusion_engine.runner import run_experiment
from fusion_engine.zoo import Registry

SIZE = 16
DATA = {"dataset": "sklearn-digits", "params": {"n_per_class": 20}, "image_size": SIZE}
TIMM = {"model": "test_resnet", "small_input": True}


def digits_split(folder: Path) -> pd.DataFrame:
    """What `fusion-engine split` says the split is: every id with its split and label."""
    spec = write_spec(folder / "split.yaml", {"name": "ids", "data": DATA, "members": [
        {"name": "m", "backbone": "timm", "params": TIMM}]})
    out = cli("split", spec, "--out", folder / "ids.csv")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{folder / 'ids.csv'}: 120 train, 40 val, 40 test"
    return pd.read_csv(folder / "ids.csv")


def digits_images(ids: list[str]) -> np.ndarray:
    from sklearn.datasets import load_digits

    digits = load_digits()
    index = [int(i.removeprefix("digits-")) for i in ids]
    return np.rint(digits.images[index] * (255 / 16)).astype(np.uint8)


def engine_pixels(ids: list[str]) -> torch.Tensor:
    """The images as the engine feeds the network: resized to SIZE, normalised with the
    architecture's own statistics (timm's data config)."""
    import timm
    from timm.data import resolve_data_config

    from fusion_engine import load_images

    config = resolve_data_config(pretrained_cfg=timm.get_pretrained_cfg(TIMM["model"]).to_dict())
    x = load_images(digits_images(ids), np.arange(len(ids)), SIZE, 3).float() / 255
    mean, std = (torch.tensor(config[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    return (x - mean) / std


@pytest.fixture(scope="module")
def made_elsewhere(tmp_path_factory):
    """A timm network trained by a plain loop, its weights saved; a scikit-learn model's
    probabilities on val and test saved as CSV; the split they were made for."""
    import timm
    from sklearn.linear_model import LogisticRegression

    folder = tmp_path_factory.mktemp("elsewhere")
    ids = digits_split(folder)
    train = ids[ids.split == "train"]
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=10)
    from fusion_engine_timm import adapt_small_input

    adapt_small_input(net, size=SIZE)
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3)
    x, y = engine_pixels(list(train.id)), torch.tensor(train.label.to_numpy())
    net.train()
    for _ in range(3):  # a plain PyTorch loop: full batches, a few epochs
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimiser.step()
    save_file(net.state_dict(), str(folder / "net.safetensors"))

    scored = ids[ids.split != "train"]
    flat = lambda frame: digits_images(list(frame.id)).reshape(len(frame), -1) / 255.0  # noqa: E731
    sk = LogisticRegression(max_iter=200).fit(flat(train), train.label)
    proba = pd.DataFrame(sk.predict_proba(flat(scored)), columns=[str(c) for c in sk.classes_])
    proba.insert(0, "id", list(scored.id))
    proba.to_csv(folder / "sklearn.csv", index=False)
    return folder, net.eval(), ids


def fused_spec(folder: Path, **member_changes) -> Path:
    members = [
        {"name": "engine", "backbone": "timm", "params": TIMM, "train": {"epochs": 1}},
        {"name": "pytorch", "backbone": "timm", "params": TIMM, "train": False, "weights": "net.safetensors"},
        {"name": "sklearn", "predictions": "sklearn.csv", "kind": "probabilities"},
    ]
    for member in members:
        member.update(member_changes.get(member["name"], {}))
    return write_spec(folder / "fused.yaml", {"name": "byo", "data": DATA, "members": members, "fusers": [
        {"name": "mean", "fuser": "mean"}, {"name": "stack", "fuser": "logistic-stacking"}]})


@pytest.fixture(scope="module")
def fused(made_elsewhere):
    folder, _, _ = made_elsewhere
    result = run_experiment(fused_spec(folder), registry=folder / "reg", quiet=True)
    return folder, result


def test_members_from_weights_and_predictions_are_fused_with_a_trained_one(made_elsewhere, fused):
    folder, net, ids = made_elsewhere
    _, result = fused
    record = summary(result.run_dir)
    assert (record["trained"], record["predicted"], record["read"]) == (["engine"], ["engine", "pytorch"], ["sklearn"])
    assert {n: m["source"] for n, m in record["members"].items()} == {
        "engine": "trained", "pytorch": "weights", "sklearn": "predictions"}
    test_ids = list(ids[ids.split == "test"].id)
    outputs = {m: load_arrays(result.run_dir / "members" / m / "outputs.safetensors")["test_logits"]
               for m in ("engine", "pytorch", "sklearn")}
    # the network trained elsewhere, run by hand on the engine's own preprocessing
    with torch.no_grad():
        by_hand = net(engine_pixels(test_ids)).numpy()
    np.testing.assert_allclose(outputs["pytorch"], by_hand, atol=1e-4)
    # the CSV's probabilities, as the member's (through log and softmax)
    csv = pd.read_csv(folder / "sklearn.csv").set_index("id").loc[test_ids, [str(c) for c in range(10)]].to_numpy()
    np.testing.assert_allclose(softmax(outputs["sklearn"].astype(np.float64), axis=1), csv, atol=1e-6)
    # the fused row: the mean of the three members' probabilities, done by hand in numpy
    stored = load_arrays(result.run_dir / "probabilities.safetensors")
    mean = np.mean([softmax(outputs[m].astype(np.float64), axis=1) for m in outputs], axis=0)
    np.testing.assert_allclose(stored["mean/test"], mean, atol=1e-12)
    board = result.leaderboard.set_index("name")
    y = ids[ids.split == "test"].label.to_numpy()
    assert board.loc["mean", "accuracy"] == pytest.approx(np.mean(mean.argmax(1) == y))
    assert board.loc["sklearn", "source"] == "predictions" and board.loc["pytorch", "source"] == "weights"


def test_unknown_costs_are_unknown_never_made_up(fused):
    _, result = fused
    board = result.leaderboard.set_index("name")
    assert np.isnan(board.loc["sklearn", ["n_params", "infer_ms_per_image", "train_seconds"]].astype(float)).all()
    assert board.loc["pytorch", "n_params"] > 0 and np.isnan(board.loc["pytorch", "train_seconds"])
    assert board.loc["pytorch", "infer_ms_per_image"] > 0
    assert np.isnan(float(board.loc["mean", "infer_ms_per_image"]))  # a sum over a member of unknown cost
    assert board.loc["engine", "train_seconds"] > 0
    md = (result.run_dir / "leaderboard.md").read_text()
    out = cli("leaderboard", result.run_id, "--registry", result.run_dir.parent.parent)
    row = next(line for line in out.stdout.splitlines() if "│ sklearn" in line)
    assert row.count("unknown") == 2 and "| sklearn |" in md


def test_a_rerun_reads_runs_and_trains_nothing_and_moving_files_changes_nothing(made_elsewhere, fused, tmp_path):
    folder, _, _ = made_elsewhere
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("net.safetensors", "sklearn.csv"):
        shutil.copy(folder / name, moved / name)
    spec = fused_spec(moved)
    record = summary(run_experiment(spec, registry=folder / "reg", quiet=True).run_dir)
    assert record["reused"] == ["engine", "pytorch", "sklearn"] and record["predicted"] == [] and record["read"] == []
    # new bytes are a new member
    frame = pd.read_csv(moved / "sklearn.csv")
    frame[["0", "1"]] = frame[["1", "0"]].to_numpy()
    frame.to_csv(moved / "sklearn.csv", index=False)
    record = summary(run_experiment(spec, registry=folder / "reg", quiet=True).run_dir)
    assert record["read"] == ["sklearn"] and record["reused"] == ["engine", "pytorch"]


def test_a_checkpoint_in_another_class_order_is_mapped_by_class_names(made_elsewhere, fused, tmp_path):
    """The head's rows in another order, with classes.txt beside the file saying which: the same
    member outputs, column for column."""
    folder, net, _ = made_elsewhere
    _, result = fused
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for name in ("fc.weight", "fc.bias"):
        state[name] = state[name][order]
    other = tmp_path / "shuffled"
    other.mkdir()
    save_file(state, str(other / "net.safetensors"))
    (other / "classes.txt").write_text("\n".join(str(c) for c in order) + "\n")
    shutil.copy(folder / "sklearn.csv", other / "sklearn.csv")
    again = run_experiment(fused_spec(other), registry=tmp_path / "reg", quiet=True)
    logits = [load_arrays(r.run_dir / "members" / "pytorch" / "outputs.safetensors")["test_logits"]
              for r in (result, again)]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)


def test_members_travel_between_registries(made_elsewhere, fused, tmp_path, capsys):
    folder, _, _ = made_elsewhere
    _, result = fused
    keys = {n: m["key"] for n, m in summary(result.run_dir)["members"].items()}
    for key in keys.values():
        assert main(["zoo", "export", key[:12], str(tmp_path / "shared"), "--registry", str(folder / "reg")]) == 0
    exported = sorted((tmp_path / "shared").iterdir())
    assert sorted(p.name for p in exported) == sorted(keys.values())
    assert not (tmp_path / "shared" / keys["sklearn"] / "model.safetensors").exists()  # predictions have no weights
    capsys.readouterr()
    assert main(["zoo", "import", *map(str, exported), "--registry", str(tmp_path / "other"), "--json"]) == 0
    assert sorted(i["name"] for i in json.loads(capsys.readouterr().out) if i["new"]) == sorted(keys)
    record = summary(run_experiment(fused_spec(folder), registry=tmp_path / "other", quiet=True).run_dir)
    assert record["reused"] == ["engine", "pytorch", "sklearn"]
    # a changed byte is refused, and nothing is stored
    target = tmp_path / "shared" / keys["pytorch"] / "outputs.safetensors"
    target.write_bytes(target.read_bytes()[:-1] + b"\0")
    assert main(["zoo", "import", str(target.parent), "--registry", str(tmp_path / "third")]) == 2
    assert capsys.readouterr().err == (f"{target}: its sha256 differs from the one recorded when it was written; "
                                       "not imported\n")
    assert Registry(tmp_path / "third", create=False).entries() == []


def test_zoo_import_stores_a_specs_file_members_without_a_run(made_elsewhere, tmp_path, capsys):
    folder, _, _ = made_elsewhere
    spec = fused_spec(folder)
    assert main(["zoo", "import", str(spec), "--registry", str(tmp_path / "reg"), "--json"]) == 0
    imported = json.loads(capsys.readouterr().out)
    assert sorted((i["name"], i["source"]) for i in imported) == [("pytorch", "weights"), ("sklearn", "predictions")]
    assert not (tmp_path / "reg" / "runs").exists() or not any((tmp_path / "reg" / "runs").iterdir())
    record = summary(run_experiment(spec, registry=tmp_path / "reg", quiet=True).run_dir)
    assert record["reused"] == ["pytorch", "sklearn"] and record["trained"] == ["engine"]
    assert main(["zoo", "import", str(spec), "--member", "engine", "--registry", str(tmp_path / "reg")]) == 2
    assert capsys.readouterr().err.startswith("zoo import: 'engine' is a member to train")


def test_split_writes_paths_for_image_files(make_image_folder, tmp_path):
    root = make_image_folder(per_class=5)
    spec = write_spec(tmp_path / "s.yaml", {"name": "f", "data": {"dataset": "imagefolder", "params": {
        "root": str(root)}}, "members": [{"name": "m", "backbone": "resnet18"}]})
    assert cli("split", spec, "--out", tmp_path / "ids.parquet").returncode == 0
    frame = pd.read_parquet(tmp_path / "ids.parquet")
    assert list(frame.columns) == ["id", "split", "label", "path"] and len(frame) == 15
    assert all(Path(p).is_file() and Path(p).relative_to(root).as_posix() == i for i, p in zip(frame.id, frame.path))


# -- formats, and what a file may hold ---------------------------------------------------------------

CLASSES = ["cat", "dog", "owl"]
IDS = {"train": [f"t{i}" for i in range(6)], "val": [f"v{i}" for i in range(5)], "test": [f"s{i}" for i in range(4)]}


def _probabilities(ids: list[str], seed: int = 0) -> np.ndarray:
    return softmax(np.random.default_rng(seed).normal(size=(len(ids), 3)), axis=1)


def _write(path: Path, ids: list[str], values: np.ndarray, names: list[str] | None, kind: str = "probabilities"):
    """``values`` (columns in ``names`` order) in the format ``path``'s suffix says."""
    from safetensors.numpy import save_file as save_arrays

    if path.suffix in (".csv", ".parquet"):
        frame = pd.DataFrame(values, columns=names)
        frame.insert(0, "id", ids)
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path, index=False)
    elif path.suffix == ".npz":
        np.savez(path, ids=np.array(ids), **{kind: values}, **({"class_names": np.array(names)} if names else {}))
    else:
        meta = {"ids": json.dumps(ids), **({"class_names": json.dumps(names)} if names else {})}
        save_arrays({kind: np.ascontiguousarray(values)}, str(path), metadata=meta)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".npz", ".safetensors"])
def test_every_format_gives_the_same_outputs_in_the_datasets_order(tmp_path, suffix):
    from fusion_engine.predictions import read_predictions

    ids = IDS["val"] + IDS["test"] + ["stranger"]  # rows in any order, train left out, one id not the dataset's
    order = [2, 0, 1]  # the file's columns: owl, cat, dog
    p = _probabilities(ids)
    path = tmp_path / f"p{suffix}"
    _write(path, ids[::-1], p[::-1][:, order], [CLASSES[c] for c in order])
    logits, names = read_predictions(path, kind="probabilities", class_names=None, dataset_classes=CLASSES, ids=IDS)
    assert sorted(logits) == ["test", "val"] and names == ["owl", "cat", "dog"]  # train is optional
    np.testing.assert_allclose(softmax(logits["val"].astype(np.float64), axis=1), p[:5], atol=1e-6)
    np.testing.assert_allclose(softmax(logits["test"].astype(np.float64), axis=1), p[5:9], atol=1e-6)


def test_class_names_order_unnamed_columns_and_train_rows_are_read(tmp_path):
    from fusion_engine.predictions import read_predictions

    ids = IDS["train"] + IDS["val"] + IDS["test"]
    z = np.random.default_rng(1).normal(size=(len(ids), 3))
    np.savez(tmp_path / "p.npz", ids=np.array(ids), logits=z[:, [1, 2, 0]])  # no names in the file: dog, owl, cat
    logits, names = read_predictions(tmp_path / "p.npz", kind="logits", class_names=["dog", "owl", "cat"],
                                     dataset_classes=CLASSES, ids=IDS)
    assert names == ["dog", "owl", "cat"] and sorted(logits) == ["test", "train", "val"]
    np.testing.assert_allclose(logits["train"], z[:6], atol=1e-6)


def test_a_file_with_some_train_rows_leaves_train_out_and_says_so(tmp_path, caplog):
    from fusion_engine.predictions import read_predictions

    ids = IDS["train"][:4] + IDS["val"] + IDS["test"]
    np.savez(tmp_path / "p.npz", ids=np.array(ids), logits=np.random.default_rng(3).normal(size=(len(ids), 3)),
             class_names=np.array(CLASSES))
    with caplog.at_level("WARNING", logger="fusion_engine"):
        logits, _ = read_predictions(tmp_path / "p.npz", kind="logits", class_names=None, dataset_classes=CLASSES,
                                     ids=IDS)
    assert sorted(logits) == ["test", "val"]
    assert "2 of the 6 train ids are missing" in caplog.text and "its train outputs are left out" in caplog.text
    caplog.clear()
    ids = IDS["val"] + IDS["test"]  # no train rows at all: nothing to say
    np.savez(tmp_path / "q.npz", ids=np.array(ids), logits=np.zeros((len(ids), 3)), class_names=np.array(CLASSES))
    with caplog.at_level("WARNING", logger="fusion_engine"):
        read_predictions(tmp_path / "q.npz", kind="logits", class_names=None, dataset_classes=CLASSES, ids=IDS)
    assert "missing" not in caplog.text


def test_probabilities_written_rounded_are_renormalised_with_a_warning(tmp_path, caplog):
    from fusion_engine.predictions import read_predictions

    ids = IDS["val"] + IDS["test"]
    p = np.round(_probabilities(ids, seed=2), 3)
    assert np.abs(p.sum(axis=1) - 1).max() > 1e-6  # the rounding broke the sums
    _write(tmp_path / "p.csv", ids, p, CLASSES)
    with caplog.at_level("WARNING", logger="fusion_engine"):
        logits, _ = read_predictions(tmp_path / "p.csv", kind="probabilities", class_names=None,
                                     dataset_classes=CLASSES, ids=IDS)
    assert "written rounded?); renormalised" in caplog.text
    np.testing.assert_allclose(softmax(logits["val"].astype(np.float64), axis=1).sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(softmax(logits["val"].astype(np.float64), axis=1),
                               p[:5] / p[:5].sum(axis=1, keepdims=True), atol=1e-6)


def test_ids_that_look_like_numbers_stay_ids(tmp_path):
    from fusion_engine.predictions import read_predictions

    ids = {"train": [], "val": ["0001", "0002", "NA"], "test": ["0003", "0004", "1e3"]}
    _write(tmp_path / "p.csv", ids["val"] + ids["test"], _probabilities(ids["val"] + ids["test"]), CLASSES)
    logits, _ = read_predictions(tmp_path / "p.csv", kind="probabilities", class_names=None,
                                 dataset_classes=CLASSES, ids=ids)
    assert logits["val"].shape == (3, 3) and logits["test"].shape == (3, 3)


# -- files that change, folders that are not what they claim ----------------------------------------

def test_a_weights_file_replaced_during_the_run_fails_that_member_not_its_key(tmp_path):
    """The file is checked (and keyed) before the run; a file replaced before the member runs is
    an error for that member, never a member stored under the old file's key."""
    from conftest import TOY_PLUGIN, toy_spec_data

    spec_bad = __import__("test_bad_input")
    spec_bad.toy_weights(tmp_path)
    (tmp_path / "swap.py").write_text(
        "import fusion_engine, pathlib\n"
        "@fusion_engine.hookimpl\n"
        "def on_member_ready(run, member):\n"
        "    if member.name == 'net-a':  # after the first member, before the weights member runs\n"
        f"        pathlib.Path({str(tmp_path / 'w.safetensors')!r}).write_bytes(\n"
        f"            pathlib.Path({str(tmp_path / 'w.safetensors')!r}).read_bytes()[:-4] + b'    ')\n")
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(
        plugins=[str(TOY_PLUGIN), "swap.py"],
        members=[{"name": "net-a", "backbone": "toy-net", "train": {"epochs": 1}},
                 {"name": "w", "backbone": "toy-net", "train": False, "weights": "w.safetensors"}],
        fusers=[]))
    out = cli("run", spec, "--registry", tmp_path / "reg", "--quiet")
    assert out.returncode == 1, out.stderr
    assert "w.safetensors changed after the run checked it" in out.stderr
    assert [e.name for e in Registry(tmp_path / "reg", create=False).entries()] == ["net-a"]


def test_zoo_import_refuses_links_and_members_without_their_weights_and_writes_nothing(fused, tmp_path, capsys):
    folder, result = fused
    key = summary(result.run_dir)["members"]["pytorch"]["key"]
    assert main(["zoo", "export", key, str(tmp_path / "out"), "--registry", str(folder / "reg")]) == 0
    exported = tmp_path / "out" / key
    linked = tmp_path / "linked" / key
    linked.mkdir(parents=True)
    for f in exported.iterdir():
        (linked / f.name).symlink_to(f) if f.name == "card.json" else shutil.copy(f, linked / f.name)
    (exported / "model.safetensors").unlink()
    card = json.loads((exported / "card.json").read_text())
    del card["files"]["model.safetensors"]
    (exported / "card.json").write_text(json.dumps(card))
    capsys.readouterr()
    for source, error in ((linked, "links are not imported"), (exported, "model.safetensors is missing (a weights "
                                                                         "member has model.safetensors, ")):
        assert main(["zoo", "import", str(source), "--registry", str(tmp_path / "target")]) == 2
        err = capsys.readouterr().err
        assert error in err and err.count("\n") == 1, err
    assert not (tmp_path / "target").exists()  # nothing was created


def test_zoo_show_says_where_a_member_came_from_and_invents_nothing(fused, capsys):
    folder, result = fused
    keys = {n: m["key"] for n, m in summary(result.run_dir)["members"].items()}
    shown = {}
    for name in ("pytorch", "sklearn"):
        capsys.readouterr()
        assert main(["zoo", "show", keys[name], "--registry", str(folder / "reg")]) == 0
        shown[name] = dict(line.strip().split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    assert shown["pytorch"]["source"] == "weights" and shown["pytorch"]["from file"].startswith("net.safetensors")
    assert "predicted in" in shown["pytorch"] and "trained in" not in shown["pytorch"]
    assert shown["sklearn"]["source"] == "predictions" and shown["sklearn"]["from file"].startswith("sklearn.csv")
    assert not {"train", "seed", "best epoch", "trained in", "params"} & set(shown["sklearn"])
    card = json.loads((folder / "reg" / "zoo" / keys["sklearn"] / "card.json").read_text())
    assert card["spec"].get("train") is None and card["spec"].get("seed") is None


def test_a_row_with_a_predictions_member_is_not_exported_but_a_weights_member_is(made_elsewhere, fused, tmp_path, capsys):
    """Export (issue 14) of members from elsewhere: a row that fuses the CSV member is refused in
    one line (there is no network to ship); the network trained elsewhere exports and predicts
    the run's stored test probabilities from its own folder."""
    import fusion_engine
    from fusion_engine.runfolder import RunFolder

    folder, _, ids = made_elsewhere
    _, result = fused
    args = [result.run_id, "--registry", str(folder / "reg"), "--out"]
    assert main(["export", args[0], "mean", *args[1:], str(tmp_path / "mean")]) == 2
    assert capsys.readouterr().err == ("row mean uses member sklearn, which was brought as predictions only (no "
                                       "weights): it cannot be exported; export a row without it\n")
    assert not (tmp_path / "mean").exists()
    assert main(["export", args[0], "pytorch", *args[1:], str(tmp_path / "pytorch"), "-q"]) == 0
    ens = fusion_engine.load(tmp_path / "pytorch", device="cpu")
    assert ens.card.members[0].source == "weights" and ens.card.kind == "member"
    test_ids = list(ids[ids.split == "test"].id)
    got = ens.predict_proba(digits_images(test_ids))
    stored = RunFolder(result.run_dir).probabilities("test")["pytorch"]
    assert np.abs(got - stored).max() <= 1e-5


@pytest.mark.skipif(not all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")),
                    reason="needs the onnx extra")
def test_weights_in_another_class_order_export_reordered_in_torch_and_onnx(made_elsewhere, tmp_path):
    """A network whose outputs are in reversed class order (class_names in the spec): the run
    reorders its outputs, and so must the exported folder and its ONNX graph."""
    import fusion_engine
    from fusion_engine.runfolder import RunFolder

    folder, net, ids = made_elsewhere
    reverse = list(range(9, -1, -1))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    head = net.get_classifier()
    name = next(n for n, m in net.named_modules() if m is head)
    for part in ("weight", "bias"):
        state[f"{name}.{part}"] = state[f"{name}.{part}"][reverse].contiguous()
    save_file(state, str(tmp_path / "reversed.safetensors"))
    spec = write_spec(tmp_path / "rev.yaml", {"name": "rev", "data": DATA, "members": [
        {"name": "rev", "backbone": "timm", "params": TIMM, "train": False, "weights": "reversed.safetensors",
         "class_names": [str(c) for c in reverse]}]})
    result = run_experiment(spec, registry=tmp_path / "reg", quiet=True)
    fusion_engine.export_ensemble(result.run_id, "rev", out=tmp_path / "ens", registry=tmp_path / "reg", onnx=True)
    test_ids = list(ids[ids.split == "test"].id)
    stored = RunFolder(result.run_dir).probabilities("test")["rev"]
    with torch.no_grad():
        assert np.abs(stored - softmax(net(engine_pixels(test_ids)).double().numpy(), axis=1)).max() < 1e-4
    images = digits_images(test_ids)
    for runtime, tolerance in (("torch", 1e-5), ("onnx", 1e-4)):
        ens = fusion_engine.load(tmp_path / "ens", runtime=runtime, device="cpu")
        assert np.abs(ens.predict_proba(images) - stored).max() <= tolerance, runtime
    assert fusion_engine.load(tmp_path / "ens").card.members[0].class_order == reverse
