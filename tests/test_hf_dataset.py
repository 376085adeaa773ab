"""The ``hf`` dataset plugin on Hugging Face datasets written here as parquet files (nothing is
downloaded): class names from the ClassLabel feature, the dataset's own splits or ours, a hub
dataset offline from the hub cache, fresh data after files change, one-line errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import cli, summary, toy_spec_data, write_spec
from hub_cache import populate_hub_cache

datasets = pytest.importorskip("datasets", reason="the hf extra is not installed: pip install 'fusion-engine[hf]'")

from fusion_engine_datasets.hf import HFParams, load_hf_dataset  # noqa: E402

CLASSES = ["cat", "dog", "frog"]


def png(colour: tuple[int, int, int], size: int = 10) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, format="PNG")
    return out.getvalue()


def write_parquet(path, per_class: int, offset: int = 0, labels: str = "classlabel") -> None:
    """``per_class`` solid squares of each class, unique colours, as a Hugging Face parquet file."""
    rows = [(c, i) for c in range(len(CLASSES)) for i in range(per_class)]
    label = datasets.ClassLabel(names=CLASSES) if labels == "classlabel" else datasets.Value("string")
    features = datasets.Features({"image": datasets.Image(), "label": label})
    data = {"image": [{"bytes": png((80 * c, (7 * i + offset) % 256, 40)), "path": None} for c, i in rows],
            "label": [c if labels == "classlabel" else CLASSES[c] for c, _ in rows]}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))


@pytest.fixture
def hf_folder(tmp_path):
    """A dataset folder as the hub lays one out: data/train-*.parquet (8 per class) and test (3)."""
    root = tmp_path / "tiny-hf"
    write_parquet(root / "data" / "train-00000-of-00001.parquet", 8)
    write_parquet(root / "data" / "test-00000-of-00001.parquet", 3, offset=100)
    return root


def test_a_local_dataset_brings_its_classes_and_its_train_and_test_splits(hf_folder):
    ds = load_hf_dataset(HFParams(path=str(hf_folder)))
    assert ds.class_names == CLASSES
    assert len(ds.labels) == 33 and np.bincount(ds.labels).tolist() == [11, 11, 11]
    assert ds.split.tolist() == ["train"] * 24 + ["test"] * 9  # no val: the engine draws it from train
    assert ds.ids[0] == "train/0" and ds.ids[-1] == "test/8"
    first = ds.images[0]
    assert set(first) == {"bytes", "path"} and Image.open(io.BytesIO(first["bytes"])).size == (10, 10)


def test_splits_may_be_given_or_left_to_the_engine(hf_folder):
    mapped = load_hf_dataset(HFParams(path=str(hf_folder), split={"train": "train[:75%]", "val": "train[75%:]",
                                                                   "test": "test"}))
    assert [int((mapped.split == s).sum()) for s in ("train", "val", "test")] == [18, 6, 9]
    pooled = load_hf_dataset(HFParams(path=str(hf_folder), split="train+test"))
    assert pooled.split is None and len(pooled.labels) == 33
    files = load_hf_dataset(HFParams(path=str(hf_folder / "data" / "*.parquet")))
    assert files.split is None and len(files.labels) == 33


def test_labels_without_class_features_are_encoded_in_sorted_order(tmp_path):
    write_parquet(tmp_path / "strings.parquet", 4, labels="string")
    ds = load_hf_dataset(HFParams(path=str(tmp_path / "strings.parquet")))
    assert ds.class_names == sorted(CLASSES) and ds.labels[:4].tolist() == [0, 0, 0, 0]


def test_a_run_on_an_hf_dataset(hf_folder, tmp_path):
    from fusion_engine.runner import run_experiment

    spec = write_spec(tmp_path / "hf.yaml", toy_spec_data(
        name="hf", data={"dataset": "hf", "params": {"path": "tiny-hf"}, "image_size": 8, "split": {"val": 0.25}}))
    run = summary(run_experiment(spec, registry=tmp_path / "reg", quiet=True).run_dir)
    assert run["status"] == "complete"
    assert run["data"]["classes"] == CLASSES
    assert run["data"]["split_sizes"] == {"train": 18, "val": 6, "test": 9}  # val: a quarter of the train split


def test_a_hub_dataset_loads_offline_from_the_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    staging = tmp_path / "staging"
    write_parquet(staging / "train.parquet", 5)
    write_parquet(staging / "test.parquet", 2, offset=50)
    populate_hub_cache(tmp_path / "hub", "someone/tiny-pets", {
        "data/train-00000-of-00001.parquet": staging / "train.parquet",
        "data/test-00000-of-00001.parquet": staging / "test.parquet"}, repo_type="dataset")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ds = load_hf_dataset(HFParams(path="someone/tiny-pets"))
    assert ds.class_names == CLASSES and ds.split.tolist() == ["train"] * 15 + ["test"] * 6


def test_changed_files_are_read_again_not_served_from_a_stale_cache(hf_folder):
    assert len(load_hf_dataset(HFParams(path=str(hf_folder))).labels) == 33
    write_parquet(hf_folder / "data" / "train-00000-of-00001.parquet", 9)
    assert len(load_hf_dataset(HFParams(path=str(hf_folder))).labels) == 36


def test_the_fingerprint_covers_the_image_bytes(hf_folder):
    from fusion_engine.data import dataset_fingerprint

    before = dataset_fingerprint(load_hf_dataset(HFParams(path=str(hf_folder))))
    write_parquet(hf_folder / "data" / "test-00000-of-00001.parquet", 3, offset=101)  # other pixels, same labels
    assert dataset_fingerprint(load_hf_dataset(HFParams(path=str(hf_folder)))) != before


@pytest.mark.parametrize("params, message", [
    ({"name": "nope"}, "hf {path}: BuilderConfig 'nope' not found. Available: ['default']"),
    ({"split": "validation"}, "hf {path}: Unknown split \"validation\". Should be one of ['train', 'test']."),
    ({"image_column": "label"}, "image_column 'label' holds ClassLabel(names=['cat', 'dog', 'frog']), not images"),
    ({"label_column": "species"}, "label_column 'species' is not a column; columns: image, label"),
    ({"split": {"train": "train"}}, "data.params.split: give test (val is optional: drawn from train when left out)"),
    ({"path": "missing-folder/x/y"}, "data.params.path: no such file or folder"),
    ({"path": "nobody/nothing"}, "hf nobody/nothing: the dataset is not in the Hugging Face cache and HF_HUB_OFFLINE=1; "
                                 "download it once with `hf download --repo-type dataset nobody/nothing`"),
])
def test_bad_hf_settings_are_one_line_errors(hf_folder, tmp_path, params, message):
    spec = write_spec(tmp_path / "bad.yaml", toy_spec_data(
        data={"dataset": "hf", "params": {"path": "tiny-hf", **params}, "image_size": 8}))
    result = cli("validate", spec)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message.format(path=hf_folder) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_data_files_whose_columns_differ_are_a_one_line_error(hf_folder, tmp_path):
    test = datasets.Dataset.from_dict(
        {"image": [{"bytes": png((1, 2, 3)), "path": None}] * 2, "label": [0, 1], "extra": [1, 2]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                    "extra": datasets.Value("int64")}))
    test.to_parquet(str(hf_folder / "data" / "test-00000-of-00001.parquet"))
    spec = write_spec(tmp_path / "bad.yaml", toy_spec_data(
        data={"dataset": "hf", "params": {"path": "tiny-hf"}, "image_size": 8}))
    result = cli("validate", spec)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"{spec}: data: hf {hf_folder}: the data files do not all have the same columns: one has "
                                     f"image, label, extra where image, label were expected "
                                     f"(in {hf_folder / 'data' / 'test-00000-of-00001.parquet'})"), result.stderr


@pytest.mark.parametrize("broken, path", [
    ("train-00000-of-00001.parquet", "tiny-hf"),  # read first, for the schema
    ("test-00000-of-00001.parquet", "tiny-hf"),  # read after it
    ("train-00000-of-00001.parquet", "tiny-hf/data/train-00000-of-00001.parquet"),  # a single file
])
def test_a_corrupt_data_file_is_a_one_line_error_naming_it(hf_folder, tmp_path, broken, path):
    (hf_folder / "data" / broken).write_bytes(b"not parquet at all")
    spec = write_spec(tmp_path / "bad.yaml", toy_spec_data(
        data={"dataset": "hf", "params": {"path": path}, "image_size": 8}))
    result = cli("validate", spec)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.strip().endswith(f"(in {hf_folder / 'data' / broken})"), result.stderr


def test_a_load_gives_back_datasets_logging_and_says_again_what_it_logged_without_failing(hf_folder, caplog):
    from datasets.utils import are_progress_bars_disabled, enable_progress_bars

    from fusion_engine_datasets.hf import _datasets_log

    datasets.logging.set_verbosity_info()
    enable_progress_bars()
    handlers = list(datasets.logging.get_logger().handlers)
    try:
        assert len(load_hf_dataset(HFParams(path=str(hf_folder))).labels) == 33
        assert datasets.logging.get_verbosity() == datasets.logging.INFO and not are_progress_bars_disabled()
        assert datasets.logging.get_logger().handlers == handlers
        with caplog.at_level("WARNING", logger="fusion_engine"):
            with _datasets_log("hf somewhere"):
                datasets.logging.get_logger("datasets.builder").error("Extraction of a.zip is blocked\nmore")
        assert "hf somewhere: Extraction of a.zip is blocked" in caplog.text and "more" not in caplog.text
    finally:
        datasets.logging.set_verbosity_warning()


def test_splits_that_cannot_be_joined_name_the_columns_that_differ():
    from fusion_engine.errors import FusionEngineError
    from fusion_engine_datasets.hf import _joined

    image = {"image": [{"bytes": png((1, 2, 3)), "path": None}] * 2}
    train = datasets.Dataset.from_dict({**image, "label": [0, 1]}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}))
    test = datasets.Dataset.from_dict({**image, "label": ["a", "b"]}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("string")}))
    with pytest.raises(FusionEngineError) as caught:
        _joined(datasets, [("train", train), ("test", test)], "hf somewhere")
    assert str(caught.value) == ("hf somewhere: splits train and test cannot be joined: column label differs "
                                 "(missing from one, or of another type or class list)")
    assert len(_joined(datasets, [("train", train), ("val", train)], "hf somewhere")) == 4


def test_the_image_column_pickles_as_file_references(hf_folder):
    import pickle

    images = load_hf_dataset(HFParams(path=str(hf_folder))).images
    again = pickle.loads(pickle.dumps(images))
    assert again[5] == images[5] and len(pickle.dumps(images)) < 10_000
    assert json.dumps(len(again)) == "33"


def test_a_row_with_no_image_is_a_one_line_error_naming_the_row(hf_folder, tmp_path):
    rows = {"image": [{"bytes": png((9, 9, 9)), "path": None}, None, {"bytes": png((9, 9, 8)), "path": None}],
            "label": [0, 1, 2]}
    datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})).to_parquet(
        str(hf_folder / "data" / "test-00000-of-00001.parquet"))
    spec = write_spec(tmp_path / "empty.yaml", toy_spec_data(
        data={"dataset": "hf", "params": {"path": "tiny-hf"}, "image_size": 8}))
    result = cli("run", spec)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (  # after the run's progress lines
        "sample test/1: cannot read image: the value is None (an empty row?)"), \
        result.stderr
