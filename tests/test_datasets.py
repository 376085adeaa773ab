"""The first-party datasets plugin: sklearn-digits, imagefolder and csv."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

import fusion_engine_datasets
from fusion_engine import BackboneRecord, FusionEngineError, SpecError, hookimpl
from fusion_engine.plugins import DISABLE_ENV, PluginInfo, Plugins, get_plugins
from fusion_engine.resolve import resolve_spec
from fusion_engine.specfile import parse_spec
from fusion_engine_datasets.digits import DigitsParams, load_digits_dataset
from fusion_engine_datasets.folder import ImageFolderParams, load_image_folder
from fusion_engine_datasets.manifest import CsvParams, load_csv_manifest


def records():
    return {r.name: r for r in fusion_engine_datasets.register_datasets()}


# -- registration ----------------------------------------------------------------------------------

def test_register_datasets_provides_three_datasets_through_the_entry_point(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "fusion_engine_timm,fusion_engine_fusers,fusion_engine_metrics")
    catalog = get_plugins().catalog()
    assert {"sklearn-digits", "imagefolder", "csv"} <= set(catalog.names("dataset"))
    assert catalog.get("dataset", "imagefolder").plugin == "fusion_engine_datasets"
    assert catalog.get("dataset", "Sklearn_Digits").record.params is DigitsParams


def test_every_dataset_params_model_forbids_unknown_keys():
    for record in records().values():
        with pytest.raises(ValidationError, match="extra"):
            record.params.model_validate({"root": ".", "path": "x.csv", "bogus": 1})


# -- sklearn-digits --------------------------------------------------------------------------------

def test_digits_are_uint8_scaled_to_full_range_with_ids_and_class_names():
    ds = load_digits_dataset(DigitsParams(), Path("."))
    assert ds.images.shape == (1797, 8, 8) and ds.images.dtype == np.uint8
    assert ds.images.min() == 0 and ds.images.max() == 255
    assert ds.class_names == [str(d) for d in range(10)]
    assert ds.ids[0] == "digits-0000" and ds.ids[-1] == "digits-1796"
    assert np.bincount(ds.labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert ds.split is None


def test_digits_n_per_class_keeps_the_first_n_of_each_class():
    small = load_digits_dataset(DigitsParams(n_per_class=5))
    full = load_digits_dataset(DigitsParams())
    assert np.bincount(small.labels).tolist() == [5] * 10
    positions = [int(i.removeprefix("digits-")) for i in small.ids]
    assert positions == sorted(positions)
    assert np.array_equal(small.images, full.images[positions])
    assert np.array_equal(small.labels, full.labels[positions])
    assert small.ids == load_digits_dataset(DigitsParams(n_per_class=5)).ids


# -- imagefolder -----------------------------------------------------------------------------------

def test_imagefolder_reads_class_folders_sorted_like_torchvision(make_image_folder):
    root = make_image_folder(classes=("zebra", "ant", "Bee"), per_class=3)
    ds = load_image_folder(ImageFolderParams(root=root), Path("/elsewhere"))
    assert ds.class_names == ["Bee", "ant", "zebra"]
    assert len(ds.ids) == 9 and ds.split is None
    assert ds.ids[:3] == ["Bee/Bee-0.png", "Bee/Bee-1.png", "Bee/Bee-2.png"]
    for sample_id, label, image in zip(ds.ids, ds.labels, ds.images):
        assert sample_id.split("/")[0] == ds.class_names[label]
        assert Path(image) == root / sample_id


def test_imagefolder_root_is_relative_to_base_dir(make_image_folder, tmp_path):
    make_image_folder(name="data/pets")
    ds = load_image_folder(ImageFolderParams(root="data/pets"), tmp_path)
    assert ds.class_names == ["cat", "dog", "fox"] and len(ds.ids) == 12


def test_imagefolder_takes_image_extensions_any_case_and_subfolders_and_skips_hidden(make_image_folder):
    root = make_image_folder(classes=("cat", "dog"), per_class=1)
    Image.new("L", (4, 4)).save(root / "cat" / "upper.PNG", format="PNG")
    (root / "cat" / "nested").mkdir()
    Image.new("L", (4, 4)).save(root / "cat" / "nested" / "deep.jpeg", format="JPEG")
    (root / "cat" / "notes.txt").write_text("not an image")
    Image.new("L", (4, 4)).save(root / "cat" / ".hidden.png", format="PNG")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("L", (4, 4)).save(root / ".ipynb_checkpoints" / "x.png", format="PNG")
    ds = load_image_folder(ImageFolderParams(root=root))
    assert ds.class_names == ["cat", "dog"]
    assert ds.ids == ["cat/cat-0.png", "cat/upper.PNG", "cat/nested/deep.jpeg", "dog/dog-0.png"]


def test_imagefolder_keeps_the_split_given_by_train_val_test_folders(make_image_folder):
    root = make_image_folder(splits=("train", "val", "test"), per_class=2)
    ds = load_image_folder(ImageFolderParams(root=root))
    assert ds.class_names == ["cat", "dog", "fox"]
    assert ds.split.tolist() == ["train"] * 6 + ["val"] * 6 + ["test"] * 6
    assert ds.ids[0] == "train/cat/cat-0.png" and ds.ids[-1] == "test/fox/fox-1.png"
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2] * 3


def test_imagefolder_flat_layout_treats_a_train_folder_as_a_class(make_image_folder):
    root = make_image_folder(classes=("train", "zoo"), per_class=2)
    ds = load_image_folder(ImageFolderParams(root=root, layout="flat"))
    assert ds.class_names == ["train", "zoo"] and ds.split is None


@pytest.mark.parametrize(
    "arrange, expected",
    [
        (lambda root: root.rename(root.with_name("gone")), r"no such directory: .*images"),
        (lambda root: (shutil.rmtree(root), root.write_text("x")), r"not a directory: .*images"),
        (lambda root: [shutil.rmtree(p) for p in root.iterdir()], r"no class folders in .*images"),
        (lambda root: [p.unlink() for p in (root / "dog").iterdir()], r"class 'dog' has no images in .*images/dog"),
    ],
    ids=["missing", "file", "no-classes", "empty-class"],
)
def test_imagefolder_errors_name_the_path(make_image_folder, arrange, expected):
    root = make_image_folder()
    arrange(root)
    with pytest.raises(FusionEngineError, match=expected):
        load_image_folder(ImageFolderParams(root=root))


def test_imagefolder_split_layout_needs_val_and_test(make_image_folder):
    root = make_image_folder(splits=("train",))
    with pytest.raises(FusionEngineError, match=r"has no val/, test/ folder; a split layout needs train/, val/ and test/"):
        load_image_folder(ImageFolderParams(root=root))


def test_imagefolder_split_layout_rejects_class_sets_that_differ(make_image_folder):
    root = make_image_folder(splits=("train", "val", "test"))
    shutil.rmtree(root / "test" / "dog")
    (root / "test" / "emu").mkdir()
    Image.new("RGB", (4, 4)).save(root / "test" / "emu" / "e.png")
    with pytest.raises(FusionEngineError, match=r"class folders differ between .*train and .*test: test/ lacks dog; test/ has extra emu"):
        load_image_folder(ImageFolderParams(root=root))


def test_imagefolder_split_layout_rejects_other_folders_beside_the_splits(make_image_folder):
    root = make_image_folder(splits=("train", "val", "test"))
    (root / "cat").mkdir()
    with pytest.raises(FusionEngineError, match=r"mixes train/, val/, test/ with other folders \(cat\)"):
        load_image_folder(ImageFolderParams(root=root))


def test_imagefolder_root_is_checked_when_the_spec_is_validated(make_image_folder, tmp_path):
    make_image_folder(name="pets")
    assert ImageFolderParams.model_validate({"root": "pets"}, context={"base_dir": tmp_path}).root == Path("pets")
    assert ImageFolderParams.model_validate({"root": "absent"}).root == Path("absent")  # no context: checked at load
    with pytest.raises(ValidationError, match=f"no such directory: {tmp_path / 'absent'}"):
        ImageFolderParams.model_validate({"root": "absent"}, context={"base_dir": tmp_path})


class _OneBackbone:
    @hookimpl
    def register_backbones(self):
        return [BackboneRecord("stub", build=lambda params, **kw: None)]


def _catalog():
    plugins = Plugins()
    plugins.register(fusion_engine_datasets, PluginInfo(name="fusion_engine_datasets", source="entry-point"))
    plugins.register(_OneBackbone(), PluginInfo(name="stub", source="file"))
    return plugins.catalog()


@pytest.mark.parametrize(
    "dataset, params, message",
    [
        ("imagefolder", {"root": "absent"}, "data.params.root: no such directory: {base}/absent (got 'absent')"),
        ("csv", {"path": "absent.csv"}, "data.params.path: no such file: {base}/absent.csv (got 'absent.csv')"),
    ],
)
def test_a_missing_dataset_path_reads_as_a_located_spec_error(tmp_path, dataset, params, message):
    spec_file = tmp_path / "spec.yaml"
    spec = parse_spec({"name": "t", "data": {"dataset": dataset, "params": params}, "members": [{"name": "m", "backbone": "stub"}]})
    with pytest.raises(SpecError) as caught:
        resolve_spec(spec, _catalog(), file=str(spec_file))
    assert str(caught.value) == f"{spec_file}: " + message.format(base=tmp_path)


# -- csv -------------------------------------------------------------------------------------------

def write_manifest(folder: Path, text: str, name: str = "manifest.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_csv_reads_paths_relative_to_its_folder_and_sorts_class_names(make_image_folder, tmp_path):
    root = make_image_folder(per_class=2)
    write_manifest(root, "path,label\ncat/cat-0.png,cat\ndog/dog-0.png, dog \nfox/fox-1.png,fox\ncat/cat-1.png,cat\n")
    ds = load_csv_manifest(CsvParams(path="images/manifest.csv"), tmp_path)
    assert ds.class_names == ["cat", "dog", "fox"]
    assert ds.ids == ["cat/cat-0.png", "dog/dog-0.png", "fox/fox-1.png", "cat/cat-1.png"]
    assert ds.labels.tolist() == [0, 1, 2, 0]
    assert [Path(p) for p in ds.images] == [root / i for i in ds.ids]
    assert ds.split is None


def test_csv_column_names_and_split_column_are_configurable(make_image_folder):
    root = make_image_folder(per_class=1)
    manifest = write_manifest(root, "file,kind,part\ncat/cat-0.png,cat,train\ndog/dog-0.png,dog,VAL\nfox/fox-0.png,fox,test\n")
    ds = load_csv_manifest(CsvParams(path=manifest, path_column="file", label_column="kind", split_column="part"))
    assert ds.split.tolist() == ["train", "val", "test"]
    assert ds.labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("file,label\ncat/cat-0.png,cat\n", r"missing columns: path; found: file, label"),
        ("path,label\ncat/cat-0.png,cat\ndog/dog-0.png,\n", r"manifest.csv, line 3: empty label"),
        ("path,label\ncat/cat-0.png,cat\n,dog\n", r"manifest.csv, line 3: empty path"),
        ("path,label\ncat/cat-0.png,cat\ncat/gone.png,cat\n", r"line 3: no such image: .*cat/gone.png"),
        ("path,label\ncat/cat-0.png,cat\n./cat/cat-0.png,dog\n", r"line 3: .*cat-0.png is already listed on line 2"),
        ("path,label\n", r"manifest.csv: no rows after the header"),
        ("", r"manifest.csv: the file is empty"),
    ],
    ids=["columns", "empty-label", "empty-path", "missing-image", "duplicate", "no-rows", "empty-file"],
)
def test_csv_errors_name_the_file_line_and_image(make_image_folder, text, expected):
    manifest = write_manifest(make_image_folder(), text)
    with pytest.raises(FusionEngineError, match=expected):
        load_csv_manifest(CsvParams(path=manifest))


def test_csv_rejects_an_unknown_split_value(make_image_folder):
    manifest = write_manifest(make_image_folder(), "path,label,split\ncat/cat-0.png,cat,holdout\n")
    with pytest.raises(FusionEngineError, match=r"line 2: split 'holdout' is not one of train, val, test"):
        load_csv_manifest(CsvParams(path=manifest, split_column="split"))


def test_csv_missing_manifest_is_named(tmp_path):
    with pytest.raises(FusionEngineError, match=f"csv: no such file: {tmp_path / 'nope.csv'}"):
        load_csv_manifest(CsvParams(path="nope.csv"), tmp_path)
