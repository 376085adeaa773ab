"""How an image becomes the ``uint8`` pixels a member sees when it is validated, tested or asked
to predict: one function for every place that does it (a run's val and test splits, the
decoded-image cache, and new images given to a trained member), so a member always sees its
images prepared the way it was trained.

An :class:`~fusion_engine.records.InputConfig` says which of two preparations applies:

- **squash** (``crop_mode: squash``, ``crop_pct: 1``, ``interpolation: bilinear``: the
  small-image path, and every config that does not say otherwise): the whole image resized to
  ``size x size``, bilinear and antialiased; JPEGs decode straight to a smaller scale (draft
  mode); arrays of one shape are resized in one batched call.
- **timm's evaluation transform** (any other config, as the photo path takes from a backbone's
  data config): ``timm.data.create_transform(is_training=False)`` with the config's
  ``interpolation``, ``crop_pct`` and ``crop_mode`` (resize the shorter side to
  ``size / crop_pct``, centre-crop ``size``), ended in its ``uint8`` form (its prefetcher form).

Normalisation is not part of it: members normalise ``uint8`` batches on the device.

Images are file paths, encoded bytes (``{"bytes": ..., "path": ...}`` as Hugging Face datasets
hold them), PIL images or ``uint8`` arrays. One that cannot be read raises a one-line
:class:`~fusion_engine.errors.FusionEngineError` naming it.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import FusionEngineError, UnreadableImage
from .records import InputConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

DECODE_THREADS = min(8, os.cpu_count() or 1)
RESIZE_CHUNK_FLOATS = 2**26  # bounds the float32 copy interpolate makes: 256 MiB


def is_squash(cfg: InputConfig) -> bool:
    """Whether ``cfg`` asks for the small-image preparation (a plain resize to a square)."""
    return cfg.crop_mode == "squash" and cfg.crop_pct == 1.0 and cfg.interpolation == "bilinear"


def preparation(cfg: InputConfig) -> dict:
    """What decides the prepared pixels besides the image: the part of ``cfg`` a cache key or a
    member's card records (normalisation is applied later, on the device)."""
    return {"size": cfg.size, "in_chans": cfg.in_chans, "interpolation": cfg.interpolation,
            "crop_pct": cfg.crop_pct, "crop_mode": cfg.crop_mode}


def load_images(images: Sequence[Any] | np.ndarray, indices: Sequence[int] | np.ndarray, size: "int | InputConfig",
                in_chans: int | None = None) -> "torch.Tensor":
    """The images at ``indices`` as one ``uint8`` tensor ``(n, in_chans, size, size)``.

    ``size`` is an :class:`InputConfig` (its preparation is used, see the module docstring) or
    a square size, with ``in_chans``, for the squash preparation. Grayscale images are repeated
    to 3 channels, RGB turned to luma as PIL does it. Files and PIL images are decoded in a
    thread pool.
    """
    import torch

    cfg = size if isinstance(size, InputConfig) else squash_config(size, 3 if in_chans is None else in_chans)
    if cfg.in_chans not in (1, 3):
        raise FusionEngineError(f"in_chans must be 1 or 3, got {cfg.in_chans}")
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    squash = is_squash(cfg)
    if squash and isinstance(images, np.ndarray) and images.dtype != object:
        return _resize_batch(_to_channels(images[indices], cfg.in_chans), cfg.size)
    items = [images[i] for i in indices]
    if squash and items and all(isinstance(x, np.ndarray) for x in items) and len({x.shape for x in items}) == 1:
        return _resize_batch(_to_channels(np.stack(items), cfg.in_chans), cfg.size)
    if not items:
        return torch.empty((0, cfg.in_chans, cfg.size, cfg.size), dtype=torch.uint8)
    out = torch.empty((len(items), cfg.in_chans, cfg.size, cfg.size), dtype=torch.uint8)
    with ThreadPoolExecutor(min(DECODE_THREADS, len(items))) as pool:  # PIL releases the GIL to decode and resize
        for i, pixels in enumerate(pool.map(partial(prepare_image, cfg=cfg), items)):
            out[i] = pixels
    return out


def squash_config(size: int, in_chans: int = 3) -> InputConfig:
    """The small-image preparation at ``size`` (normalisation left at its neutral value)."""
    return InputConfig(size=size, mean=(0.0,) * in_chans, std=(1.0,) * in_chans, in_chans=in_chans)


def prepare_image(item: Any, cfg: InputConfig) -> "torch.Tensor":
    """One image prepared as ``cfg`` says: a ``uint8`` tensor ``(in_chans, size, size)``."""
    import torch

    mode = "L" if cfg.in_chans == 1 else "RGB"
    if is_squash(cfg):
        pixels = _squashed(item, cfg.size, mode)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return torch.from_numpy(np.array(pixels, order="C"))  # a writable copy: PIL's arrays are read-only
    with open_image(item) as image:
        return eval_transform(cfg)(image.convert(mode) if image.mode != mode else image)


@lru_cache(maxsize=32)
def eval_transform(cfg: InputConfig):
    """timm's evaluation transform for ``cfg``, ending in a ``uint8`` tensor (no normalisation)."""
    from timm.data import create_transform

    return create_transform(input_size=cfg.size, is_training=False, interpolation=cfg.interpolation,
                            crop_pct=cfg.crop_pct, crop_mode=cfg.crop_mode, use_prefetcher=True)


def open_image(item: Any) -> Image.Image:
    """A PIL image for any kind of image item (the caller closes it); a one-line error naming
    the file when it cannot be read."""
    if isinstance(item, Image.Image):
        return item.copy()  # the caller's image is not closed or changed
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise FusionEngineError(f"image arrays must be uint8, got {item.dtype}")
        return Image.fromarray(item.squeeze(-1) if item.ndim == 3 and item.shape[-1] == 1 else item)
    source, name = _source(item)
    try:
        image = Image.open(source)
        image.load()
        return image
    except UnidentifiedImageError:
        raise UnreadableImage(f"cannot read image {name}: not an image format Pillow can decode") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise UnreadableImage(f"cannot read image {name}: {str(exc) or type(exc).__name__}") from None


def _source(item: Any) -> tuple[Any, str]:
    """What PIL opens for ``item`` (a path or a byte stream) and how errors name it."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item), os.fspath(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return io.BytesIO(item), f"({len(item)} encoded bytes)"
    if isinstance(item, dict) and ("bytes" in item or "path" in item):  # a Hugging Face Image() value
        data, path = item.get("bytes"), item.get("path")
        if data is not None:
            return io.BytesIO(data), path or f"({len(data)} encoded bytes)"
        if path:
            return os.fspath(path), os.fspath(path)
    raise FusionEngineError(f"unsupported image type {type(item).__name__}; expected a path, encoded bytes, a PIL "
                            f"image or a uint8 array")


def _squashed(item: Any, size: int, mode: str) -> np.ndarray:
    """``item`` resized whole to ``size x size`` in ``mode``; JPEGs decode to a smaller scale first."""
    if isinstance(item, np.ndarray):
        return _resized(open_image(item), size, mode)
    if isinstance(item, Image.Image):
        return _resized(item, size, mode)
    source, name = _source(item)
    try:
        with Image.open(source) as image:
            image.draft(mode, (size, size))  # JPEG decodes straight to a smaller scale: much faster
            return _resized(image, size, mode)
    except UnidentifiedImageError:
        raise UnreadableImage(f"cannot read image {name}: not an image format Pillow can decode") from None
    except FusionEngineError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise UnreadableImage(f"cannot read image {name}: {str(exc) or type(exc).__name__}") from None


def _resized(image: Image.Image, size: int, mode: str) -> np.ndarray:
    image = image.convert(mode)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _to_channels(batch: np.ndarray, in_chans: int) -> "torch.Tensor":
    """``(n, H, W[, C])`` uint8 -> ``(n, in_chans, H, W)``, converting as PIL's ``convert`` does."""
    import torch

    if batch.dtype != np.uint8:
        raise FusionEngineError(f"image arrays must be uint8, got {batch.dtype}")
    if batch.ndim == 3:
        batch = batch[..., None]
    if batch.ndim != 4 or batch.shape[-1] not in (1, 2, 3, 4):
        raise FusionEngineError(f"image arrays must be (H, W) or (H, W, 1|3|4) per image, got {batch.shape[1:]}")
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    gray = x.shape[1] <= 2
    x = x[:, :1] if gray else x[:, :3]  # alpha dropped, as PIL's convert("RGB") and ("L") do
    if in_chans == 3 and gray:
        return x.expand(-1, 3, -1, -1)
    if in_chans == 1 and not gray:
        weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(1, 3, 1, 1)  # PIL's ITU-R 601-2 luma
        return ((x.to(torch.int32) * weights).sum(1, keepdim=True) + 0x8000).bitwise_right_shift(16).to(torch.uint8)
    return x


def _resize_batch(x: "torch.Tensor", size: int) -> "torch.Tensor":
    import torch
    import torch.nn.functional as F

    n, channels, height, width = x.shape
    if (height, width) == (size, size):
        return x.contiguous()
    out = torch.empty((n, channels, size, size), dtype=torch.uint8)
    chunk = max(1, RESIZE_CHUNK_FLOATS // (channels * max(height * width, size * size)))
    for start in range(0, n, chunk):
        resized = F.interpolate(
            x[start : start + chunk].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[start : start + chunk] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out
