"""An example third-party fusion-engine plugin: a backbone and a fuser.

Install it with ``pip install ./docs/examples/fusion-engine-example`` and use ``tiny-cnn`` and
``median`` in a spec. Torch is imported inside the factory, so ``fusion-engine validate`` and
``fusion-engine plugins`` stay fast.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from fusion_engine import (BackboneRecord, BuiltBackbone, Fuser, FuserRecord, InputConfig, Params,
                           check_logits, hookimpl)


class TinyCNNParams(Params):
    width: int = Field(16, ge=1, le=512, description="channels of the first conv layer")
    dropout: float = Field(0.0, ge=0, lt=1)


def build_tiny_cnn(params: TinyCNNParams, num_classes: int, image_size: int | None = None) -> BuiltBackbone:
    import torch.nn as nn

    w = params.width
    module = nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(params.dropout), nn.Linear(2 * w, num_classes),
    )
    size = image_size or 32
    return BuiltBackbone(module, InputConfig(size=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))


class MedianFuser(Fuser):
    """The per-class median of member probabilities, renormalised: robust to one wild member."""

    requires_fit = False  # nothing learned on val, so its val score needs no cross-fitting

    def predict_proba(self, logits):
        from scipy.special import softmax

        proba = np.median(softmax(check_logits(logits), axis=2), axis=0)
        return proba / proba.sum(axis=1, keepdims=True)


@hookimpl
def register_backbones():
    return [BackboneRecord("tiny-cnn", build_tiny_cnn, TinyCNNParams, description="a two-layer CNN")]


@hookimpl
def register_fusers():
    return [FuserRecord("median", MedianFuser, description="median of member probabilities")]
