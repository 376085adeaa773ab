"""Where a dataset's files are: paths in a spec are relative to the spec's folder."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationInfo


def resolve_path(path: Path, base_dir: Path | str) -> Path:
    return (Path(base_dir) / Path(path).expanduser()).resolve()


def missing_directory(path: Path) -> str | None:
    """Why ``path`` is not a usable directory, or ``None`` when it is."""
    if not path.exists():
        return f"no such directory: {path}"
    if not path.is_dir():
        return f"not a directory: {path}"
    return None


def missing_file(path: Path) -> str | None:
    """Why ``path`` is not a usable file, or ``None`` when it is."""
    if not path.exists():
        return f"no such file: {path}"
    if not path.is_file():
        return f"not a file: {path}"
    return None


def check_at_validation(path: Path, info: ValidationInfo, problem) -> Path:
    """Report a missing path when the spec is validated, not minutes later when the run loads it.

    The spec validator passes ``base_dir`` in the validation context; without it (a ``Params``
    built in code) the check waits for ``load``.
    """
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is not None:
        message = problem(resolve_path(path, base_dir))
        if message:
            raise ValueError(message)
    return path
