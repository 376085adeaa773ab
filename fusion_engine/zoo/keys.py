"""Zoo keys: the sha256 of everything that decides a member's weights and outputs.

A key is computed from :func:`key_material`, a plain JSON mapping, so that two runs agree on
a member exactly when they would train (or load) the same one. The material is stored in the
member's card, so a key can always be checked against what it claims to be.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ..records import SPLITS
from .errors import ZooError

#: part of every key: bump it when what a stored member means changes (2: the code that made it is in the key)
ZOO_FORMAT = 2

KEY_RE = re.compile(r"^[0-9a-f]{64}$")
PREFIX_RE = re.compile(r"^[0-9a-f]{8,64}$")
MIN_PREFIX = 8
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}$")


def canonical_json(value: Any) -> bytes:
    """The one JSON text of ``value``: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def split_digest(ids: dict[str, list[str]]) -> str:
    """The sha256 of the sample ids of train, val and test, in order."""
    return sha256_json({s: [str(i) for i in ids[s]] for s in SPLITS})


def key_material(*, backbone: str | None, params: dict, train: dict | None, seed: int | None, image_size: int | None,
                 mean: list | None, std: list | None, fingerprint: str, split: str, code: dict,
                 weights: dict | None = None, source: dict | None = None) -> dict:
    """What a member's key hashes: everything that decides its weights and its outputs.

    ``params`` with every file a parameter names given by its content's sha256 (not its path);
    ``code`` identifies the code that trains it (:func:`fusion_engine.provenance.member_code`);
    ``weights`` the pretrained weights it starts from when they come from elsewhere than a
    file its params name (a hub's cache: repository, commit, file and sha256; left out when
    ``None``, so members without such weights keep their keys);
    ``source``, for a member not trained here, the file it comes from (``{"weights": ...}`` or
    ``{"predictions": ...}``: its sha256 and the class order it is read in); ``train`` and
    ``seed`` are None then.
    Not in it: the member's name, the device (CPU and CUDA runs of one member are the same
    member), ``calibrate`` (applied to the stored logits at load time), the fusers, and where
    the images were held (memory, disk or streamed: the same pixels either way).
    """
    material = {
        "format": ZOO_FORMAT,
        "backbone": backbone,
        "params": params,
        "train": train,
        "seed": None if seed is None else int(seed),
        "data": {"image_size": image_size, "mean": None if mean is None else list(mean),
                 "std": None if std is None else list(std), "fingerprint": fingerprint, "split": split},
        "code": code,
    }
    if weights is not None:
        material["weights"] = weights
    if source is not None:
        material["source"] = source
    return material


def member_key(material: dict) -> str:
    return sha256_json(material)


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ZooError(f"not a zoo key: {key!r} (expected 64 lowercase hex characters)")
    return key


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id) or ".." in run_id:
        raise ZooError(f"not a run id: {run_id!r}")
    return run_id
