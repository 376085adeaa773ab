"""Writing files whole.

Everything the engine writes (run folders, zoo cards, checkpoints, caches, reports) goes through
:func:`atomic_path`: the bytes land in a uniquely named temporary file in the destination's
folder, which is renamed over the destination only once it is complete, so a reader (or a run
killed half-way) sees the old file or the new one, never half of one. ``fsync=True`` also syncs
the file before the rename, for what must survive a power cut (the zoo).

JSON files are written by :func:`write_json` in the plain mode of :mod:`fusion_engine.jsoncodec`,
the one codec for numpy values.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .jsoncodec import encode_json

__all__ = ["atomic_path", "checksum", "fsync_dir", "read_json", "seal", "write_atomic", "write_json"]


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; moved over ``path`` when the block succeeds,
    removed when it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # unique, with the umask's permissions
    try:
        yield Path(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` whole or not at all."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | os.PathLike, value: Any, *, fsync: bool = False, allow_nan: bool = True) -> Path:
    """``value`` as indented JSON, numpy values and paths in the codec's plain mode
    (:mod:`fusion_engine.jsoncodec`); a value that must come back as an array is tagged by
    :func:`~fusion_engine.jsoncodec.to_jsonable` first, as fusers' states are."""
    return write_atomic(path, encode_json(value, indent=2, allow_nan=allow_nan) + "\n", fsync=fsync)


def checksum(path: str | os.PathLike) -> dict:
    """``{"sha256", "bytes"}`` of a file."""
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        size = os.fstat(handle.fileno()).st_size
    return {"sha256": digest, "bytes": size}


def seal(path: str | os.PathLike) -> dict:
    """fsync a file just written and return its checksum (:func:`checksum`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return checksum(path)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder, so that renames into it are durable (where the filesystem can)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot sync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """A JSON file's value, or ``default`` when there is no such file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
