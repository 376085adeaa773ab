"""The decoded-image cache on disk: a dataset's images prepared for one
:class:`~fusion_engine.records.InputConfig` (:mod:`fusion_engine.preprocess`), decoded once per
machine into a file in the registry's cache folder (named by :func:`cache_path`), and read back
whole or by rows (:mod:`fusion_engine.stores`).

A file is written chunk by chunk, so decoding never holds more than a chunk, and renamed into
place when complete; a reader never uses half of one, nor one written for other data or another
preparation (:class:`DecodedCache`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .errors import FusionEngineError
from .files import atomic_path
from .preprocess import is_squash, load_images, preparation
from .records import InputConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

IMAGE_CACHE_FORMAT = 1
#: images decoded per chunk while a cache file is written: bounds the memory decoding takes
DECODE_CHUNK_BYTES = 64 << 20


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
