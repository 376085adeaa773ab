"""What can go wrong with a registry, as errors a user can act on."""

from __future__ import annotations

from pathlib import Path

from ..errors import FusionEngineError


def short(key: str) -> str:
    """A key as messages show it: its first 12 characters."""
    return f"{key[:12]}…"


class ZooError(FusionEngineError):
    """A problem with the registry a user can act on."""


class CorruptArtifact(ZooError):
    """A stored member whose files are missing, truncated or changed since they were written."""

    def __init__(self, key: str, file: str, reason: str):
        self.key, self.file, self.reason = key, file, reason
        super().__init__(f"zoo member {short(key)} is damaged: {file}: {reason}")


class PlantedFile(ZooError):
    """A file in the registry that fusion-engine never writes: refused, never loaded."""

    def __init__(self, key: str, path: Path, what: str):
        self.key, self.path, self.reason = key, path, what
        super().__init__(
            f"zoo member {short(key)}: {path} {what}; fusion-engine never writes or loads such files "
            f"(nothing in a registry is unpickled), so it refuses this member. Inspect the file, then remove "
            f"the member with: fusion-engine zoo rm {key[:16]}")


class UnreadableCard(ZooError):
    """A member whose card checks out (its bytes are as written) but that this version cannot
    read: written by a newer fusion-engine, or by code that wrote other fields. Kept, never
    deleted: it is not damage."""

    def __init__(self, key: str, reason: str):
        self.key = key
        super().__init__(f"zoo member {short(key)}: card.json {reason}; the member is left as it is "
                         f"(inspect it with fusion-engine zoo show {key[:16]})")


class Busy(ZooError):
    """A lock another process holds, asked for without waiting."""
