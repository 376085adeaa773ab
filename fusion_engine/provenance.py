"""What produced a result: the code and the files that decide a member's outputs, and the
versions of the libraries a run used.

A member's zoo key (:func:`fusion_engine.zoo.key_material`) includes :func:`member_code` and its
parameters with files replaced by their content (:func:`params_for_key`), so that a plugin
whose code changed, or a weights file whose bytes changed, is never served from the zoo. What is
left out, and why, is in docs/zoo.md.
"""

from __future__ import annotations

import hashlib
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

#: the distributions whose versions a run records
RECORDED = ("fusion-engine", "torch", "timm", "numpy", "scikit-learn", "xgboost")


def library_versions() -> dict[str, str]:
    """Python's version and each installed distribution of :data:`RECORDED`'s."""
    out = {"python": platform.python_version()}
    for pkg in RECORDED:
        found = _version(pkg)
        if found:
            out[pkg] = found
    return out


def engine_version() -> str | None:
    """fusion-engine's own version."""
    return _version("fusion-engine")


def member_code(provided) -> dict[str, Any]:
    """The code that decides a trained member's outputs: the engine's version (its training
    loop), the backbone plugin's identity (distribution and version, or a plugin file's
    sha256), torch's major.minor version (kernels change numerics between minor releases; patch
    releases fix bugs) and timm's full version (model definitions and initialisations change
    within minor releases)."""
    torch = _version("torch")
    return {
        "engine": engine_version(),
        "plugin": dict(provided.code),
        "torch": ".".join(torch.split(".")[:2]) if torch else None,
        "timm": _version("timm"),
    }


def params_for_key(params: dict) -> dict:
    """A member's params as they enter its key: a value naming an existing file becomes
    ``{"sha256": ...}`` of its content, so moving the file changes nothing and changing its bytes
    changes the member."""
    out = {}
    for name, value in params.items():
        if isinstance(value, str) and value and os.path.isfile(value):
            out[name] = {"sha256": file_sha256(value)}
        else:
            out[name] = value
    return out


def file_sha256(path: str | os.PathLike) -> str:
    """A file's sha256, computed once per (path, size, modification time) in a process."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
