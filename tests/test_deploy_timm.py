"""Real networks through the export: timm's tiny ``test_resnet`` (RGB, ImageNet normalisation)
and ``test_efficientnet`` (grayscale, its small-input stem) at 16 px, fused by logistic stacking;
torch and ONNX Runtime (one graph input per kind of image) against the run."""

from __future__ import annotations

import numpy as np
import pytest

import fusion_engine
from conftest import TOY_PLUGIN, toy_spec_data, write_spec
from fusion_engine.runfolder import RunFolder

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def timm_export(tmp_path_factory):
    from fusion_engine.runner import run_experiment

    root = tmp_path_factory.mktemp("timm")
    train = {"epochs": 1, "batch_size": 16}
    spec = toy_spec_data(
        data={"dataset": "toy-data", "params": {"n_per_class": 20}, "split": {"val": 0.25, "test": 0.25}, "image_size": 16},
        members=[{"name": "resnet", "backbone": "timm", "params": {"model": "test_resnet"}, "train": train},
                 {"name": "effnet", "backbone": "timm", "params": {"model": "test_efficientnet", "in_chans": 1,
                                                                   "small_input": True},
                  "train": train, "calibrate": "temperature"}],
        fusers=[{"name": "stack-lr", "fuser": "logistic-stacking", "temperature": True}])
    result = run_experiment(write_spec(root / "spec.yaml", spec), registry=root / "registry", quiet=True)
    out = root / "export"
    fusion_engine.export_ensemble(result.run_id, out=out, registry=root / "registry", onnx=True)
    folder = RunFolder(result.run_dir)
    record = fusion_engine.get_plugins([TOY_PLUGIN]).catalog().get("dataset", "toy-data").record
    dataset = record.load(record.params(n_per_class=20))
    where = {i: k for k, i in enumerate(dataset.ids)}
    images = dataset.images[[where[i] for i in folder.split["test"]["ids"]]]
    return out, images, folder.probabilities("test")["stack-lr"]


def test_timm_members_export_and_predict_in_torch_and_onnx_runtime(timm_export):
    out, images, stored = timm_export
    ens = fusion_engine.load(out, device="cpu")
    assert ens.card.row == "stack-lr" and ens.members == ["resnet", "effnet"]
    assert ens.card.members[1].image_size == 16 and ens.card.members[1].params["small_input"] is True
    assert ens.card.members[0].input.in_chans == 3 and ens.card.members[1].input.in_chans == 1
    assert np.abs(ens.predict_proba(images) - stored).max() <= 1e-5
    onnx_ens = fusion_engine.load(out, runtime="onnx")
    assert np.abs(onnx_ens.predict_proba(images) - stored).max() <= 1e-4
    assert [(i.name, i.members) for i in onnx_ens.card.onnx.inputs] == [("images_16", ["resnet"]),
                                                                        ("images_16_gray", ["effnet"])]


def test_one_rgb_array_is_one_image_for_an_ensemble_that_takes_colour(timm_export):
    """(H, W, 3) uint8 is one colour image when a member takes 3 channels (resnet here), the same
    as that image in a list or as a batch of one; not a batch of H grey images."""
    out, _, _ = timm_export
    ens = fusion_engine.load(out, device="cpu")
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    one = ens.predict_proba(rgb)
    assert one.shape == (1, 3)
    assert np.array_equal(one, ens.predict_proba([rgb])) and np.array_equal(one, ens.predict_proba(rgb[None]))
    assert ens.predict(rgb).tolist() == [ens.classes[one.argmax()]]
