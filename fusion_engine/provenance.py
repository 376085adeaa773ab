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
    """The code that decides a trained member's outputs: the engine's (its training loop, its
    image decoding), the backbone plugin's identity (distribution and version, or a plugin
    file's sha256), torch's major.minor version (kernels change numerics between minor releases;
    patch releases fix bugs) and timm's full version (model definitions and initialisations
    change within minor releases).

    The engine and an installed plugin are known by their version when they run from a release
    (a wheel's files); run from a source tree (an editable install, or a checkout on the path)
    their versions do not move as the code does, so their source's sha256 enters as well
    (:func:`source_identity`). A plugin file is known by its content, not its name."""
    import fusion_engine

    torch = _version("torch")
    code = {
        "engine": engine_version(),
        "plugin": {k: v for k, v in provided.code.items() if k != "file"},
        "torch": ".".join(torch.split(".")[:2]) if torch else None,
        "timm": _version("timm"),
    }
    code.update({f"engine_{k}": v for k, v in source_identity("fusion-engine", fusion_engine.__file__).items()})
    return code


def source_identity(distribution: str | None, module_file: str | os.PathLike | None) -> dict[str, str]:
    """``{"source_sha256": ...}`` for code that does not run from a release of ``distribution``
    (installed editable, not installed, or imported from elsewhere than its installed files),
    else ``{}``: a release's version names its code, a source tree's does not.

    The sha256 covers every ``.py`` file of the module's package (the module alone when it is
    not a package), by relative name and content."""
    if module_file is None:
        return {}
    module_file = Path(module_file).resolve()
    if distribution is not None and _from_release(distribution, str(module_file)):
        return {}
    return {"source_sha256": package_sha256(str(module_file))}


@lru_cache(maxsize=64)
def _from_release(distribution: str, module_file: str) -> bool:
    import json
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import distribution as find

    try:
        dist = find(distribution)
    except PackageNotFoundError:
        return False
    if not dist.read_text("RECORD"):  # not installed from a wheel (a source tree's .egg-info, say)
        return False
    direct_url = dist.read_text("direct_url.json")
    if direct_url:
        try:
            if json.loads(direct_url).get("dir_info", {}).get("editable"):
                return False
        except ValueError:
            return False
    return any(Path(dist.locate_file(f)).resolve() == Path(module_file) for f in dist.files or ()
               if str(f).endswith(".py"))


def package_sha256(module_file: str) -> str:
    """The sha256 of a module's source: every ``.py`` file under its package's folder (the file
    alone for a module that is not a package), by relative name and content (each file's hash is
    cached while its size and modification time stay: :func:`file_sha256`)."""
    path = Path(module_file)
    files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(path.parent).as_posix()}\0{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def params_for_key(params: dict, base_dir: str | os.PathLike | None = None) -> dict:
    """A member's params as they enter its key: every string that names an existing file or
    folder, at any depth (inside lists and dicts too), becomes its content, so moving the file
    changes nothing and changing its bytes changes the member. A relative path is read against
    ``base_dir`` (the spec's folder, as plugins read it), never the working directory.

    A file becomes ``{"sha256": ...}``; a folder ``{"tree_sha256": ...}``, the sha256 of the
    sorted manifest of every file under it (relative name, size and sha256), so adding, removing,
    renaming or changing any file in it changes the member (every file is read: a folder of
    gigabytes costs a second per gigabyte, once per process while it is unchanged)."""
    return {name: _value_for_key(value, base_dir) for name, value in params.items()}


def _value_for_key(value: Any, base_dir: str | os.PathLike | None) -> Any:
    if isinstance(value, dict):
        return {k: _value_for_key(v, base_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_value_for_key(v, base_dir) for v in value]
    if not isinstance(value, str) or not value or "\n" in value or len(value) > 4096:
        return value
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    try:
        if path.is_file():
            return {"sha256": file_sha256(path)}
        if path.is_dir():
            return {"tree_sha256": tree_sha256(path)}
    except OSError:  # a name the filesystem refuses (too long, say): not a path
        pass
    return value


def tree_sha256(folder: str | os.PathLike) -> str:
    """The sha256 of a folder's manifest: each file under it (symlinks followed, hidden files
    included), by relative POSIX name in sorted order, with its size and sha256."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix()):
        entry = f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0{file_sha256(path)}\n"
        digest.update(entry.encode())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """A file's sha256, computed once per (path, inode, size, modification time) in a process
    (an atomic replace changes the inode; a rewrite in place of the same size within one tick of
    the filesystem's clock is the one change this cache can miss, within one process)."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4096)
def _sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
