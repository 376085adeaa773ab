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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from pathlib import Path
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


def empty_image_error(item: Any) -> str | None:
    """The error for an ``item`` that holds no image at all (a dataset's empty row), or None."""
    if item is None:
        return "cannot read image: the value is None (an empty row?)"
    if isinstance(item, dict) and ("bytes" in item or "path" in item) and item.get("bytes") is None \
            and not item.get("path"):
        return "cannot read image: a Hugging Face image value with neither bytes nor a path (an empty row?)"
    return None


def _source(item: Any) -> tuple[Any, str]:
    """What PIL opens for ``item`` (a path or a byte stream) and how errors name it."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item), os.fspath(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return io.BytesIO(item), f"({len(item)} encoded bytes)"
    empty = empty_image_error(item)
    if empty:
        raise UnreadableImage(empty)
    if isinstance(item, dict) and ("bytes" in item or "path" in item):  # a Hugging Face Image() value
        data, path = item.get("bytes"), item.get("path")
        if data is not None:
            return io.BytesIO(data), path or f"({len(data)} encoded bytes)"
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
    return _channels(torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2), in_chans)


def _channels(x: "torch.Tensor", in_chans: int) -> "torch.Tensor":
    """``(n, 1|2|3|4, H, W)`` uint8 -> ``(n, in_chans, H, W)``, converting as PIL's ``convert`` does."""
    import torch

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


# -- new images, as a run prepared its dataset's ---------------------------------------------------
# An exported ensemble (fusion_engine.deploy) and ``fusion-engine predict`` prepare new images with
# these, which end in the same functions as load_images, so a member sees them as it saw its run's.

#: the two ways :func:`load_images` resizes for the squash preparation (see :func:`resize_method`)
RESIZE_TENSOR, RESIZE_PIL = "tensor", "pil"


def resize_method(images: Sequence[Any] | np.ndarray) -> str:
    """How :func:`load_images` resizes ``images`` for the squash preparation: ``"tensor"`` for
    arrays of one shape (one batched, antialiased bilinear resize in torch), ``"pil"`` for files,
    PIL images and arrays of several shapes (PIL's bilinear resize, image by image). The two differ
    by one grey level in about a pixel in five, so an exported ensemble records which one its run
    used and predicts new images the same way (:func:`decode_images`). timm's evaluation transform
    (the photo path) is the same for every kind of image."""
    if isinstance(images, np.ndarray) and images.dtype != object:
        return RESIZE_TENSOR
    uniform = len(images) > 0 and all(isinstance(x, np.ndarray) for x in images) and len({x.shape for x in images}) == 1
    return RESIZE_TENSOR if uniform else RESIZE_PIL


#: what a folder of images is searched for: torchvision's ``IMG_EXTENSIONS`` (the ``imagefolder``
#: dataset and ``fusion-engine predict`` both walk folders with :func:`image_files`)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_files(folder: str | os.PathLike, skipped: "Counter[str] | None" = None) -> list[Path]:
    """Every image file under ``folder`` (by extension, :data:`IMAGE_EXTENSIONS`), recursively,
    in a stable (sorted) order; hidden files and folders are skipped, symlinked folders followed.
    The other files skipped are counted by extension in ``skipped``. One walker, so a dataset of
    image folders and ``fusion-engine predict`` on a folder agree on which files are images."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath, name))
            elif skipped is not None:
                skipped[os.path.splitext(name)[1].lower()] += 1
    return found


def pixels_key(cfg: Any) -> tuple:
    """What decides a member's prepared pixels, as a dict key: members with equal keys share one
    decoded tensor. ``cfg`` is anything with an input config's fields (an ``InputConfig``, an
    export card's member input)."""
    return (cfg.size, cfg.in_chans, getattr(cfg, "interpolation", "bilinear"), float(getattr(cfg, "crop_pct", 1.0)),
            getattr(cfg, "crop_mode", "squash"))


def decode_images(items: Sequence[Any], size: "int | InputConfig", in_chans: int | None = None,
                  method: str = RESIZE_PIL) -> tuple["torch.Tensor", dict[int, str]]:
    """``items`` (paths, encoded bytes, PIL images, uint8 arrays ``(H, W[, C])``) as ``uint8``
    ``(n, in_chans, size, size)``, each made exactly as :func:`load_images` makes the images of a
    dataset: ``size`` is an :class:`InputConfig` or a square size (with ``in_chans``) for the
    squash preparation. For squash, ``method`` (:func:`resize_method` of the run's dataset) says
    how: files through PIL (``"pil"``), or decoded at their own size and resized in torch
    (``"tensor"``); timm's evaluation transform (the photo path) is per image, whatever
    ``method``. An item that cannot be read is left out of the tensor and its position mapped to
    the reason, so one bad file never stops the others.
    """
    import torch

    cfg = size if isinstance(size, InputConfig) else squash_config(size, 3 if in_chans is None else in_chans)
    size, in_chans = cfg.size, cfg.in_chans
    if in_chans not in (1, 3):
        raise FusionEngineError(f"in_chans must be 1 or 3, got {in_chans}")
    if method not in (RESIZE_PIL, RESIZE_TENSOR):
        raise ValueError(f"unknown resize method {method!r}; expected {RESIZE_TENSOR!r} or {RESIZE_PIL!r}")
    mode = "L" if in_chans == 1 else "RGB"
    squash = is_squash(cfg)
    if not squash:
        work = partial(prepare_image, cfg=cfg)  # a (C, size, size) tensor, as load_images makes it
    elif method == RESIZE_PIL:
        work = partial(_squashed, size=size, mode=mode)
    else:
        work = _native
    if work is _native and all(isinstance(item, np.ndarray) for item in items):
        decoded = [_or_reason(work, item) for item in items]  # nothing to decode: threads would only cost
    else:
        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            decoded = list(pool.map(partial(_or_reason, work), items))
    errors = {i: d for i, d in enumerate(decoded) if isinstance(d, str)}
    ok = [i for i in range(len(items)) if i not in errors]
    out = torch.empty((len(ok), in_chans, size, size), dtype=torch.uint8)
    if not squash:
        for row, i in enumerate(ok):
            out[row] = decoded[i]
        return out, errors
    if method == RESIZE_PIL:
        # written through numpy's view of ``out``: PIL's arrays are read-only, and torch warns on
        # wrapping one (from_numpy); this copies each image once, into its place
        view = out.numpy()
        for row, i in enumerate(ok):
            image = decoded[i]
            view[row] = image[None] if in_chans == 1 else image.transpose(2, 0, 1)
        return out, errors
    by_shape: dict[tuple, list[int]] = {}
    for row, i in enumerate(ok):
        by_shape.setdefault(decoded[i].shape, []).append(row)
    for rows in by_shape.values():  # arrays of one shape resize together, as a dataset's do
        resized = _resize_batch(_to_channels(np.stack([decoded[ok[r]] for r in rows]), in_chans), size)
        if len(rows) == len(ok):
            return resized, errors
        out[rows] = resized
    return out, errors


def batch_pixels(x: "torch.Tensor", size: "int | InputConfig", in_chans: int | None = None) -> "torch.Tensor":
    """A uint8 batch ``(n, C, H, W)`` as :func:`load_images` makes a dataset's arrays of one
    shape: for squash, channels converted and resized in torch (a batch already at ``size`` with
    ``in_chans`` channels comes back as it is, without a copy); otherwise timm's evaluation
    transform on each image."""
    import torch

    cfg = size if isinstance(size, InputConfig) else squash_config(size, 3 if in_chans is None else in_chans)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 2, 3, 4):
        raise FusionEngineError(f"an image batch must be uint8 (n, 1|3|4, H, W), got {tuple(x.shape)} {x.dtype}")
    arrays = x.permute(0, 2, 3, 1).numpy()  # the layout a dataset's arrays have (n, H, W, C)
    if not is_squash(cfg):
        return load_images(list(arrays), np.arange(len(arrays)), cfg)
    if tuple(x.shape[2:]) == (cfg.size, cfg.size):  # nothing to resample: the channels are all that change
        return _channels(x, cfg.in_chans).contiguous()
    # resampled as the run's arrays were, to the last bit
    return _resize_batch(_to_channels(arrays, cfg.in_chans), cfg.size)


def _or_reason(work, item: Any) -> Any:
    try:
        return work(item)
    except FusionEngineError as exc:
        return str(exc)
    except Exception as exc:  # anything else one item raises is that item's problem, not the batch's
        return f"cannot read image {_label(item)}: {type(exc).__name__}: {exc}"


def _label(item: Any) -> str:
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else type(item).__name__


#: PIL modes kept as they are by :func:`_native`; others become RGB (colour) or L (one channel)
_NATIVE_MODES = ("L", "LA", "RGB", "RGBA")
_COLOUR_MODES = ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa")


def _native(item: Any) -> np.ndarray:
    """One image as a uint8 array at its own size, ``(H, W)`` or ``(H, W, 2|3|4)``, as an array
    dataset would hold it; :func:`_to_channels` converts it as for a dataset."""
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise FusionEngineError(f"image arrays must be uint8, got {item.dtype}")
        if not (item.ndim == 2 or (item.ndim == 3 and item.shape[-1] in (1, 2, 3, 4))):
            raise FusionEngineError(f"image arrays must be (H, W) or (H, W, 1|3|4), got {item.shape}")
        return item
    with open_image(item) as image:  # a copy of a PIL image, else the file or bytes opened and loaded
        return np.asarray(image if image.mode in _NATIVE_MODES else image.convert(_mode_for(image)))


def _mode_for(image: Image.Image) -> str:
    return "RGB" if image.mode in _COLOUR_MODES else "L"
