"""A split's images at one input config, wherever they live: what a member trains on and
predicts from, in memory that stays within a budget at any dataset size.

:func:`open_images` gives each split an :class:`ImageSet` whose store (:mod:`fusion_engine.stores`:
held in memory, read from the decoded-image cache, or decoded per batch) is opened when first read.
An image set hands out batches for lists of positions (:meth:`ImageSet.batches`), in the
order asked, so training chooses the order (and gathers per-sample targets with the same
positions) whatever the storage; every storage gives the same pixels, so a member trains to the
same weights whichever one its data took. Pickled (to a Ray worker), an image set is what reopens
it (the dataset's items, the cache file's path), never its pixels, unless its pixels are all
there is (arrays given in memory); the worker reopens it with its own budget.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

from .decoded_cache import decoded_cache
from .errors import FusionEngineError
from .memory import default_workers
from .records import InputConfig
from .stores import MemoryStore, Opener, SharedBudget, Store

if TYPE_CHECKING:  # pragma: no cover
    import torch


class ImageSet:
    """One split's images at one input config: its raw ``items`` and the :class:`~fusion_engine.stores.Store` that
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
        opens it there (the items and the cache file's path, :class:`~fusion_engine.stores.Opener`)."""
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


def share_memory_budget(image_sets: Iterable[ImageSet], share: float = 1.0) -> None:
    """Have image sets that reached another process (a Ray task) keep to one memory budget
    together, as a run's splits do on the driver (:class:`~fusion_engine.stores.SharedBudget`):
    ``data.memory_budget`` worked out once on this machine and scaled by ``share`` (the task's
    part of it), less what all of the sets hold in memory. Sets that keep to a budget already (a
    run's own, on the driver) and sets given pixels alone are left as they are; sets pickled
    again travel without it."""
    sets = list(image_sets)
    to_open = [s for s in sets if s.opener is not None and s.opener.budget is None and not s.opened]
    if not to_open:
        return
    budget = SharedBudget(to_open[0].opener.budget_setting, lambda: sum(s.store.nbytes for s in sets if s.opened),
                          share=share)
    for image_set in to_open:
        image_set.opener.budget = budget


def open_images(items, split_rows: dict[str, np.ndarray], cfg: InputConfig, *, fingerprint: str,
                cache_dir: os.PathLike | str | None, storage: str = "auto", workers: int | None = None,
                budget: Callable[[int], tuple[int, str]] | None = None,
                budget_setting: float | str | None = None) -> dict[str, ImageSet]:
    """Each split's :class:`ImageSet` of the dataset's ``items`` prepared as ``cfg``, each with
    its own store and decoded-image cache file, opened when first read (see :func:`fusion_engine.stores.open_store`);
    ``budget_setting`` is ``data.memory_budget``, for a process that opens them elsewhere."""
    sets = {}
    for split, rows in split_rows.items():
        cache = None if cache_dir is None else decoded_cache(cache_dir, fingerprint, cfg, len(rows), rows)
        opener = Opener(Rows(items, rows), cfg, cache, storage, budget, budget_setting=budget_setting)
        sets[split] = ImageSet(opener.items, cfg, opener=opener, workers=workers)
    return sets
