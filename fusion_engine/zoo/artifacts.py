"""A stored member's files: sealed when written, checked before they are read.

Every file of a member has its size and sha256 taken when it is written
(:func:`fusion_engine.files.seal`), and is checked against them before it is used
(:func:`check_file`, :func:`read_checked`).
A file that fails is damage (:class:`CorruptArtifact`), unless it is a pickle or a zip archive
(torch.save's format), which the zoo never writes and refuses outright (:class:`PlantedFile`).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from .errors import CorruptArtifact, PlantedFile

#: what a member's folder holds besides its card: its weights (not for a member read from
#: predictions), its logits and labels per split, and its sample ids per split
WEIGHTS_FILE, OUTPUTS_FILE, IDS_FILE = "model.safetensors", "outputs.safetensors", "ids.json"
PAYLOAD_FILES = (WEIGHTS_FILE, OUTPUTS_FILE, IDS_FILE)
CARD_FILE = "card.json"
#: the order splits are written in
_SPLIT_ORDER = ("train", "val", "test")


def write_outputs(folder: Path, logits: dict, labels: dict, ids: dict) -> None:
    """A member's outputs in ``folder``: ``outputs.safetensors`` (``<split>_logits`` float32,
    ``<split>_labels`` int64) and ``ids.json`` (``{split: [id, ...]}``), for the splits in
    ``logits`` (each of which ``labels`` and ``ids`` have)."""
    import numpy as np
    from safetensors.numpy import save_file

    splits = sorted(logits, key=_SPLIT_ORDER.index)
    save_file({**{f"{s}_logits": np.ascontiguousarray(logits[s], dtype=np.float32) for s in splits},
               **{f"{s}_labels": np.ascontiguousarray(labels[s], dtype=np.int64) for s in splits}},
              str(folder / OUTPUTS_FILE))
    (folder / IDS_FILE).write_text(json.dumps({s: list(ids[s]) for s in splits}) + "\n", encoding="utf-8")


def output_splits(folder: Path) -> set[str]:
    """The splits a member's stored outputs cover (read from the file's header alone)."""
    from safetensors import safe_open

    with safe_open(str(folder / OUTPUTS_FILE), "np") as f:
        return {k[:-len("_logits")] for k in f.keys() if k.endswith("_logits")}


def required_files(source: str) -> tuple[str, ...]:
    """The payload files a member from ``source`` must have: all of them, but a member read
    from predictions made elsewhere has no weights."""
    return PAYLOAD_FILES[1:] if source == "predictions" else PAYLOAD_FILES

_PICKLE_MAGIC = tuple(bytes([0x80, p]) for p in range(2, 6))
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a zip of pickles


def tree_bytes(path: Path) -> int:
    """The bytes of the regular files under ``path`` (not following links)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def _lstat_regular(key: str, path: Path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CorruptArtifact(key, path.name, "missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise PlantedFile(key, path, "is not a regular file (a link or a device)")
    return st


def _verdict(key: str, path: Path, expected: dict, size: int, head: bytes) -> None:
    """Why a file fails its checksum: a pickle or an archive is refused, anything else is damage."""
    if head.startswith(_PICKLE_MAGIC):
        raise PlantedFile(key, path, "holds a pickle")
    if head.startswith(_ZIP_MAGIC):
        raise PlantedFile(key, path, "holds a zip archive (torch.save's pickle format)")
    if size != expected["bytes"]:
        raise CorruptArtifact(key, path.name, f"{size} bytes where {expected['bytes']} were written (truncated or overwritten)")
    raise CorruptArtifact(key, path.name, "its sha256 differs from the one recorded when it was written")


def check_file(key: str, path: Path, expected: dict) -> None:
    """Raise unless the file at ``path`` is the one ``expected`` describes."""
    st = _lstat_regular(key, path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        handle.seek(0)
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if st.st_size != expected["bytes"] or digest != expected["sha256"]:
        _verdict(key, path, expected, st.st_size, head)


def read_checked(key: str, path: Path, expected: dict) -> bytes:
    """A file's bytes, read once and checked against its checksum (no window to swap it)."""
    _lstat_regular(key, path)
    data = path.read_bytes()
    if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
        _verdict(key, path, expected, len(data), data[:8])
    return data


def read_json_object(path: Path, key: str) -> dict:
    """A JSON object from a member's folder; damage reported as :class:`CorruptArtifact`."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptArtifact(key, path.name, "missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptArtifact(key, path.name, f"not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CorruptArtifact(key, path.name, "not a JSON object")
    return value
