"""The data stage of a run: a dataset is loaded and split (:func:`load_dataset`), then
fingerprinted, with its pixels decoded on demand (:class:`RunData`, made by :func:`run_data`).

torch and scikit-learn load inside the functions that use them, so importing this module (as
``validate`` and ``plugins`` may) stays fast.
"""

from __future__ import annotations

import hashlib
import json
import math
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import FusionEngineError, located, plugin_code
from .files import atomic_path
from .records import SPLITS, ImageDataset, InputConfig
from .spec import SplitSpec

if TYPE_CHECKING:  # pragma: no cover
    from collections import Counter

    import torch

    from .spec import ResolvedSpec

log = logging.getLogger("fusion_engine")

MIN_PER_CLASS = len(SPLITS)
FINGERPRINT_FORMAT = 1
DECODE_THREADS = min(8, os.cpu_count() or 1)
RESIZE_CHUNK_FLOATS = 2**26  # bounds the float32 copy interpolate makes: 256 MiB
IMAGE_CACHE_FORMAT = 1
IMAGE_CACHE_MAX_BYTES = 8 << 30  # decoded datasets larger than this are decoded again each run


# -- the stage -------------------------------------------------------------------------------------

@dataclass
class RunData:
    """A run's data: the dataset, its split, what identifies both, and its images per input config."""

    dataset: ImageDataset
    indices: dict[str, np.ndarray]  # split -> sorted sample indices
    labels: dict[str, np.ndarray]  # split -> labels
    ids: dict[str, list[str]]  # split -> sample ids
    fingerprint: str  # :func:`dataset_fingerprint`
    split: str  # the sha256 of the split's sample ids
    cache_dir: Path | None = None
    _images: dict = field(default_factory=dict, repr=False)

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.class_names)

    @property
    def split_sizes(self) -> dict[str, int]:
        return {s: int(len(idx)) for s, idx in self.indices.items()}

    def pixels(self, cfg: InputConfig) -> dict:
        """train/val/test images at the size and channels ``cfg`` asks for: decoded once a run,
        and for datasets of files once a machine (:func:`cached_images`)."""
        key = (cfg.size, cfg.in_chans)
        if key not in self._images:
            images = cached_images(self.dataset.images, self.fingerprint, cfg.size, cfg.in_chans, self.cache_dir, log=log)
            self._images[key] = {s: images[self.indices[s]] for s in SPLITS}
        return self._images[key]


def load_dataset(resolved: "ResolvedSpec") -> tuple[ImageDataset, dict[str, np.ndarray]]:
    """The spec's dataset through its plugin, checked (two classes at least) and split once.

    Cheap for datasets of files (their plugins list and check files, nothing is decoded), so it
    runs before anything else: in ``validate``, and in ``run`` before a run folder is made.
    """
    bound = resolved.dataset
    data_spec = resolved.spec.data
    # every problem is reported at the spec's data field; a plugin's own bug names the plugin
    with located(resolved.file, "data", plugin=plugin_code(bound, "dataset")):
        dataset = bound.record.load(bound.params, base_dir=resolved.base_dir)
        if not isinstance(dataset, ImageDataset):
            raise FusionEngineError(f"dataset plugin {bound.provided.plugin} returned {type(dataset).__name__}, "
                                    f"expected ImageDataset")
        present = np.unique(dataset.labels)
        if len(present) < 2:
            what = f"only class '{_class_name(dataset, present[0])}'" if len(present) else "no samples"
            raise FusionEngineError(f"dataset '{data_spec.dataset}' has {what}; a classifier needs samples of at "
                                    f"least 2 classes")
        if dataset.split is not None and "split" in data_spec.model_fields_set:
            log.warning("dataset '%s' brings its own train/val/test split; data.split is ignored", data_spec.dataset)
        indices = split_indices(dataset, data_spec.split, resolved.spec.seed)
        check_split_classes(dataset, indices)
    return dataset, indices


def check_split_classes(dataset: ImageDataset, indices: dict[str, np.ndarray]) -> None:
    """Every split holds two classes at least and train holds every class (an error: a member
    cannot learn a class it never sees, and fusers fit on val); a class missing from val or test
    is a warning (it is never scored there). Only a dataset's own split can fail this: the
    engine's stratified split puts every class in every split."""
    where = _split_source(dataset)
    for part in SPLITS:
        present = np.unique(dataset.labels[indices[part]])
        if len(present) < 2:
            only = f"only class '{_class_name(dataset, present[0])}'" if len(present) else "no samples"
            raise FusionEngineError(f"{where} gives {part} {only}; each split needs samples of at least 2 classes")
        missing = [dataset.class_names[c] for c in range(len(dataset.class_names)) if c not in set(present.tolist())]
        if missing and part == "train":
            raise FusionEngineError(f"{where} gives train no samples of {_few(missing)}; a member cannot learn a class "
                                    f"it never sees: put some of its samples in train")
        if missing:
            log.warning("%s gives %s no samples of %s; %s scores leave that class out", where, part, _few(missing), part)


def _split_source(dataset: ImageDataset) -> str:
    return f"the dataset's own split ({dataset.description})" if dataset.description else "the dataset's own split"


def _few(names: list[str]) -> str:
    return f"class{'es' if len(names) > 1 else ''} " + ", ".join(f"'{n}'" for n in names[:3]) + \
        (f" and {len(names) - 3} more" if len(names) > 3 else "")


def run_data(dataset: ImageDataset, indices: dict[str, np.ndarray], *, cache_dir: Path | None = None,
             fingerprint: str | None = None) -> RunData:
    """The data stage of a run: a split dataset, fingerprinted (file contents included; pass the
    ``fingerprint`` when it is known already), with its images decoded on demand."""
    from .zoo.keys import split_digest

    ids = {s: [str(dataset.ids[i]) for i in idx] for s, idx in indices.items()}
    data = RunData(dataset, indices, {s: dataset.labels[idx] for s, idx in indices.items()}, ids,
                   fingerprint or dataset_fingerprint(dataset), split_digest(ids), cache_dir=cache_dir)
    log.info("dataset: %s, %d classes", data.split_sizes, len(data.class_names))
    return data


#: the formats ``fusion-engine split`` writes
SPLIT_SUFFIXES = (".csv", ".parquet", ".json")


def check_split_path(path: Path) -> None:
    if path.suffix.lower() not in SPLIT_SUFFIXES:
        raise FusionEngineError(f"--out {path}: write a .csv, .parquet or .json file")


def write_split_ids(dataset: ImageDataset, indices: dict[str, np.ndarray], path: Path) -> Path:
    """``fusion-engine split``: every sample's id, split, label and, for image files, path, as
    CSV, Parquet or JSON (by ``path``'s suffix), written whole or not at all."""
    import pandas as pd

    from .files import atomic_path

    rows = []
    for split, idx in indices.items():
        for i in idx:
            image = dataset.images[i] if not isinstance(dataset.images, np.ndarray) else None
            rows.append({"id": str(dataset.ids[i]), "split": split, "label": dataset.class_names[dataset.labels[i]],
                         "path": os.fspath(image) if isinstance(image, (str, os.PathLike)) else None})
    frame = pd.DataFrame(rows)
    if frame["path"].isna().all():
        frame = frame.drop(columns="path")
    check_split_path(path)
    suffix = path.suffix.lower()
    try:
        with atomic_path(path) as tmp:
            if suffix == ".csv":
                frame.to_csv(tmp, index=False)
            elif suffix == ".parquet":
                frame.to_parquet(tmp, index=False)
            else:
                frame.to_json(tmp, orient="records", indent=1)
    except OSError as exc:
        raise FusionEngineError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


# -- splitting -------------------------------------------------------------------------------------

def split_indices(dataset: ImageDataset, split: SplitSpec, seed: int) -> dict[str, np.ndarray]:
    """Sorted sample indices for ``train``, ``val`` and ``test``.

    The dataset's own split wins where it has one (``split`` is then unused). Otherwise the split
    is stratified and seeded: test is drawn first, then val from the rest, so both fractions are
    of the whole dataset.
    """
    if dataset.split is not None:
        return _given_split(dataset.split, _split_source(dataset))
    labels = dataset.labels
    if len(labels) == 0:
        raise FusionEngineError("the dataset has no samples")
    counts = np.bincount(labels, minlength=len(dataset.class_names))
    present = np.flatnonzero(counts)
    fewest = present[np.argmin(counts[present])]
    if counts[fewest] < MIN_PER_CLASS:
        raise FusionEngineError(
            f"class '{_class_name(dataset, fewest)}' has only {counts[fewest]} sample{'s' if counts[fewest] != 1 else ''}; "
            f"a stratified train/val/test split needs at least {MIN_PER_CLASS} per class"
        )
    everything = np.arange(len(labels))
    rest, test = _hold_out(everything, dataset, split.test, seed, "test")
    train, val = _hold_out(rest, dataset, split.val / (1 - split.test), seed, "val")
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _given_split(split: np.ndarray, where: str) -> dict[str, np.ndarray]:
    unknown = sorted(set(split.tolist()) - set(SPLITS), key=str)
    if unknown:
        raise FusionEngineError(f"{where} holds {', '.join(repr(u) for u in unknown)}; expected {', '.join(SPLITS)}")
    parts = {name: np.flatnonzero(split == name) for name in SPLITS}
    empty = [name for name, idx in parts.items() if len(idx) == 0]
    if empty:
        raise FusionEngineError(f"{where} has no {' and no '.join(empty)} samples; each of {', '.join(SPLITS)} "
                                f"needs some")
    return parts


def _hold_out(indices: np.ndarray, dataset: ImageDataset, fraction: float, seed: int, part: str):
    """``(kept, held_out)``: a stratified share ``fraction`` of ``indices`` held out as ``part``."""
    from sklearn.model_selection import train_test_split

    labels = dataset.labels[indices]
    n_classes = len(np.unique(labels))
    n_held = math.ceil(fraction * len(indices))
    for name, n in ((part, n_held), ("train" if part == "val" else "train and val", len(indices) - n_held)):
        if n < n_classes:
            raise FusionEngineError(
                f"a stratified split of {len(indices)} samples would put {n} in {name}, fewer than the {n_classes} "
                f"classes; use more data or change data.split"
            )
    try:
        return train_test_split(indices, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as exc:
        counts = np.bincount(labels)
        present = np.flatnonzero(counts)
        fewest = present[np.argmin(counts[present])]
        raise FusionEngineError(
            f"cannot hold out {part} stratified: class '{_class_name(dataset, fewest)}' has {counts[fewest]} "
            f"sample(s) left ({exc})"
        ) from None


def _class_name(dataset: ImageDataset, label: int) -> str:
    return dataset.class_names[label] if 0 <= label < len(dataset.class_names) else str(label)


# -- fingerprint -----------------------------------------------------------------------------------

def dataset_fingerprint(dataset: ImageDataset) -> str:
    """A sha256 hex digest of everything that defines the data, part of every member's zoo key.

    It covers the ids, labels, class names, the dataset's own split and the image contents: the
    bytes of each file for paths (not sizes and dates, which copies and touches change while the
    data stays the same), the pixels for arrays and PIL images. Reading every file costs about a
    second per GB from a warm disk, paid once per run.
    """
    digest = hashlib.sha256()
    header = {
        "format": FINGERPRINT_FORMAT,
        "class_names": list(dataset.class_names),
        "ids": [str(i) for i in dataset.ids],
        "labels": dataset.labels.tolist(),
        "split": None if dataset.split is None else [str(s) for s in dataset.split],
    }
    digest.update(json.dumps(header, separators=(",", ":")).encode())
    for image_digest in _image_digests(dataset.images):
        digest.update(image_digest)
    return digest.hexdigest()


def _image_digests(images: Sequence[Any] | np.ndarray) -> Iterator[bytes]:
    if isinstance(images, np.ndarray) and images.dtype != object:
        yield _array_digest(images)
        return
    with ThreadPoolExecutor(DECODE_THREADS) as pool:  # hashlib releases the GIL on large buffers
        yield from pool.map(_item_digest, images)


def _item_digest(item: Any) -> bytes:
    if isinstance(item, (str, os.PathLike)):
        try:
            with open(item, "rb") as handle:
                return hashlib.file_digest(handle, "sha256").digest()
        except OSError as exc:
            raise FusionEngineError(f"cannot read image {os.fspath(item)}: {exc.strerror or exc}") from None
    if isinstance(item, np.ndarray):
        return _array_digest(item)
    if isinstance(item, Image.Image):
        digest = hashlib.sha256(f"{item.mode}{item.size}".encode())
        digest.update(item.tobytes())
        return digest.digest()
    raise FusionEngineError(f"unsupported image type {type(item).__name__}; expected a path, a PIL image or a uint8 array")


def _array_digest(array: np.ndarray) -> bytes:
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.digest()


# -- pixels ----------------------------------------------------------------------------------------

def load_images(images: Sequence[Any] | np.ndarray, indices: Sequence[int] | np.ndarray, size: int, in_chans: int) -> "torch.Tensor":
    """The images at ``indices`` as one ``uint8`` tensor ``(n, in_chans, size, size)``, decoded once.

    Each image is converted to RGB or grayscale (grayscale repeated to 3 channels, RGB to luma
    as PIL does it) and resized, not cropped, to ``size x size`` with bilinear, antialiased
    resampling. Arrays of one shape are resized in one batched call; files and PIL images are
    decoded and resized by PIL in a thread pool.
    """
    import torch

    if in_chans not in (1, 3):
        raise FusionEngineError(f"in_chans must be 1 or 3, got {in_chans}")
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if isinstance(images, np.ndarray) and images.dtype != object:
        return _resize_batch(_to_channels(images[indices], in_chans), size)
    items = [images[i] for i in indices]
    if items and resize_method(items) == RESIZE_TENSOR:
        return _resize_batch(_to_channels(np.stack(items), in_chans), size)
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        decoded = list(pool.map(partial(_decode, size=size, mode="L" if in_chans == 1 else "RGB"), items))
    if not decoded:
        return torch.empty((0, in_chans, size, size), dtype=torch.uint8)
    batch = np.stack(decoded)
    batch = batch[:, None] if in_chans == 1 else batch.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(batch))


#: the two ways :func:`load_images` resizes (see :func:`resize_method`)
RESIZE_TENSOR, RESIZE_PIL = "tensor", "pil"


def resize_method(images: Sequence[Any] | np.ndarray) -> str:
    """How :func:`load_images` resizes ``images``: ``"tensor"`` for arrays of one shape (one
    batched, antialiased bilinear resize in torch), ``"pil"`` for files, PIL images and arrays of
    several shapes (PIL's bilinear resize, image by image). The two differ by one grey level in
    about a pixel in five, so an exported ensemble records which one its run used and predicts
    new images the same way (:func:`decode_images`)."""
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


def decode_images(items: Sequence[Any], size: int, in_chans: int, method: str) -> tuple["torch.Tensor", dict[int, str]]:
    """``items`` (paths, PIL images, uint8 arrays ``(H, W[, C])``) as ``uint8`` ``(n, in_chans,
    size, size)``, each made exactly as :func:`load_images` makes the images of a dataset that it
    resizes by ``method`` (:func:`resize_method`): files through PIL (``"pil"``), or decoded at
    their own size and resized in torch (``"tensor"``). An item that cannot be read is left out of
    the tensor and its position mapped to the reason, so one bad file never stops the others.
    """
    import torch

    if in_chans not in (1, 3):
        raise FusionEngineError(f"in_chans must be 1 or 3, got {in_chans}")
    mode = "L" if in_chans == 1 else "RGB"
    if method == RESIZE_PIL:
        work = partial(_decode, size=size, mode=mode)
    elif method == RESIZE_TENSOR:
        work = _native
    else:
        raise ValueError(f"unknown resize method {method!r}; expected {RESIZE_TENSOR!r} or {RESIZE_PIL!r}")
    if method == RESIZE_TENSOR and all(isinstance(item, np.ndarray) for item in items):
        decoded = [_or_reason(work, item) for item in items]  # nothing to decode: threads would only cost
    else:
        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            decoded = list(pool.map(partial(_or_reason, work), items))
    errors = {i: d for i, d in enumerate(decoded) if isinstance(d, str)}
    ok = [i for i in range(len(items)) if i not in errors]
    out = torch.empty((len(ok), in_chans, size, size), dtype=torch.uint8)
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


def batch_pixels(x: "torch.Tensor", size: int, in_chans: int) -> "torch.Tensor":
    """A uint8 batch ``(n, C, H, W)`` as :func:`load_images` makes a dataset's arrays of one
    shape: channels converted, resized in torch. A batch already at ``size`` with ``in_chans``
    channels comes back as it is, without a copy."""
    import torch

    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 2, 3, 4):
        raise FusionEngineError(f"an image batch must be uint8 (n, 1|3|4, H, W), got {tuple(x.shape)} {x.dtype}")
    if tuple(x.shape[2:]) == (size, size):  # nothing to resample: the channels are all that change
        return _channels(x, in_chans).contiguous()
    # resampled from the layout a dataset's arrays have (n, H, W, C), as the run's were, to the last bit
    return _resize_batch(_to_channels(x.permute(0, 2, 3, 1).numpy(), in_chans), size)


def _or_reason(work, item: Any) -> np.ndarray | str:
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
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        try:
            with Image.open(path) as image:
                return _native(image.copy() if image.mode in _NATIVE_MODES else image.convert(_mode_for(image)))
        except UnidentifiedImageError:
            raise FusionEngineError(f"cannot read image {path}: not an image format Pillow can decode") from None
        except FusionEngineError:
            raise
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
            raise FusionEngineError(f"cannot read image {path}: {str(exc) or type(exc).__name__}") from None
    if isinstance(item, Image.Image):
        return np.asarray(item if item.mode in _NATIVE_MODES else item.convert(_mode_for(item)))
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise FusionEngineError(f"image arrays must be uint8, got {item.dtype}")
        if not (item.ndim == 2 or (item.ndim == 3 and item.shape[-1] in (1, 2, 3, 4))):
            raise FusionEngineError(f"image arrays must be (H, W) or (H, W, 1|3|4), got {item.shape}")
        return item
    raise FusionEngineError(f"unsupported image type {type(item).__name__}; expected a path, a PIL image or a uint8 array")


def _mode_for(image: Image.Image) -> str:
    return "RGB" if image.mode in _COLOUR_MODES else "L"


def decodes_files(images: Sequence[Any] | np.ndarray) -> bool:
    """Whether loading ``images`` means decoding files or PIL images (worth caching), rather
    than resizing arrays already in memory."""
    return not (isinstance(images, np.ndarray) and images.dtype != object) and any(
        not isinstance(item, np.ndarray) for item in images)


def cached_images(images: Sequence[Any] | np.ndarray, fingerprint: str, size: int, in_chans: int,
                  cache_dir: os.PathLike | str | None, log=None) -> "torch.Tensor":
    """Every image of a dataset, as :func:`load_images` returns them, decoded once per machine.

    Datasets of files are decoded and resized once and kept in ``cache_dir`` as one safetensors
    file per (data fingerprint, size, channels): a later run that trains a member on the same
    data reads it back at disk speed instead of decoding every file again (a few ms against a
    millisecond or more per JPEG). The fingerprint covers the file contents, so changed data never
    reads a stale cache. A cache file that cannot be read is decoded again and rewritten; arrays
    already in memory, and datasets over ``IMAGE_CACHE_MAX_BYTES`` decoded, are not cached.
    """
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    n = len(images)
    expected = (n, in_chans, size, size)
    if cache_dir is None or not decodes_files(images) or math.prod(expected) > IMAGE_CACHE_MAX_BYTES:
        return load_images(images, np.arange(n), size, in_chans)
    key = hashlib.sha256(f"{IMAGE_CACHE_FORMAT}:{fingerprint}:{size}:{in_chans}".encode()).hexdigest()
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        try:
            x = load_file(path)["images"]
            if tuple(x.shape) == expected and str(x.dtype) == "torch.uint8":
                if log is not None:
                    log.info("decoded images read from the cache %s", path)
                return x
            reason = f"holds {tuple(x.shape)} {x.dtype}, expected {expected} uint8"
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
        if log is not None:
            log.warning("image cache %s is unreadable (%s); decoding again", path, reason)
    x = load_images(images, np.arange(n), size, in_chans)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # whole or not at all: a reader never sees half a file
            save_file({"images": x.contiguous()}, str(tmp), metadata={"fingerprint": fingerprint})
    except OSError as exc:  # a cache that cannot be written costs speed, not the run
        if log is not None:
            log.warning("could not write the image cache %s: %s", path, exc.strerror or exc)
    return x


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


def _decode(item: Any, *, size: int, mode: str) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        try:
            with Image.open(path) as image:
                image.draft(mode, (size, size))  # JPEG decodes straight to a smaller scale: much faster
                return _converted(image, size, mode)
        except UnidentifiedImageError:
            raise FusionEngineError(f"cannot read image {path}: not an image format Pillow can decode") from None
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
            raise FusionEngineError(f"cannot read image {path}: {str(exc) or type(exc).__name__}") from None
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise FusionEngineError(f"image arrays must be uint8, got {item.dtype}")
        return _converted(Image.fromarray(item.squeeze(-1) if item.ndim == 3 and item.shape[-1] == 1 else item), size, mode)
    if isinstance(item, Image.Image):
        return _converted(item, size, mode)
    raise FusionEngineError(f"unsupported image type {type(item).__name__}; expected a path, a PIL image or a uint8 array")


def _converted(image: Image.Image, size: int, mode: str) -> np.ndarray:
    image = image.convert(mode)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)
