"""The model zoo: every member stored once, under a key that says exactly what it is.

- :mod:`~fusion_engine.zoo.keys`: what a key hashes (:func:`key_material`), and key checks;
- :mod:`~fusion_engine.zoo.card`: :class:`MemberCard`, the typed description of a member;
- :mod:`~fusion_engine.zoo.artifacts`: a member's files, sealed when written, checked when read;
- :mod:`~fusion_engine.zoo.index`: the SQLite index of members and runs;
- :mod:`~fusion_engine.zoo.store`: :class:`Registry`, the folder, its locks, storing and reading;
- :mod:`~fusion_engine.zoo.gc`: cleaning a registry up.
"""

from __future__ import annotations

from .card import CARD_VERSION, MemberCard
from .errors import Busy, CorruptArtifact, PlantedFile, UnreadableCard, ZooError, short
from .gc import GcReport
from .index import ZooEntry
from .keys import ZOO_FORMAT, check_key, check_run_id, key_material, member_key, split_digest
from .artifacts import tree_bytes
from .store import REGISTRY_ENV, MemberOutputs, Registry, StoredMember, describe_candidates, resolve_registry

__all__ = ["CARD_VERSION", "Busy", "CorruptArtifact", "GcReport", "MemberCard", "MemberOutputs", "PlantedFile",
           "Registry", "StoredMember", "UnreadableCard", "ZOO_FORMAT", "ZooEntry", "ZooError", "check_key", "check_run_id",
           "describe_candidates", "key_material", "member_key", "resolve_registry", "short", "split_digest", "tree_bytes",
           "REGISTRY_ENV"]
