"""fusion-engine first-party plugin: backbones from timm.

``timm`` builds any timm architecture by name; ``resnet18`` and ``mobilenetv2`` are ready-made
names for the two members of the quickstart. torch and timm load inside the factories, so listing
and validating plugins stays fast.

Pretrained weights come from a local file (``pretrained_file``, checked against
``pretrained_sha256``) or, with ``pretrained: true`` or a model name with a tag
(``resnet18.a1_in1k``), from timm's own source for them: the Hugging Face hub, through its local
cache. :func:`hub_weights` finds the file timm would load (its repository, revision, file name,
the order timm tries them in) in the cache without touching the network when ``HF_HUB_OFFLINE=1``
(downloading it otherwise), and names it by repository, commit, file and sha256: that identity
enters the member's zoo key, and the member is built from that very file. Weights neither cached
nor downloadable are one line saying so, before any run starts.

``small_input`` adapts a stem built for 224 px ImageNet images to images of 64 px or less, as
CIFAR-style networks do, so that a 16 or 32 px input is not pooled down to a single pixel:

- ResNet family: ``conv1`` becomes a 3x3 stride-1 convolution and the max-pool is dropped. From
  scratch the new kernel is freshly initialised; with pretrained weights the 7x7 kernel is
  resampled to 3x3 (timm's ``resample_patch_embed``), which keeps what it detects at the scale a
  downsized image shows it.
- MobileNet/EfficientNet family (timm models with ``conv_stem``): the stem convolution and the
  first stride-2 block run at stride 1 (as kuangliu's CIFAR MobileNetV2 does), so the network
  downsamples 8x instead of 32x. The weights are unchanged. On digits at 16 px the stride-1
  block costs 1.5x the training time and is worth 3 points (96.4% -> 99.2% test, 10 epochs).

Models trained from scratch start with a near-zero classifier and residual blocks that start as
the identity; both matter for a MobileNetV2 learning from a thousand images.

The package: ``params`` (what a spec gives), ``hub`` (pretrained weights and their identity),
``small_input`` (the stem and the feature-map check), ``models`` (building and checking a
network); this module declares the records.
"""

from __future__ import annotations

from typing import Any

from fusion_engine import BackboneRecord, BuiltBackbone, InputConfig, hookimpl

from .hub import HubWeights, hub_weights, uses_hub, verify_sha256, weights_identity
from .models import build_model, check_model, input_from_timm, model_input_config
from .params import SMALL_INPUT_MAX, BackboneParams, TimmParams
from .small_input import adapt_small_input, small_stem, warn_if_collapsed

__all__ = ["BackboneParams", "TimmParams", "SMALL_INPUT_MAX", "HubWeights", "hub_weights", "uses_hub",
           "weights_identity", "verify_sha256", "build_model", "check_model", "model_input_config",
           "adapt_small_input", "READY", "register_backbones"]


def build_timm(params: TimmParams, num_classes: int, image_size: int | None = None) -> BuiltBackbone:
    return build_model(params.model, params, num_classes=num_classes, image_size=image_size)


def timm_input_config(params: TimmParams, image_size: int | None = None) -> InputConfig:
    return model_input_config(params.model, params, image_size=image_size)


def check_timm(params: TimmParams, *, num_classes: int, image_size: int | None = None) -> None:
    check_model(params.model, params, num_classes=num_classes, image_size=image_size)


def timm_weights(params: TimmParams) -> dict | None:
    return weights_identity(params.model, params)


#: what ``validate`` needs of the ready-made names, known without importing torch or timm: timm's
#: pretrained config (input size, mean, std, and the evaluation resize and crop) and how many times the network halves its input (all
#: its downsampling steps are 3x3 stride-2 convolutions or pools with padding 1, or ResNet's 7x7
#: stem with padding 3: each gives ceil(size / 2)), and how many with ``small_input``'s stem.
#: tests/test_backbones.py checks both against timm.
READY = {
    "resnet18": {"size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                 "interpolation": "bicubic", "crop_pct": 0.95, "crop_mode": "center", "halvings": 5,
                 "small_input_halvings": 3},
    "mobilenetv2_100": {"size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                        "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center", "halvings": 5,
                        "small_input_halvings": 3},
}


def _ready(model_name: str) -> dict[str, Any]:
    """``build``, ``input_config`` and ``check`` of a ready-made name for one timm architecture.
    Its ``input_config``, and its ``check`` when the member has no ``pretrained_file``, no hub
    weights and no ``kwargs``, need neither torch nor timm (:data:`READY`): ``validate`` of the quickstart stays fast."""
    known = READY[model_name]

    def build(params: BackboneParams, num_classes: int, image_size: int | None = None) -> BuiltBackbone:
        return build_model(model_name, params, num_classes=num_classes, image_size=image_size)

    def input_config(params: BackboneParams, image_size: int | None = None) -> InputConfig:
        return input_from_timm({"input_size": (3, known["size"], known["size"]),
                                **{k: known[k] for k in ("mean", "std", "interpolation", "crop_pct", "crop_mode")}},
                               params, image_size)

    def check(params: BackboneParams, *, num_classes: int, image_size: int | None = None) -> None:
        if params.pretrained_file is not None or params.kwargs or uses_hub(model_name, params):  # weights to fit
            return check_model(model_name, params, num_classes=num_classes, image_size=image_size)
        small = small_stem(params, image_size)
        halvings = known["small_input_halvings" if small else "halvings"]

        def final(width: int) -> tuple[int, int]:
            for _ in range(halvings):
                width = -(-width // 2)
            return (width, width)

        warn_if_collapsed(model_name, params, image_size, image_size or known["size"], final, adapted=small)

    def weights(params: BackboneParams) -> dict | None:
        return weights_identity(model_name, params)

    for fn, what in ((build, "build"), (input_config, "input_config"), (check, "check"), (weights, "weights")):
        fn.__name__ = f"{what}_{model_name}"
    build.__doc__ = f"timm ``{model_name}``."
    return {"build": build, "input_config": input_config, "check": check, "weights": weights}


@hookimpl
def register_backbones():
    return [
        BackboneRecord("timm", build_timm, TimmParams, input_config=timm_input_config, check=check_timm,
                       weights=timm_weights,
                       description="any timm architecture by name (model: resnet50, convnext_tiny, ...)"),
        BackboneRecord("resnet18", params=BackboneParams, description="timm resnet18", **_ready("resnet18")),
        BackboneRecord("mobilenetv2", params=BackboneParams, description="timm mobilenetv2_100",
                       **_ready("mobilenetv2_100")),
    ]

