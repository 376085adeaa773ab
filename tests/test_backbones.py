"""The timm backbones plugin: building, small-input stems, local pretrained weights."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
from pydantic import ValidationError  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from fusion_engine import FusionEngineError  # noqa: E402
from fusion_engine.plugins import get_plugins  # noqa: E402
from fusion_engine_timm import BackboneParams, TimmParams  # noqa: E402


def build(backbone: str, num_classes: int = 7, image_size: int | None = 16, **params):
    record = get_plugins().catalog().get("backbone", backbone).record
    return record.build(record.params.model_validate(params), num_classes=num_classes, image_size=image_size)


def test_plugin_import_does_not_import_torch_or_timm():
    code = "import sys, fusion_engine_timm; print('torch' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_catalog_lists_the_three_backbones():
    names = get_plugins().catalog().names("backbone")
    assert {"timm", "resnet18", "mobilenetv2"} <= set(names)


@pytest.mark.parametrize("backbone, params", [
    ("resnet18", {}),
    ("mobilenetv2", {}),
    ("timm", {"model": "resnet18"}),
])
def test_builds_a_classifier_for_num_classes_with_its_input_config(backbone, params):
    built = build(backbone, num_classes=7, image_size=16, **params)
    built.module.eval()
    assert built.module(torch.zeros(2, 3, 16, 16)).shape == (2, 7)
    assert built.input.size == 16
    assert built.input.in_chans == 3
    assert built.input.mean == pytest.approx((0.485, 0.456, 0.406))
    assert built.input.std == pytest.approx((0.229, 0.224, 0.225))


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv2"])
def test_a_fresh_head_starts_near_zero_so_the_first_loss_is_log_classes(backbone):
    torch.manual_seed(0)
    model = build(backbone, num_classes=10).module.train()
    logits = model(torch.randn(8, 3, 16, 16))
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(8))
    assert loss.item() == pytest.approx(np.log(10), abs=0.1)


def test_mobilenet_residual_blocks_start_as_the_identity():
    model = build("mobilenetv2").module
    block = next(m for m in model.modules() if getattr(m, "has_skip", False))
    x = torch.randn(2, block.conv_pw.in_channels, 4, 4)
    assert torch.allclose(block.eval()(x), x)


def test_without_image_size_the_input_is_timms_default_and_the_stem_unchanged():
    built = build("resnet18", image_size=None)
    assert built.input.size == 224
    assert built.module.conv1.stride == (2, 2)


def test_one_channel_input_averages_the_normalisation():
    built = build("resnet18", in_chans=1)
    assert built.input.in_chans == 1
    assert built.input.mean == pytest.approx((sum((0.485, 0.456, 0.406)) / 3,))
    assert built.module(torch.zeros(2, 1, 16, 16)).shape == (2, 7)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv2"])
def test_small_input_keeps_a_spatial_map_that_the_imagenet_stem_collapses(backbone):
    x = torch.zeros(1, 3, 16, 16)
    small = build(backbone, small_input=True).module.eval()
    large = build(backbone, small_input=False).module.eval()
    assert small.forward_features(x).shape[-2:] == (2, 2)
    assert large.forward_features(x).shape[-2:] == (1, 1)


def test_small_input_auto_follows_the_image_size():
    assert build("resnet18", image_size=32).module.conv1.kernel_size == (3, 3)
    assert build("resnet18", image_size=96).module.conv1.kernel_size == (7, 7)


def test_small_input_resnet_stem_is_a_3x3_stride_1_conv_without_maxpool():
    model = build("resnet18", small_input=True).module
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, torch.nn.Identity)


def test_small_input_true_on_an_unsupported_family_is_an_error():
    with pytest.raises(FusionEngineError, match="small_input cannot adapt timm model 'test_vit'"):
        build("timm", model="test_vit", small_input=True, image_size=None)


# One of each convolutional family whose stem small_input reaches by running the first two
# downsampling steps at stride 1, shortcuts included (the smallest member of each family).
FAMILIES = ["regnetx_002", "convnext_atto", "ghostnet_050", "repvgg_a0", "mobilenetv3_small_050", "densenet121"]


@pytest.mark.parametrize("model", FAMILIES)
def test_small_input_keeps_a_feature_map_in_every_convolutional_family(model):
    """At 28 px every family ends in 1x1 or less with its ImageNet stem; with small_input it keeps at
    least 2x2, trains (a backward pass) and gives logits for every class."""
    x = torch.zeros(2, 3, 28, 28)
    plain = build("timm", model=model, small_input=False, image_size=28).module.eval()
    with torch.no_grad():
        try:
            collapsed = min(plain.forward_features(x).shape[-2:]) <= 1
        except RuntimeError:  # smaller than the network can take at all
            collapsed = True
    assert collapsed
    small = build("timm", model=model, small_input=True, image_size=28).module
    with torch.no_grad():
        assert min(small.eval().forward_features(x).shape[-2:]) >= 2
    out = small.train()(torch.rand(2, 3, 28, 28))
    out.sum().backward()
    assert out.shape == (2, 7)


def test_small_input_auto_leaves_an_unsupported_family_as_it_is():
    built = build("timm", model="test_vit", image_size=None)
    assert built.input.size == 160


def test_unknown_timm_model_suggests_close_names():
    with pytest.raises(FusionEngineError, match=r"unknown timm model 'resnet81'; did you mean .*'resnet18'"):
        build("timm", model="resnet81")


def test_unknown_pretrained_tag_lists_the_known_ones():
    with pytest.raises(FusionEngineError, match="no pretrained tag 'nope'; its tags: .*tv_in1k"):
        build("timm", model="resnet18.nope")


def test_hub_names_are_refused_at_validation():
    with pytest.raises(ValidationError):
        TimmParams(model="hf-hub:timm/resnet18.a1_in1k")


def test_kwargs_cannot_override_what_the_engine_sets():
    with pytest.raises(ValidationError, match="num_classes"):
        BackboneParams(kwargs={"num_classes": 3})


def test_kwargs_reach_timm_create_model():
    from timm.layers import DropPath

    model = build("resnet18", kwargs={"drop_path_rate": 0.1}).module
    assert any(isinstance(m, DropPath) for m in model.modules())


# -- pretrained weights from a local file ------------------------------------------------------

@pytest.fixture
def resnet_file(tmp_path):
    """A 10-class resnet18's weights in a .safetensors file, and the weights themselves."""
    import timm

    torch.manual_seed(1)
    state = timm.create_model("resnet18", num_classes=10).state_dict()
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pretrained_file_loads_every_weight(resnet_file):
    path, state = resnet_file
    loaded = build("resnet18", num_classes=10, image_size=None, pretrained_file=str(path)).module.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_pretrained_file_with_other_classes_keeps_all_but_the_head(resnet_file):
    path, state = resnet_file
    loaded = build("resnet18", num_classes=3, image_size=None, pretrained_file=str(path)).module.state_dict()
    assert loaded["fc.weight"].shape == (3, 512)
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))


def test_pretrained_torch_file_loads_too(resnet_file, tmp_path):
    _, state = resnet_file
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    loaded = build("resnet18", num_classes=10, image_size=None, pretrained_file=str(path)).module.state_dict()
    assert torch.equal(loaded["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])


def test_pretrained_stem_is_resampled_for_small_input(resnet_file):
    path, state = resnet_file
    model = build("resnet18", num_classes=10, image_size=16, pretrained_file=str(path)).module
    assert model.conv1.weight.shape == (64, 3, 3, 3)
    assert not torch.allclose(model.conv1.weight, torch.zeros(()))
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_pretrained_three_channel_stem_adapts_to_one_channel(resnet_file):
    path, state = resnet_file
    model = build("resnet18", num_classes=10, image_size=None, in_chans=1, pretrained_file=str(path)).module
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.allclose(model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))


def test_pretrained_file_of_another_architecture_is_an_error(tmp_path):
    import timm

    path = tmp_path / "mobilenet.safetensors"
    save_file(timm.create_model("mobilenetv2_100", num_classes=10).state_dict(), str(path))
    with pytest.raises(FusionEngineError, match="cannot build timm model 'resnet18'"):
        build("resnet18", num_classes=3, pretrained_file=str(path))
    # the check before a run says which tensors and how many, from the file's header
    from fusion_engine_timm import BackboneParams, check_model

    with pytest.raises(FusionEngineError) as err:
        check_model("resnet18", BackboneParams(pretrained_file=path), num_classes=3, image_size=16)
    message = str(err.value)
    assert message.startswith(f"pretrained_file {path} does not fit timm model 'resnet18': ")
    assert re.search(r": 98 missing \(conv1\.weight, layer1\.0\.conv1\.weight, .*; 258 unexpected \(blocks\.0\.0\.bn1\.bias, "
                     r".*; 4 mis-shaped \(bn1\.weight \(file 32, network 64\), ", message), message
    assert "\n" not in message


def test_matching_checksum_loads(resnet_file):
    path, _ = resnet_file
    build("resnet18", num_classes=10, pretrained_file=str(path), pretrained_sha256=sha256(path).upper())


def test_checksum_mismatch_names_file_expected_and_actual(resnet_file):
    path, _ = resnet_file
    wrong = "0" * 64
    with pytest.raises(FusionEngineError) as info:
        build("resnet18", num_classes=10, pretrained_file=str(path), pretrained_sha256=wrong)
    message = str(info.value)
    assert str(path) in message and wrong in message and sha256(path) in message


def test_pretrained_file_is_relative_to_the_spec_folder(resnet_file):
    path, _ = resnet_file
    params = BackboneParams.model_validate({"pretrained_file": path.name}, context={"base_dir": path.parent})
    assert params.pretrained_file == path.resolve()


def test_missing_pretrained_file_fails_validation(tmp_path):
    with pytest.raises(ValidationError, match="no such file"):
        BackboneParams.model_validate({"pretrained_file": "absent.safetensors"}, context={"base_dir": tmp_path})


def test_checksum_without_file_fails_validation():
    with pytest.raises(ValidationError, match="pretrained_file is not"):
        BackboneParams(pretrained_sha256="a" * 64)


def test_in_chans_is_what_images_load_as():
    assert BackboneParams(in_chans=1).in_chans == 1
    with pytest.raises(ValidationError, match="Input should be 1 or 3"):
        BackboneParams(in_chans=4)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100"])
def test_the_ready_made_names_table_is_what_timm_says(name):
    """``validate`` reads the ready-made names' input config and final feature map from a table
    (no torch): the table must agree with timm's pretrained config and with a real pass."""
    import torch

    import timm

    from fusion_engine_timm import READY, _ready, adapt_small_input, model_input_config
    from fusion_engine_timm.small_input import feature_map_size

    ready = _ready(name)
    for in_chans in (1, 3):
        params = BackboneParams(in_chans=in_chans)
        for image_size in (None, 28):
            assert ready["input_config"](params, image_size=image_size) == \
                model_input_config(name, params, image_size=image_size)
    for small in (False, True):
        halvings = READY[name]["small_input_halvings" if small else "halvings"]
        for size in (8, 15, 16, 28, 33, 40, 64, 100, 224):
            with torch.device("meta"):
                model = timm.create_model(name, num_classes=3)
                if small:
                    assert adapt_small_input(model, size=size)
            expected = size
            for _ in range(halvings):
                expected = -(-expected // 2)
            assert feature_map_size(model, 3, size) == (expected, expected), (name, small, size)


def test_the_ready_made_check_warns_as_the_full_check_does(caplog):
    """The table's warning (no torch) and the full check's (a meta-device pass) are the same line."""
    from fusion_engine_timm import _ready, check_model

    params = BackboneParams(small_input=False, in_chans=1)
    with caplog.at_level("WARNING", logger="fusion_engine"):
        _ready("resnet18")["check"](params, num_classes=3, image_size=28)
        check_model("resnet18", params, num_classes=3, image_size=28)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0] == lines[1] and "use data.image_size >= 40 or small_input: true" in lines[0]
