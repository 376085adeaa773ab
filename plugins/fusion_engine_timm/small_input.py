"""Stems built for 224 px ImageNet images adapted to images of 64 px or less (``small_input``),
as CIFAR-style networks do, and the check that a network keeps a feature map at a given size
(the plugin's docstring says what changes for each family, and the figures)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .params import SMALL_INPUT_MAX

if TYPE_CHECKING:
    from .params import BackboneParams

log = logging.getLogger("fusion_engine")


def small_stem(params: BackboneParams, image_size: int | None) -> bool:
    """Whether the member's stem is adapted to small images."""
    if params.small_input == "auto":
        return image_size is not None and image_size <= SMALL_INPUT_MAX
    return bool(params.small_input)


def adapt_small_input(model: Any, *, resample: bool = False, size: int = 32) -> bool:
    """Make ``model``'s stem keep the resolution of a small image, 4x as CIFAR-style networks do;
    False if it cannot (a vision transformer, whose patch grid is fixed).

    ResNets get a 3x3 stride-1 first convolution and no max-pool (``resample`` resizes a
    pretrained 7x7 kernel to 3x3 instead of initialising it afresh); every other family with a
    strided convolution or pooling has its first two downsampling steps run at stride 1 (see
    :func:`_unstride_first_steps`), checked to run on ``size`` px images: for MobileNet and
    EfficientNet that is the stem and the first strided block, as kuangliu's CIFAR MobileNetV2.
    """
    import torch
    from timm.models.resnet import ResNet
    from torch import nn

    if isinstance(model, ResNet):
        if isinstance(model.conv1, nn.Conv2d):
            old = model.conv1
            model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None)
            with torch.no_grad():
                if resample:
                    from timm.layers import resample_patch_embed

                    weight = old.weight if old.kernel_size == (3, 3) else resample_patch_embed(old.weight, [3, 3])
                    model.conv1.weight.copy_(weight)
                    if old.bias is not None:
                        model.conv1.bias.copy_(old.bias)
                else:  # as timm's ResNet initialises its convolutions
                    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        else:  # deep stems (resnet*d): a sequence of 3x3 convolutions, the first at stride 2
            _first_strided_conv(model.conv1).stride = (1, 1)
        model.maxpool = nn.Identity()
        return True
    if hasattr(model, "pos_embed"):  # a transformer: its patch grid and position embeddings are fixed
        return False
    return _unstride_first_steps(model, steps=2, size=size)


def _unstride_first_steps(model: Any, steps: int, size: int) -> bool:
    """Run the first ``steps`` downsampling steps at stride 1. A step is every strided
    convolution or pooling that takes the network's full-resolution input: found by a pass on the
    meta device that records each layer's input size, so a block's main path and its shortcut
    change together. False when the model has no strided layer to change."""
    import torch
    from torch import nn

    kinds = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    device = next(model.parameters()).device
    training = model.training
    original = {m: m.stride for m in model.modules() if isinstance(m, kinds)}

    def probe(hooked: bool, width: int = 64) -> list[tuple[Any, int]] | None:
        """A pass at ``width`` px recording each strided layer's input width; None when it fails."""
        seen: list[tuple[Any, int]] = []
        hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0].shape[-1])))
                 for m in original] if hooked else []
        try:
            with torch.no_grad():
                model.eval()
                model.forward_features(torch.zeros(1, _in_chans(model), width, width, device=device))
        except Exception:
            return None
        finally:
            model.train(training)
            for hook in hooks:
                hook.remove()
        return seen

    changed = False
    for _ in range(steps):
        seen = probe(hooked=True)
        if not seen:
            break
        strided = [m for m, width in seen if width == seen[0][1] and _stride(m) > 1]
        if not strided:
            break
        for m in strided:
            m.stride = (1, 1) if isinstance(m, nn.Conv2d) else 1
        changed = True
    if changed and (probe(hooked=False) is None or probe(hooked=False, width=size) is None):
        # a shortcut that did not follow the main path: leave the model as it was
        for m, stride in original.items():
            m.stride = stride
        return False
    return changed


def _stride(module: Any) -> int:
    stride = module.stride
    return max(stride) if isinstance(stride, tuple) else int(stride)


def _in_chans(model: Any) -> int:
    from torch import nn

    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


def _first_strided_conv(module: Any) -> Any:
    from torch import nn

    for m in module.modules():
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            return m
    return None


def feature_map_size(model: Any, in_chans: int, size: int) -> tuple[int, int] | None:
    """The spatial size of the model's last feature map for ``size`` px input, found by a pass on
    the model's device (on the meta device: shapes only); None for a model without spatial
    features (a transformer's tokens). Raises what the pass raises."""
    import torch

    training = model.training
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model.eval()  # batch norm in training refuses a 1x1 map of one sample: the size is the question here
            out = model.forward_features(torch.zeros(1, in_chans, size, size, device=device))
    finally:
        model.train(training)
    return tuple(out.shape[-2:]) if out.ndim == 4 else None


def _smallest_size_for(final_map, size: int, limit: int = 1024) -> int | None:
    """The smallest multiple of 8 above ``size`` whose final feature map (``final_map(width)``)
    is at least 2x2."""
    def fits(width: int) -> bool:
        try:
            final = final_map(width)
        except Exception:
            return False
        return final is not None and min(final) >= 2

    lo, hi = size, limit
    if not fits(hi):
        return None
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def warn_if_collapsed(name: str, params: BackboneParams, image_size: int | None, size: int, final_map, *,
                       adapted: bool, final: tuple[int, int] | None = None) -> None:
    """Warn when the network's last feature map at ``size`` px is smaller than 2x2, naming the
    smallest ``data.image_size`` that keeps one; ``final_map(width)`` gives the map's size."""
    final = final if final is not None else final_map(size)
    if min(final) >= 2:
        return
    small = small_stem(params, image_size)
    smallest = _smallest_size_for(final_map, size)
    stem = ("even with small_input's stem" if adapted else
            "small_input could not adapt its stem" if small else "small_input is off")
    hint = f"use data.image_size >= {smallest}" if smallest else "use a larger data.image_size"
    if not small and params.small_input is not True:
        hint += " or small_input: true"
    log.warning("timm model '%s' at %d px ends in a %dx%d feature map (%s), which leaves little to classify; %s "
                "to keep a 2x2 map", name, size, final[0], final[1], stem, hint)


def cannot_adapt(name: str, model: Any) -> str:
    return (f"small_input cannot adapt timm model '{name}' ({type(model).__name__}): running its first "
            "downsampling steps at stride 1 does not give a network that runs (a vision transformer's patch grid is "
            "fixed; some families' shortcuts do not follow); set small_input: false and a larger data.image_size")

