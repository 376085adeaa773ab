"""A Hugging Face hub cache written by hand, as ``hf_hub_download`` leaves one, so that tests load
"downloaded" weights and datasets with no network (``HF_HUB_OFFLINE=1``).

Layout: ``<cache>/models--<org>--<name>/refs/main`` (the commit), ``blobs/<sha256>`` (the bytes)
and ``snapshots/<commit>/<file>`` (a relative symlink to the blob).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def populate_hub_cache(cache_dir: str | os.PathLike, repo_id: str, files: dict[str, bytes | str | os.PathLike], *,
                       repo_type: str = "model", revision: str = "main", commit: str | None = None) -> Path:
    """Write ``files`` into the cache as one snapshot of ``repo_id`` and point ``revision`` at
    it; return the snapshot folder. The commit defaults to a hash of the files' hashes."""
    storage = Path(cache_dir) / "--".join([f"{repo_type}s", *repo_id.split("/")])
    blobs = {}
    for name, source in files.items():
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        blobs[name] = (hashlib.sha256(data).hexdigest(), data)
    if commit is None:
        digest = hashlib.sha1()
        for name in sorted(blobs):
            digest.update(f"{name}:{blobs[name][0]}\n".encode())
        commit = digest.hexdigest()
    snapshot = storage / "snapshots" / commit
    for name, (sha, data) in blobs.items():
        blob = storage / "blobs" / sha
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        os.symlink(os.path.relpath(blob, target.parent), target)
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snapshot
