"""Batches of images made in parallel: by DataLoader worker processes (:func:`worker_batches`)
from the datasets they read, one for evaluation (:class:`Prepared`: an item prepared as its input
config says) and one for training (:class:`Transformed`: an item through an augmentation), or
made one or two ahead in a thread (:func:`prefetched`).

Batches come in the order asked, and a training image is the same whichever worker makes it (the
workers are seeded by a generator of their own, not torch's global one); an image that cannot be
read stops the iteration with the one-line error naming it.
"""

from __future__ import annotations

import queue
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .errors import FusionEngineError, UnreadableImage
from .preprocess import prepare_image
from .records import InputConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class Prepared:
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
