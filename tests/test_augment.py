"""Augmentation: which pipeline a member takes, timm's transforms for photos (the same result
with any number of worker processes), random erasing and mixup, their settings checked before a
run, and evaluation images prepared as timm prepares them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from conftest import cli, toy_spec_data, write_spec  # noqa: E402
from fusion_engine import InputConfig  # noqa: E402
from fusion_engine.augment import hflip_of, resolve_pipeline, train_transform  # noqa: E402
from fusion_engine.preprocess import load_images  # noqa: E402
from fusion_engine.imagesets import ImageSet  # noqa: E402
from fusion_engine.spec import AugmentSpec, TrainSpec  # noqa: E402
from fusion_engine.training import train_member  # noqa: E402

PHOTO = InputConfig(size=72, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bicubic", crop_pct=0.9,
                    crop_mode="center")


def photos(n: int, seed: int, size: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of noisy 80 px images, each bright in one colour channel."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randint(0, 60, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    for k in range(3):
        x[y == k, k] += 150
    return x, y


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def test_small_images_take_the_batch_pipeline_and_larger_ones_timm():
    assert resolve_pipeline(AugmentSpec(), 64) == "batch"
    assert resolve_pipeline(AugmentSpec(), 65) == "timm"
    assert resolve_pipeline(AugmentSpec(pipeline="timm"), 16) == "timm"
    assert resolve_pipeline(AugmentSpec(pipeline="batch"), 224) == "batch"
    assert (hflip_of(AugmentSpec(), "batch"), hflip_of(AugmentSpec(), "timm")) == (False, True)
    assert hflip_of(AugmentSpec(hflip=False), "timm") is False


def test_the_timm_pipeline_trains_to_the_same_weights_with_any_number_of_workers():
    x_train, y_train = photos(48, 0)
    x_val, y_val = photos(24, 1)
    val = load_images(ImageSet.of(x_val).items, np.arange(24), PHOTO)
    spec = TrainSpec(epochs=2, batch_size=16, lr=0.01, augment={"auto_augment": "rand-m9-mstd0.5-inc1",
                                                                "re_prob": 0.3, "mixup": 0.2, "cutmix": 1.0})
    results = []
    for workers in (0, 2):
        train = ImageSet.of(x_train)
        train.workers = workers
        results.append(train_member(tiny_net(), PHOTO, spec, train, y_train, val, y_val, seed=0, device="cpu",
                                    quiet=True))
    assert results[0].pipeline == "timm"
    assert [h["train_loss"] for h in results[0].history] == [h["train_loss"] for h in results[1].history]
    for name, value in results[0].state_dict.items():
        assert torch.equal(value, results[1].state_dict[name]), name


def test_timm_training_transforms_end_in_uint8_at_the_input_size():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8))
    for augment in ({}, {"auto_augment": "trivialaugment"}, {"auto_augment": "augmix-m5-w4-d2"},
                    {"scale": (0.5, 1.0), "ratio": (1.0, 1.0), "color_jitter": None}):
        out = train_transform(AugmentSpec(**augment), PHOTO)(image)
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 72, 72), augment


def test_photos_are_prepared_for_evaluation_as_timms_eval_transform_does(make_image_folder):
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((90, 120), (100, 80))]
    timm_eval = create_transform(input_size=72, interpolation="bicubic", crop_pct=0.9, crop_mode="center",
                                 mean=(0.0,) * 3, std=(1 / 255,) * 3)  # timm's float output, scaled back to 0..255
    got = load_images(images, [0, 1], PHOTO)
    for image, prepared in zip(images, got):
        expected = timm_eval(Image.fromarray(image))
        assert prepared.shape == (3, 72, 72)
        assert torch.allclose(prepared.float(), expected, atol=0.01)


def test_mixup_gives_soft_targets_and_random_erasing_changes_pixels():
    from fusion_engine.augment import BatchAugment
    from fusion_engine.training import _Normaliser

    cfg = InputConfig(size=8, mean=(0.5,), std=(0.5,), in_chans=1)
    dev = torch.device("cpu")
    xb = torch.full((5, 1, 8, 8), 200, dtype=torch.uint8)
    yb = torch.tensor([0, 1, 2, 0, 1])
    mixer = BatchAugment(AugmentSpec(mixup=0.8, shift=0.0), cfg, "batch", _Normaliser(cfg, dev), dev,
                         torch.Generator().manual_seed(0), num_classes=3, label_smoothing=0.1, seed=0)
    x, target = mixer(xb, yb)
    assert target.shape == (5, 3) and torch.allclose(target.sum(1), torch.ones(5))
    assert target[4].argmax() == 1 and target[4].max() == pytest.approx(1 - 0.1 + 0.1 / 3)  # the odd one, unmixed
    eraser = BatchAugment(AugmentSpec(re_prob=1.0, shift=0.0), cfg, "batch", _Normaliser(cfg, dev), dev,
                          torch.Generator().manual_seed(0), num_classes=3, label_smoothing=0.1, seed=0)
    x, target = eraser(xb, yb)
    assert target is yb and (x != x[0, 0, 0, 0]).any(dim=(1, 2, 3)).all()  # every image has an erased patch


def test_augment_settings_the_pipeline_would_ignore_are_refused_before_a_run(tmp_path):
    cases = [
        ({"scale": [0.5, 1.0]}, None,
         "members.0.train.augment.scale: only the timm pipeline uses it, and this member's 8 px images take the "
         "batch pipeline; remove it or set train.augment.pipeline: timm"),
        ({"pipeline": "timm", "shift": 0.1}, None,
         "members.0.train.augment.shift: only the batch pipeline uses it, and this member asks for the timm pipeline"),
        ({"pipeline": "timm", "auto_augment": "nonsense"}, None, "members.0.train.augment.auto_augment: timm cannot "
         "build the transform (Unknown AA policy nonsense)"),
        ({"scale": [0.9, 0.5]}, None, "members.0.train.augment.scale: expected [low, high] with 0 < low <= high <= 1"),
    ]
    for augment, _, message in cases:
        spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(members=[
            {"name": "net-a", "backbone": "toy-net", "train": {"epochs": 1, "augment": augment}}]))
        result = cli("validate", spec)
        assert result.returncode == 2 and message in result.stderr, (augment, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_photo_member_runs_end_to_end_on_the_timm_pipeline(make_image_folder, tmp_path):
    from fusion_engine.runner import run_experiment
    from conftest import summary

    make_image_folder(per_class=6, size=90, classes=("cat", "dog"))
    spec = write_spec(tmp_path / "photo.yaml", toy_spec_data(
        name="photo", data={"dataset": "imagefolder", "params": {"root": "images"}, "image_size": 72, "workers": 0},
        members=[{"name": "net-a", "backbone": "toy-net", "train": {"epochs": 1, "batch_size": 4,
                                                                     "augment": {"auto_augment": "trivialaugment"}}}],
        fusers=[]))
    result = run_experiment(spec, registry=tmp_path / "reg", quiet=True)
    run = summary(result.run_dir)
    assert run["status"] == "complete"
    card = (tmp_path / "reg" / "zoo" / run["members"]["net-a"]["key"] / "card.json").read_text()
    import json

    assert json.loads(card)["input"]["pipeline"] == "timm"


def test_a_photo_member_is_evaluated_with_its_backbones_resize_and_crop_a_small_one_with_a_plain_resize():
    from fusion_engine.plugins import get_plugins
    from fusion_engine.preflight import member_input
    from fusion_engine.resolve import Bound
    from fusion_engine.spec import DataSpec

    provided = get_plugins().catalog().get("backbone", "timm")
    bound = Bound(provided, provided.record.params(model="test_resnet.r160_in1k", pretrained=False))
    photo = member_input(bound, num_classes=3, data_spec=DataSpec(dataset="x", image_size=96), seed=0,
                         train=TrainSpec())
    assert (photo.size, photo.interpolation, photo.crop_pct, photo.crop_mode) == (96, "bilinear", 0.95, "center")
    small = member_input(bound, num_classes=3, data_spec=DataSpec(dataset="x", image_size=32), seed=0,
                         train=TrainSpec())
    assert (small.size, small.interpolation, small.crop_pct, small.crop_mode) == (32, "bilinear", 1.0, "squash")
    forced = member_input(bound, num_classes=3, data_spec=DataSpec(dataset="x", image_size=96), seed=0,
                          train=TrainSpec(augment={"pipeline": "batch"}))
    assert forced.crop_mode == "squash"


def test_randaugment_at_full_magnitude_posterizes_to_black_instead_of_failing_the_worker():
    from fusion_engine.augment import posterize

    cfg = InputConfig(size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", crop_pct=0.875,
                      crop_mode="center")
    # magnitude 10, no noise: every PosterizeIncreasing keeps 0 bits, which Pillow 11+ refuses
    transform = train_transform(AugmentSpec(auto_augment="rand-m10-n4-inc1"), cfg)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    for seed in range(40):
        torch.manual_seed(seed)
        out = transform(image)
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 32, 32)
    assert np.asarray(posterize(image, 0)).max() == 0
    assert np.array_equal(np.asarray(posterize(image, 4)), np.asarray(image) & 0xF0)
