"""Exporting a row, loading it anywhere, predicting new images: what ``fusion-engine export``,
``fusion-engine predict`` and ``fusion_engine.load`` promise, checked against the run's own
stored test probabilities for every first-party fuser, with and without temperature."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import fusion_engine
from conftest import TOY_PLUGIN, cli, toy_spec_data, write_spec
from fusion_engine import FusionEngineError
from fusion_engine.cli import main
from fusion_engine.runfolder import RunFolder

#: every first-party fuser, each also with ``temperature: true`` (row ``<name>-t``)
FUSERS = {
    "mean": ("mean", {}),
    "geometric-mean": ("mean", {"space": "logprob"}),
    "vote": ("vote", {}),
    "weighted": ("weighted", {}),
    "caruana": ("caruana", {}),
    "stack-lr": ("logistic-stacking", {}),
    "stack-xgb": ("xgboost-stacking", {"n_estimators": 30}),
    "cascade": ("cascade", {"max_accuracy_drop": 0.1}),
    "cascade-cal": ("cascade", {"max_accuracy_drop": 0.1, "confidence": "calibrated"}),
}
FUSER_ROWS = [name + t for name in FUSERS for t in ("", "-t")]
ONNX_ROWS = [row for row in FUSER_ROWS if not row.startswith("stack-xgb")] + ["net-a"]

onnx_installed = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")),
    reason="needs the onnx extra")


class DeployRun:
    """The toy members at 12 px (8 px images upsampled as the run's data were), net-a
    temperature-calibrated, with every first-party fuser plain and temperature-scaled, the toy
    plugin's own fuser, and a student (``pupil``) distilled from ``stack-lr``; run once for the
    session, each row exported at most once."""

    def __init__(self, root: Path):
        fusers = [{"name": name + t, "fuser": fuser, "params": params, **({"temperature": True} if t else {})}
                  for name, (fuser, params) in FUSERS.items() for t in ("", "-t")]
        pupil = {"name": "pupil", "backbone": "toy-net", "params": {"width": 5}, "teacher": "stack-lr",
                 "train": {"epochs": 2, "batch_size": 16}}
        spec = toy_spec_data(fusers=[*fusers, {"name": "avg", "fuser": "toy-mean"}], students=[pupil])
        spec["data"]["image_size"] = 12
        spec["members"][0]["calibrate"] = "temperature"
        from fusion_engine.runner import run_experiment

        self.root = root
        self.registry = root / "registry"
        result = run_experiment(write_spec(root / "spec.yaml", spec), registry=self.registry, quiet=True)
        self.run_id = result.run_id
        self.folder = RunFolder(result.run_dir)
        self._exports: dict[tuple, Path] = {}

    def export(self, row: str, *, onnx: bool = True) -> Path:
        key = (row, onnx)
        if key not in self._exports:
            out = self.root / "exports" / (row + ("-onnx" if onnx else ""))
            fusion_engine.export_ensemble(self.run_id, row, out=out, registry=self.registry, onnx=onnx)
            self._exports[key] = out
        return self._exports[key]

    def test_images(self) -> np.ndarray:
        """The run's test images, as the toy dataset holds them (8x8 uint8), in the test split's order."""
        from fusion_engine.plugins import get_plugins

        record = get_plugins([TOY_PLUGIN]).catalog().get("dataset", "toy-data").record
        dataset = record.load(record.params(n_per_class=20))
        where = {i: k for k, i in enumerate(dataset.ids)}
        return dataset.images[[where[i] for i in self.folder.split["test"]["ids"]]]

    def stored(self, row: str) -> np.ndarray:
        return self.folder.probabilities("test")[row]


@pytest.fixture(scope="session")
def deploy_run(tmp_path_factory) -> DeployRun:
    return DeployRun(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="session")
def test_pngs(deploy_run, tmp_path_factory) -> list[Path]:
    """The run's test images as PNG files, one per image, in test order."""
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for i, image in enumerate(deploy_run.test_images()):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


# -- exactness: every row, through the Python API -------------------------------------------------

@pytest.mark.parametrize("row", [*FUSER_ROWS, "avg", "net-a", "net-b", "pupil"])
def test_every_row_exported_predicts_the_runs_stored_test_probabilities(deploy_run, row):
    ens = fusion_engine.load(deploy_run.export(row, onnx=False), device="cpu")
    got = ens.predict_proba(deploy_run.test_images())
    assert np.abs(got - deploy_run.stored(row)).max() <= 1e-5
    assert ens.card.check["max_abs_diff"] <= 1e-5 and ens.card.check["images"] == len(got)


@onnx_installed
@pytest.mark.parametrize("row", ONNX_ROWS)
def test_the_onnx_graph_predicts_them_in_onnx_runtime(deploy_run, row):
    out = deploy_run.export(row)
    ens = fusion_engine.load(out, runtime="onnx")
    got = ens.predict_proba(deploy_run.test_images())
    assert np.abs(got - deploy_run.stored(row)).max() <= 1e-4
    assert np.array_equal(got.argmax(1), deploy_run.stored(row).argmax(1))
    import onnx

    model = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["images_12_gray"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a dynamic batch
    assert [o.name for o in model.graph.output] == ["proba"]


@onnx_installed
@pytest.mark.parametrize("row", ["stack-xgb", "stack-xgb-t"])
def test_xgboost_stacking_in_onnx_matches_its_fuser_on_the_graphs_own_member_logits(deploy_run, row):
    """Trees jump at thresholds, so ONNX Runtime's float32 member logits may move a sample across
    one: the graph's fuser is checked on the graph's own member logits, where it is exact."""
    ens = fusion_engine.load(deploy_run.export(row), runtime="onnx")
    check = ens.card.onnx.check
    assert check["max_abs_diff_fuser"] <= 1e-4
    got = ens.predict_proba(deploy_run.test_images())
    assert np.abs(got - deploy_run.stored(row)).max() == pytest.approx(check["max_abs_diff"], abs=1e-6)


@onnx_installed
def test_a_float32_graph_takes_images_in_0_1(deploy_run):
    out = deploy_run.root / "exports" / "float"
    fusion_engine.export_ensemble(deploy_run.run_id, "stack-lr-t", out=out, registry=deploy_run.registry, onnx=True,
                                  onnx_input="float32")
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("images_12_gray", "tensor(float)")]
    ens = fusion_engine.load(out, runtime="onnx")
    pixels, _ = ens.pixels(list(deploy_run.test_images()))
    from fusion_engine.preprocess import pixels_key

    assert list(pixels) == [pixels_key(ens.input_configs[0])] == [(12, 1, "bilinear", 1.0, "squash")]
    x = pixels[(12, 1, "bilinear", 1.0, "squash")].numpy().astype(np.float32) / 255
    got = session.run(["proba"], {"images_12_gray": x})[0]
    assert np.abs(got - deploy_run.stored("stack-lr-t")).max() <= 1e-4


@pytest.mark.parametrize("row", ["cascade", "cascade-t", "cascade-cal", "cascade-cal-t"])
def test_an_exported_cascade_runs_each_member_only_on_the_images_that_reach_it(deploy_run, row):
    """As the run priced it: each member runs on the test images the run's cascade consulted it
    for (its fusers/<row>.json test_usage), and the probabilities are still the stored ones."""
    ens = fusion_engine.load(deploy_run.export(row, onnx=False), device="cpu")
    images = deploy_run.test_images()
    got = ens.predict_proba(images)
    assert np.abs(got - deploy_run.stored(row)).max() <= 1e-5
    usage = deploy_run.folder.fusers[row]["test_usage"]["consulted"]
    assert ens.usage == {m: round(share * len(images)) for m, share in usage.items()}
    assert min(ens.usage.values()) < len(images) == max(ens.usage.values())


# -- the folder -----------------------------------------------------------------------------------

def test_the_folder_holds_weights_state_card_and_checksums_and_no_pickle(deploy_run):
    out = deploy_run.export("stack-xgb-t", onnx=False)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["SHA256SUMS", "ensemble.json", "fuser.json", "members/net-a/model.safetensors",
                     "members/net-b/model.safetensors", "plugins/toy_plugin.py"]
    card = json.loads((out / "ensemble.json").read_text())
    assert card["format"] == 1 and card["run_id"] == deploy_run.run_id and card["row"] == "stack-xgb-t"
    assert card["classes"] == ["top", "bottom", "dark"] and card["resize"] == "tensor"
    assert card["data"]["fingerprint"] == deploy_run.folder.summary["data"]["fingerprint"]
    assert card["scores"]["accuracy"] == next(r for r in deploy_run.folder.rows if r["name"] == "stack-xgb-t")["accuracy"]
    assert card["spec"]["name"] == "toy"
    net_a, net_b = card["members"]
    assert net_a["temperature"] == deploy_run.folder.cards["net-a"].temperature and net_b["temperature"] is None
    assert net_a["input"] == {"size": 12, "mean": [0.5], "std": [0.5], "in_chans": 1, "interpolation": "bilinear",
                              "crop_pct": 1.0, "crop_mode": "squash"}  # the small-image squash, as the run prepared it
    from fusion_engine.deploy.card import ExportedInput
    from fusion_engine.zoo.card import CardInput

    assert set(ExportedInput.model_fields) <= set(CardInput.model_fields)  # export copies the zoo card's by name
    assert card["fuser"]["temperature"] is True and card["fuser"]["fuser"] == "xgboost-stacking"
    booster = json.loads((out / "fuser.json").read_text())["state"]["fuser_"]["final_estimator_"]["booster"]
    assert "learner" in booster  # XGBoost's own JSON model
    sums = dict(reversed(line.split("  ")) for line in (out / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == [f for f in files if f != "SHA256SUMS"]
    for path in out.rglob("*"):
        if path.is_file():
            assert not path.read_bytes()[:2].startswith(b"\x80"), path  # no pickle


def test_a_copied_folder_predicts_without_the_registry_or_the_plugin_file(deploy_run, tmp_path):
    registry = Path(shutil.copytree(deploy_run.registry, tmp_path / "registry"))
    plugin = tmp_path / "plugins" / "toy_plugin.py"
    plugin.parent.mkdir()
    shutil.copy(TOY_PLUGIN, plugin)
    spec = json.loads((registry / "runs" / deploy_run.run_id / "run.json").read_text())
    spec["spec_file"] = str(tmp_path / "spec.yaml")  # the run's spec lists ../plugins/toy_plugin.py from here
    (registry / "runs" / deploy_run.run_id / "run.json").write_text(json.dumps(spec))
    data = json.loads((registry / "runs" / deploy_run.run_id / "spec.json").read_text())
    data["plugins"] = ["plugins/toy_plugin.py"]
    (registry / "runs" / deploy_run.run_id / "spec.json").write_text(json.dumps(data))
    fusion_engine.export_ensemble(deploy_run.run_id, "vote-t", out=tmp_path / "made", registry=registry)
    shutil.rmtree(registry)
    shutil.rmtree(plugin.parent)
    moved = Path(shutil.move(tmp_path / "made", tmp_path / "elsewhere" / "ens"))
    script = ("import sys, numpy as np, fusion_engine; ens = fusion_engine.load(sys.argv[1], device='cpu'); "
              "print(ens.members, ens.classes); np.save(sys.argv[2], ens.predict_proba(np.load(sys.argv[3])))")
    np.save(tmp_path / "images.npy", deploy_run.test_images())
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", script, moved, tmp_path / "proba.npy", tmp_path / "images.npy"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['net-a', 'net-b'] ['top', 'bottom', 'dark']"
    assert np.abs(np.load(tmp_path / "proba.npy") - deploy_run.stored("vote-t")).max() <= 1e-5


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "members" / "net-b" / "model.safetensors").write_bytes(b"\0" * 10),
     r"members/net-b/model.safetensors: its sha256 differs from the one in SHA256SUMS"),
    (lambda out: (out / "fuser.json").unlink(), r"fuser.json: missing \(listed in SHA256SUMS\)"),
    (lambda out: (out / "SHA256SUMS").unlink(), r"no SHA256SUMS, so its files cannot be checked"),
    (lambda out: (out / "ensemble.json").unlink(), r"ensemble.json: missing \(listed in SHA256SUMS\)"),
    (lambda out: [p.unlink() for p in out.rglob("*") if p.is_file()], r"not an exported ensemble \(no ensemble.json\)"),
], ids=["changed-weights", "missing-state", "no-checksums", "no-card", "empty"])
def test_a_damaged_folder_is_refused_in_one_line(deploy_run, tmp_path, capsys, damage, message):
    out = Path(shutil.copytree(deploy_run.export("vote", onnx=False), tmp_path / "ens"))
    damage(out)
    assert main(["predict", str(out), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_a_folder_from_a_newer_fusion_engine_is_refused(deploy_run, tmp_path):
    from fusion_engine.deploy.card import write_sums

    out = Path(shutil.copytree(deploy_run.export("vote", onnx=False), tmp_path / "ens"))
    card = json.loads((out / "ensemble.json").read_text())
    card.update(format=2, fusion_engine="9.0")
    (out / "ensemble.json").write_text(json.dumps(card))
    write_sums(out)
    with pytest.raises(FusionEngineError, match=r"exported in format 2 by a newer fusion-engine \(9.0\); this one reads "
                                                r"format 1 and older: upgrade fusion-engine$"):
        fusion_engine.load(out)


# -- export: rows, refusals ---------------------------------------------------------------------------

def test_export_defaults_to_the_best_fuser_and_prints_the_folder(toy_run, tmp_path, capsys):
    best = next(r["name"] for r in RunFolder(toy_run.run_dir).rows if r["kind"] == "fuser")
    out = tmp_path / "best"
    assert main(["export", toy_run.run_dir.name[:12], "--out", str(out), "--registry", str(toy_run.registry), "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert fusion_engine.load(out).card.row == best


def test_export_refuses_an_unknown_row_and_an_existing_folder(deploy_run, tmp_path, capsys):
    args = [deploy_run.run_id, "--registry", str(deploy_run.registry)]
    assert main(["export", args[0], "stak-lr", "--out", str(tmp_path / "x"), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"run {deploy_run.run_id} has no row 'stak-lr' (did you mean 'stack-lr'?); its rows: ")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["export", args[0], "vote", "--out", str(tmp_path / "full"), *args[1:]]) == 2
    assert "the folder exists and is not empty; choose another or pass --force" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    # --force replaces an earlier export, and nothing else
    assert main(["export", args[0], "vote", "--out", str(tmp_path / "full"), "--force", "-q", *args[1:]]) == 2
    assert capsys.readouterr().err == (f"--out {tmp_path / 'full'}: the folder is not empty and is not an earlier export "
                                       f"(no ensemble.json); --force replaces only an export: choose another folder\n")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    shutil.copytree(deploy_run.export("mean", onnx=False), tmp_path / "ens")
    assert main(["export", args[0], "vote", "--out", str(tmp_path / "ens"), "--force", "--check", "0", "-q", *args[1:]]) == 0
    assert fusion_engine.load(tmp_path / "ens").card.row == "vote" and fusion_engine.load(tmp_path / "ens").card.check is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens", "full"]  # no scratch folder left beside it


def test_force_never_replaces_the_registry_or_a_run(toy_registry, tmp_path, capsys):
    run_dir = next((toy_registry / "runs").iterdir())
    before = sorted(p.relative_to(toy_registry) for p in toy_registry.rglob("*"))
    for out, where in ((toy_registry, "is the registry"), (run_dir, "is inside the registry"),
                       (toy_registry / "zoo", "is inside the registry"), (tmp_path, "holds the registry")):
        assert main(["export", run_dir.name, "net-a", "--out", str(out), "--force", "--registry", str(toy_registry)]) == 2
        assert capsys.readouterr().err == f"--out {out}: {where} {toy_registry}; export to a folder outside it\n"
    assert sorted(p.relative_to(toy_registry) for p in toy_registry.rglob("*")) == before
    assert main(["leaderboard", run_dir.name, "--registry", str(toy_registry)]) == 0


def test_export_checks_out_before_anything_else(tmp_path, monkeypatch, capsys):
    """``--out .`` and a file on --out's path are refused first: with no registry at all, the
    error is about --out, so no export work was done before it."""
    (tmp_path / "here").mkdir()
    (tmp_path / "image.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "here")
    missing = ["--registry", str(tmp_path / "no-registry")]
    assert main(["export", "some-run", "--out", ".", *missing]) == 2
    assert capsys.readouterr().err == "--out .: is the current folder; export into a new folder, e.g. --out ./here-export\n"
    assert main(["export", "some-run", "--out", "..", "--force", *missing]) == 2
    assert capsys.readouterr().err.startswith("--out ..: is the current folder or holds it; ")
    assert main(["export", "some-run", "--out", "../image.png/ens", *missing]) == 2
    assert capsys.readouterr().err == f"--out ../image.png/ens: {tmp_path / 'image.png'} is a file, not a folder\n"
    assert main(["export", "some-run", "--out", "../new", *missing]) == 2
    assert capsys.readouterr().err == f"no registry at {tmp_path / 'no-registry'}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "image.png"]


def test_an_export_removes_the_scratch_folders_of_killed_exports_to_the_same_place(deploy_run, tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a process that has ended, as a killed export has
    (tmp_path / f".ens.export-{dead}-0a1b2c3d" / "members").mkdir(parents=True)
    (tmp_path / f".ens.replaced-{dead}-0a1b2c3d").mkdir()
    running = tmp_path / f".ens.export-{os.getpid()}-0a1b2c3d"  # an export still under way (this process)
    running.mkdir()
    (tmp_path / ".other.export-1-0a1b2c3d").mkdir()  # another destination's
    fusion_engine.export_ensemble(deploy_run.run_id, "mean", out=tmp_path / "ens", registry=deploy_run.registry,
                                  check_images=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ens", running.name, ".other.export-1-0a1b2c3d"])


def test_a_student_row_exports_with_its_teacher_on_the_card(deploy_run, tmp_path, capsys):
    out = tmp_path / "pupil"
    assert main(["export", deploy_run.run_id, "pupil", "--out", str(out), "--registry", str(deploy_run.registry), "-q"]) == 0
    card = json.loads((out / "ensemble.json").read_text())
    assert card["kind"] == "student" and card["teacher"] == {"name": "stack-lr", "kind": "fuser"}
    assert card["fuser"] is None and [m["name"] for m in card["members"]] == ["pupil"]
    assert card["scores"]["kind"] == "student" and card["scores"]["teacher"] == "stack-lr"
    ens = fusion_engine.load(out)
    assert np.abs(ens.predict_proba(deploy_run.test_images()) - deploy_run.stored("pupil")).max() <= 1e-5
    assert json.loads((deploy_run.export("net-a", onnx=False) / "ensemble.json").read_text())["teacher"] is None


def test_a_row_with_a_predictions_only_member_is_refused_in_one_line(toy_registry, tmp_path, capsys):
    run_dir = next((toy_registry / "runs").iterdir())
    card_path = run_dir / "members" / "net-a" / "card.json"
    card = json.loads(card_path.read_text())
    card["source"] = "predictions"
    card_path.write_text(json.dumps(card))
    args = ["--registry", str(toy_registry), "--out"]
    assert main(["export", run_dir.name, "avg", *args, str(tmp_path / "avg")]) == 2
    assert capsys.readouterr().err == ("row avg uses member net-a, which was brought as predictions only (no weights): "
                                       "it cannot be exported; export a row without it\n")
    assert not (tmp_path / "avg").exists() and not list(tmp_path.glob(".avg*"))
    assert main(["export", run_dir.name, "net-b", *args, str(tmp_path / "b"), "-q"]) == 0


@onnx_installed
def test_a_fuser_without_an_onnx_graph_is_refused_and_nothing_is_left(deploy_run, tmp_path, capsys):
    out = tmp_path / "avg"
    assert main(["export", deploy_run.run_id, "avg", "--onnx", "--out", str(out), "--registry",
                 str(deploy_run.registry)]) == 2
    assert capsys.readouterr().err.endswith("fuser ToyMean has no ONNX graph (it does not implement onnx_proba); "
                                            "export without --onnx\n")
    assert not out.exists() and not list(tmp_path.iterdir())


# -- predict: the command -------------------------------------------------------------------------

def test_predict_files_and_folders_reports_a_corrupt_file_in_its_row(deploy_run, test_pngs, tmp_path):
    """PNG files of the run's 8 px test images are resized to 12 px in torch, as the run's arrays
    were (PIL's resize differs by a grey level on a pixel in five)."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for path in test_pngs[:10]:
        shutil.copy(path, folder / "sub" / path.name)
    (folder / "sub" / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"skipped")
    out = tmp_path / "preds.csv"
    result = cli("predict", deploy_run.export("vote-t", onnx=False), folder, *test_pngs[10:], "--out", out, "--probs")
    assert result.returncode == 1, result.stderr
    n = len(test_pngs)
    assert re.fullmatch(rf"{n} of {n + 1} images predicted by toy/vote-t \(torch, cpu\) in [0-9.]+s; 1 could not be "
                        rf"read \(see the error column\); 1 files in folders skipped as not images -> {re.escape(str(out))}",
                        result.stderr.strip().splitlines()[-1]), result.stderr
    preds = pd.read_csv(out)
    assert list(preds.columns) == ["path", "class", "probability", "class_2", "probability_2", "class_3",
                                   "probability_3", "proba_top", "proba_bottom", "proba_dark", "error"]
    broken = preds[preds["path"].str.endswith("broken.png")]
    assert broken["error"].tolist() == [f"cannot read image {folder / 'sub' / 'broken.png'}: not an image format "
                                        f"Pillow can decode"]
    assert broken["class"].isna().all()
    good = preds.drop(broken.index)
    assert [Path(p).name for p in good["path"]] == [p.name for p in test_pngs]
    stored = deploy_run.stored("vote-t")
    assert np.abs(good[["proba_top", "proba_bottom", "proba_dark"]].to_numpy() - stored).max() <= 1e-5
    assert good["class"].tolist() == [["top", "bottom", "dark"][k] for k in stored.argmax(1)]
    assert np.allclose(good["probability"], stored.max(1))


def test_predict_reads_a_manifest_and_writes_json_or_parquet(deploy_run, test_pngs, tmp_path, capsys):
    manifest = tmp_path / "list.csv"
    pd.DataFrame({"path": [str(p) for p in test_pngs[:3]] + ["gone.png"], "label": ["x"] * 4}).to_csv(manifest, index=False)
    export = str(deploy_run.export("stack-lr", onnx=False))
    assert main(["predict", export, str(manifest), "--out", str(tmp_path / "p.json"), "--top-k", "2", "-q"]) == 1
    assert capsys.readouterr().err == ""
    records = json.loads((tmp_path / "p.json").read_text())
    assert [r["path"] for r in records] == [str(p) for p in test_pngs[:3]] + [str(tmp_path / "gone.png")]
    assert set(records[0]) == {"path", "class", "probability", "top_k", "error"}
    assert len(records[0]["top_k"]) == 2 and records[0]["top_k"][0]["class"] == records[0]["class"]
    assert records[3]["class"] is None and "gone.png" in records[3]["error"]
    assert main(["predict", export, *map(str, test_pngs[:3]), "--out", str(tmp_path / "p.parquet"), "-q"]) == 0
    frame = pd.read_parquet(tmp_path / "p.parquet")
    assert frame["class"].tolist() == [r["class"] for r in records[:3]] and frame["error"].isna().all()


@onnx_installed
def test_predict_runs_the_onnx_graph_with_runtime_onnx(deploy_run, test_pngs, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["predict", str(deploy_run.export("cascade-t")), *map(str, test_pngs), "--runtime", "onnx",
                 "--device", "cpu", "--probs", "--out", str(out)]) == 0
    n = len(test_pngs)
    assert re.fullmatch(rf"{n} of {n} images predicted by toy/cascade-t \(onnx, cpu\) in [0-9.]+s -> {re.escape(str(out))}",
                        capsys.readouterr().err.strip().splitlines()[-1])
    preds = pd.read_csv(out)
    assert np.abs(preds[["proba_top", "proba_bottom", "proba_dark"]].to_numpy() - deploy_run.stored("cascade-t")).max() <= 1e-4


def test_predict_writes_csv_to_stdout_without_out(deploy_run, test_pngs, capsys):
    assert main(["predict", str(deploy_run.export("mean", onnx=False)), str(test_pngs[0]), "--top-k", "1", "-q"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "path,class,probability,error" and lines[1].startswith(f"{test_pngs[0]},")


@pytest.mark.parametrize("args, message", [
    (["--out", "p.xlsx"], "--out p.xlsx: unknown format; use a .csv, .parquet or .json file"),
    (["--top-k", "0"], "--top-k must be at least 1, got 0"),
    (["--runtime", "onnx"], "has no ONNX graph; export it with --onnx to use --runtime onnx"),
])
def test_predict_refuses_bad_options_in_one_line(deploy_run, test_pngs, capsys, args, message):
    assert main(["predict", str(deploy_run.export("mean", onnx=False)), str(test_pngs[0]), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_predict_checks_where_its_output_goes_before_predicting(tmp_path, capsys):
    """Checked before the export folder is even opened: a long predict never ends in an error
    about its --out."""
    (tmp_path / "file.png").write_bytes(b"")
    (tmp_path / "out.csv").mkdir()
    missing_export = str(tmp_path / "no-export")
    for out, message in ((tmp_path / "nodir" / "p.csv", f"its folder {tmp_path / 'nodir'} does not exist; create it first "
                                                         f"or choose another"),
                         (tmp_path / "file.png" / "p.csv", f"{tmp_path / 'file.png'} is a file, not a folder"),
                         (tmp_path / "out.csv", f"is a folder; name a file in it, e.g. {tmp_path / 'out.csv' / 'predictions.csv'}")):
        assert main(["predict", missing_export, str(tmp_path / "file.png"), "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"--out {out}: {message}\n"


def test_predict_into_a_closed_pipe_stops_quietly(deploy_run, test_pngs):
    """``predict ... | head -1``: the reader is gone before the rows are written; no traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "fusion_engine", "predict", str(deploy_run.export("mean", onnx=False)),
                             *map(str, test_pngs), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 141 and err == ""


def test_predict_batch_size_changes_nothing_in_the_output(deploy_run, test_pngs, tmp_path):
    """Rows, classes and errors are the same for every --batch-size; probabilities agree to
    float rounding (a convolution's summation order depends on the batch: ~1e-9 here)."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    inputs = [*map(str, test_pngs[:5]), str(broken), *map(str, test_pngs[5:])]  # a failure inside a batch
    export = str(deploy_run.export("stack-lr", onnx=False))
    frames = []
    for size in ("1", "4", "64"):
        out = tmp_path / f"b{size}.csv"
        assert main(["predict", export, *inputs, "--batch-size", size, "--probs", "--out", str(out), "-q"]) == 1
        frames.append(pd.read_csv(out))
    proba = [c for c in frames[0].columns if c.startswith("prob")]
    for other in frames[1:]:
        assert other.drop(columns=proba).equals(frames[0].drop(columns=proba))
        assert np.abs(other[proba].to_numpy() - frames[0][proba].to_numpy())[~other["error"].notna()].max() <= 1e-7
    preds = frames[0]
    assert preds["error"].notna().tolist() == [i == 5 for i in range(len(inputs))]
    good = preds.drop(5)[["proba_top", "proba_bottom", "proba_dark"]].to_numpy()
    assert np.abs(good - deploy_run.stored("stack-lr")).max() <= 1e-5


def test_predict_finds_the_images_of_a_folder_as_the_imagefolder_dataset_does(deploy_run, make_image_folder, tmp_path,
                                                                                 capsys):
    from fusion_engine.plugins import get_plugins

    root = make_image_folder(per_class=2, size=8)
    (tmp_path / "elsewhere" / "owl").mkdir(parents=True)
    shutil.copy(root / "cat" / "cat-0.png", tmp_path / "elsewhere" / "owl" / "owl-0.png")
    (root / "owl").symlink_to(tmp_path / "elsewhere" / "owl", target_is_directory=True)  # a symlinked class folder
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"skipped")
    Image.new("RGB", (8, 8)).save(root / "dog" / "anim.gif")  # not among the dataset's extensions
    record = get_plugins().catalog().get("dataset", "imagefolder").record
    dataset = record.load(record.params.model_validate({"root": str(root)}))
    out = tmp_path / "p.csv"
    assert main(["predict", str(deploy_run.export("mean", onnx=False)), str(root), "--out", str(out)]) == 0
    assert pd.read_csv(out)["path"].tolist() == [str(root / i) for i in dataset.ids]
    assert "owl/owl-0.png" in dataset.ids
    assert capsys.readouterr().err.strip().endswith(f"2 files in folders skipped as not images -> {out}")


def test_a_folder_of_jpeg_and_png_files_predicts_its_stored_probabilities(make_image_folder, tmp_path):
    """A dataset of files (JPEG and PNG of 48 px, resized to 12 px by PIL after JPEG's draft
    decode) exported and predicted through the CLI: the run's own test files give its stored test
    probabilities, in torch and ONNX Runtime, with a corrupt file among them; and no warning."""
    root = make_image_folder(per_class=5, size=48, suffix=".jpg", noise=True)
    make_image_folder(per_class=5, size=48, suffix=".png", noise=True)
    spec = toy_spec_data(name="files", data={"dataset": "imagefolder", "params": {"root": str(root)}, "image_size": 12,
                                             "split": {"val": 0.25, "test": 0.25}},
                         fusers=[{"name": "stack", "fuser": "logistic-stacking", "temperature": True}])
    spec["members"][0]["calibrate"] = "temperature"
    from fusion_engine.runner import run_experiment

    result = run_experiment(write_spec(tmp_path / "spec.yaml", spec), registry=tmp_path / "registry", quiet=True)
    folder = RunFolder(result.run_dir)
    test_files = [root / i for i in folder.split["test"]["ids"]]
    assert {p.suffix for p in test_files} == {".jpg", ".png"}
    stored = folder.probabilities("test")["stack"]
    onnx = all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))
    export = cli("export", result.run_id, "stack", "--out", tmp_path / "ens", "--registry", tmp_path / "registry", "-q",
                 *(["--onnx"] if onnx else []))
    assert export.returncode == 0 and export.stderr == "", export.stderr
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    for runtime, tolerance in (("torch", 1e-5), *((("onnx", 1e-4),) if onnx else ())):
        out = tmp_path / f"{runtime}.csv"
        done = cli("predict", tmp_path / "ens", *test_files[:3], broken, *test_files[3:], "--probs", "--runtime", runtime,
                   "--out", out, "-q")
        assert done.returncode == 1 and done.stderr == "", done.stderr  # -q: nothing on stderr, not even a warning
        preds = pd.read_csv(out)
        assert preds["error"].notna().tolist() == [i == 3 for i in range(len(test_files) + 1)]
        got = preds.drop(3)[[f"proba_{c}" for c in folder.classes]].to_numpy()
        assert np.abs(got - stored).max() <= tolerance, runtime


def test_the_onnx_runtime_snippet_in_the_docs_decodes_images_as_the_engine_does(make_image_folder):
    """docs/deploying.md's ``load_image`` (PIL and numpy only), run as written, against the
    engine's decoding for a dataset of files: JPEG (where the draft decode matters) and PNG,
    grey and colour, resized and not."""
    from fusion_engine import decode_images

    text = (Path(__file__).parents[1] / "docs" / "deploying.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def load_image" in b)
    namespace: dict = {}
    exec(block[:block.index("card = json.load")], namespace)
    files = sorted(make_image_folder(per_class=2, size=48, suffix=".jpg", noise=True).rglob("*.jpg"))
    files += sorted(make_image_folder(name="png", per_class=1, size=20, noise=True).rglob("*.png"))
    for size in (12, 48):
        for channels in (1, 3):
            engine, errors = decode_images(files, size, channels, "pil")
            assert not errors
            assert np.array_equal(np.stack([namespace["load_image"](p, size, channels) for p in files]), engine.numpy())


def test_predict_with_no_images_found_is_an_error(deploy_run, tmp_path, capsys):
    assert main(["predict", str(deploy_run.export("mean", onnx=False)), str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"no images found in {tmp_path}")


# -- the Python API -------------------------------------------------------------------------------

def test_load_takes_paths_pil_images_arrays_and_tensors_alike(deploy_run, test_pngs):
    ens = fusion_engine.load(deploy_run.export("caruana-t", onnx=False))
    images = deploy_run.test_images()
    expected = deploy_run.stored("caruana-t")
    as_tensor = torch.from_numpy(images)[:, None]  # (N, 1, 8, 8) uint8
    for given in (test_pngs, [str(p) for p in test_pngs], [Image.open(p) for p in test_pngs], images, list(images),
                  as_tensor, as_tensor.float() / 255):
        assert np.abs(ens.predict_proba(given) - expected).max() <= 1e-5
    assert ens.predict(images).tolist() == [ens.classes[k] for k in expected.argmax(1)]
    assert ens.predict_proba(test_pngs[0]).shape == (1, 3)
    assert ens.classes == ["top", "bottom", "dark"] and ens.members == ["net-a", "net-b"]
    assert ens.card.row == "caruana-t" and ens.card.fuser.fuser == "caruana"


def test_a_3d_array_is_a_batch_of_grey_images_for_a_grey_ensemble(deploy_run):
    """The documented rule for an ensemble whose members all take 1 channel: (N, H, W) is a batch
    even when W is 3; one image is (H, W), or a list."""
    ens = fusion_engine.load(deploy_run.export("mean", onnx=False))
    images = deploy_run.test_images()[:3]
    narrow = np.ascontiguousarray(images[:, :, :3])  # (3, 8, 3): three grey images 3 px wide
    assert ens.predict_proba(narrow).shape == (3, 3)
    assert np.array_equal(ens.predict_proba(narrow), ens.predict_proba(list(narrow)))
    assert np.array_equal(ens.predict_proba(images[0]), ens.predict_proba([images[0]]))


def test_the_api_names_bad_images(deploy_run, tmp_path):
    ens = fusion_engine.load(deploy_run.export("mean", onnx=False))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    good = np.zeros((8, 8), np.uint8)
    with pytest.raises(FusionEngineError, match=rf"^1 of 3 images could not be read; the first \(#1\): cannot read image {bad}"):
        ens.predict_proba([good, bad, good])
    batches = list(ens.proba_batches([good, bad, good], batch_size=2))
    assert [b.errors.keys() for b in batches] == [{1}, set()] and np.isnan(batches[0].proba[1]).all()
    with pytest.raises(FusionEngineError, match=r"float images must lie in \[0, 1\]"):
        ens.predict_proba(torch.full((1, 1, 8, 8), 200.0))
    with pytest.raises(FusionEngineError, match="image arrays must be uint8, got float64"):
        ens.predict_proba(np.zeros((2, 8, 8)))
