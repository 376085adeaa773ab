"""``zoo gc``: remove what no run will read, and report the bytes freed.

Temporary folders, zoo folders the index does not list that fail their checks (an intact one is
indexed again instead: a finished member whose row a crash or a lost index took), index rows
whose folder is gone, checkpoints of members already stored (and, when asked, of interrupted
training), lock files of finished runs and, when asked, the decoded-image cache. Anything a live
process holds the lock of is left alone.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .artifacts import children, tree_bytes
from .errors import Busy, UnreadableCard, ZooError
from .keys import KEY_RE
from .locks import is_held

if TYPE_CHECKING:  # pragma: no cover
    from .store import Registry


@dataclass
class GcReport:
    removed: list[dict] = field(default_factory=list)  # {"path", "what", "bytes"}
    kept_in_use: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # intact members the index lacked, indexed again
    unreadable: list[str] = field(default_factory=list)  # unindexed members whose card this version cannot read
    index_rows_removed: int = 0
    runs_marked_interrupted: int = 0
    dry_run: bool = False

    @property
    def bytes_freed(self) -> int:
        return sum(r["bytes"] for r in self.removed)

    def as_dict(self) -> dict:
        return {"bytes_freed": self.bytes_freed, "dry_run": self.dry_run, "removed": self.removed,
                "kept_in_use": self.kept_in_use, "recovered": self.recovered, "unreadable": self.unreadable,
                "index_rows_removed": self.index_rows_removed,
                "runs_marked_interrupted": self.runs_marked_interrupted}


def collect(reg: "Registry", *, dry_run: bool = False, checkpoints: bool = False, cache: bool = False) -> GcReport:
    """Clean ``reg`` (see the module docstring); ``dry_run`` only reports."""
    report = GcReport(dry_run=dry_run)
    indexed = {e.key for e in reg.entries()}

    def drop(path: Path, what: str, key: str | None) -> None:
        try:
            with (reg.lock(key, wait=False) if key else nullcontext()):
                size = tree_bytes(path)
                if not dry_run:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                report.removed.append({"path": str(path.relative_to(reg.root)), "what": what, "bytes": size})
        except Busy:
            report.kept_in_use.append(str(path.relative_to(reg.root)))

    for path in sorted(children(reg.tmp_dir)):
        key = path.name.split(".", 1)[0]
        drop(path, "temporary", key if KEY_RE.match(key) else None)
    for path in sorted(children(reg.zoo_dir)):
        if not KEY_RE.match(path.name) or path.is_symlink():
            drop(path, "not a zoo member", None)
        elif path.name not in indexed:
            try:
                with reg.lock(path.name, wait=False):
                    row = reg.orphan_entry(path.name)
                    if not dry_run:
                        reg.index.insert(row)
                    report.recovered.append(path.name)
                    continue
            except Busy:
                report.kept_in_use.append(str(path.relative_to(reg.root)))
                continue
            except UnreadableCard:  # a newer version's member: not this version's to delete
                report.unreadable.append(str(path.relative_to(reg.root)))
                continue
            except (ZooError, OSError):
                pass
            drop(path, "unindexed member that fails its checks", path.name)
    for path in sorted(children(reg.checkpoints_dir)):
        if not KEY_RE.match(path.name) or path.is_symlink():
            drop(path, "not a checkpoint", None)
        elif path.name in indexed:
            drop(path, "checkpoint of a stored member", path.name)
        elif checkpoints:
            drop(path, "checkpoint of interrupted training", path.name)
    for entry in reg.entries():
        if not (reg.zoo_dir / entry.key).exists():
            with suppress(Busy), reg.lock(entry.key, wait=False):
                if not dry_run:
                    reg.index.delete(entry.key)
                report.index_rows_removed += 1
    for run in reg.runs():
        if run["status"] == "interrupted":
            if not dry_run:
                reg.index.mark_interrupted(run["run_id"])
            report.runs_marked_interrupted += 1
    for path in sorted(children(reg.locks_dir / "runs")):
        if not is_held(path):
            drop(path, "lock of a finished run", None)
    if cache:
        for path in sorted(children(reg.image_cache_dir)):
            drop(path, "decoded-image cache", None)
    return report
