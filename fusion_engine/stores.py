"""Where a dataset's images live, prepared for one :class:`~fusion_engine.records.InputConfig`
(:mod:`fusion_engine.preprocess`): one of three **storages**, chosen by :func:`open_store` and
logged with the figures that decided it:

- ``memory``: one ``uint8`` tensor of every sample, when it fits the memory budget; each split
  is a list of rows into it (no copy per split). A dataset of files is decoded once per machine
  into the registry's decoded-image cache (:mod:`fusion_engine.decoded_cache`) and read back
  whole by later runs.
- ``disk``: the decoded-image cache file itself, read per batch with positional reads. Decoded
  once, chunk by chunk, so decoding never holds more than a chunk.
- ``stream``: each batch decoded from the dataset's own storage (files, a Hugging Face cache)
  in DataLoader worker processes (:mod:`fusion_engine.loaders`).

The **memory budget** (``data.memory_budget``) defaults to half (:mod:`fusion_engine.memory`) of the
memory available to this process (the smaller of the system's available memory and a cgroup's
limit, as in a container). Data that fits takes ``memory``; data that does not takes ``disk`` or
``stream``, whichever measures faster here: the time to decode a sample of its images (shared
among the workers) against the time to read the same number back from the cache. The cache is
written first if it is missing and there is room on its disk. Nothing but the budget and a few
batches holds pixels, so peak memory does not grow with the number of images.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from .decoded_cache import DECODE_CHUNK_BYTES, DecodedCache
from .errors import FusionEngineError
from .loaders import Prepared, prefetched, worker_batches
from .memory import gb, memory_budget, return_freed_batches
from .preprocess import load_images, prepare_image
from .records import InputConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger("fusion_engine")

STORAGES = ("memory", "disk", "stream")
#: room left free on the cache's disk beyond the file itself
DISK_MARGIN_BYTES = 1 << 30
PROBE_IMAGES = 32


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
        return worker_batches(Prepared(self.items, self.cfg), (np.asarray(r).tolist() for r in rows), self.workers)


class SharedBudget:
    """One memory budget for several image sets: ``data.memory_budget`` worked out once, when
    first asked (before any of their pixels took their share of the memory; ``share``: the part
    of the machine the process has, :func:`fusion_engine.memory.memory_budget`), less what
    ``held()`` says the sets already hold in memory. Called as an :class:`Opener`'s ``budget``."""

    def __init__(self, setting: float | str | None, held: Callable[[], int], *, share: float = 1.0):
        self.setting, self.held, self.share = setting, held, share
        self._total: tuple[int, str] | None = None

    def total(self) -> tuple[int, str]:
        if self._total is None:
            self._total = memory_budget(self.setting, share=self.share)
        return self._total

    def __call__(self, nbytes: int) -> tuple[int, str]:
        budget, why = self.total()
        return max(0, budget - self.held()), why


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
