"""The command line as a user meets it: exit codes, one-line errors, run folders."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import EXPERIMENTS, TOY_PLUGIN, cli, summary, toy_spec_data, write_spec
from fusion_engine.cli import main


def test_help_and_version():
    assert cli("--help").returncode == 0
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("fusion-engine ")


def test_validate_accepts_a_good_spec_without_importing_torch(toy_spec):
    spec = toy_spec()
    code = f"import sys; from fusion_engine.cli import main; rc = main(['validate', {str(spec)!r}]); " \
           "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{spec}: ok (2 members, 2 fusers, dataset toy-data)"


def test_validate_of_the_quickstart_imports_neither_torch_nor_timm():
    """Its resnet18 and mobilenetv2 give their input config and feature-map check from a table."""
    spec = EXPERIMENTS / "quickstart.yaml"
    code = f"import sys; from fusion_engine.cli import main; rc = main(['validate', {str(spec)!r}]); " \
           "print(sorted(m for m in ('torch', 'timm') if m in sys.modules)); sys.exit(rc)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"


def test_shipped_experiments_validate(cifar10_cached):
    specs = sorted(EXPERIMENTS.glob("*.yaml")) + sorted(EXPERIMENTS.glob("*.toml"))
    assert {"quickstart.yaml", "cifar10.yaml"} <= {p.name for p in specs}
    for spec in specs:
        assert main(["validate", str(spec)]) == 0, spec


@pytest.fixture
def cifar10_cached(tmp_path, monkeypatch):
    """What experiments/cifar10.yaml needs, in a Hugging Face cache made here as `hf download`
    leaves one: the dataset (a few generated images with CIFAR-10's columns and classes) and
    weights of the right shapes for both members' tags. Nothing is downloaded."""
    import io

    import datasets
    import timm
    from huggingface_hub import constants
    from PIL import Image
    from safetensors.torch import save_file

    from hub_cache import populate_hub_cache

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    files = {}
    for split, n in (("train", 10), ("test", 1)):
        rows = [(c, i) for c in range(10) for i in range(n)]
        images = []
        for c, i in rows:
            out = io.BytesIO()
            Image.new("RGB", (32, 32), (25 * c, 40 * i, 90)).save(out, format="PNG")
            images.append({"bytes": out.getvalue(), "path": None})
        path = tmp_path / f"{split}.parquet"
        datasets.Dataset.from_dict({"img": images, "label": [c for c, _ in rows]}, features=features).to_parquet(str(path))
        files[f"plain_text/{split}-00000-of-00001.parquet"] = path
    populate_hub_cache(tmp_path / "hub", "uoft-cs/cifar10", files, repo_type="dataset")
    for tag in ("resnet18.a1_in1k", "mobilenetv2_100.ra_in1k"):
        weights = tmp_path / f"{tag}.safetensors"
        save_file({k: v.contiguous() for k, v in timm.create_model(tag).state_dict().items()}, str(weights))
        populate_hub_cache(tmp_path / "hub", f"timm/{tag}", {"model.safetensors": weights})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def _set(path: tuple, value):
    """A change to the toy spec: the field at ``path`` set to ``value``."""
    def change(data: dict) -> dict:
        *parents, last = path
        target = data
        for part in parents:
            target = target[part]
        if isinstance(last, tuple):  # rename a key
            target[last[1]] = target.pop(last[0])
        else:
            target[last] = value
        return data
    return change


@pytest.mark.parametrize(
    "change, expected",
    [
        (_set(("members", 1, "backbone"), "toy-nett"),
         "members.1.backbone: unknown backbone 'toy-nett' (did you mean 'toy-net'?); installed: "),
        (_set(("members", 0, "train", "epochs"), 0),
         "members.0.train.epochs: Input should be greater than or equal to 1 (got 0)"),
        (_set(("data", "params", ("n_per_class", "n_per_klass")), None),
         "data.params.n_per_klass: unknown field (did you mean 'n_per_class'?)"),
        (_set(("fusers", 0, "fuser"), "nope"), "fusers.0.fuser: unknown fuser 'nope'"),
    ],
)
def test_bad_specs_exit_2_with_one_line(tmp_path, change, expected):
    spec = write_spec(tmp_path / "spec.yaml", change(toy_spec_data()))
    for args in (["validate", spec], ["run", spec, "--registry", tmp_path / "reg"]):
        out = cli(*args)
        assert out.returncode == 2
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        assert out.stderr.startswith(f"{spec}: {expected}")
    assert not (tmp_path / "reg").exists(), "a spec error must not create a run"


def test_missing_spec_file(tmp_path):
    out = cli("run", tmp_path / "nope.yaml")
    assert (out.returncode, out.stderr) == (2, f"{tmp_path / 'nope.yaml'}: no such file\n")


def test_run_writes_a_complete_run_folder(tmp_path, toy_spec):
    spec = toy_spec()
    out = cli("run", spec, "--registry", tmp_path / "reg")
    assert out.returncode == 0, out.stderr
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "reg" / "runs" and run_dir.name.split("-")[2] == "toy"
    for name in ("leaderboard.csv", "leaderboard.md", "leaderboard.json", "spec.yaml", "spec.json", "run.json",
                 "run.log", "split.json", "predictions_test.csv", "fusers/avg.json",
                 "members/net-a/outputs.safetensors", "members/net-b/card.json"):
        assert (run_dir / name).is_file(), name
    for member in ("net-a", "net-b"):  # the weights are stored once, in the zoo, under the member's key
        card = json.loads((run_dir / "members" / member / "card.json").read_text())
        assert card["zoo"] == f"zoo/{card['key']}" and (tmp_path / "reg" / card["zoo"] / "model.safetensors").is_file()

    board = pd.read_csv(run_dir / "leaderboard.csv")
    assert list(board.columns[:9]) == ["rank", "name", "kind", "source", "members", "accuracy",
                                       "precision_macro", "recall_macro", "f1_macro"]
    assert "val_accuracy" in board.columns
    assert sorted(board["name"]) == ["avg", "avg-a", "net-a", "net-b"]
    assert list(board["rank"]) == [1, 2, 3, 4]
    assert board["accuracy"].is_monotonic_decreasing
    assert board.set_index("name").loc["avg", "members"] == "net-a, net-b"
    assert board[["accuracy", "f1_macro", "val_accuracy"]].apply(lambda c: c.between(0, 1).all()).all()

    split = json.loads((run_dir / "split.json").read_text())
    sizes = {s: len(split[s]["ids"]) for s in ("train", "val", "test")}
    assert sizes == {"train": 30, "val": 15, "test": 15}
    assert not set(split["test"]["ids"]) & (set(split["train"]["ids"]) | set(split["val"]["ids"]))
    predictions = pd.read_csv(run_dir / "predictions_test.csv")
    assert list(predictions["id"]) == split["test"]["ids"]
    acc = (predictions["net-a"] == predictions["label"]).mean()
    assert acc == pytest.approx(board.set_index("name").loc["net-a", "accuracy"])
    # one fuser over one member reproduces that member exactly
    assert (predictions["avg-a"] == predictions["net-a"]).all()
    from safetensors.numpy import load_file

    proba = load_file(run_dir / "probabilities.safetensors")
    assert sorted(proba) == sorted(f"{r}/{s}" for r in ("avg", "avg-a", "net-a", "net-b") for s in ("val", "test"))
    assert proba["avg/test"].shape == (15, 3) and np.allclose(proba["avg/test"].sum(1), 1)
    assert (proba["net-a/test"].argmax(1) == predictions["net-a"]).all()

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "complete" and record["trained"] == ["net-a", "net-b"]
    resolved = json.loads((run_dir / "spec.json").read_text())
    assert resolved["members"][0]["params"] == {"width": 4}
    md = (run_dir / "leaderboard.md").read_text().splitlines()
    assert md[0].startswith("| rank | name | kind | source | members | accuracy |") and len(md) == 2 + 4
    assert str(run_dir) in out.stdout and "accuracy" in out.stdout

    report = run_dir / "report.html"
    html = report.read_text()
    assert all(name in html for name in ("avg", "avg-a", "net-a", "net-b"))
    assert any((run_dir / "plots").glob("confusion*.png"))
    report.unlink()
    again = cli("report", run_dir.name[:17], "--registry", tmp_path / "reg")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(report) and report.is_file()
    missing = cli("report", "19990101", "--registry", tmp_path / "reg")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr


def test_run_is_reproducible_on_cpu(toy_run, tmp_path):
    """Another registry, so the members train from scratch again, in another process; everything
    but the timings must agree with the session's toy run."""
    out = cli("run", toy_run.spec, "--registry", tmp_path / "reg", "--quiet")
    assert out.returncode == 0, out.stderr
    run_dir = Path(out.stdout.strip())
    assert summary(run_dir)["trained"] == ["net-a", "net-b"]
    timings = ["train_seconds", "fit_seconds", "infer_ms_per_image", "pareto"]
    boards = [pd.read_csv(d / "leaderboard.csv").drop(columns=timings) for d in (toy_run.run_dir, run_dir)]
    pd.testing.assert_frame_equal(*boards)


def test_quiet_prints_only_the_run_folder_and_env_sets_the_registry(toy_run, toy_registry):
    out = cli("run", toy_run.spec, "--quiet", env={"FUSION_ENGINE_REGISTRY": str(toy_registry)})
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and Path(lines[0]).parent == toy_registry / "runs"
    assert summary(lines[0])["reused"] == ["net-a", "net-b"]


def test_lifecycle_hooks_are_called_in_order(tmp_path, toy_spec, toy_registry):
    tracker = tmp_path / "tracker.py"
    log = tmp_path / "events.txt"
    tracker.write_text(textwrap.dedent(f"""
        from fusion_engine import hookimpl

        def note(text):
            with open({str(log)!r}, "a") as f:
                f.write(text + "\\n")

        @hookimpl
        def on_run_start(run):
            note("start " + run.spec.spec.name + " " + str(run.run_dir.is_dir()))

        @hookimpl
        def on_member_ready(member):
            note("member " + member.name + " " + str(member.logits["test"].shape))

        @hookimpl
        def on_run_end(run, leaderboard):
            note("end " + str(len(leaderboard)))
    """))
    spec = toy_spec(plugins=[str(TOY_PLUGIN), "tracker.py"])
    out = cli("run", spec, "--registry", toy_registry, "--quiet")
    assert out.returncode == 0, out.stderr
    assert log.read_text().splitlines() == ["start toy True", "member net-a (15, 3)", "member net-b (15, 3)", "end 4"]


def test_temperature_options_keep_predictions_and_record_the_temperature(tmp_path, toy_registry):
    data = toy_spec_data()
    data["members"][1]["calibrate"] = "temperature"
    data["fusers"].append({"name": "avg-t", "fuser": "toy-mean", "temperature": True})
    out = cli("run", write_spec(tmp_path / "spec.yaml", data), "--registry", toy_registry, "--quiet")
    assert out.returncode == 0, out.stderr
    run_dir = Path(out.stdout.strip())
    card = json.loads((run_dir / "members" / "net-b" / "card.json").read_text())
    assert card["temperature"] > 0 and json.loads((run_dir / "members/net-a/card.json").read_text())["temperature"] is None
    state = json.loads((run_dir / "fusers" / "avg-t.json").read_text())
    assert state["temperature"] is True and state["state"]["temperature_"] > 0
    predictions = pd.read_csv(run_dir / "predictions_test.csv")
    assert (predictions["avg-t"] == predictions["avg"]).all(), "temperature must not change a prediction"


def test_bad_data_fails_the_run_with_one_line_and_records_it(tmp_path):
    root = tmp_path / "imgs"
    for label, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (root / label).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (12, 12), colour).save(root / label / f"{i}.png")
    (root / "b" / "broken.png").write_bytes(b"not a png")
    spec = write_spec(tmp_path / "spec.yaml", "name: bad\ndevice: cpu\ndata: {dataset: imagefolder, params: {root: imgs}, "
                                              "image_size: 32}\nmembers:\n  - {name: r, backbone: resnet18, train: {epochs: 1}}\n")
    out = cli("run", spec, "--registry", tmp_path / "reg", "--quiet")
    assert (out.returncode, out.stderr) == (2, f"cannot read image {root / 'b' / 'broken.png'}: "
                                               "not an image format Pillow can decode\n")
    (run_dir,) = (tmp_path / "reg" / "runs").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "broken.png" in record["error"]
    assert "broken.png" in (run_dir / "run.log").read_text()


def test_cuda_without_cuda_is_bad_input_before_anything_is_written(tmp_path, toy_spec):
    out = cli("run", toy_spec(), "--registry", tmp_path / "reg", "--device", "cuda")
    assert (out.returncode, out.stderr) == (2, "device 'cuda' was asked for but CUDA is not available; "
                                               "use device: auto or cpu\n")
    assert not (tmp_path / "reg" / "runs").exists()


def test_warnings_logged_from_worker_threads_do_not_hang_a_run(toy_registry, tmp_path):
    """Fusers are cross-fitted on threads; a warning logged on one of them (a cascade whose budget
    no thresholds meet) reaches stderr, and the run ends (the stderr handler once kept its lock)."""
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(
        fusers=[{"name": "tight", "fuser": "cascade", "params": {"budget": 1e-9}}]))
    out = cli("run", spec, "--registry", toy_registry, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "cascade: no thresholds meet a budget" in out.stderr
