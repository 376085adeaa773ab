"""What produced a result: the versions of the libraries that decide it."""

from __future__ import annotations

import platform

#: the distributions whose versions a run records
RECORDED = ("fusion-engine", "torch", "timm", "numpy", "scikit-learn", "xgboost")


def library_versions() -> dict[str, str]:
    """Python's version and each installed distribution of :data:`RECORDED`'s."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in RECORDED:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
