"""A plugin file as a user would write one: a tiny backbone, a dataset and a fuser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field

from fusion_engine import (BackboneRecord, BuiltBackbone, DatasetRecord, Fuser, FuserRecord, ImageDataset,
                           InputConfig, Params, hookimpl)


class ToyNetParams(Params):
    width: int = Field(4, gt=0)


def toy_input(params, image_size: int | None = None) -> InputConfig:
    """What a toy net takes, known without building it (or importing torch)."""
    return InputConfig(size=image_size or 8, mean=(0.5,), std=(0.5,), in_chans=1)


def build_toy_net(params: ToyNetParams, num_classes: int, image_size: int | None = None) -> BuiltBackbone:
    import torch.nn as nn

    module = nn.Sequential(
        nn.Conv2d(1, params.width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(4 * params.width, num_classes),
    )
    return BuiltBackbone(module, toy_input(params, image_size))


class FlakyNetParams(ToyNetParams):
    fail_while: str = Field(description="a file path: training raises while this file exists")


def build_flaky_net(params: FlakyNetParams, num_classes: int, image_size: int | None = None) -> BuiltBackbone:
    """A toy net whose forward pass raises while ``fail_while`` exists: a member that fails, then,
    the file removed, trains."""
    import os

    import torch.nn as nn

    built = build_toy_net(params, num_classes, image_size)

    class Flaky(nn.Sequential):
        def forward(self, x):
            if os.path.exists(params.fail_while):
                raise RuntimeError(f"flaky-net refuses to train while {params.fail_while} exists")
            return super().forward(x)

    built.module = Flaky(*built.module)
    return built


class FileNetParams(ToyNetParams):
    weights: Path = Field(description="a safetensors file whose 'marker' tensor the net keeps as a buffer")


def build_file_net(params: FileNetParams, num_classes: int, image_size: int | None = None) -> BuiltBackbone:
    """A toy net that reads a file at build time, as a backbone with pretrained weights does."""
    from safetensors.torch import load_file

    built = build_toy_net(params, num_classes, image_size)
    built.module.register_buffer("marker", load_file(str(params.weights))["marker"])
    return built


class ToyDataParams(Params):
    n_per_class: int = Field(12, ge=4)
    own_split: bool = Field(False, description="the dataset's own split: per class, half train, a quarter val and test")
    scramble_test: bool = Field(False, description="with own_split: the test labels shuffled (nothing may read them)")


def load_toy_data(params: ToyDataParams, base_dir=None) -> ImageDataset:
    """Three classes: bright top half, bright bottom half, dark."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for label in range(3):
        for _ in range(params.n_per_class):
            img = rng.integers(0, 40, size=(8, 8), dtype=np.uint8)
            if label == 0:
                img[:4] += 200
            elif label == 1:
                img[4:] += 200
            images.append(img)
            labels.append(label)
    labels = np.array(labels)
    split = None
    if params.own_split:
        n = params.n_per_class
        per_class = ["train"] * (n - 2 * (n // 4)) + ["val"] * (n // 4) + ["test"] * (n // 4)
        split = np.array(per_class * 3, dtype=object)
        if params.scramble_test:
            test = np.flatnonzero(split == "test")
            labels[test] = np.random.default_rng(1).permutation(labels[test])
    return ImageDataset(np.stack(images), labels, ["top", "bottom", "dark"],
                        [f"toy-{i}" for i in range(len(labels))], split=split)


class ToyMean(Fuser):
    requires_fit = False

    def predict_proba(self, logits):
        from scipy.special import softmax

        return softmax(np.asarray(logits), axis=2).mean(axis=0)


@hookimpl
def register_backbones():
    return [BackboneRecord("toy-net", build_toy_net, ToyNetParams, input_config=toy_input),
            BackboneRecord("flaky-net", build_flaky_net, FlakyNetParams, input_config=toy_input),
            BackboneRecord("file-net", build_file_net, FileNetParams, input_config=toy_input)]


@hookimpl
def register_datasets():
    return [DatasetRecord("toy-data", load_toy_data, ToyDataParams)]


@hookimpl
def register_fusers():
    return [FuserRecord("toy-mean", ToyMean)]
