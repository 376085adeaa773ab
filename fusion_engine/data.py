"""The data stage of a run: a dataset is loaded and split (:func:`load_dataset`), then
fingerprinted, with its images prepared on demand for each input config, held within the
memory budget (:class:`RunData`, made by :func:`run_data`; :mod:`fusion_engine.imagesets`,
:mod:`fusion_engine.stores`).

How one image is prepared is :mod:`fusion_engine.preprocess` (``load_images``, exported as
``fusion_engine.load_images``). torch and scikit-learn load inside the functions that use them,
so importing this module (as ``validate`` and ``plugins`` may) stays fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
from PIL import Image

from .decoded_cache import decoded_cache
from .errors import FusionEngineError, UnreadableImage, located, plugin_code
from .imagesets import ImageSet, open_images
from .preprocess import DECODE_THREADS, empty_image_error, pixels_key, squash_config
from .records import SPLITS, ImageDataset, InputConfig
from .spec import SplitSpec
from .stores import SharedBudget, open_store

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .resolve import ResolvedSpec

log = logging.getLogger("fusion_engine")

MIN_PER_CLASS = len(SPLITS)
FINGERPRINT_FORMAT = 1
DIGEST_CHUNK = 1024

__all__ = ["RunData", "cached_images", "dataset_fingerprint", "load_dataset", "run_data",
           "split_indices"]


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
    memory_budget: float | str | None = None  # ``data.memory_budget``: a fraction of available memory, or a size
    storage: str = "auto"  # ``data.storage``: auto, memory, disk or stream
    workers: int | None = None  # ``data.workers``: DataLoader worker processes (None: one per core, at most 8)
    _images: dict = field(default_factory=dict, repr=False)  # pixels_key -> its splits' image sets
    _budget: SharedBudget | None = field(default=None, repr=False)

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.class_names)

    @property
    def split_sizes(self) -> dict[str, int]:
        return {s: int(len(idx)) for s, idx in self.indices.items()}

    def pixels(self, cfg: InputConfig) -> dict[str, ImageSet]:
        """The train/val/test :class:`~fusion_engine.imagesets.ImageSet` of ``cfg``, each opened
        when first read: held in memory when it fits the memory budget (decoded once a run, and
        for datasets of files once a machine), else read per batch from the decoded-image cache
        or decoded per batch (the choice is logged)."""
        key = pixels_key(cfg)  # members that differ only in normalisation share the pixels
        if key not in self._images:
            self._images[key] = open_images(self.dataset.images, self.indices, cfg, fingerprint=self.fingerprint,
                                            cache_dir=self.cache_dir, storage=self.storage, workers=self.workers,
                                            budget=partial(self._budget_for, key), budget_setting=self.memory_budget)
        return self._images[key]

    def _budget_for(self, key: tuple, nbytes: int) -> tuple[int, str]:
        """The memory budget left for ``nbytes`` more pixels of one preparation (``key``): what
        sets already held in memory leave of it, after letting go of those of other preparations
        when it would not fit beside them (they read back from the cache when asked again). The
        budget is worked out once a run: a fraction of the memory available when it was first
        asked, before any of these pixels took their share of it."""
        if self._budget is None:
            self._budget = SharedBudget(self.memory_budget, lambda: sum(
                s.store.nbytes for sets in self._images.values() for s in sets.values() if s.opened))
        if self._budget.held() + nbytes > self._budget.total()[0]:
            for other, sets in self._images.items():
                if other != key:
                    for image_set in sets.values():
                        image_set.release()
        return self._budget(nbytes)


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
            if np.any(dataset.split == "val"):
                log.warning("dataset '%s' brings its own train/val/test split; data.split is ignored", data_spec.dataset)
            elif "test" in data_spec.split.model_fields_set:
                log.warning("dataset '%s' brings its own train and test split; data.split.test is ignored (val is "
                            "data.split.val of its train split)", data_spec.dataset)
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
             fingerprint: str | None = None, data_spec=None) -> RunData:
    """The data stage of a run: a split dataset, fingerprinted (file contents included; pass the
    ``fingerprint`` when it is known already), with its images prepared on demand, within the
    memory budget and storage ``data_spec`` (the spec's ``data``) asks for."""
    from .zoo.keys import split_digest

    ids = {s: [str(dataset.ids[i]) for i in idx] for s, idx in indices.items()}
    loading = {} if data_spec is None else {"memory_budget": data_spec.memory_budget, "storage": data_spec.storage,
                                            "workers": data_spec.workers}
    data = RunData(dataset, indices, {s: dataset.labels[idx] for s, idx in indices.items()}, ids,
                   fingerprint or dataset_fingerprint(dataset), split_digest(ids), cache_dir=cache_dir, **loading)
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

    The dataset's own split wins where it has one (``split`` is then unused). A dataset that
    brings train and test but no val (CIFAR-10, most Hugging Face datasets) has its val drawn
    from its train split: ``split.val`` of it, stratified and seeded. Otherwise the split is
    stratified and seeded: test is drawn first, then val from the rest, so both fractions are of
    the whole dataset.
    """
    if dataset.split is not None:
        parts = _given_split(dataset.split, _split_source(dataset))
        if len(parts["val"]) == 0:
            parts["train"], parts["val"] = (np.sort(p) for p in _hold_out(parts["train"], dataset, split.val, seed, "val"))
        return parts
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
    empty = [name for name, idx in parts.items() if len(idx) == 0 and name != "val"]  # val may come from train
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
    for image_digest in _image_digests(dataset.images, header["ids"]):
        digest.update(image_digest)
    return digest.hexdigest()


def _image_digests(images: Sequence[Any] | np.ndarray, ids: Sequence[Any]) -> Iterator[bytes]:
    """Each image's digest, in order; an error about an image that is not a file (whose name it
    already gives) names its sample id."""
    if isinstance(images, np.ndarray) and images.dtype != object:
        yield _array_digest(images)
        return
    items = iter(images)
    start = 0
    with ThreadPoolExecutor(DECODE_THREADS) as pool:  # hashlib releases the GIL on large buffers
        while chunk := list(islice(items, DIGEST_CHUNK)):  # a chunk at a time: map would hold every item at once
            digests = pool.map(_item_digest, chunk)  # in order: an item's error is raised at its turn
            for offset, item in enumerate(chunk):
                try:
                    found = next(digests)
                except FusionEngineError as exc:
                    if isinstance(item, (str, os.PathLike)):
                        raise
                    raise type(exc)(f"sample {ids[start + offset]}: {exc}") from None
                yield found
            start += len(chunk)


def _item_digest(item: Any) -> bytes:
    if isinstance(item, (str, os.PathLike)):
        try:
            with open(item, "rb") as handle:
                return hashlib.file_digest(handle, "sha256").digest()
        except OSError as exc:
            raise FusionEngineError(f"cannot read image {os.fspath(item)}: {exc.strerror or exc}") from None
    if isinstance(item, np.ndarray):
        return _array_digest(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return hashlib.sha256(item).digest()
    empty = empty_image_error(item)
    if empty:
        raise UnreadableImage(empty)
    if isinstance(item, dict) and ("bytes" in item or "path" in item):  # a Hugging Face Image() value
        return _item_digest(item["bytes"] if item.get("bytes") is not None else item["path"])
    if isinstance(item, Image.Image):
        digest = hashlib.sha256(f"{item.mode}{item.size}".encode())
        digest.update(item.tobytes())
        return digest.digest()
    raise FusionEngineError(f"unsupported image type {type(item).__name__}; expected a path, encoded bytes, a PIL "
                            f"image or a uint8 array")


def _array_digest(array: np.ndarray) -> bytes:
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.digest()


# -- pixels ----------------------------------------------------------------------------------------

def cached_images(images: Sequence[Any] | np.ndarray, fingerprint: str, size: int, in_chans: int,
                  cache_dir: os.PathLike | str | None) -> "torch.Tensor":
    """Every image of a dataset, as :func:`load_images` prepares them for the small-image path,
    in one tensor, decoded once per machine.

    Datasets of files are decoded and resized once and kept in ``cache_dir`` as one safetensors
    file per (data fingerprint, preparation): a later run reads it back at disk speed instead of
    decoding every file again. The fingerprint covers the file contents, so changed data never
    reads a stale cache. A cache file that cannot be read is decoded again (with a warning) and
    rewritten; arrays already in memory are not cached. Runs go through :meth:`RunData.pixels`,
    which also keeps to the memory budget.
    """
    cfg = squash_config(size, in_chans)
    cache = None if cache_dir is None else decoded_cache(cache_dir, fingerprint, cfg, len(images))
    return open_store(images, cfg, cache=cache, budget=1 << 62, budget_text="no budget", storage="memory").pixels
