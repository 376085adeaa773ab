"""Images within a memory budget: the same member, whether its images are held in memory, read
per batch from the decoded-image cache on disk, or decoded per batch in worker processes; the
choice logged with its figures; the budget and storage settable in the spec."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import cli, toy_spec_data, write_spec
from fusion_engine import FusionEngineError, InputConfig
from fusion_engine.decoded_cache import DecodedCache, decoded_cache
from fusion_engine.imagesets import ImageSet, open_images
from fusion_engine.memory import available_memory, memory_budget, parse_budget
from fusion_engine.preprocess import load_images
from fusion_engine.runner import run_experiment
from fusion_engine.stores import open_store

CFG = InputConfig(size=8, mean=(0.5,), std=(0.5,), in_chans=1)


def folder_spec(tmp_path: Path, name: str, students: list | None = None, **data) -> Path:
    """The toy members on a folder of tiny PNGs, with ``data`` fields (and ``students``) added."""
    return write_spec(tmp_path / f"{name}.yaml", toy_spec_data(
        name=name, data={"dataset": "imagefolder", "params": {"root": "images"}, "image_size": 8,
                         "split": {"val": 0.25, "test": 0.25}, **data},
        members=[{"name": "net-a", "backbone": "toy-net", "train": {"epochs": 2, "batch_size": 8}},
                 {"name": "net-b", "backbone": "toy-net", "seed": 5,
                  "train": {"epochs": 2, "batch_size": 5,  # random erasing draws torch's global generator
                            "augment": {"hflip": True, "shift": 0.25, "re_prob": 0.5}}}],
        fusers=[{"name": "avg", "fuser": "toy-mean"}], students=students or []))


def outputs(registry: Path, run: dict) -> dict:
    """Each member's stored weights and logits."""
    found = {}
    for name, member in run["members"].items():
        folder = registry / "zoo" / member["key"]
        found[name] = {**load_file(str(folder / "model.safetensors")), **load_file(str(folder / "outputs.safetensors"))}
    return found


@pytest.mark.parametrize("storage", ["disk", "stream"])
def test_a_member_trains_to_the_same_weights_from_memory_from_disk_and_streamed(make_image_folder, tmp_path, storage):
    make_image_folder(per_class=8, size=20)
    memory = run_experiment(folder_spec(tmp_path, "memory", storage="memory"), registry=tmp_path / "a", quiet=True)
    other = run_experiment(folder_spec(tmp_path, storage, storage=storage, workers=2 if storage == "stream" else 0),
                           registry=tmp_path / "b", quiet=True)
    first = json.loads((memory.run_dir / "run.json").read_text())
    second = json.loads((other.run_dir / "run.json").read_text())
    assert first["members"]["net-a"]["key"] == second["members"]["net-a"]["key"]  # where images live is not in the key
    a, b = outputs(tmp_path / "a", first), outputs(tmp_path / "b", second)
    for member in a:
        assert a[member].keys() == b[member].keys()
        for tensor in a[member]:
            np.testing.assert_array_equal(a[member][tensor], b[member][tensor], err_msg=f"{member} {tensor}")
    log = (other.run_dir / "run.log").read_text()
    expected = "reading them from the decoded-image cache" if storage == "disk" else "decoding them per batch"
    assert expected in log and "data.storage: " + storage in log


@pytest.mark.parametrize("storage", ["disk", "stream"])
def test_a_student_distils_to_the_same_weights_from_memory_from_disk_and_streamed(make_image_folder, tmp_path, storage):
    """Its teacher's probabilities follow its images into each shuffled batch, whichever way they are read."""
    make_image_folder(per_class=8, size=20)
    pupil = [{"name": "pupil", "backbone": "toy-net", "teacher": "avg", "distill": {"alpha": 0.9, "temperature": 2.0},
              "train": {"epochs": 2, "batch_size": 5, "augment": {"hflip": True}}}]
    memory = run_experiment(folder_spec(tmp_path, "memory", pupil, storage="memory"), registry=tmp_path / "a", quiet=True)
    other = run_experiment(folder_spec(tmp_path, storage, pupil, storage=storage, workers=2 if storage == "stream" else 0),
                           registry=tmp_path / "b", quiet=True)
    first = json.loads((memory.run_dir / "run.json").read_text())
    second = json.loads((other.run_dir / "run.json").read_text())
    assert first["members"]["pupil"]["source"] == "student"
    assert first["members"]["pupil"]["key"] == second["members"]["pupil"]["key"]  # the same soft targets
    a, b = outputs(tmp_path / "a", first)["pupil"], outputs(tmp_path / "b", second)["pupil"]
    assert a.keys() == b.keys() and "val_logits" in a
    for tensor in a:
        np.testing.assert_array_equal(a[tensor], b[tensor], err_msg=f"pupil {tensor}")


def test_data_over_the_budget_is_streamed_or_read_from_disk_and_the_choice_is_logged(make_image_folder, tmp_path):
    make_image_folder(per_class=8, size=20)
    result = run_experiment(folder_spec(tmp_path, "small", memory_budget="100B"), registry=tmp_path / "reg", quiet=True)
    log = (result.run_dir / "run.log").read_text()
    # 12 train images of 1 x 8 x 8 are 768 bytes: over a 100-byte budget; the cache is written, then measured
    assert "12 images at 8 px (0.0 MB decoded) exceed the memory budget (0.0 MB, data.memory_budget 0.0 MB)" in log
    assert "decoding them once into the decoded-image cache" in log
    assert "measured per image: reading the cache" in log and " ms, decoding " in log
    assert json.loads((result.run_dir / "run.json").read_text())["status"] == "complete"


def test_every_storage_gives_the_same_batches_in_the_order_asked(make_image_folder, tmp_path):
    root = make_image_folder(per_class=6, size=13)
    paths = sorted(root.rglob("*.png"))
    rows = {"train": np.array([0, 3, 5, 7, 8, 9, 12, 15, 16, 17]), "val": np.array([1, 2, 4, 6])}
    positions = [np.array([3, 0, 9]), np.array([1]), np.array([8, 2, 5, 4, 6, 7])]
    expected = load_images(paths, rows["train"], CFG)
    for storage, workers in (("memory", 0), ("disk", 0), ("stream", 0), ("stream", 2)):
        sets = open_images(paths, rows, CFG, fingerprint="f" * 64, cache_dir=tmp_path / storage, storage=storage,
                           workers=workers)
        assert sets["train"].storage == storage
        got = list(sets["train"].batches(positions))
        for idx, batch in zip(positions, got):
            assert batch.equal(expected[idx]), (storage, workers)
        assert sets["val"].tensor().equal(load_images(paths, rows["val"], CFG))


def test_an_image_set_pickles_as_what_reopens_it_not_its_pixels(make_image_folder, tmp_path):
    root = make_image_folder(per_class=20, size=16)
    paths = sorted(root.rglob("*.png"))
    cfg = InputConfig(size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    sets = open_images(paths, {"train": np.arange(60)}, cfg, fingerprint="e" * 64, cache_dir=tmp_path / "cache")
    pixels = sets["train"].tensor()  # opened: decoded and cached
    wire = pickle.dumps(sets["train"])
    assert len(wire) < pixels.nbytes / 4  # 60 x 3 x 32 x 32 = 184 kB of pixels; the paths are a few kB
    again = pickle.loads(wire)
    assert not again.opened
    assert again.tensor().equal(pixels)  # reopened from the cache file the driver wrote


def test_a_corrupt_image_met_while_streaming_is_one_line_naming_it(make_image_folder, tmp_path):
    root = make_image_folder(per_class=4, size=12)
    paths = sorted(root.rglob("*.png"))
    paths[5].write_bytes(b"not a png")
    sets = open_images(paths, {"train": np.arange(len(paths))}, CFG, fingerprint="d" * 64, cache_dir=None,
                       storage="stream", workers=2)
    with pytest.raises(FusionEngineError) as error:
        list(sets["train"].sequential(4))
    assert str(error.value) == f"cannot read image {paths[5]}: not an image format Pillow can decode"


def test_the_decoded_cache_is_a_safetensors_file_read_by_rows(tmp_path, make_image_folder):
    from safetensors.torch import load_file as load_tensors

    root = make_image_folder(per_class=3, size=10)
    paths = sorted(root.rglob("*.png"))
    cache = decoded_cache(tmp_path, "c" * 64, CFG, len(paths))
    cache.write(paths, CFG)
    everything = load_tensors(str(cache.path))["images"]  # a plain safetensors file
    assert everything.equal(load_images(paths, np.arange(len(paths)), CFG))
    assert cache.check() is None
    assert cache.read(np.array([7, 2, 3])).equal(everything[[7, 2, 3]])
    assert cache.read(np.array([3, 4, 5])).equal(everything[3:6])
    other = DecodedCache(cache.path, cache.shape, {"fingerprint": "0" * 64})
    assert other.check() == "was written for other data"


def test_the_budget_is_a_fraction_of_available_memory_or_a_size():
    assert parse_budget(None) == (0.5, None)
    assert parse_budget(0.25) == (0.25, None)
    assert parse_budget("8GB") == (None, 8_000_000_000)
    assert parse_budget("512MiB") == (None, 512 * 2**20)
    budget, why = memory_budget(0.25)
    assert budget == pytest.approx(0.25 * available_memory(), rel=0.05) and why.startswith("25% of ")
    assert memory_budget("2GB") == (2_000_000_000, "data.memory_budget 2.00 GB")
    for bad, message in ((2, "a fraction of the available memory, in \\(0, 1\\]"), ("lots", "'lots' is not a size")):
        with pytest.raises(ValueError, match=message):
            parse_budget(bad)


def test_image_sets_opened_in_a_task_share_one_budget_scaled_by_the_tasks_share(make_image_folder, monkeypatch):
    import fusion_engine.memory
    from fusion_engine import share_memory_budget

    train_bytes = 8 * 8 * 8  # 8 grey images at 8 px; val is 4 of them
    monkeypatch.setattr(fusion_engine.memory, "available_memory", lambda: 4 * train_bytes)
    assert memory_budget(0.5, share=0.25) == (train_bytes // 2, "50% of 0.0 MB available, times this task's share "
                                                                 "of the machine, 0.25")
    assert memory_budget("2GB", share=0.25)[0] == 2_000_000_000  # a size is each task's
    paths = sorted(make_image_folder(per_class=4, size=12).rglob("*.png"))

    def task_sets(share: float) -> dict:
        sets = open_images(paths, {"train": np.arange(8), "val": np.arange(8, 12)}, CFG, fingerprint="b" * 64,
                           cache_dir=None, workers=0, budget_setting=0.5)
        sets = pickle.loads(pickle.dumps(sets))  # as a Ray task gets them: without the driver's budget
        share_memory_budget(sets.values(), share)
        return {split: sets[split].storage for split in ("train", "val")}

    assert task_sets(1.0) == {"train": "memory", "val": "memory"}  # 2 x train_bytes for both
    assert task_sets(0.5) == {"train": "memory", "val": "stream"}  # train_bytes: what train holds leaves val nothing
    assert task_sets(0.25) == {"train": "stream", "val": "memory"}  # half of train's bytes: val's 4 images fit


def test_image_sets_opened_in_another_process_never_write_the_cache(make_image_folder, tmp_path):
    paths = sorted(make_image_folder(per_class=4, size=12).rglob("*.png"))
    for storage, expected in (("memory", "memory"), ("disk", "stream"), ("auto", "memory")):
        sets = open_images(paths, {"train": np.arange(8)}, CFG, fingerprint="c" * 64, cache_dir=tmp_path / "cache",
                           storage=storage, workers=0, budget_setting="1GB")
        there = pickle.loads(pickle.dumps(sets))["train"]  # as a Ray task gets it: the cache's path, not to write
        assert there.tensor().equal(load_images(paths, np.arange(8), CFG))
        assert there.storage == expected and not (tmp_path / "cache").exists(), storage
    here = open_images(paths, {"train": np.arange(8)}, CFG, fingerprint="c" * 64, cache_dir=tmp_path / "cache",
                       workers=0, budget_setting="1GB")["train"]
    assert here.tensor().equal(load_images(paths, np.arange(8), CFG)) and len(list((tmp_path / "cache").iterdir())) == 1


def test_a_cgroup_limit_counts_its_working_set_not_its_page_cache(tmp_path):
    from fusion_engine.memory import _cgroup_headroom

    def cgroup(lines: str, files: dict[str, str]):
        proc = tmp_path / "proc-cgroup"
        proc.write_text(lines)
        for name, text in files.items():
            (tmp_path / "sys" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "sys" / name).write_text(text)
        return _cgroup_headroom(proc, tmp_path / "sys")

    gib = 2**30
    # v2: 4 GiB limit, 3 GiB charged of which 2 GiB is droppable page cache (a dataset just read)
    assert cgroup("0::/job\n", {"job/memory.max": f"{4 * gib}\n", "job/memory.current": f"{3 * gib}\n",
                                 "job/memory.stat": f"anon 1\ninactive_file {2 * gib}\nactive_file 5\n"}) == 3 * gib
    assert cgroup("0::/free\n", {"free/memory.max": "max\n", "free/memory.current": "1\n"}) is None
    # v1, and a hybrid host whose v2 line has no memory files: the v1 memory controller is read
    v1 = {"memory/box/memory.limit_in_bytes": f"{2 * gib}", "memory/box/memory.usage_in_bytes": f"{gib}",
          "memory/box/memory.stat": f"cache 9\ntotal_inactive_file {gib // 2}\n"}
    assert cgroup("4:memory:/box\n", v1) == 2 * gib - gib // 2
    assert cgroup("0::/user.slice\n5:cpu,cpuacct:/x\n4:memory:/box\n", v1) == 2 * gib - gib // 2
    assert cgroup("4:memory:/box\n", {"memory/box/memory.limit_in_bytes": str(2**63 - 4096)}) is None  # no limit


def test_bad_loading_settings_are_one_line_errors(tmp_path):
    for data, message in (({"memory_budget": 3}, "data.memory_budget: a number is a fraction of the available memory"),
                          ({"memory_budget": "a lot"}, "data.memory_budget: 'a lot' is not a size"),
                          ({"memory_budget": "8i"}, "data.memory_budget: '8i' is not a size"),
                          ({"memory_budget": True}, "data.memory_budget: expected a number, not true or false"),
                          ({"storage": "tape"}, "data.storage: Input should be 'auto', 'memory', 'disk' or 'stream'"),
                          ({"workers": -1}, "data.workers: Input should be greater than or equal to 0")):
        spec = write_spec(tmp_path / "bad.yaml", toy_spec_data(data={"dataset": "toy-data", **data}))
        result = cli("validate", spec)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_arrays_over_the_budget_are_resized_per_batch(caplog):
    import logging

    images = np.random.default_rng(0).integers(0, 255, (10, 6, 6), dtype=np.uint8)
    with caplog.at_level(logging.INFO, logger="fusion_engine"):
        store = open_store(images, CFG, cache=None, budget=10, budget_text="test")
    assert store.storage == "stream" and "they are arrays in memory, resized per batch" in caplog.text
    [batch] = list(store.batches([np.array([4, 1])]))
    assert batch.equal(load_images(images, [4, 1], CFG))


def test_a_tensor_is_an_image_set_in_memory():
    import torch

    x = torch.randint(0, 255, (5, 1, 8, 8), dtype=torch.uint8)
    images = ImageSet.of(x, CFG)
    assert len(images) == 5 and images.storage == "memory" and images.tensor() is x
    assert np.array_equal(images.items[2], x[2, 0].numpy())  # its own images, for a training transform


PEAK_RSS = """
import resource, sys
from fusion_engine.cli import main
status = main(sys.argv[1:])
print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(status)
"""


def test_a_run_over_its_memory_budget_never_holds_its_images_and_scores_the_same(make_image_folder, tmp_path):
    import subprocess
    import sys

    # 1,002 images that decode to 256 x 256 grayscale: 66 MB of pixels, held whole in memory by
    # the first run, and within a 4 MB budget by the second (nothing but a few batches held)
    make_image_folder(per_class=334, size=24)
    peaks, boards = {}, {}
    for name, data in (("held", {"storage": "memory"}), ("budget", {"memory_budget": "4MB", "workers": 0})):
        spec = write_spec(tmp_path / f"{name}.yaml", toy_spec_data(
            name=name, data={"dataset": "imagefolder", "params": {"root": "images"}, "image_size": 256,
                             "split": {"val": 0.25, "test": 0.25}, **data},
            members=[{"name": "net", "backbone": "toy-net",
                      "train": {"epochs": 1, "batch_size": 32, "augment": {"pipeline": "batch"}}}],
            fusers=[{"name": "avg", "fuser": "toy-mean"}]))
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, "run", str(spec), "--registry", str(tmp_path / name),
                              "--quiet"], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        peaks[name] = int(out.stdout.split("peak_rss_kb")[-1]) / 1024
        [run_dir] = (tmp_path / name / "runs").iterdir()
        boards[name] = json.loads((run_dir / "leaderboard.json").read_text())
        log = (run_dir / "run.log").read_text()
    assert "exceed the memory budget (4.0 MB, data.memory_budget 4.0 MB)" in log
    assert "held in memory" not in log
    pixels_mb = 1002 * 256 * 256 / 2**20
    assert peaks["budget"] < peaks["held"] - 0.6 * pixels_mb, peaks
    scores = {name: [(r["name"], r["accuracy"], r["nll"]) for r in board["rows"]] for name, board in boards.items()}
    assert scores["held"] == scores["budget"]  # the same member, the same test scores


@pytest.mark.parametrize("storage", ["disk", "stream"])
def test_a_member_from_its_weights_file_predicts_streamed_images_as_from_memory(make_image_folder, tmp_path, storage):
    import shutil

    make_image_folder(per_class=8, size=20)
    trained = run_experiment(folder_spec(tmp_path, "trained", storage="memory"), registry=tmp_path / "a", quiet=True)
    first = json.loads((trained.run_dir / "run.json").read_text())
    folder = tmp_path / "a" / "zoo" / first["members"]["net-a"]["key"]
    shutil.copy(folder / "model.safetensors", tmp_path / "net-a.safetensors")
    spec = write_spec(tmp_path / "byo.yaml", toy_spec_data(
        name="byo", data={"dataset": "imagefolder", "params": {"root": "images"}, "image_size": 8,
                          "split": {"val": 0.25, "test": 0.25}, "storage": storage, "memory_budget": "100B",
                          "workers": 2 if storage == "stream" else 0},
        members=[{"name": "mine", "backbone": "toy-net", "train": False, "weights": "net-a.safetensors"}],
        fusers=[{"name": "avg", "fuser": "toy-mean"}]))
    result = run_experiment(spec, registry=tmp_path / "b", quiet=True)
    second = json.loads((result.run_dir / "run.json").read_text())
    assert second["members"]["mine"]["source"] == "weights"
    mine = load_file(str(tmp_path / "b" / "zoo" / second["members"]["mine"]["key"] / "outputs.safetensors"))
    net_a = load_file(str(folder / "outputs.safetensors"))
    for split in ("val", "test"):
        np.testing.assert_array_equal(mine[f"{split}_logits"], net_a[f"{split}_logits"])
    log = (result.run_dir / "run.log").read_text()
    assert "exceed the memory budget" in log and f"data.storage is {storage}" in log


def test_a_streamed_photo_run_exports_and_predicts_its_photos_as_it_scored_them(make_image_folder, tmp_path):
    """A photo run end to end at the photo path's settings: JPEGs larger than the input, decoded
    per batch under a budget they do not fit (``storage: auto``), a timm network trained on timm's
    transforms and evaluated with its resize and centre crop. Its export checks itself on the run's
    test images; ``predict`` on those files gives the probabilities the run scored, and a corrupt
    file among them is reported in its own row."""
    import pandas as pd

    import fusion_engine
    from fusion_engine import RunFolder

    root = make_image_folder(classes=("cat", "dog"), per_class=10, size=90, suffix=".jpg", noise=True)
    spec = write_spec(tmp_path / "photos.yaml", toy_spec_data(
        name="photos", data={"dataset": "imagefolder", "params": {"root": "images"}, "image_size": 72,
                             "split": {"val": 0.25, "test": 0.25}, "memory_budget": "64KB", "workers": 0},
        members=[{"name": "net", "backbone": "timm", "params": {"model": "test_resnet"},
                  "train": {"epochs": 1, "batch_size": 4, "augment": {"auto_augment": "trivialaugment"}}}],
        fusers=[]))
    result = run_experiment(spec, registry=tmp_path / "reg", quiet=True)
    log = (result.run_dir / "run.log").read_text()
    assert "exceed the memory budget" in log and "decoded-image cache" in log, log  # 72 px images do not fit in 64 KB
    folder = RunFolder(result.run_dir)
    export = fusion_engine.export_ensemble(result.run_id, "net", out=tmp_path / "export", registry=tmp_path / "reg")
    card = json.loads((tmp_path / "export" / "ensemble.json").read_text())["members"][0]["input"]
    assert (card["size"], card["crop_mode"], card["crop_pct"]) == (72, "center", 0.95)  # test_resnet's eval crop
    assert export is not None

    test_ids = folder.split["test"]["ids"]
    files = [root / i for i in test_ids]
    assert all(f.is_file() for f in files), test_ids
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "preds.csv"
    done = cli("predict", tmp_path / "export", *files[:2], broken, *files[2:], "--out", out, "--probs")
    assert done.returncode == 1, done.stderr
    preds = pd.read_csv(out)
    assert preds["error"].notna().tolist() == [False, False, True] + [False] * (len(files) - 2)
    good = preds[preds["error"].isna()]
    proba = good[[c for c in preds.columns if c.startswith("proba_")]].to_numpy()
    np.testing.assert_allclose(proba, folder.probabilities("test")["net"], atol=1e-5)


def test_a_fractional_budget_is_worked_out_once_a_run_and_pixels_are_shared_across_normalisations(
        make_image_folder, tmp_path, monkeypatch):
    """A fraction of *available* memory falls as the run holds pixels: asked again, it would count
    them twice. Members that differ only in mean and std read the same decoded pixels."""
    from fusion_engine import stores
    from fusion_engine.data import run_data
    from fusion_engine.records import ImageDataset

    asked = []

    def budget(value, *, share=1.0):
        asked.append(value)
        return 10**9 // len(asked), "a test's budget"  # what a second look at available memory would say

    monkeypatch.setattr(stores, "memory_budget", budget)
    root = make_image_folder(per_class=4, size=12)
    paths = sorted(root.rglob("*.png"))
    dataset = ImageDataset(paths, np.arange(len(paths)) % 3, ["cat", "dog", "fox"], [p.name for p in paths])
    data = run_data(dataset, {"train": np.arange(6), "val": np.arange(6, 9), "test": np.arange(9, 12)},
                    cache_dir=tmp_path / "cache",
                    fingerprint="d" * 64)
    data.memory_budget = 0.5
    imagenet = InputConfig(size=8, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    plain = InputConfig(size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    first, second = data.pixels(imagenet), data.pixels(plain)
    assert first is second and first["train"].storage == "memory"
    bigger = data.pixels(InputConfig(size=10, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert bigger["val"].storage == "memory" and first["train"].opened
    assert asked == [0.5]
