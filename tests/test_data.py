"""The core data path: splitting, fingerprinting and loading images."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fusion_engine import FusionEngineError, ImageDataset, InputConfig
from fusion_engine.data import dataset_fingerprint, split_indices
from fusion_engine.preprocess import load_images
from fusion_engine.spec import SplitSpec
from fusion_engine_datasets.digits import DigitsParams, load_digits_dataset
from fusion_engine_datasets.folder import ImageFolderParams, load_image_folder


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_digits_dataset(DigitsParams())


def toy_dataset(counts: list[int], split=None) -> ImageDataset:
    labels = np.repeat(np.arange(len(counts)), counts)
    images = np.arange(len(labels) * 4, dtype=np.uint8).reshape(-1, 2, 2)
    return ImageDataset(images, labels, [f"c{i}" for i in range(len(counts))], [f"s{i}" for i in range(len(labels))], split)


# -- split_indices ---------------------------------------------------------------------------------

def test_split_fractions_are_of_the_whole_and_parts_partition_the_dataset(digits):
    parts = split_indices(digits, SplitSpec(val=0.2, test=0.1), seed=0)
    assert {k: len(v) for k, v in parts.items()} == {"train": 1257, "val": 360, "test": 180}
    together = np.concatenate(list(parts.values()))
    assert np.array_equal(np.sort(together), np.arange(1797))
    assert all(np.array_equal(v, np.sort(v)) for v in parts.values())


def test_split_is_stratified(digits):
    parts = split_indices(digits, SplitSpec(val=0.2, test=0.2), seed=3)
    share = np.bincount(digits.labels) / len(digits.labels)
    for name in ("train", "val", "test"):
        counts = np.bincount(digits.labels[parts[name]], minlength=10)
        assert np.all(np.abs(counts - share * len(parts[name])) <= 1.5), name


def test_split_is_reproducible_for_a_seed_and_differs_across_seeds(digits):
    first = split_indices(digits, SplitSpec(), seed=7)
    again = split_indices(digits, SplitSpec(), seed=7)
    other = split_indices(digits, SplitSpec(), seed=8)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["test"], other["test"])


def test_a_dataset_split_is_kept_and_the_fractions_ignored(make_image_folder):
    ds = load_image_folder(ImageFolderParams(root=make_image_folder(splits=("train", "val", "test"), per_class=2)))
    parts = split_indices(ds, SplitSpec(val=0.5, test=0.3), seed=0)
    assert parts["train"].tolist() == list(range(6))
    assert parts["val"].tolist() == list(range(6, 12))
    assert parts["test"].tolist() == list(range(12, 18))


def test_a_dataset_split_with_an_empty_part_is_an_error():
    ds = toy_dataset([3, 3], split=["train"] * 4 + ["val"] * 2)
    with pytest.raises(FusionEngineError, match="the dataset's own split has no test samples"):
        split_indices(ds, SplitSpec(), seed=0)


def test_a_dataset_split_without_val_draws_val_from_its_train_split():
    # 2 classes x 10 train samples, then 2 x 3 test samples
    ds = toy_dataset([13, 13], split=(["train"] * 10 + ["test"] * 3) * 2)
    parts = split_indices(ds, SplitSpec(val=0.2), seed=0)
    assert parts["test"].tolist() == [10, 11, 12, 23, 24, 25]  # the dataset's test split, untouched
    assert len(parts["val"]) == 4 and np.bincount(ds.labels[parts["val"]]).tolist() == [2, 2]  # 20% of train, stratified
    assert sorted([*parts["train"], *parts["val"]]) == [*range(10), *range(13, 23)]
    assert split_indices(ds, SplitSpec(val=0.2), seed=0)["val"].tolist() == parts["val"].tolist()  # seeded
    assert split_indices(ds, SplitSpec(val=0.2), seed=1)["val"].tolist() != parts["val"].tolist()


def test_a_dataset_split_with_an_unknown_part_is_an_error():
    ds = toy_dataset([3, 3], split=["train", "val", "test", "dev", "train", "val"])
    with pytest.raises(FusionEngineError, match="own split holds 'dev'; expected train, val, test"):
        split_indices(ds, SplitSpec(), seed=0)


def test_a_class_too_small_to_stratify_is_named():
    with pytest.raises(FusionEngineError, match="class 'c1' has only 2 samples; .* needs at least 3 per class"):
        split_indices(toy_dataset([20, 2, 20]), SplitSpec(), seed=0)


def test_a_test_split_smaller_than_the_class_count_is_an_error():
    with pytest.raises(FusionEngineError, match="of 15 samples would put 3 in test, fewer than the 5 classes"):
        split_indices(toy_dataset([3] * 5), SplitSpec(val=0.2, test=0.2), seed=0)


# -- dataset_fingerprint ---------------------------------------------------------------------------

def test_fingerprint_is_stable_across_loads(digits, make_image_folder, tmp_path):
    assert dataset_fingerprint(digits) == dataset_fingerprint(load_digits_dataset(DigitsParams()))
    root = make_image_folder()
    folder_print = dataset_fingerprint(load_image_folder(ImageFolderParams(root=root)))
    assert len(folder_print) == 64 and int(folder_print, 16) >= 0
    assert folder_print == dataset_fingerprint(load_image_folder(ImageFolderParams(root=root)))
    moved = shutil.copytree(root, tmp_path / "copy")
    assert folder_print == dataset_fingerprint(load_image_folder(ImageFolderParams(root=moved)))


def test_fingerprint_changes_with_a_label_a_pixel_an_id_or_the_split():
    base = toy_dataset([3, 3])
    reference = dataset_fingerprint(base)
    relabelled = toy_dataset([3, 3])
    relabelled.labels[0] = 1
    repainted = toy_dataset([3, 3])
    repainted.images[2, 1, 1] ^= 1
    renamed = toy_dataset([3, 3])
    renamed.ids[0] = "other"
    given_split = toy_dataset([3, 3], split=["train", "val", "test"] * 2)
    variants = [dataset_fingerprint(d) for d in (relabelled, repainted, renamed, given_split)]
    assert len({reference, *variants}) == 5


def test_fingerprint_changes_when_an_image_file_changes(make_image_folder):
    root = make_image_folder()
    before = dataset_fingerprint(load_image_folder(ImageFolderParams(root=root)))
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "dog" / "dog-2.png")
    assert dataset_fingerprint(load_image_folder(ImageFolderParams(root=root))) != before


def test_fingerprint_hashes_pil_images_by_pixels():
    def dataset(colour):
        return ImageDataset([Image.new("RGB", (4, 4), colour)], [0], ["a"], ["x"])

    assert dataset_fingerprint(dataset((1, 2, 3))) == dataset_fingerprint(dataset((1, 2, 3)))
    assert dataset_fingerprint(dataset((1, 2, 3))) != dataset_fingerprint(dataset((1, 2, 4)))


# -- load_images -----------------------------------------------------------------------------------

def test_a_gray_array_batch_becomes_uint8_rgb_at_the_asked_size(digits):
    x = load_images(digits.images, np.arange(10), size=32, in_chans=3)
    assert x.shape == (10, 3, 32, 32) and str(x.dtype) == "torch.uint8"
    assert x.min() == 0 and x.max() == 255
    assert (x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all()


def test_arrays_keep_the_order_of_the_indices_and_their_pixels_at_native_size(digits):
    x = load_images(digits.images, [5, 0, 5], size=8, in_chans=1)
    assert x.shape == (3, 1, 8, 8)
    assert np.array_equal(x[:, 0].numpy(), digits.images[[5, 0, 5]])


def test_batched_array_resize_matches_pil_within_one_level(digits):
    as_pil = [Image.fromarray(a) for a in digits.images[:40]]
    for size in (5, 32):
        batched = load_images(digits.images, range(40), size=size, in_chans=1).numpy().astype(int)
        one_by_one = load_images(as_pil, range(40), size=size, in_chans=1).numpy().astype(int)
        assert np.abs(batched - one_by_one).max() <= 1


def test_rgb_arrays_become_gray_as_pil_converts_them():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(6, 5, 5, 3), dtype=np.uint8)
    x = load_images(rgb, range(6), size=5, in_chans=1)
    expected = np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in rgb])
    assert np.array_equal(x[:, 0].numpy(), expected)


def test_image_files_are_decoded_converted_and_resized(make_image_folder):
    ds = load_image_folder(ImageFolderParams(root=make_image_folder(size=16)))
    colours = [Image.open(p).getpixel((0, 0)) for p in ds.images[:3]]
    rgb = load_images(ds.images, [0, 1, 2], size=24, in_chans=3)
    assert rgb.shape == (3, 3, 24, 24) and str(rgb.dtype) == "torch.uint8"
    assert [tuple(rgb[i, :, 12, 12].tolist()) for i in range(3)] == colours
    gray = load_images(ds.images, [0, 1, 2], size=16, in_chans=1)
    assert gray.shape == (3, 1, 16, 16)
    assert [gray[i, 0, 0, 0].item() for i in range(3)] == [Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0)) for c in colours]


def test_a_grayscale_file_is_repeated_to_three_channels(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(path)
    x = load_images([str(path)], [0], size=8, in_chans=3)
    assert (x[0, 0] == x[0, 1]).all() and (x[0, 0] == x[0, 2]).all()
    assert x[0, 0, 7, 7].item() == 252


def test_arrays_of_different_shapes_in_a_list_are_each_resized():
    images = [np.full((4, 6), 10, np.uint8), np.full((9, 9, 3), 200, np.uint8)]
    x = load_images(images, [0, 1], size=7, in_chans=3)
    assert x.shape == (2, 3, 7, 7)
    assert (x[0] == 10).all() and (x[1] == 200).all()


def test_no_indices_give_an_empty_batch(digits):
    assert load_images(digits.images, [], size=16, in_chans=3).shape == (0, 3, 16, 16)
    assert load_images(["never-read.png"], [], size=16, in_chans=1).shape == (0, 1, 16, 16)


@pytest.mark.parametrize("content", [b"this is not a png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"], ids=["garbage", "truncated"])
def test_a_corrupt_image_file_is_named_in_the_error(tmp_path, content):
    good = tmp_path / "good.png"
    Image.new("RGB", (4, 4)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(FusionEngineError, match=f"cannot read image {bad}: "):
        load_images([good, bad], [0, 1], size=8, in_chans=3)


def test_a_missing_image_file_is_named_in_the_error(tmp_path):
    with pytest.raises(FusionEngineError, match=f"cannot read image {tmp_path / 'gone.png'}"):
        load_images([tmp_path / "gone.png"], [0], size=8, in_chans=3)
    with pytest.raises(FusionEngineError, match=f"cannot read image {tmp_path / 'gone.png'}"):
        dataset_fingerprint(ImageDataset([tmp_path / "gone.png"], [0], ["a"], ["gone"]))


def test_non_uint8_arrays_are_rejected():
    with pytest.raises(FusionEngineError, match="image arrays must be uint8, got float64"):
        load_images(np.zeros((2, 4, 4)), [0, 1], size=4, in_chans=1)


# -- decoding new images as a dataset's were (exported ensembles) ---------------------------------

@pytest.mark.parametrize("size", [8, 5, 13])
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("channels", [None, 3, 4], ids=["gray", "rgb", "rgba"])
def test_new_images_are_made_exactly_as_a_datasets_arrays_were(size, in_chans, channels):
    import torch

    from fusion_engine.preprocess import RESIZE_TENSOR, batch_pixels, decode_images, resize_method

    rng = np.random.default_rng(size)
    shape = (12, 8, 8) if channels is None else (12, 8, 8, channels)
    arrays = rng.integers(0, 256, size=shape, dtype=np.uint8)
    assert resize_method(arrays) == resize_method(list(arrays)) == RESIZE_TENSOR
    expected = load_images(arrays, np.arange(12), size=size, in_chans=in_chans)
    decoded, errors = decode_images(list(arrays), size, in_chans, RESIZE_TENSOR)
    assert errors == {} and torch.equal(decoded, expected)
    nchw = torch.from_numpy(arrays[..., None] if channels is None else arrays).permute(0, 3, 1, 2)
    assert torch.equal(batch_pixels(nchw, size, in_chans), expected)


def test_new_image_files_are_made_as_the_dataset_resized_them(tmp_path):
    """Files of an array dataset are decoded at their size and resized in torch; files of a file
    dataset through PIL: the two differ by a grey level here and there, so the method matters."""
    from fusion_engine.preprocess import RESIZE_PIL, RESIZE_TENSOR, decode_images, resize_method

    arrays = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8), dtype=np.uint8)
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    assert resize_method(paths) == RESIZE_PIL
    from_arrays = load_images(arrays, np.arange(6), size=13, in_chans=3)
    from_files = load_images(paths, np.arange(6), size=13, in_chans=3)
    assert not np.array_equal(from_arrays.numpy(), from_files.numpy())
    (tmp_path / "bad.png").write_bytes(b"nope")
    tensor, errors = decode_images([*paths[:3], tmp_path / "bad.png", *paths[3:]], 13, 3, RESIZE_TENSOR)
    assert list(errors) == [3] and errors[3] == f"cannot read image {tmp_path / 'bad.png'}: not an image format Pillow can decode"
    assert np.array_equal(tensor.numpy(), from_arrays.numpy())
    tensor, errors = decode_images(paths, 13, 3, RESIZE_PIL)
    assert errors == {} and np.array_equal(tensor.numpy(), from_files.numpy())


@pytest.mark.parametrize("method", ["pil", "tensor"])
def test_new_images_for_a_photo_member_get_its_resize_and_centre_crop(tmp_path, method):
    """A member on the photo path saw timm's evaluation resize and centre crop (not a squash) in
    its run; new files, arrays and batches get exactly that, whichever resize the dataset's squash
    used, and an unreadable file is reported by position."""
    import torch

    from fusion_engine.preprocess import batch_pixels, decode_images, is_squash

    cfg = InputConfig(size=24, mean=(0.5,) * 3, std=(0.5,) * 3, in_chans=3, interpolation="bicubic",
                      crop_pct=0.875, crop_mode="center")
    assert not is_squash(cfg)
    rng = np.random.default_rng(1)
    arrays = rng.integers(0, 256, size=(4, 40, 56, 3), dtype=np.uint8)  # not square: the crop shows
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(paths[-1])
    expected = load_images(paths, np.arange(4), cfg)
    squashed = load_images(paths, np.arange(4), size=24, in_chans=3)
    assert not torch.equal(expected, squashed)
    assert torch.equal(load_images(arrays, np.arange(4), cfg), expected)
    (tmp_path / "bad.png").write_bytes(b"nope")
    decoded, errors = decode_images([*paths[:2], tmp_path / "bad.png", *paths[2:]], cfg, method=method)
    assert list(errors) == [2] and torch.equal(decoded, expected)
    decoded, errors = decode_images(list(arrays), cfg, method=method)
    assert errors == {} and torch.equal(decoded, expected)
    assert torch.equal(batch_pixels(torch.from_numpy(arrays).permute(0, 3, 1, 2), cfg), expected)


# -- import cost -----------------------------------------------------------------------------------

def test_importing_the_data_modules_does_not_import_torch():
    code = "import fusion_engine_datasets, fusion_engine.data, sys; assert 'torch' not in sys.modules"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


HF_EMPTY = "a Hugging Face image value with neither bytes nor a path (an empty row?)"


@pytest.mark.parametrize("empty, why", [
    (None, "the value is None (an empty row?)"),
    ({"bytes": None, "path": None}, HF_EMPTY),
    ({"bytes": None}, HF_EMPTY),
    ({"path": ""}, HF_EMPTY),
])
def test_an_empty_image_value_is_one_line_naming_its_sample_when_fingerprinted_and_refused_when_decoded(
        empty, why, monkeypatch):
    import fusion_engine.data
    from fusion_engine import UnreadableImage

    monkeypatch.setattr(fusion_engine.data, "DIGEST_CHUNK", 16)  # the empty one in the third chunk

    image = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(image, format="PNG")
    images = [image.getvalue()] * 40 + [empty] + [image.getvalue()] * 40
    dataset = ImageDataset(images=images, labels=np.arange(81) % 3, class_names=["a", "b", "c"],
                           ids=[f"row-{i}" for i in range(81)])
    with pytest.raises(UnreadableImage) as caught:
        dataset_fingerprint(dataset)
    assert str(caught.value) == f"sample row-40: cannot read image: {why}"
    with pytest.raises(UnreadableImage) as caught:
        load_images(images, np.array([0, 40]), InputConfig(size=4, mean=(0.5,) * 3, std=(0.5,) * 3))
    assert str(caught.value) == f"cannot read image: {why}"
