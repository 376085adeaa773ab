"""``sklearn-digits``: the 8x8 digits bundled with scikit-learn, so a first run needs no download."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import Field

from fusion_engine import ImageDataset, Params

DIGITS_MAX_VALUE = 16


class DigitsParams(Params):
    n_per_class: Optional[int] = Field(
        None, ge=1, description="keep only the first n images of each class (quick trials); default: all"
    )


def load_digits_dataset(params: DigitsParams, base_dir: Path | None = None) -> ImageDataset:
    """Images as one ``uint8`` array ``(N, 8, 8)`` scaled to 0..255; the core resizes them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    keep = np.arange(len(labels))
    if params.n_per_class is not None:
        keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[: params.n_per_class] for c in np.unique(labels)]))
    images = np.rint(digits.images[keep] * (255 / DIGITS_MAX_VALUE)).astype(np.uint8)
    return ImageDataset(
        images=images,
        labels=labels[keep],
        class_names=[str(name) for name in digits.target_names],
        ids=[f"digits-{i:04d}" for i in keep],
        description="scikit-learn load_digits (UCI optical recognition of handwritten digits)",
    )
