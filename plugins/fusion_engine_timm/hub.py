"""Pretrained weights from the Hugging Face cache: which file ``timm.create_model(name,
pretrained=True)`` loads, found without the network when ``HF_HUB_OFFLINE=1``, and what
identifies its bytes (repository, commit, file, sha256) for the member's zoo key; and the
checks of a model name and of a weights file's checksum."""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from fusion_engine import FusionEngineError

if TYPE_CHECKING:
    from .params import BackboneParams


@dataclass(frozen=True)
class HubWeights:
    """A pretrained-weights file in the Hugging Face cache, and what identifies its bytes."""

    repo: str
    revision: str  # the commit of the snapshot that holds it
    file: str
    path: str
    sha256: str

    def identity(self) -> dict:
        """What enters a member's zoo key (no local path: another machine's copy is the same weights)."""
        return {"source": "hf-hub", "repo": self.repo, "revision": self.revision, "file": self.file,
                "sha256": self.sha256}


def uses_hub(name: str, params: BackboneParams) -> bool:
    """Whether the member starts from timm's pretrained weights through the hub's cache."""
    if params.pretrained_file is not None:
        return False
    return params.pretrained if params.pretrained is not None else "." in name


def weights_identity(name: str, params: BackboneParams) -> dict | None:
    """The identity of the hub weights ``params`` select for ``name`` (None for none): found in
    the Hugging Face cache, else downloaded unless offline; a one-line error otherwise."""
    return hub_weights(name).identity() if uses_hub(name, params) else None


def hub_weights(name: str) -> HubWeights:
    """The file ``timm.create_model(name, pretrained=True)`` loads, found as timm looks for it:
    the pretrained config's ``hf_hub_id`` (``repo`` or ``repo@revision``) and ``hf_hub_filename``,
    else ``model.safetensors`` then ``pytorch_model.bin``. From the Hugging Face cache
    (``HF_HUB_CACHE``, or ``HF_HOME``/hub); downloaded into it when ``HF_HUB_OFFLINE`` is unset."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    from timm.models import get_pretrained_cfg

    check_model_name(name)
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise FusionEngineError(f"timm has no pretrained weights for '{name}'; drop pretrained, or give "
                                f"pretrained_file")
    if not cfg.hf_hub_id:
        where = cfg.url or cfg.file
        raise FusionEngineError(f"timm's pretrained weights for '{name}' are not on the Hugging Face hub (they are at "
                                f"{where}); download them and give pretrained_file")
    repo, _, revision = cfg.hf_hub_id.partition("@")
    revision = revision or "main"
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for file in files:
        path = try_to_load_from_cache(repo, file, revision=revision)
        if isinstance(path, str):  # not None, nor the "known to be absent" marker
            return _found(repo, file, path)
    offline = constants.HF_HUB_OFFLINE
    reason = "HF_HUB_OFFLINE=1" if offline else ""
    if not offline:
        for file in files:
            try:
                return _found(repo, file, hf_hub_download(repo, file, revision=revision))
            except (EntryNotFoundError, LocalEntryNotFoundError) as exc:
                cause = exc.__cause__ or exc
                reason = f"the hub cannot be reached ({first_line(cause)})" if isinstance(
                    exc, LocalEntryNotFoundError) else f"the hub has no {file}"
            except (HfHubHTTPError, OSError, ValueError) as exc:
                reason = f"downloading failed ({first_line(exc)})"
                break
    raise FusionEngineError(
        f"pretrained weights for timm model '{name}' ({repo}@{revision}: {' or '.join(files)}) are not in the Hugging "
        f"Face cache {constants.HF_HUB_CACHE} and {reason}; download them once with `hf download {repo}` where there "
        f"is network (or point HF_HOME or HF_HUB_CACHE at a cache that has them)")


def _found(repo: str, file: str, path: str) -> HubWeights:
    snapshot = Path(path).parents[len(Path(file).parts) - 1]  # .../snapshots/<commit>/<file>
    return HubWeights(repo, snapshot.name, file, path, _file_sha256(path))


def _file_sha256(path: str) -> str:
    stat = os.stat(path)
    return _hashed(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _hashed(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, once per (file, size, date) in a process: weights are hashed when checked
    and again when a key is made."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise unless the file's SHA-256 is ``expected``: weights are code-adjacent, so pin them."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected.lower():
        raise FusionEngineError(f"checksum mismatch for {path}: expected sha256 {expected.lower()}, got {actual}")


def check_model_name(name: str) -> None:
    import timm
    from timm.models import split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see timm.list_models()"
        raise FusionEngineError(f"unknown timm model '{arch}'{hint}")
    if tag:
        tags = timm.list_pretrained(f"{arch}.*")
        if name not in tags:
            known = ", ".join(t.split(".", 1)[1] for t in tags) or "none"
            raise FusionEngineError(f"timm model '{arch}' has no pretrained tag '{tag}'; its tags: {known}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]

