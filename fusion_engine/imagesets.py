"""A split's images at one input config, wherever they live: what a member trains on and
predicts from, in memory that stays within a budget at any dataset size.

A dataset's images, prepared for one :class:`~fusion_engine.records.InputConfig`
(:mod:`fusion_engine.preprocess`), are held in one of three **storages**, chosen by
:func:`open_images` and logged with the figures that decided it:

- ``memory``: one ``uint8`` tensor of every sample, when it fits the memory budget; each split
  is a list of rows into it (no copy per split). A dataset of files is decoded once per machine
  into the registry's decoded-image cache and read back whole by later runs.
- ``disk``: the decoded-image cache file itself, read per batch with positional reads. Decoded
  once, chunk by chunk, so decoding never holds more than a chunk.
- ``stream``: each batch decoded from the dataset's own storage (files, a Hugging Face cache)
  in DataLoader worker processes.

The **memory budget** (``data.memory_budget``) defaults to half (:mod:`fusion_engine.memory`) of the
memory available to this process (the smaller of the system's available memory and a cgroup's
limit, as in a container). Data that fits takes ``memory``; data that does not takes ``disk`` or
``stream``, whichever measures faster here: the time to decode a sample of its images (shared
among the workers) against the time to read the same number back from the cache. The cache is
written first if it is missing and there is room on its disk. Nothing but the budget and a few
batches holds pixels, so peak memory does not grow with the number of images.

An :class:`ImageSet` hands out batches for lists of positions (:meth:`ImageSet.batches`), in the
order asked, so training chooses the order (and gathers per-sample targets with the same
positions) whatever the storage; every storage gives the same pixels, so a member trains to the
same weights whichever one its data took. Pickled (to a Ray worker), an image set is what reopens
it (the dataset's items, the cache file's path), never its pixels, unless its pixels are all
there is (arrays given in memory); the worker reopens it with its own budget.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import shutil
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .errors import FusionEngineError, UnreadableImage
from .files import atomic_path
from .memory import (available_memory, default_workers, gb, memory_budget, parse_budget,  # noqa: F401
                     return_freed_batches, usable_cpus)
from .preprocess import is_squash, load_images, prepare_image, preparation
from .records import InputConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger("fusion_engine")

STORAGES = ("memory", "disk", "stream")
IMAGE_CACHE_FORMAT = 1
#: images decoded per chunk while a cache file is written: bounds the memory decoding takes
DECODE_CHUNK_BYTES = 64 << 20
#: room left free on the cache's disk beyond the file itself
DISK_MARGIN_BYTES = 1 << 30
PROBE_IMAGES = 32


# -- the decoded-image cache file ------------------------------------------------------------------------

class DecodedCache:
    """A file of prepared images, ``uint8 (N, C, S, S)``, in the safetensors layout (one tensor,
    ``images``), written chunk by chunk and read whole or by rows.

    It is written under a temporary name and renamed when complete, so a reader never sees half
    of one. Its header records the data fingerprint and the preparation; a file whose header,
    shape or size disagree with what is expected is not used.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int, int], metadata: dict[str, str]):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.metadata = metadata
        self.record = math.prod(self.shape[1:])
        self.offset = 0
        self._fd: tuple[int, int] | None = None  # (pid, fd): a forked process opens its own

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.record

    def _header(self) -> bytes:
        header = json.dumps({"__metadata__": self.metadata, "images": {
            "dtype": "U8", "shape": list(self.shape), "data_offsets": [0, self.nbytes]}}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        return struct.pack("<Q", len(header)) + header

    def check(self) -> str | None:
        """Why the file cannot be used (absent: ``None`` is returned only for a usable file)."""
        try:
            with open(self.path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > 1 << 24:
                    return "its header is not a safetensors header"
                header = json.loads(handle.read(length))
                size = os.fstat(handle.fileno()).st_size
        except FileNotFoundError:
            return "missing"
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
            return str(exc) or type(exc).__name__
        images = header.get("images") if isinstance(header, dict) else None
        if not isinstance(images, dict) or images.get("dtype") != "U8" or tuple(images.get("shape", ())) != self.shape:
            got = (images or {}).get("shape") if isinstance(images, dict) else None
            return f"holds {tuple(got) if got else 'no images'}, expected {self.shape} uint8"
        if size != 8 + length + self.nbytes or images.get("data_offsets") != [0, self.nbytes]:
            return f"is {size} bytes, expected {8 + length + self.nbytes}"
        if (header.get("__metadata__") or {}).get("fingerprint") != self.metadata.get("fingerprint"):
            return "was written for other data"
        self.offset = 8 + length
        return None

    def write(self, items: Sequence[Any] | np.ndarray, cfg: InputConfig, *, keep: "torch.Tensor | None" = None,
              progress: Callable[[int], None] | None = None, chunk_bytes: int = DECODE_CHUNK_BYTES) -> None:
        """Prepare every item and write the file, ``chunk_bytes`` of images at a time; ``keep``
        (a tensor of the file's shape) receives the pixels too."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        chunk = max(1, chunk_bytes // self.record)
        with atomic_path(self.path, fsync=True) as tmp:  # a renamed file is a whole one, after a power loss too
            with open(tmp, "wb") as handle:
                handle.write(self._header())
                for start in range(0, self.shape[0], chunk):
                    rows = np.arange(start, min(start + chunk, self.shape[0]))
                    pixels = load_images(items, rows, cfg)
                    handle.write(pixels.numpy().tobytes())
                    if keep is not None:
                        keep[start:start + len(rows)] = pixels
                    if progress is not None:
                        progress(int(rows[-1]) + 1)
        self.check()

    def read_all(self) -> "torch.Tensor":
        import torch

        out = torch.empty(self.shape, dtype=torch.uint8)
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            view = memoryview(out.numpy()).cast("B")
            done = 0
            while done < len(view):
                got = handle.readinto(view[done:])
                if not got:
                    raise OSError(f"{self.path} ended early")
                done += got
        return out

    def read(self, rows: np.ndarray) -> "torch.Tensor":
        """The images at ``rows`` (in that order): one read for a run of consecutive rows (as
        prediction asks), one per image otherwise. Positional reads share no file position, so
        threads and forked processes can read at once."""
        import torch

        rows = np.asarray(rows, dtype=np.int64)
        out = torch.empty((len(rows), *self.shape[1:]), dtype=torch.uint8)
        if not len(rows):
            return out
        fd = self._descriptor()
        view = memoryview(out.numpy()).cast("B")
        if rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
            self._pread(fd, view, self.offset + int(rows[0]) * self.record)
        else:
            for i, row in enumerate(rows.tolist()):
                self._pread(fd, view[i * self.record:(i + 1) * self.record], self.offset + row * self.record)
        return out

    def _descriptor(self) -> int:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
        return self._fd[1]

    def _pread(self, fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if not got:
                raise FusionEngineError(f"the decoded-image cache {self.path} ended early; remove it (zoo gc --cache)")
            done += got

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if self._fd is not None and self._fd[0] == os.getpid():
            try:
                os.close(self._fd[1])
            except OSError:
                pass


def cache_path(cache_dir: os.PathLike | str, fingerprint: str, cfg: InputConfig, rows: np.ndarray | None = None) -> Path:
    """Where the decoded images of the data ``fingerprint`` (its samples at ``rows``, or all of
    them) prepared as ``cfg`` are cached."""
    import hashlib

    what = f"{IMAGE_CACHE_FORMAT}:{fingerprint}:{cfg.size}:{cfg.in_chans}"
    if not is_squash(cfg):  # the small-image preparation of a whole dataset keeps the names its caches always had
        what += ":" + json.dumps(preparation(cfg), sort_keys=True)
    if rows is not None:
        what += ":rows:" + hashlib.sha256(np.ascontiguousarray(rows, dtype="<i8").tobytes()).hexdigest()
    return Path(cache_dir) / f"{hashlib.sha256(what.encode()).hexdigest()}.safetensors"


def decoded_cache(cache_dir: os.PathLike | str, fingerprint: str, cfg: InputConfig, n: int,
                  rows: np.ndarray | None = None) -> DecodedCache:
    """The decoded-image cache of ``n`` images of the data ``fingerprint`` (those at ``rows``)
    prepared as ``cfg``."""
    return DecodedCache(cache_path(cache_dir, fingerprint, cfg, rows), (n, cfg.in_chans, cfg.size, cfg.size),
                        {"fingerprint": fingerprint, "preparation": json.dumps(preparation(cfg), sort_keys=True)})


# -- where a dataset's images live -----------------------------------------------------------------------

class Store:
    """Every image of a sequence of items prepared for one input config (see the module docstring)."""

    storage = "?"

    def __init__(self, items: Sequence[Any] | np.ndarray | None, cfg: InputConfig | None, cache: DecodedCache | None,
                 workers: int):
        self.items, self.cfg, self.cache, self.workers = items, cfg, cache, workers

    def __len__(self) -> int:
        return len(self.items)

    @property
    def nbytes(self) -> int:
        """Bytes of pixels held in memory."""
        return 0

    def batches(self, rows: list[np.ndarray]) -> Iterator["torch.Tensor"]:
        raise NotImplementedError


class MemoryStore(Store):
    storage = "memory"

    def __init__(self, pixels: "torch.Tensor", items=None, cfg: InputConfig | None = None,
                 cache: DecodedCache | None = None, workers: int = 0):
        super().__init__(items, cfg, cache, workers)
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes

    def batches(self, rows):
        import torch

        for r in rows:
            yield self.pixels[r if isinstance(r, torch.Tensor) else torch.from_numpy(np.asarray(r, dtype=np.int64))]


class DiskStore(Store):
    storage = "disk"

    def batches(self, rows):
        return prefetched(self.cache.read(np.asarray(r)) for r in rows)


class StreamStore(Store):
    storage = "stream"

    def batches(self, rows):
        if self.workers <= 0 or not decodes_items(self.items):  # arrays resize fast in this process
            return prefetched(load_images(self.items, np.asarray(r), self.cfg) for r in rows)
        return worker_batches(_Prepared(self.items, self.cfg), (np.asarray(r).tolist() for r in rows), self.workers)


@dataclass
class Opener:
    """What opens a split's store when it is first read: its items, preparation and cache file,
    the storage asked for, and ``budget(nbytes) -> (bytes, why)`` (default: the memory budget).

    Pickled (to a Ray worker) it keeps the items, the cache file's path, the storage and the
    spec's ``data.memory_budget`` (``budget_setting``), and drops the rest: the worker opens the
    store within that budget of its own machine's memory, reading the cache file where that path
    holds it and decoding from the dataset's own storage otherwise, and writes no cache.
    """

    items: Any
    cfg: InputConfig
    cache: DecodedCache | None = None
    storage: str = "auto"
    budget: Callable[[int], tuple[int, str]] | None = None
    writable: bool = True
    budget_setting: float | str | None = None  # data.memory_budget, where ``budget`` is not given

    def __call__(self, workers: int) -> Store:
        needed = len(self.items) * self.cfg.in_chans * self.cfg.size * self.cfg.size
        budget, why = self.budget(needed) if self.budget is not None else memory_budget(self.budget_setting)
        return open_store(self.items, self.cfg, cache=self.cache, budget=budget, budget_text=why, storage=self.storage,
                          workers=workers, writable=self.writable)

    def __reduce__(self):
        return Opener, (self.items, self.cfg, self.cache, self.storage, None, False, self.budget_setting)


def decodes_items(items) -> bool:
    """Whether preparing ``items`` means decoding (files, bytes, PIL images), not resizing arrays."""
    if isinstance(items, np.ndarray) and items.dtype != object:
        return False
    return len(items) > 0 and not isinstance(items[0], np.ndarray)


# -- choosing a storage ------------------------------------------------------------------------------------

def open_store(items, cfg: InputConfig, *, cache: DecodedCache | None, budget: int, budget_text: str,
               storage: str = "auto", workers: int = 0, writable: bool = True, what: str = "images") -> Store:
    """The store of ``items`` prepared as ``cfg``: in memory when it fits ``budget`` (or
    ``storage`` says so), else on disk or streamed, whichever measures faster (see the module
    docstring). The choice is logged."""
    import torch

    n = len(items)
    shape = (n, cfg.in_chans, cfg.size, cfg.size)
    nbytes = math.prod(shape)
    decodes = decodes_items(items)
    size = f"{n:,} {what} at {cfg.size} px ({gb(nbytes)} decoded)"
    usable = cache is not None and cache.check() is None
    if storage == "memory" or (storage == "auto" and nbytes <= budget):
        if storage == "memory" and nbytes > budget:
            log.warning("%s exceed the memory budget (%s, %s) but data.storage is memory: holding them in memory",
                        size, gb(budget), budget_text)
        else:
            log.info("%s: held in memory (%s)", size, f"within the memory budget, {gb(budget)} of {budget_text}"
                     if storage == "auto" else "data.storage is memory")
        if usable:
            log.info("decoded images read from the cache %s", cache.path)
            try:
                return MemoryStore(cache.read_all(), items, cfg, cache, workers)
            except OSError as exc:
                log.warning("image cache %s is unreadable (%s); decoding again", cache.path, exc)
        elif cache is not None and cache.path.exists():
            log.warning("image cache %s is unreadable (%s); decoding again", cache.path, cache.check())
        pixels = torch.empty(shape, dtype=torch.uint8)
        if cache is not None and writable and decodes and _room_for(cache):
            try:
                cache.write(items, cfg, keep=pixels)
                return MemoryStore(pixels, items, cfg, cache, workers)
            except OSError as exc:  # a cache that cannot be written costs speed, not the run
                log.warning("could not write the image cache %s: %s", cache.path, exc.strerror or exc)
        chunk = max(1, DECODE_CHUNK_BYTES // max(1, math.prod(shape[1:])))
        for start in range(0, n, chunk):
            pixels[start:start + chunk] = load_images(items, np.arange(start, min(n, start + chunk)), cfg)
        return MemoryStore(pixels, items, cfg, None, workers)

    over = (f"{size} exceed the memory budget ({gb(budget)}, {budget_text})" if nbytes > budget
            else f"{size}, data.storage: {storage}")
    return_freed_batches()  # batches come and go: keep glibc from growing its heap with them
    if storage == "stream" or (storage == "auto" and not decodes):
        why = "data.storage is stream" if storage == "stream" else "they are arrays in memory, resized per batch"
        log.info("%s: decoding them per batch (%s)", over, why)
        return StreamStore(items, cfg, None, workers)
    if not usable:
        room = cache is not None and writable and _room_for(cache)
        if not room:
            why = ("no cache folder" if cache is None else "its folder is not on this machine" if not writable
                   else f"{cache.path.parent} lacks {gb(cache.nbytes + DISK_MARGIN_BYTES)} free")
            if storage == "disk" and cache is None:
                raise FusionEngineError("data.storage is disk but there is no cache folder to write decoded images to")
            log.info("%s: decoding them per batch in %d worker processes (the decoded-image cache cannot be "
                     "written: %s)", over, workers, why)
            return StreamStore(items, cfg, None, workers)
        log.info("%s: decoding them once into the decoded-image cache %s", over, cache.path)
        started = time.perf_counter()
        try:
            # a quarter of the budget at a time: decoding data that does not fit stays within it
            cache.write(items, cfg, progress=_progress_logger(n, started),
                        chunk_bytes=min(DECODE_CHUNK_BYTES, budget // 4))
        except OSError as exc:  # a cache that cannot be written costs speed, not the run
            log.warning("could not write the image cache %s (%s): decoding the images per batch instead", cache.path,
                        exc.strerror or exc)
            return StreamStore(items, cfg, None, workers)
        log.info("wrote the decoded-image cache in %.1fs", time.perf_counter() - started)
    if storage == "disk":
        log.info("%s: reading them from the decoded-image cache %s (data.storage is disk)", over, cache.path)
        return DiskStore(items, cfg, cache, workers)
    decode_s, read_s = _probe(items, cfg, cache)
    per_epoch_decode = decode_s / max(1, workers)
    choice = "disk" if read_s <= per_epoch_decode else "stream"
    log.info("%s: %s (measured per image: reading the cache %.3f ms, decoding %.3f ms, %.3f ms shared by %d "
             "workers)", over,
             f"reading them from the decoded-image cache {cache.path}" if choice == "disk" else
             "decoding them per batch in worker processes, which measured faster than reading the cache",
             1000 * read_s, 1000 * decode_s, 1000 * per_epoch_decode, max(1, workers))
    return DiskStore(items, cfg, cache, workers) if choice == "disk" else StreamStore(items, cfg, None, workers)


def _probe(items, cfg: InputConfig, cache: DecodedCache) -> tuple[float, float]:
    """Seconds per image to decode, and to read back from ``cache``, a spread-out sample."""
    n = len(items)
    rows = np.unique(np.linspace(0, n - 1, min(PROBE_IMAGES, n)).astype(np.int64))
    started = time.perf_counter()
    for row in rows:
        prepare_image(items[int(row)], cfg)
    decode = (time.perf_counter() - started) / len(rows)
    shuffled = np.random.default_rng(0).permutation(rows)
    started = time.perf_counter()
    for row in shuffled:
        cache.read(np.array([row]))
    return decode, (time.perf_counter() - started) / len(rows)


def _room_for(cache: DecodedCache) -> bool:
    folder = cache.path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free >= cache.nbytes + DISK_MARGIN_BYTES
    except OSError:
        return False


def _progress_logger(total: int, started: float) -> Callable[[int], None]:
    last = [started]

    def progress(done: int) -> None:
        now = time.perf_counter()
        if now - last[0] >= 30:
            last[0] = now
            log.info("decoded %d of %d images (%.0f/s)", done, total, done / (now - started))

    return progress


# -- image sets --------------------------------------------------------------------------------------------

class ImageSet:
    """One split's images at one input config: its raw ``items`` and the :class:`Store` that
    prepares them, opened when first read (see the module docstring)."""

    def __init__(self, items: Any, cfg: InputConfig | None, *, opener: Opener | None = None,
                 store: Store | None = None, workers: int | None = None):
        self.items, self.cfg, self.opener, self._store = items, cfg, opener, store
        self.workers = default_workers() if workers is None else workers

    @classmethod
    def of(cls, x: "ImageSet | torch.Tensor", cfg: InputConfig | None = None) -> "ImageSet":
        """``x`` as an image set: a ``uint8`` tensor ``(N, C, S, S)`` becomes one in memory
        (whose images, as arrays, are also its items, for a training transform)."""
        if isinstance(x, ImageSet):
            return x
        import torch

        x = torch.as_tensor(x)
        items = None
        if x.dtype == torch.uint8 and x.ndim == 4 and x.device.type == "cpu":
            items = x.permute(0, 2, 3, 1).numpy()
            items = items[..., 0] if items.shape[-1] == 1 else items
        return cls(items, cfg, store=MemoryStore(x, items, cfg), workers=0)

    @property
    def store(self) -> Store:
        if self._store is None:
            if self.opener is None:
                raise FusionEngineError("these images have no store to read them from")
            self._store = self.opener(self.workers)
        return self._store

    @property
    def opened(self) -> bool:
        return self._store is not None

    def release(self) -> None:
        """Let go of the pixels held in memory; the next read opens the store again."""
        if self.opener is not None:
            self._store = None

    def __len__(self) -> int:
        return len(self._store) if self._store is not None and self.items is None else len(self.items)

    @property
    def storage(self) -> str:
        return self.store.storage

    @property
    def nbytes(self) -> int:
        """Bytes of this split's pixels, wherever they are."""
        return math.prod(self.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        if isinstance(self._store, MemoryStore):
            return tuple(self._store.pixels.shape)
        return (len(self), self.cfg.in_chans, self.cfg.size, self.cfg.size)

    @property
    def dtype(self):
        import torch

        return self._store.pixels.dtype if isinstance(self._store, MemoryStore) else torch.uint8

    @property
    def device(self):
        import torch

        return self._store.pixels.device if isinstance(self._store, MemoryStore) else torch.device("cpu")

    def batches(self, index_batches: Iterable[Any]) -> Iterator["torch.Tensor"]:
        """``uint8`` tensors, one per list of positions, in the order given."""
        import torch

        store = self.store
        if isinstance(store, MemoryStore):
            dev = store.pixels.device
            return store.batches(torch.as_tensor(idx, device=dev) for idx in index_batches)
        return store.batches([np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx) for idx in index_batches])

    def sequential(self, batch_size: int, start: int = 0) -> Iterator["torch.Tensor"]:
        """Every image from ``start``, in order, ``batch_size`` at a time."""
        return self.batches(np.arange(i, min(i + batch_size, len(self))) for i in range(start, len(self), batch_size))

    def tensor(self) -> "torch.Tensor":
        """All of this split's images in one tensor (for small sets)."""
        import torch

        if isinstance(self.store, MemoryStore):
            return self.store.pixels
        batches = list(self.sequential(max(1, len(self))))
        return batches[0] if batches else torch.empty(self.shape, dtype=torch.uint8)

    def on(self, device) -> "ImageSet":
        """This split's pixels on ``device`` when they are held in memory; else itself."""
        if not isinstance(self.store, MemoryStore):
            return self
        return ImageSet(self.items, self.cfg, store=MemoryStore(self.store.pixels.to(device), self.items, self.cfg),
                        workers=self.workers)

    def __reduce__(self):
        """To another process (a Ray worker): its pixels when they are all there is, else what
        opens it there (the items and the cache file's path, :class:`Opener`)."""
        if self.items is None or self.opener is None:
            return ImageSet._rebuilt, (self.items, self.cfg, None, self.tensor().cpu(), self.workers)
        return ImageSet._rebuilt, (self.items, self.cfg, self.opener, None, self.workers)

    @staticmethod
    def _rebuilt(items, cfg, opener, pixels, workers) -> "ImageSet":
        store = None if pixels is None else MemoryStore(pixels, items, cfg)
        return ImageSet(items, cfg, opener=opener, store=store, workers=workers)

    def __repr__(self) -> str:
        return f"ImageSet({len(self)} images, {self.store.storage if self.opened else 'not opened'})"


class Rows:
    """``items[rows[i]]``: a split's view of a dataset's items (pickled as the two)."""

    def __init__(self, items, rows):
        self.items, self.rows = items, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.items[int(self.rows[i])]

    def __iter__(self):
        return (self.items[int(r)] for r in self.rows)


def open_images(items, split_rows: dict[str, np.ndarray], cfg: InputConfig, *, fingerprint: str,
                cache_dir: os.PathLike | str | None, storage: str = "auto", workers: int | None = None,
                budget: Callable[[int], tuple[int, str]] | None = None,
                budget_setting: float | str | None = None) -> dict[str, ImageSet]:
    """Each split's :class:`ImageSet` of the dataset's ``items`` prepared as ``cfg``, each with
    its own store and decoded-image cache file, opened when first read (see :func:`open_store`);
    ``budget_setting`` is ``data.memory_budget``, for a process that opens them elsewhere."""
    sets = {}
    for split, rows in split_rows.items():
        cache = None if cache_dir is None else decoded_cache(cache_dir, fingerprint, cfg, len(rows), rows)
        opener = Opener(Rows(items, rows), cfg, cache, storage, budget, budget_setting=budget_setting)
        sets[split] = ImageSet(opener.items, cfg, opener=opener, workers=workers)
    return sets


# -- batches from worker processes and threads ------------------------------------------------------------

@dataclass
class _Prepared:
    """The dataset a DataLoader's workers read: item ``row`` prepared for evaluation."""

    items: Any
    cfg: InputConfig

    def __getitem__(self, row: int):
        return prepare_image(self.items[row], self.cfg)

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Transformed:
    """The dataset a DataLoader's workers read for training: ``(row, seed)`` -> item ``row``
    through ``transform`` with every generator seeded by ``seed`` (the same image whichever
    worker makes it)."""

    items: Any
    transform: Any
    in_chans: int
    #: ``normalise.image(uint8 (C, S, S)) -> float32``, applied here when training on the CPU (each image
    #: normalised where it was made, while it is in cache, as timm's own loader does); None: ``uint8`` out,
    #: normalised on the device
    normalise: Any = None

    def __getitem__(self, key: tuple[int, int]):
        from torch.utils.data import get_worker_info

        from .augment import kept_random_state, seed_everything
        from .preprocess import open_image

        row, seed = key
        with kept_random_state(get_worker_info() is None):  # in the training process: leave its generators be
            seed_everything(seed)
            with open_image(self.items[row]) as image:
                mode = "L" if self.in_chans == 1 else "RGB"
                x = self.transform(image.convert(mode) if image.mode != mode else image)
        return x if self.normalise is None else self.normalise.image(x)

    def __len__(self) -> int:
        return len(self.items)


def worker_batches(dataset, batches: Iterable[list], workers: int, *, pin_memory: bool = False) -> Iterator["torch.Tensor"]:
    """``dataset[key]`` for every key of each batch, stacked, made by ``workers`` DataLoader
    processes (in this process when 0), in order. An image that cannot be read stops the
    iteration with the one-line error naming it."""
    import torch
    from torch.utils.data import DataLoader

    # a generator of its own: a loader takes its workers' base seed from the one it is given, or else
    # from torch's global generator, whose draws would then differ with where the images are held
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory,
                        prefetch_factor=4 if workers else None, worker_init_fn=_worker_init if workers else None,
                        generator=torch.Generator())
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # a worker's exception comes back with its traceback as the message
            found = re.findall(r"(UnreadableImage|FusionEngineError): (.+)", str(exc)) if "\n" in str(exc) else []
            if found:
                kind, message = found[-1]
                raise (UnreadableImage if kind == "UnreadableImage" else FusionEngineError)(message.strip()) from None
            raise
        yield batch


def _worker_init(worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)  # one thread per worker: the workers are the parallelism


def prefetched(batches: Iterator, depth: int = 2) -> Iterator:
    """``batches`` made one or two ahead in a thread (reading and resizing release the GIL), so
    the next batch is ready when the model wants it."""
    done = object()
    out: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                if stop.is_set():
                    return
                out.put(batch)
            out.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            out.put(exc)

    thread = threading.Thread(target=produce, daemon=True, name="fusion-engine-prefetch")
    thread.start()
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(0.01)
