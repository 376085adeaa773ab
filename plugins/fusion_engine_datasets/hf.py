"""``hf``: a Hugging Face dataset, from the hub (through its local cache) or from local files.

``path`` is a hub name (``uoft-cs/cifar10``), a local folder laid out as a hub dataset
(``data/train-*.parquet``, optionally a ``README.md`` with configs), or parquet file(s) (a glob
such as ``data/*.parquet``). ``name`` picks a config. Images come from the one ``Image`` column
(or ``image_column``), labels from the one ``ClassLabel`` column (or ``label_column``), class
names from its ``ClassLabel`` names (a column of other values is encoded: its sorted values are
the classes).

Which rows make train, val and test (``split``):

- omitted: the dataset's own ``train`` and ``test`` splits (``validation``, ``valid`` or ``val``
  as val when it has one; otherwise the engine draws val from train, ``data.split.val`` of it);
  a dataset without both a train and a test split is split by the engine;
- a mapping ``{train: ..., test: ..., val: ...}`` of Hugging Face split expressions
  (``train[:90%]``; ``val`` optional);
- a single expression (``train``, ``train+test``): those rows, split by the engine.

Images are never decoded here: each sample is its encoded bytes, read from the memory-mapped
Arrow files when a batch needs them, so a dataset of any size loads in seconds and little
memory, and a worker process (or a Ray task) reads the same files.

Offline (``HF_HUB_OFFLINE=1``) a hub dataset loads from what an earlier online load left in the
``datasets`` cache, or from the dataset's files in the hub cache (``hf download --repo-type
dataset NAME``). Local folders get a ``datasets`` cache folder of their own, named by the names,
sizes and dates of their files, so changed files are never served from a stale cache.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from fusion_engine import SPLITS, FusionEngineError, ImageDataset, Params

log = logging.getLogger("fusion_engine")

INSTALL_HINT = "pip install 'fusion-engine[hf]'"
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
VAL_NAMES = ("validation", "valid", "val")
DATA_SUFFIXES = (".parquet", ".arrow")


class HFParams(Params):
    path: str = Field(description="a hub dataset (uoft-cs/cifar10), a local dataset folder, or parquet file(s) (a glob "
                                  "such as data/*.parquet); local paths are relative to the spec file")
    name: Optional[str] = Field(None, description="the dataset's config (default: its default one)")
    revision: Optional[str] = Field(None, description="a hub dataset's branch, tag or commit")
    split: Union[None, str, dict[Literal["train", "val", "test"], str]] = Field(
        None, description="train/val/test as {train: train, test: test, val: validation} (split expressions; val "
                          "optional), or one expression split by the engine (train+test); default: the dataset's "
                          "train, test and validation splits")
    image_column: Optional[str] = Field(None, description="the column of images (default: the one Image column)")
    label_column: Optional[str] = Field(None, description="the column of labels (default: the one ClassLabel column, "
                                                          "else label)")
    id_column: Optional[str] = Field(None, description="a column of unique sample ids (default: split/row)")

    @field_validator("path")
    @classmethod
    def _local_path_exists(cls, value: str, info: ValidationInfo) -> str:
        base_dir = (info.context or {}).get("base_dir")
        if base_dir is not None and _local_files(value, Path(base_dir)) is None and not HUB_NAME.match(value):
            raise ValueError(f"no such file or folder: {Path(base_dir) / value}; give a local dataset or a hub name "
                             f"such as uoft-cs/cifar10")
        return value

    @field_validator("split")
    @classmethod
    def _train_and_test(cls, value):
        if isinstance(value, dict):
            missing = [s for s in ("train", "test") if not value.get(s)]
            if missing:
                raise ValueError(f"give {' and '.join(missing)} (val is optional: drawn from train when left out)")
        return value


#: a local dataset: its folder, and its data files when a file or glob named them (see :func:`_local_files`)
_Local = Optional[tuple[Path, Optional[list[Path]]]]


def load_hf_dataset(params: HFParams, base_dir: Path | str = ".") -> ImageDataset:
    try:
        import datasets
    except ImportError:
        raise FusionEngineError(f"the hf dataset needs the datasets library, which is not installed; {INSTALL_HINT}") \
            from None
    local = _local_files(params.path, Path(base_dir))
    where = f"hf {params.path if local is None else (local[1][0] if local[1] and len(local[1]) == 1 else local[0])}"
    with _datasets_log(where) as kept:
        return _load_hf_dataset(datasets, params, local, where, kept)


def _load_hf_dataset(datasets, params: HFParams, local: _Local, where: str, kept: _KeptLog) -> ImageDataset:
    parts = _load_parts(params, local, where, kept)
    names = [name for name, _ in parts]
    table = _joined(datasets, parts, where)
    image_column = _image_column(table, params.image_column, where)
    label_column = _label_column(table, params.label_column, where)
    class_names, labels = _labels(table, label_column, where)
    if params.id_column:
        _check_column(table, params.id_column, "id_column", where)
        ids = [str(v) for v in table.with_format("numpy", columns=[params.id_column])[params.id_column]]
    else:
        ids = [f"{name}/{i}" for name, ds in parts for i in range(len(ds))]
    own = _own_split(params, names)
    split = None if own is None else np.concatenate([np.full(len(ds), part, dtype=object)
                                                     for part, (_, ds) in zip(own, parts)])
    return ImageDataset(images=HFImages(table, image_column), labels=labels, class_names=class_names, ids=ids,
                        split=split, description=f"Hugging Face dataset {params.path}"
                                                 f"{f' ({params.name})' if params.name else ''}")


def _joined(datasets, parts: list, where: str):
    """The splits as one table; splits that cannot be joined are a one-line error naming the columns that differ."""
    if len(parts) == 1:
        return parts[0][1]
    try:
        return datasets.concatenate_datasets([ds for _, ds in parts])
    except ValueError as exc:
        (first, base), *rest = parts
        for name, ds in rest:
            differ = sorted(c for c in set(base.features) | set(ds.features) if base.features.get(c) != ds.features.get(c))
            if differ:
                raise FusionEngineError(f"{where}: splits {first} and {name} cannot be joined: "
                                        f"{'columns' if len(differ) > 1 else 'column'} {', '.join(differ)} "
                                        f"{'differ' if len(differ) > 1 else 'differs'} "
                                        f"(missing from one, or of another type or class list)") from None
        raise FusionEngineError(f"{where}: splits {', '.join(n for n, _ in parts)} cannot be joined: "
                                f"{_first_line(exc)}") from None


class HFImages(Sequence):
    """The image column of a Hugging Face dataset, undecoded: item ``i`` is ``{"bytes", "path"}``.

    Reading it touches only the memory-mapped Arrow files; pickled (to a DataLoader worker or a
    Ray task) it is those files' names, not their contents."""

    def __init__(self, table, column: str):
        import datasets

        self.column = column
        self.table = table.select_columns([column]).cast_column(column, datasets.Image(decode=False))

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.table[int(i)][self.column]

    def __iter__(self):
        for batch in self.table.iter(batch_size=1024):
            yield from batch[self.column]


# -- loading ---------------------------------------------------------------------------------------

def _load_parts(params: HFParams, local: _Local, where: str, kept: _KeptLog) -> list[tuple[str, Any]]:
    """``(name, Dataset)`` for each part of the data: one per train/val/test when the dataset
    brings them, else one (or one per split of the dataset) for the engine to split."""
    if isinstance(params.split, dict):
        return [(part if params.split[part] == part else params.split[part],
                 _load(params, local, where, kept, split=params.split[part])) for part in SPLITS
                if params.split.get(part)]
    if isinstance(params.split, str):
        return [(params.split, _load(params, local, where, kept, split=params.split))]
    everything = _load(params, local, where, kept, split=None)
    names = list(everything)
    if "train" in names and "test" in names:
        val = next((v for v in VAL_NAMES if v in names), None)
        return [(name, everything[name]) for name in ("train", val, "test") if name]
    return [(name, everything[name]) for name in names]


def _own_split(params: HFParams, names: list[str]) -> list[str] | None:
    """Which of train/val/test each part is, or None when the engine splits the data."""
    if isinstance(params.split, dict):
        return [part for part in SPLITS if params.split.get(part)]
    if params.split is None and "train" in names and "test" in names:
        return ["train" if n == "train" else "test" if n == "test" else "val" for n in names]
    return None


class _KeptLog(logging.Handler):
    """The ``datasets`` library's error records while a load runs, kept instead of printed: the one
    that precedes a failure names the file it failed on (the exception often does not)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def in_file(self) -> str:
        """`` (in FILE)`` for the last file datasets failed to read (its "Failed to read file
        '...'", "Failed to read schema from '...'", "Failed to load JSON from file '...'"), else
        nothing."""
        for record in reversed(self.records):
            found = re.search(r"Failed to [\w ]+? '([^']+)'", record.getMessage())
            if found:
                return f" (in {found.group(1)})"
        return ""


#: one load at a time swaps ``datasets``' log (two threads' swaps would otherwise leave ours in place)
_DATASETS_LOG = threading.RLock()


@contextmanager
def _datasets_log(where: str) -> Iterator[_KeptLog]:
    """``datasets``' own log kept, and its progress bars off, while the block runs (its handlers,
    level and progress bars given back after): a failure becomes one line of ours naming the file;
    an error it logged without failing (an archive it would not extract, say) is said again as
    our warning."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    logger = logging.getLogger("datasets")
    with _DATASETS_LOG:
        kept = _KeptLog()
        saved = logger.handlers[:], logger.level, logger.propagate, are_progress_bars_disabled()
        logger.handlers, logger.propagate = [kept], False
        logger.setLevel(logging.ERROR)
        disable_progress_bars()
        failed = True
        try:
            yield kept
            failed = False
        finally:
            logger.handlers, logger.propagate = saved[0], saved[2]
            logger.setLevel(saved[1])
            if not saved[3]:
                enable_progress_bars()
        if not failed:
            for record in kept.records:
                log.warning("%s: %s", where, _first_line(record.getMessage()))


def _load(params: HFParams, local: _Local, where: str, kept: _KeptLog, *, split: str | None):
    """One split (or all) of the dataset: ``local`` files or folder (:func:`_local_files`), else the hub."""
    import datasets

    try:
        if local is not None:
            return _load_local(local, params, split)
        try:
            return datasets.load_dataset(params.path, params.name, revision=params.revision, split=split)
        except ConnectionError as exc:  # offline, or no network: try the dataset's files in the hub cache
            snapshot = _hub_snapshot(params)
            if snapshot is None:
                offline = datasets.config.HF_HUB_OFFLINE
                raise FusionEngineError(
                    f"{where}: the dataset is not in the Hugging Face cache and "
                    f"{'HF_HUB_OFFLINE=1' if offline else f'the hub cannot be reached ({_first_line(exc)})'}; "
                    f"download it once with `hf download --repo-type dataset {params.path}` (or load it once online), "
                    f"or give a local path") from None
            return _load_local((snapshot, None), params, split)
    except FusionEngineError:
        raise
    except datasets.exceptions.DatasetGenerationError as exc:  # its own text is a paragraph; the cause says what
        raise FusionEngineError(f"{where}: {_generation_failure(exc)}{kept.in_file()}") from None
    except (ValueError, FileNotFoundError, KeyError, TypeError, OSError) as exc:
        raise FusionEngineError(f"{where}: {_first_line(exc)}{kept.in_file()}") from None


def _generation_failure(exc: BaseException) -> str:
    """One line for a dataset ``datasets`` could not build: files whose columns differ, else the first cause."""
    from datasets.table import CastError

    cause, seen = exc, []
    while cause is not None and cause not in seen:
        if isinstance(cause, CastError):
            return (f"the data files do not all have the same columns: one has "
                    f"{', '.join(cause.table_column_names)} where {', '.join(cause.requested_column_names)} "
                    f"were expected")
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    return _first_line(seen[-1])


def _load_local(local: tuple[Path, list[Path] | None], params: HFParams, split: str | None):
    """A local folder (as a hub dataset) or data files, with a ``datasets`` cache folder of its
    own, named by the files' names, sizes and dates (``datasets`` would otherwise serve a
    folder's first contents after its files changed)."""
    import datasets

    folder, files = local
    listed = files if files is not None else sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256(repr((str(folder), params.name)).encode())
    for path in listed:
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "fusion-engine" / digest.hexdigest()[:20]
    if files is None:
        return datasets.load_dataset(str(folder), params.name, split=split, cache_dir=str(cache_dir))
    builder = "parquet" if files[0].suffix == ".parquet" else "arrow"
    return datasets.load_dataset(builder, data_files={"train": [str(f) for f in files]}, split=split,
                                 cache_dir=str(cache_dir))


def _local_files(path: str, base_dir: Path) -> _Local:
    """``(folder, None)`` for a local dataset folder, ``(folder, files)`` for data files (a file
    or a glob), None when ``path`` names nothing local."""
    full = (base_dir / Path(path).expanduser()) if not Path(path).expanduser().is_absolute() else Path(path).expanduser()
    if full.is_dir():
        return full.resolve(), None
    if full.is_file():
        return full.resolve().parent, [full.resolve()]
    if any(c in path for c in "*?["):
        found = sorted(Path(p).resolve() for p in glob.glob(str(full), recursive=True)
                       if p.endswith(DATA_SUFFIXES) and os.path.isfile(p))
        if found:
            return found[0].parent, found
    return None


def _hub_snapshot(params: HFParams) -> Path | None:
    """The dataset's files in the hub cache (``hf download --repo-type dataset``), if there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(params.path, repo_type="dataset", revision=params.revision,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        return None


# -- columns ---------------------------------------------------------------------------------------

def _image_column(table, given: str | None, where: str) -> str:
    import datasets

    images = [name for name, feature in table.features.items() if isinstance(feature, datasets.Image)]
    if given is not None:
        _check_column(table, given, "image_column", where)
        if given not in images:
            raise FusionEngineError(f"{where}: image_column '{given}' holds {table.features[given]}, not images; "
                                    f"image columns: {', '.join(images) or 'none'}")
        return given
    if len(images) != 1:
        found = f"{len(images)} image columns ({', '.join(images)})" if images else "no Image column"
        raise FusionEngineError(f"{where}: {found}; say which with image_column (columns: "
                                f"{', '.join(table.column_names)})")
    return images[0]


def _label_column(table, given: str | None, where: str) -> str:
    import datasets

    if given is not None:
        _check_column(table, given, "label_column", where)
        return given
    classes = [name for name, feature in table.features.items() if isinstance(feature, datasets.ClassLabel)]
    if len(classes) == 1:
        return classes[0]
    if not classes and "label" in table.column_names:
        return "label"
    found = f"{len(classes)} ClassLabel columns ({', '.join(classes)})" if classes else "no ClassLabel column"
    raise FusionEngineError(f"{where}: {found}; say which with label_column (columns: {', '.join(table.column_names)})")


def _check_column(table, column: str, field: str, where: str) -> None:
    if column not in table.column_names:
        raise FusionEngineError(f"{where}: {field} '{column}' is not a column; columns: {', '.join(table.column_names)}")


def _labels(table, column: str, where: str) -> tuple[list[str], np.ndarray]:
    """Class names and integer labels: a ClassLabel's names, else the sorted distinct values."""
    import datasets

    feature = table.features[column]
    values = table.with_format("numpy", columns=[column])[column]
    values = np.asarray(values)
    if isinstance(feature, datasets.ClassLabel):
        if len(values) and (values.min() < 0 or values.max() >= feature.num_classes):
            bad = int(values.min()) if values.min() < 0 else int(values.max())
            raise FusionEngineError(f"{where}: label_column '{column}' holds {bad}, outside its {feature.num_classes} "
                                    f"classes (-1 marks an unlabelled sample: keep such rows out with split)")
        return list(feature.names), values.astype(np.int64)
    if values.dtype.kind not in "iuUSO" or values.ndim != 1:
        raise FusionEngineError(f"{where}: label_column '{column}' holds {feature}, not class labels")
    classes, labels = np.unique(values.astype(str) if values.dtype.kind in "USO" else values, return_inverse=True)
    return [str(c) for c in classes], labels.astype(np.int64)


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
