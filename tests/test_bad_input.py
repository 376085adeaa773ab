"""A catalogue of bad input, as users and plugin authors make it: each is refused by ``validate``
and by ``run`` with exit status 2 and one line naming the problem, before anything is trained,
and the registry is left exactly as it was (no run folder, no index row, no file changed)."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import TOY_PLUGIN, cli, toy_spec_data, write_spec
from fusion_engine.cli import main

TINY_TIMM = "test_resnet"  # timm's smallest ResNet: building it costs nothing


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its sha256: what "untouched" is checked against."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.parent.name != "locks"}


def images(root: Path, classes: dict[str, int], size: int = 12) -> Path:
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (size, size), (40 * c, 7 * i, 90)).save(root / name / f"{i}.png")
    return root


def folder_spec(tmp: Path, **data) -> dict:
    return toy_spec_data(data={"dataset": "imagefolder", "params": {"root": "imgs"}, "image_size": 8, **data})


def only(*members: dict, **fields) -> dict:
    """The toy spec with these members, fused by one mean."""
    return toy_spec_data(members=list(members), fusers=[{"name": "avg", "fuser": "toy-mean"}], **fields)


def timm_spec(**params) -> dict:
    return only({"name": "r", "backbone": "timm", "params": {"model": TINY_TIMM, **params}})


class Exploit:
    def __reduce__(self):
        return (print, ("unpickled!",))


def pickle_weights(tmp: Path) -> dict:
    path = tmp / "weights.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": Exploit()}))
    return timm_spec(pretrained_file=str(path))


def other_architecture(tmp: Path) -> dict:
    import timm
    import torch
    from safetensors.torch import save_file

    with torch.device("cpu"):
        state = timm.create_model("mobilenetv2_050", num_classes=3).state_dict()
    save_file(state, str(tmp / "mobilenet.safetensors"))
    return timm_spec(pretrained_file=str(tmp / "mobilenet.safetensors"))


def wrong_checksum(tmp: Path) -> dict:
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model(TINY_TIMM, num_classes=3).state_dict(), str(tmp / "w.safetensors"))
    return timm_spec(pretrained_file=str(tmp / "w.safetensors"), pretrained_sha256="0" * 64)


def ambiguous_reference(tmp: Path, registry: Path) -> dict:
    """A second stored member called net-a, trained on this data with another seed."""
    from fusion_engine.runner import run_experiment

    other = toy_spec_data()
    other["members"][0]["seed"] = 11
    run_experiment(write_spec(tmp / "other.yaml", other), registry=registry, quiet=True)
    return only({"name": "a", "zoo": "net-a"})


def csv_manifest(tmp: Path, text: str) -> dict:
    images(tmp / "imgs", {"cat": 4, "dog": 4})
    (tmp / "m.csv").write_text(text)
    return toy_spec_data(data={"dataset": "csv", "params": {"path": "m.csv"}, "image_size": 8})


GOOD_CSV = "path,label\n" + "".join(f"imgs/{c}/{i}.png,{c}\n" for c in ("cat", "dog") for i in range(4))

TOY_IDS = [f"toy-{i}" for i in range(60)]  # the toy dataset's 3 x 20 samples
TOY_CLASSES = ["top", "bottom", "dark"]


def toy_weights(tmp: Path, classes: int = 3, names: list[str] | None = None) -> dict:
    import importlib.util

    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location("toy_for_weights", TOY_PLUGIN)
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    save_file(toy.build_toy_net(toy.ToyNetParams(), classes).module.state_dict(), str(tmp / "w.safetensors"))
    if names:
        (tmp / "classes.txt").write_text("\n".join(names))
    return only({"name": "w", "backbone": "toy-net", "train": False, "weights": "w.safetensors"})


def toy_predictions(tmp: Path, text: str | None = None, *, suffix: str = ".csv", kind: str = "probabilities",
                    change=None) -> dict:
    """A predictions file for the toy data: uniform probabilities for every id, then ``change``d."""
    frame = pd.DataFrame({"id": TOY_IDS, **{c: [1 / 3] * len(TOY_IDS) for c in TOY_CLASSES}})
    if change is not None:
        frame = change(frame)
    path = tmp / f"p{suffix}"
    if text is not None:
        path.write_text(text)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".npz":
        np.savez(path, ids=np.array(frame.id), scores=frame[TOY_CLASSES].to_numpy())
    else:
        from safetensors.numpy import save_file

        save_file({kind: frame[TOY_CLASSES].to_numpy()}, str(path))
    return only({"name": "p", "predictions": path.name, "kind": kind})


def npz_predictions(tmp: Path, n_rows: int) -> dict:
    """60 ids in an .npz with ``n_rows`` rows of probabilities."""
    np.savez(tmp / "p.npz", ids=np.array(TOY_IDS), probabilities=np.full((n_rows, 3), 1 / 3))
    return only({"name": "p", "predictions": "p.npz", "kind": "probabilities"})


def cascade_over_predictions(tmp: Path) -> dict:
    spec = toy_predictions(tmp)
    spec["members"].insert(0, {"name": "net-a", "backbone": "toy-net", "train": {"epochs": 1}})
    spec["fusers"] = [{"name": "c", "fuser": "cascade"}]
    return spec


#: a plugin whose code has bugs: a build that loads a state dict that does not fit (no input_config, so
#: preflight builds the network to ask it), a check that raises ValueError, a dataset whose load raises KeyError
BUGGY_PLUGIN = """
from fusion_engine import BackboneRecord, BuiltBackbone, DatasetRecord, InputConfig, Params, hookimpl

class P(Params):
    width: int = 4

def build(params, num_classes, image_size=None):
    import torch
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, num_classes))
    net.load_state_dict({"1.weight": torch.zeros(1)})
    return BuiltBackbone(net, InputConfig(size=8, mean=(0.5,), std=(0.5,), in_chans=1))

def check(params, num_classes, image_size=None):
    raise ValueError("plugin check bug")

def load(params, base_dir):
    return {}["images"]

@hookimpl
def register_backbones():
    return [BackboneRecord("bad-build", build, P),
            BackboneRecord("bad-check", build, P, check=check,
                           input_config=lambda p, image_size=None: InputConfig(size=8, mean=(0.5,), std=(0.5,),
                                                                                in_chans=1))]

@hookimpl
def register_datasets():
    return [DatasetRecord("bad-load", load)]
"""


def buggy_plugin(tmp: Path, **fields) -> dict:
    (tmp / "buggy.py").write_text(BUGGY_PLUGIN)
    return toy_spec_data(plugins=[str(TOY_PLUGIN), "buggy.py"], **fields)


def csv_with_split(tmp: Path, rows: list[tuple[str, str]]) -> dict:
    """A CSV manifest with a split column: ``rows`` of (class, split), one image each."""
    images(tmp / "imgs", {label: sum(r[0] == label for r in rows) for label in dict.fromkeys(r[0] for r in rows)})
    seen: dict[str, int] = {}
    lines = ["path,label,split"]
    for label, part in rows:
        seen[label] = seen.get(label, -1) + 1
        lines.append(f"imgs/{label}/{seen[label]}.png,{label},{part}")
    (tmp / "m.csv").write_text("\n".join(lines) + "\n")
    return toy_spec_data(data={"dataset": "csv", "params": {"path": "m.csv", "split_column": "split"},
                               "image_size": 8})


def with_train(**train) -> dict:
    return only({"name": "a", "backbone": "toy-net", "train": train})


# (id, how to make the spec and its files, a fragment of the one-line error)
CASES = [
    ("plugin-build-raises", lambda t, r: buggy_plugin(t, members=[{"name": "a", "backbone": "bad-build"}], fusers=[]),
     "members.0.params: backbone 'bad-build' (plugin file buggy.py) of member a failed: RuntimeError: Error(s) in loading "
     "state_dict for Sequential: Missing key(s) in state_dict: \"1.bias\". size mismatch for 1.weight"),
    ("plugin-check-raises", lambda t, r: buggy_plugin(t, members=[{"name": "a", "backbone": "bad-check"}], fusers=[]),
     "members.0.params: backbone 'bad-check' (plugin file buggy.py) of member a failed: ValueError: plugin check bug"),
    ("plugin-load-raises", lambda t, r: buggy_plugin(t, data={"dataset": "bad-load"}),
     "data: dataset 'bad-load' (plugin file buggy.py) failed: KeyError: 'images'"),
    ("inf-lr", lambda t, r: with_train(lr=float("inf")), "members.0.train.lr: inf is not a finite number"),
    ("nan-mean", lambda t, r: toy_spec_data(data={**toy_spec_data()["data"], "mean": [float("nan")]}),
     "data.mean.0: nan is not a finite number"),
    ("inf-in-free-params", lambda t, r: timm_spec(kwargs={"drop_path_rate": float("-inf")}),
     "members.0.params.kwargs.drop_path_rate: -inf is not a finite number"),
    ("inf-as-string", lambda t, r: with_train(lr="inf"), "members.0.train.lr: Input should be a finite number"),
    ("mean-weights-for-other-member-count", lambda t, r: toy_spec_data(
        fusers=[{"name": "m", "fuser": "mean", "params": {"weights": [1, 2, 3]}}]),
     "fusers.0.params: fuser m (mean) with 2 members: weights: 3 given for 2 members; give one per member"),
    ("vote-weights-for-fuser-members", lambda t, r: toy_spec_data(
        fusers=[{"name": "v", "fuser": "vote", "members": ["net-a"], "params": {"weights": [1, 1]}}]),
     "fusers.0.params: fuser v (vote) with 1 members: weights: 2 given for 1 members"),
    ("boolean-as-literal-number", lambda t, r: timm_spec(in_chans=True),
     "members.0.params.in_chans: expected a number, not true or false"),
    ("number-as-boolean", lambda t, r: timm_spec(small_input=1),
     "members.0.params.small_input: expected true or false, not a number"),
    ("boolean-in-timm-kwargs", lambda t, r: timm_spec(kwargs={"drop_path_rate": True}),
     "members.0.params: kwargs.drop_path_rate: expected a number, not true (ResNet's drop_path_rate defaults to 0.0)"),
    ("seed-as-huge-float", lambda t, r: toy_spec_data(seed=1e23),
     "seed: Unable to parse input string as an integer, exceeded maximum size (got 1e+23); allowed: an integer from 0 "
     "to 4294967295"),
    # a dataset's own split without val has val drawn from its train split: here too few to draw from
    ("split-without-val", lambda t, r: csv_with_split(t, [(c, p) for c in ("cat", "dog") for p in ("train", "test")]),
     "spec.yaml: data: a stratified split of 2 samples would put 1 in val, fewer than the 2 classes"),
    ("split-without-train", lambda t, r: csv_with_split(t, [(c, p) for c in ("cat", "dog") for p in ("val", "test")]),
     "spec.yaml: data: the dataset's own split (csv manifest {tmp}/m.csv, column 'split') has no train samples"),
    ("class-only-in-test", lambda t, r: csv_with_split(t, [("cat", p) for p in ("train", "val", "test")]
                                                        + [("dog", "val"), ("dog", "test")]),
     "spec.yaml: data: the dataset's own split (csv manifest {tmp}/m.csv, column 'split') gives train only class "
     "'cat'; each split needs samples of at least 2 classes"),
    ("class-missing-from-train", lambda t, r: csv_with_split(
        t, [(c, p) for c in ("cat", "dog") for p in ("train", "val", "test")] + [("cow", "val"), ("cow", "test")]),
     "gives train no samples of class 'cow'; a member cannot learn a class it never sees"),
    ("csv-empty-image", lambda t, r: (csv_manifest(t, GOOD_CSV), (t / "imgs/dog/2.png").write_bytes(b""))[0],
     "line 8: image {tmp}/imgs/dog/2.png is empty (0 bytes)"),
    ("predictions-fewer-rows-than-ids", lambda t, r: npz_predictions(t, 59),
     "{tmp}/p.npz: 60 ids for 59 rows of probabilities; give one id per row"),
    ("predictions-more-rows-than-ids", lambda t, r: npz_predictions(t, 61), "60 ids for 61 rows of probabilities"),
    ("predictions-class-names-conflict", lambda t, r: (lambda spec: (spec["members"][0].update(
        class_names=["dark", "top", "bottom"]), spec)[1])(toy_predictions(t)),
     "{tmp}/p.csv names its classes (top, bottom, dark) and the member's class_names (dark, top, bottom) differ"),
    ("predictions-outside-0-1", lambda t, r: toy_predictions(t, change=lambda f: f.assign(top=-0.2, dark=0.8667)),
     "60 rows hold probabilities outside [0, 1] (first id toy-0); are they logits? (kind: logits)"),
    ("cascade-without-cost", lambda t, r: cascade_over_predictions(t),
     "fusers.0.fuser: fuser c (cascade) needs each member's inference cost, and member p has none (its predictions "
     "were made elsewhere): give that member infer_ms_per_image"),
    ("weights-class-count", lambda t, r: toy_weights(t, classes=5),
     "members.0.weights: weights {tmp}/w.safetensors do not fit the toy-net network this member builds: 2 mis-shaped "
     "(4.weight (file 5x16, network 3x16), 4.bias (file 5, network 3)) (of the 4 tensors the network has); its "
     "classifier is sized for another number of classes? the dataset has 3"),
    ("weights-other-classes", lambda t, r: toy_weights(t, names=["top", "bottom", "cat"]),
     "its classes are not the dataset's: 1 of the dataset's classes missing (dark); 1 classes the dataset does not "
     "have (cat)"),
    ("weights-not-a-state-dict", lambda t, r: ((t / "w.safetensors").write_bytes(b"\x00" * 20),
                                               only({"name": "w", "backbone": "toy-net", "train": False,
                                                     "weights": "w.safetensors"}))[1],
     "members.0.weights: cannot read weights file"),
    ("weights-missing", lambda t, r: only({"name": "w", "backbone": "toy-net", "train": False,
                                           "weights": "absent.safetensors"}), "members.0.weights: no such file:"),
    ("train-false-without-weights", lambda t, r: only({"name": "w", "backbone": "toy-net", "train": False}),
     "members.0.weights: a member with train: false is run as it is: give its weights: FILE"),
    ("weights-but-trained", lambda t, r: only({"name": "w", "backbone": "toy-net", "weights": "w.safetensors"}),
     "members.0.train: a member with weights: is run as it is, not trained: add train: false"),
    ("predictions-missing-ids", lambda t, r: toy_predictions(t, change=lambda f: f.iloc[:-20]),
     "5 of the 15 val ids are missing (toy-40, toy-46, toy-47, ...); `fusion-engine split SPEC --out ids.csv` lists "
     "them"),
    ("predictions-duplicate-ids", lambda t, r: toy_predictions(t, change=lambda f: pd.concat([f, f.iloc[:2]])),
     "{tmp}/p.csv: 2 ids appear more than once (toy-0, toy-1)"),
    ("predictions-extra-class", lambda t, r: toy_predictions(t, change=lambda f: f.assign(cat=0.0)),
     "its classes are not the dataset's: 1 classes the dataset does not have (cat)"),
    ("predictions-nan", lambda t, r: toy_predictions(t, kind="logits", change=lambda f: f.assign(dark=np.nan)),
     "60 rows hold NaN or infinite logits (first id toy-0)"),
    ("predictions-not-summing", lambda t, r: toy_predictions(t, change=lambda f: f.assign(dark=0.5)),
     "60 rows of probabilities do not sum to 1 (first id toy-0: 1.16667)"),
    ("predictions-no-id", lambda t, r: toy_predictions(t, change=lambda f: f.rename(columns={"id": "sample"})),
     "no 'id' column; found: sample, top, bottom, dark"),
    ("predictions-not-numbers", lambda t, r: toy_predictions(t, change=lambda f: f.assign(top="high")),
     "column 'top' holds values that are not numbers (60 rows, first id toy-0)"),
    ("predictions-npz-arrays", lambda t, r: toy_predictions(t, suffix=".npz"),
     "expected arrays 'ids' and 'probabilities', found ids, scores"),
    ("predictions-safetensors-ids", lambda t, r: toy_predictions(t, suffix=".safetensors"),
     "its metadata has no 'ids' (a JSON list of the rows' sample ids)"),
    ("predictions-format", lambda t, r: toy_predictions(t, suffix=".xlsx", text="x"),
     "members.0.predictions: 'p.xlsx' is not one of .csv, .parquet, .pq, .npz, .safetensors"),
    ("predictions-garbage", lambda t, r: toy_predictions(t, suffix=".csv", text="\x00\x01\x02"),
     "{tmp}/p.csv: no 'id' column"),
    ("predictions-kind", lambda t, r: only({"name": "p", "predictions": "p.csv"}),
     "members.0.kind: say what the predictions file holds: kind: logits or kind: probabilities"),
    ("single-class", lambda t, r: (images(t / "imgs", {"cat": 9}), folder_spec(t))[1],
     "data: dataset 'imagefolder' has only class 'cat'; a classifier needs samples of at least 2 classes"),
    ("no-class-folders", lambda t, r: ((t / "imgs").mkdir(), folder_spec(t))[1], "no class folders in"),
    ("empty-class", lambda t, r: (images(t / "imgs", {"cat": 5, "dog": 0}), (t / "imgs/dog/notes.txt").write_text("x"),
                                   folder_spec(t))[2], "class 'dog' has no images in"),
    ("too-few-per-class", lambda t, r: (images(t / "imgs", {"cat": 5, "dog": 2}), folder_spec(t))[1],
     "class 'dog' has only 2 samples; a stratified train/val/test split needs at least 3 per class"),
    ("csv-missing-column", lambda t, r: csv_manifest(t, GOOD_CSV.replace("label", "class", 1)),
     "missing columns: label"),
    ("csv-missing-image", lambda t, r: csv_manifest(t, GOOD_CSV + "imgs/cat/99.png,cat\n"), "no such image"),
    ("csv-empty-label", lambda t, r: csv_manifest(t, GOOD_CSV.replace("imgs/dog/3.png,dog", "imgs/dog/3.png,")),
     "empty label"),
    ("weights-of-another-architecture", lambda t, r: other_architecture(t),
     f"members.0.params: pretrained_file {{tmp}}/mobilenet.safetensors does not fit timm model '{TINY_TIMM}': "),
    ("weights-checksum", lambda t, r: wrong_checksum(t), "checksum mismatch for"),
    ("weights-pickle", lambda t, r: pickle_weights(t), "holds pickled Python objects, which are never loaded"),
    ("unknown-timm-model", lambda t, r: timm_spec(model="resnet19"), "unknown timm model 'resnet19'; did you mean"),
    ("small-input-transformer", lambda t, r: only({"name": "v", "backbone": "timm", "params": {
        "model": "test_vit", "small_input": True}}), "small_input cannot adapt timm model 'test_vit'"),
    ("mean-length", lambda t, r: {**toy_spec_data(), "data": {**toy_spec_data()["data"], "mean": [0.5, 0.5]}},
     "data.mean has 2 values but the backbone takes 1 channels; give 1"),
    ("seed-range", lambda t, r: toy_spec_data(seed=10**23), "seed: Input should be less than or equal to 4294967295"),
    ("boolean-as-number", lambda t, r: only({"name": "a", "backbone": "toy-net", "train": {"lr": True}}),
     "members.0.train.lr: expected a number, not true or false"),
    ("duplicate-key", lambda t, r: "name: a\n" + yaml.safe_dump({k: v for k, v in toy_spec_data().items() if k != "name"})
     + "name: b\n", "key 'name' is given twice (first on line 1); give it once"),
    ("ambiguous-reference", lambda t, r: ambiguous_reference(t, r), "members.0.zoo: 'net-a' is ambiguous: 2 zoo members"),
]


@pytest.mark.parametrize("make, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_the_registry_as_it_was(tmp_path, toy_registry, capsys, make,
                                                                           fragment):
    made = make(tmp_path, toy_registry)
    spec = tmp_path / "spec.yaml"
    spec.write_text(made) if isinstance(made, str) else write_spec(spec, made)
    before = tree(toy_registry)
    fragment = fragment.replace("{tmp}", str(tmp_path))
    for args in (["validate", str(spec), "--registry", str(toy_registry)],
                 ["run", str(spec), "--registry", str(toy_registry), "--quiet"]):
        capsys.readouterr()
        assert main(args) == 2, args
        out = capsys.readouterr()
        assert out.err.count("\n") == 1 and fragment in out.err, (args[0], out.err)
        assert out.out == ""
    assert tree(toy_registry) == before


def test_yaml_anchors_and_merge_keys_are_read(tmp_path, capsys):
    """``<<: *anchor`` copies a mapping's keys, the mapping's own keys win; only a key given twice
    in the mapping itself is refused."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""name: t
plugins: [{TOY_PLUGIN}]
data: {{dataset: toy-data}}
members:
  - &m {{name: a, backbone: toy-net, train: {{epochs: 1}}}}
  - <<: *m
    name: b
fusers: [{{name: avg, fuser: toy-mean}}]
""")
    assert main(["validate", str(spec)]) == 0, capsys.readouterr().err
    from fusion_engine.specfile import load_spec

    members = load_spec(spec).members
    assert [(m.name, m.backbone, m.train.epochs) for m in members] == [("a", "toy-net", 1), ("b", "toy-net", 1)]
    spec.write_text(spec.read_text().replace("    name: b\n", "    name: b\n    name: c\n"))
    assert main(["validate", str(spec)]) == 2
    assert "line 8: key 'name' is given twice (first on line 7); give it once" in capsys.readouterr().err


def test_a_class_missing_from_test_is_a_warning_and_the_run_goes_on(tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", csv_with_split(
        tmp_path, [(c, p) for c in ("cat", "dog") for p in ("train", "train", "val")] + [("cat", "test")] * 2
        + [("cow", p) for p in ("train", "val", "test")]))
    assert main(["validate", str(spec)]) == 0
    assert (f"the dataset's own split (csv manifest {tmp_path}/m.csv, column 'split') gives test no samples of class "
            f"'dog'; test scores leave that class out") in capsys.readouterr().err


def test_an_unknown_member_for_retrain_is_refused_before_the_run(toy_spec, toy_registry, capsys):
    before = tree(toy_registry)
    assert main(["run", str(toy_spec()), "--registry", str(toy_registry), "--retrain", "net-z", "--quiet"]) == 2
    assert capsys.readouterr().err == "--retrain: no member of toy is called 'net-z'; members it trains: net-a, net-b\n"
    assert tree(toy_registry) == before


def test_retrain_naming_nothing_is_refused_before_the_run(toy_spec, toy_registry, capsys):
    before = tree(toy_registry)
    assert main(["run", str(toy_spec()), "--registry", str(toy_registry), "--retrain", ",", "--quiet"]) == 2
    assert capsys.readouterr().err == "--retrain ',' names no member; give NAME[,NAME...] or all\n"
    assert tree(toy_registry) == before


@pytest.mark.parametrize("args, line", [
    (["run"], "fusion-engine run: the following arguments are required: SPEC (see fusion-engine run --help)"),
    (["zoo", "lst"], "fusion-engine zoo: argument ZOO_COMMAND: invalid choice: 'lst' (choose from 'list', 'show', "
                     "'rm', 'gc', 'export', 'import'); did you mean 'list'? (see fusion-engine zoo --help)"),
    (["run", "spec.yaml", "--device", "gpu"], "fusion-engine run: argument --device: invalid choice: 'gpu' (choose "
                                              "from 'auto', 'cpu', 'cuda'); did you mean 'cpu'? (see fusion-engine run "
                                              "--help)"),
])
def test_command_line_errors_are_one_line(args, line):
    out = cli(*args)
    assert (out.returncode, out.stderr, out.stdout) == (2, line + "\n", "")


def test_a_pickled_weights_file_prints_no_library_warning(tmp_path):
    """torch warns before it refuses a pickle; the user sees one line, in a fresh process."""
    spec = write_spec(tmp_path / "spec.yaml", pickle_weights(tmp_path))
    out = cli("validate", spec)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "unpickled!" not in out.stdout + out.stderr


def test_skipped_files_are_counted_once_in_validate_and_in_the_run(tmp_path, capsys):
    root = images(tmp_path / "imgs", {"cat": 6, "dog": 6})
    for name in ("notes.txt", "labels.json", "README"):
        (root / "cat" / name).write_text("x")
    (root / "dog" / "more.txt").write_text("x")
    spec = write_spec(tmp_path / "spec.yaml", folder_spec(tmp_path))
    warning = (f"imagefolder: skipped 4 files under {root} that are not images (2 .txt, 1 .json, 1 without an "
               f"extension)")
    assert main(["validate", str(spec)]) == 0
    err = capsys.readouterr().err
    assert err.count(warning) == 1
    assert main(["run", str(spec), "--registry", str(tmp_path / "reg"), "--quiet"]) == 0
    run_dir = Path(capsys.readouterr().out.strip())
    summary = json.loads((run_dir / "run.json").read_text())
    assert [w for w in summary["warnings"] if w.startswith(warning)] and warning in (run_dir / "run.log").read_text()


def test_a_collapsing_feature_map_is_a_warning_naming_the_size_that_keeps_one(tmp_path, capsys):
    spec = write_spec(tmp_path / "spec.yaml", only({"name": "r", "backbone": "resnet18", "params": {
        "small_input": False, "in_chans": 1}}, data={"dataset": "toy-data", "image_size": 28}))
    assert main(["validate", str(spec)]) == 0
    assert ("timm model 'resnet18' at 28 px ends in a 1x1 feature map (small_input is off), which leaves little to "
            "classify; use data.image_size >= 40 or small_input: true to keep a 2x2 map") in capsys.readouterr().err
