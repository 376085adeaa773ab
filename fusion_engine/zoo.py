"""The model zoo: every trained member stored once, under a key that says exactly what it is.

A registry folder holds::

    index.sqlite          the index (SQLite, WAL): members, runs, which run used which member
    zoo/<key>/            one member: model.safetensors, outputs.safetensors, ids.json, card.json
    checkpoints/<key>/    the per-epoch training state of a member not finished yet
    runs/<run_id>/        one folder per run
    tmp/                  artifacts being written, moved into zoo/ whole
    locks/                one lock file per member key (and per running run)

A member's key is the sha256 of the canonical JSON of everything that decides its weights and
outputs (:func:`key_material`). The guarantees, and how they are kept:

- *Whole or absent.* An artifact is written into ``tmp/``, fsynced, and renamed into ``zoo/``
  in one step; the index row is inserted after the rename. A process killed at any moment leaves
  a temporary folder (``gc`` removes it) or an unindexed but complete folder (adopted after its
  checksums are verified), never a half-written member the index points at.
- *Checked before use.* The index and the card record every file's size and sha256; a member
  is verified before its outputs are used. A truncated or altered file is reported
  (:class:`CorruptArtifact`), a pickle or any file the zoo did not write is refused
  (:class:`PlantedFile`). Nothing here unpickles: arrays are safetensors, the rest JSON.
- *Trained once.* ``lock(key)`` is an exclusive ``fcntl.flock`` on ``locks/<key>.lock``, held
  while a member is looked up, trained and published; a second run needing it waits, then
  finds it. The kernel drops the lock when a process dies, however it dies.
- *Short transactions.* Every write is one ``BEGIN IMMEDIATE`` transaction; readers never block
  (WAL) and writers wait up to ``BUSY_TIMEOUT_S`` for each other.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import FusionEngineError

log = logging.getLogger("fusion_engine")

#: part of every key: bump it when what a stored member means changes
ZOO_FORMAT = 1
#: the index schema, kept in ``PRAGMA user_version``
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0
CHECKPOINT_FORMAT = 1

INDEX_FILE = "index.sqlite"
PAYLOAD_FILES = ("model.safetensors", "outputs.safetensors", "ids.json")
CARD_FILE = "card.json"
ARTIFACT_FILES = (*PAYLOAD_FILES, CARD_FILE)
SPLITS = ("val", "test")

KEY_RE = re.compile(r"^[0-9a-f]{64}$")
PREFIX_RE = re.compile(r"^[0-9a-f]{8,64}$")
MIN_PREFIX = 8
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}$")

_PICKLE_MAGIC = tuple(bytes([0x80, p]) for p in range(2, 6))
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a zip of pickles


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
        self.key, self.path = key, path
        super().__init__(
            f"zoo member {short(key)}: {path} {what}; fusion-engine never writes or loads such files "
            f"(nothing in a registry is unpickled), so it refuses this member. Inspect the file, then remove "
            f"the member with: fusion-engine zoo rm {key[:16]}")


class Busy(ZooError):
    """A lock another process holds, asked for without waiting."""


# -- keys ------------------------------------------------------------------------------------------

def canonical_json(value: Any) -> bytes:
    """The one JSON text of ``value``: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def split_digest(ids: dict[str, list[str]]) -> str:
    """The sha256 of the sample ids of train, val and test, in order."""
    return sha256_json({s: [str(i) for i in ids[s]] for s in ("train", "val", "test")})


def key_material(*, backbone: str, params: dict, train: dict, seed: int, image_size: int | None,
                 mean: list | None, std: list | None, fingerprint: str, split: str) -> dict:
    """What a member's key hashes: everything that decides its weights and its outputs.

    Not in it: the member's name, the device (CPU and CUDA runs of one member are the same
    member), ``calibrate`` (applied to the stored logits at load time) and the fusers.
    """
    return {
        "format": ZOO_FORMAT,
        "backbone": backbone,
        "params": params,
        "train": train,
        "seed": int(seed),
        "data": {"image_size": image_size, "mean": None if mean is None else list(mean),
                 "std": None if std is None else list(std), "fingerprint": fingerprint, "split": split},
    }


def member_key(material: dict) -> str:
    return sha256_json(material)


def short(key: str) -> str:
    return f"{key[:12]}…"


def check_key(key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ZooError(f"not a zoo key: {key!r} (expected 64 lowercase hex characters)")
    return key


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id) or ".." in run_id:
        raise ZooError(f"not a run id: {run_id!r}")
    return run_id


# -- records ---------------------------------------------------------------------------------------

@dataclass
class ZooEntry:
    """One indexed member."""

    key: str
    name: str
    experiment: str
    run_id: str | None
    backbone: str
    dataset: str
    fingerprint: str
    split: str
    val_accuracy: float | None
    n_params: int | None
    bytes: int
    files: dict[str, dict]
    created: str

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("files")
        return out


@dataclass
class MemberOutputs:
    """A stored member's raw (uncalibrated) logits, labels and sample ids on val and test."""

    logits: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    ids: dict[str, list[str]]


@dataclass
class GcReport:
    removed: list[dict] = field(default_factory=list)  # {"path", "what", "bytes"}
    kept_in_use: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)  # intact members the index lacked, indexed again
    index_rows_removed: int = 0
    runs_marked_interrupted: int = 0
    dry_run: bool = False

    @property
    def bytes_freed(self) -> int:
        return sum(r["bytes"] for r in self.removed)

    def as_dict(self) -> dict:
        return {"bytes_freed": self.bytes_freed, "dry_run": self.dry_run, "removed": self.removed,
                "kept_in_use": self.kept_in_use, "recovered": self.recovered,
                "index_rows_removed": self.index_rows_removed,
                "runs_marked_interrupted": self.runs_marked_interrupted}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS members (
    key          TEXT PRIMARY KEY CHECK (length(key) = 64),
    name         TEXT NOT NULL,
    experiment   TEXT NOT NULL,
    run_id       TEXT,
    backbone     TEXT NOT NULL,
    dataset      TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    split        TEXT NOT NULL,
    val_accuracy REAL,
    n_params     INTEGER,
    bytes        INTEGER NOT NULL,
    files        TEXT NOT NULL,
    created      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS members_by_name ON members(name);
CREATE TABLE IF NOT EXISTS runs (
    run_id     TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    status     TEXT NOT NULL,
    created    TEXT NOT NULL,
    finished   TEXT,
    seconds    REAL,
    spec_file  TEXT,
    n_members  INTEGER,
    n_trained  INTEGER,
    n_reused   INTEGER,
    n_fusers   INTEGER,
    error      TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_experiment ON runs(experiment, created);
CREATE TABLE IF NOT EXISTS run_members (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    name   TEXT NOT NULL,
    key    TEXT NOT NULL,
    action TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE INDEX IF NOT EXISTS run_members_by_key ON run_members(key);
"""

_MEMBER_COLUMNS = ("key", "name", "experiment", "run_id", "backbone", "dataset", "fingerprint", "split",
                   "val_accuracy", "n_params", "bytes", "files", "created")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# -- the registry ----------------------------------------------------------------------------------

class Registry:
    """A registry folder: the zoo of members, the runs, and the index over both.

    ``create=False`` opens an existing registry for reading and creates nothing; a registry that
    does not exist then reads as empty.
    """

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = Path(root)
        self.create = create
        self.index_path = self.root / INDEX_FILE
        self.zoo_dir = self.root / "zoo"
        self.runs_dir = self.root / "runs"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        self.checkpoints_dir = self.root / "checkpoints"
        self.image_cache_dir = self.root / "cache" / "images"  # made when first written
        self._con: sqlite3.Connection | None = None
        if create:
            try:
                for folder in (self.root, self.zoo_dir, self.runs_dir, self.tmp_dir, self.locks_dir, self.checkpoints_dir):
                    folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ZooError(f"cannot create the registry at {self.root}: {exc.strerror or exc}") from None

    # -- the index ---------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._con is not None:
            return self._con
        if not self.create and not self.index_path.is_file():
            return self._empty()
        try:
            con = sqlite3.connect(self.index_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version == 0 and not self.create:  # created, then killed before its schema: empty
                con.close()
                return self._empty()
            if version > SCHEMA_VERSION:
                con.close()
                raise ZooError(f"the registry index {self.index_path} has schema version {version}, newer than this "
                               f"fusion-engine reads ({SCHEMA_VERSION}); upgrade fusion-engine")
            if version < SCHEMA_VERSION:
                with self._file_lock(self.locks_dir / "index.lock"):
                    con.execute("PRAGMA journal_mode = WAL")
                    con.execute("BEGIN IMMEDIATE")
                    try:
                        if con.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                            for statement in filter(str.strip, _SCHEMA.split(";")):
                                con.execute(statement)
                            con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                        con.execute("COMMIT")
                    except BaseException:
                        con.execute("ROLLBACK")
                        raise
            con.execute("PRAGMA synchronous = FULL")
            con.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            raise ZooError(f"cannot open the registry index {self.index_path}: {exc}") from None
        self._con = con
        return con

    def _empty(self) -> sqlite3.Connection:
        """An index with nothing in it, for reading a registry that has none."""
        self._con = sqlite3.connect(":memory:", isolation_level=None)
        self._con.executescript(_SCHEMA)
        return self._con

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction; taken immediately so writers queue on the busy timeout."""
        con = self._db()
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise ZooError(f"the registry index {self.index_path} is unavailable: {exc}") from None
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        else:
            con.execute("COMMIT")

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        con = self._db()
        con.row_factory = sqlite3.Row
        try:
            return con.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise ZooError(f"cannot read the registry index {self.index_path}: {exc}") from None
        finally:
            con.row_factory = None

    def integrity_check(self) -> str:
        return self._db().execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- paths -------------------------------------------------------------------------------------
    def member_dir(self, key: str) -> Path:
        """``zoo/<key>``, for a valid key only, and never through a link out of ``zoo/``."""
        return self._inside(self.zoo_dir, check_key(key))

    def checkpoint_dir(self, key: str) -> Path:
        return self._inside(self.checkpoints_dir, check_key(key))

    def run_dir(self, run_id: str) -> Path:
        return self._inside(self.runs_dir, check_run_id(run_id))

    @staticmethod
    def _inside(parent: Path, name: str) -> Path:
        path = parent / name
        if path.is_symlink() or (path.exists() and path.resolve().parent != parent.resolve()):
            raise ZooError(f"{path} leads outside {parent}; refusing to use it")
        return path

    # -- locks -------------------------------------------------------------------------------------
    @contextmanager
    def lock(self, key: str, *, wait: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the member lock of ``key``: whoever holds it may train, publish or remove it."""
        with self._file_lock(self.locks_dir / f"{check_key(key)}.lock", wait=wait, on_wait=on_wait):
            yield

    @contextmanager
    def _file_lock(self, path: Path, *, wait: bool = True, on_wait: Callable[[], None] | None = None,
                   shared: bool = False) -> Iterator[None]:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise Busy(f"{path.name} is held by another process") from None
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _held(self, path: Path) -> bool:
        """Whether another process holds ``path`` locked right now (without creating it)."""
        import fcntl

        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    # -- members: reading --------------------------------------------------------------------------
    def _entry(self, row) -> ZooEntry:
        data = dict(zip(_MEMBER_COLUMNS, row))
        data["files"] = json.loads(data["files"])
        return ZooEntry(**data)

    def get(self, key: str) -> ZooEntry | None:
        rows = self._query(f"SELECT {', '.join(_MEMBER_COLUMNS)} FROM members WHERE key = ?", (check_key(key),))
        return self._entry(tuple(rows[0])) if rows else None

    def entries(self) -> list[ZooEntry]:
        rows = self._query(f"SELECT {', '.join(_MEMBER_COLUMNS)} FROM members ORDER BY created, key")
        return [self._entry(tuple(r)) for r in rows]

    def usage(self) -> dict[str, int]:
        """How many recorded runs used each key."""
        return {r["key"]: r["n"] for r in self._query("SELECT key, count(DISTINCT run_id) AS n FROM run_members GROUP BY key")}

    def runs_using(self, key: str) -> list[str]:
        """The recorded runs that used a member, oldest first."""
        return [r["run_id"] for r in self._query(
            "SELECT m.run_id FROM run_members m JOIN runs r USING (run_id) WHERE m.key = ? ORDER BY r.created, r.rowid",
            (key,))]

    def find(self, ref: str, *, names: bool = True) -> list[ZooEntry]:
        """Every member ``ref`` may mean: a key, a key prefix (8+ hex characters) or a member name."""
        ref = ref.strip()
        found: dict[str, ZooEntry] = {}
        if PREFIX_RE.match(ref):
            rows = self._query(f"SELECT {', '.join(_MEMBER_COLUMNS)} FROM members WHERE substr(key, 1, ?) = ?",
                               (len(ref), ref))
            found.update((r["key"], self._entry(tuple(r))) for r in rows)
        if names:
            rows = self._query(f"SELECT {', '.join(_MEMBER_COLUMNS)} FROM members WHERE name = ? ORDER BY created",
                               (ref,))
            found.update((r["key"], self._entry(tuple(r))) for r in rows)
        return list(found.values())

    def resolve(self, ref: str, *, names: bool = True) -> ZooEntry:
        """The one member ``ref`` names; an error listing the candidates when it is not one."""
        if not names and not PREFIX_RE.match(ref.strip()):
            raise ZooError(f"{ref!r} is not a zoo key or key prefix (at least {MIN_PREFIX} hex characters)")
        found = self.find(ref, names=names)
        if not found:
            what = "key, key prefix or member name" if names else "key or key prefix"
            raise ZooError(f"no zoo member matches {ref!r} (a {what}) in {self.root}; `fusion-engine zoo list` shows them")
        if len(found) > 1:
            raise ZooError(f"{ref!r} is ambiguous in {self.root}; candidates: {describe_candidates(found)}")
        return found[0]

    def verify(self, entry: ZooEntry) -> dict:
        """Check every file of a member against the index; return its card.

        Raises :class:`PlantedFile` for a file the zoo never writes (or a pickle where a
        safetensors file should be) and :class:`CorruptArtifact` for a missing, truncated or
        altered one.
        """
        folder = self.member_dir(entry.key)
        if not folder.is_dir():
            raise CorruptArtifact(entry.key, str(folder), "the folder is missing")
        for name in sorted(os.listdir(folder)):
            if name not in entry.files:
                raise PlantedFile(entry.key, folder / name, "is not one of the files this member was stored with")
        for name, record in entry.files.items():
            _check_file(entry.key, folder / name, record)
        card = _read_json(folder / CARD_FILE, entry.key)
        material = card.get("key_material")
        if card.get("key") != entry.key or not isinstance(material, dict) or member_key(material) != entry.key:
            raise CorruptArtifact(entry.key, CARD_FILE, "it does not describe this key")
        return card

    def load_outputs(self, entry: ZooEntry) -> MemberOutputs:
        """A verified member's logits, labels and ids, read once and checked as read."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        folder = self.member_dir(entry.key)
        data = _read_checked(entry.key, folder / "outputs.safetensors", entry.files["outputs.safetensors"])
        try:
            arrays = load(data)
        except SafetensorError as exc:
            raise CorruptArtifact(entry.key, "outputs.safetensors", f"not a safetensors file ({exc})") from None
        ids = json.loads(_read_checked(entry.key, folder / "ids.json", entry.files["ids.json"]))
        try:
            logits = {s: arrays[f"{s}_logits"].astype(np.float32, copy=False) for s in SPLITS}
            labels = {s: arrays[f"{s}_labels"].astype(np.int64, copy=False) for s in SPLITS}
            ids = {s: [str(i) for i in ids[s]] for s in SPLITS}
        except (KeyError, TypeError) as exc:
            raise CorruptArtifact(entry.key, "outputs.safetensors", f"missing {exc}") from None
        for s in SPLITS:
            if logits[s].ndim != 2 or len(logits[s]) != len(labels[s]) or len(ids[s]) != len(labels[s]):
                raise CorruptArtifact(entry.key, "outputs.safetensors", f"{s} logits, labels and ids disagree in shape")
        return MemberOutputs(logits, labels, ids)

    def open_member(self, key: str) -> tuple[ZooEntry, dict, MemberOutputs] | None:
        """A stored member, verified, with its outputs; ``None`` when the zoo lacks it.

        Hold :meth:`lock` around this: it adopts a complete member whose index row a crash
        prevented (the window between the rename into ``zoo/`` and the insert).
        """
        entry = self.get(key)
        if entry is None:
            entry = self._adopt(key)
            if entry is None:
                return None
        card = self.verify(entry)
        return entry, card, self.load_outputs(entry)

    # -- members: writing (hold the member's lock) -------------------------------------------------
    def publish(self, key: str, card: dict, write: Callable[[Path], None], *, entry: dict) -> ZooEntry:
        """Store a member: ``write(folder)`` writes the payload files, the card and checksums are
        added, and the folder is moved into ``zoo/<key>`` whole, then indexed.

        ``entry`` gives the index fields (name, experiment, run_id, backbone, dataset,
        fingerprint, split, val_accuracy, n_params).
        """
        dest = self.member_dir(key)
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", suffix=".new", dir=self.tmp_dir))
        try:
            write(tmp)
            written = sorted(os.listdir(tmp))
            if written != sorted(PAYLOAD_FILES):
                raise RuntimeError(f"a zoo artifact holds exactly {', '.join(PAYLOAD_FILES)}; got {', '.join(written)}")
            files = {name: _seal(tmp / name) for name in PAYLOAD_FILES}
            created = _now()
            card = {**card, "key": key, "created": created, "index": entry, "files": files}
            _write_bytes(tmp / CARD_FILE, json.dumps(card, indent=2, allow_nan=False).encode() + b"\n")
            files = {**files, CARD_FILE: _seal(tmp / CARD_FILE)}
            _fsync_dir(tmp)
            if dest.exists():
                self._discard_folder(dest, key)  # a leftover nobody indexes: we hold the lock
            os.rename(tmp, dest)
            _fsync_dir(self.zoo_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        row = ZooEntry(key=key, bytes=sum(f["bytes"] for f in files.values()), files=files, created=created, **entry)
        self._insert(row)
        return row

    def _insert(self, row: ZooEntry) -> None:
        values = asdict(row)
        values["files"] = json.dumps(values["files"], sort_keys=True)
        with self._tx() as con:
            con.execute(f"INSERT OR REPLACE INTO members ({', '.join(_MEMBER_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(_MEMBER_COLUMNS))})", tuple(values[c] for c in _MEMBER_COLUMNS))

    def _orphan_entry(self, key: str) -> ZooEntry:
        """The index row of a ``zoo/<key>`` folder the index lacks, from its card, once every file
        checks out against the card; :class:`ZooError` (or worse) when one does not."""
        folder = self.member_dir(key)
        card = _read_json(folder / CARD_FILE, key)
        try:
            files = {name: {"sha256": str(card["files"][name]["sha256"]), "bytes": int(card["files"][name]["bytes"])}
                     for name in PAYLOAD_FILES}
            index = card["index"]
            fields = {k: index[k] for k in ("name", "experiment", "run_id", "backbone", "dataset", "fingerprint",
                                            "split", "val_accuracy", "n_params")}
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptArtifact(key, CARD_FILE, f"incomplete ({exc})") from None
        files[CARD_FILE] = _file_record(folder / CARD_FILE)
        row = ZooEntry(key=key, bytes=sum(f["bytes"] for f in files.values()), files=files,
                       created=str(card.get("created") or _now()), **fields)
        self.verify(row)
        return row

    def _adopt(self, key: str) -> ZooEntry | None:
        """Index a complete ``zoo/<key>`` folder that has no row (a run was killed between moving
        it into place and indexing it); remove it if it does not check out. Hold the lock."""
        folder = self.member_dir(key)
        if not folder.is_dir():
            return None
        try:
            row = self._orphan_entry(key)
        except PlantedFile:
            raise
        except (ZooError, OSError) as exc:
            log.warning("removing an unindexed zoo folder that fails its checks, %s (%s)", folder, exc)
            self._discard_folder(folder, key)
            return None
        self._insert(row)
        log.warning("recovered zoo member %s, stored by a run that stopped before indexing it", short(key))
        return row

    def discard(self, key: str) -> None:
        """Drop a damaged member (hold its lock): its folder first, then its row."""
        folder = self.member_dir(key)
        if folder.exists():
            self._discard_folder(folder, key)
        with self._tx() as con:
            con.execute("DELETE FROM members WHERE key = ?", (key,))

    def _discard_folder(self, folder: Path, key: str) -> int:
        """Move ``folder`` out of the way in one rename, then delete it; return its size."""
        size = tree_bytes(folder)
        trash = Path(tempfile.mkdtemp(prefix=f"{key}.", suffix=".trash", dir=self.tmp_dir))
        os.rename(folder, trash / "x")
        shutil.rmtree(trash, ignore_errors=True)
        return size

    def remove(self, key: str) -> int:
        """``zoo rm``: delete a member and its checkpoint; the bytes freed. Refused while in use."""
        check_key(key)
        try:
            with self.lock(key, wait=False):
                folder = self.member_dir(key)
                if self.get(key) is None and not folder.exists():
                    raise ZooError(f"no zoo member {short(key)} in {self.root}")
                freed = self._discard_folder(folder, key) if folder.exists() else 0
                with self._tx() as con:
                    con.execute("DELETE FROM members WHERE key = ?", (key,))
                ckpt = self.checkpoint_dir(key)
                if ckpt.exists():
                    freed += self._discard_folder(ckpt, key)
                return freed
        except Busy:
            raise ZooError(f"zoo member {short(key)} is in use by a running run; try again when it has finished") from None

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint(self, key: str) -> "Checkpoint":
        return Checkpoint(self.checkpoint_dir(key), key)

    # -- runs --------------------------------------------------------------------------------------
    @contextmanager
    def run_lock(self, run_id: str) -> Iterator[None]:
        """Held for as long as a run is alive, so a run that died reads as interrupted."""
        path = self.locks_dir / "runs" / f"{check_run_id(run_id)}.lock"
        try:
            with self._file_lock(path):
                yield
        finally:
            path.unlink(missing_ok=True)

    def run_started(self, run_id: str, *, experiment: str, spec_file: str, n_members: int, n_fusers: int) -> None:
        with self._tx() as con:
            con.execute("INSERT INTO runs (run_id, experiment, status, created, spec_file, n_members, n_fusers, "
                        "n_trained, n_reused) VALUES (?, ?, 'running', ?, ?, ?, ?, 0, 0)",
                        (check_run_id(run_id), experiment, _now(), spec_file, n_members, n_fusers))

    def run_member(self, run_id: str, name: str, key: str, action: str) -> None:
        column = "n_trained" if action == "trained" else "n_reused"
        with self._tx() as con:
            con.execute("INSERT OR REPLACE INTO run_members (run_id, name, key, action) VALUES (?, ?, ?, ?)",
                        (run_id, name, key, action))
            con.execute(f"UPDATE runs SET {column} = {column} + 1 WHERE run_id = ?", (run_id,))

    def run_finished(self, run_id: str, *, status: str, seconds: float, error: str | None = None) -> None:
        with self._tx() as con:
            con.execute("UPDATE runs SET status = ?, finished = ?, seconds = ?, error = ? WHERE run_id = ?",
                        (status, _now(), seconds, error, run_id))

    def runs(self, *, experiment: str | None = None) -> list[dict]:
        """Recorded runs, oldest first; a run whose process died reads ``interrupted``."""
        sql = "SELECT * FROM runs" + (" WHERE experiment = ?" if experiment else "") + " ORDER BY created, rowid"
        out = []
        for row in self._query(sql, (experiment,) if experiment else ()):
            rec = dict(row)
            if rec["status"] == "running" and not self._held(self.locks_dir / "runs" / f"{rec['run_id']}.lock"):
                again = self._query("SELECT status FROM runs WHERE run_id = ?", (rec["run_id"],))
                rec["status"] = again[0]["status"] if again and again[0]["status"] != "running" else "interrupted"
            out.append(rec)
        return out

    def find_run(self, ref: str) -> dict:
        """The run a run id or a unique prefix of one names."""
        ref = ref.strip()
        runs = [r for r in self.runs() if r["run_id"].startswith(ref)]
        exact = [r for r in runs if r["run_id"] == ref]
        if exact:
            return exact[0]
        if not runs:
            raise ZooError(f"no run {ref!r} in {self.root}; `fusion-engine runs list` shows them")
        if len(runs) > 1:
            raise ZooError(f"run id {ref!r} is ambiguous; candidates: {', '.join(r['run_id'] for r in runs[:10])}"
                           + (f" and {len(runs) - 10} more" if len(runs) > 10 else ""))
        return runs[0]

    def latest_run(self, experiment: str | None = None) -> dict:
        """The most recent complete run (of ``experiment``)."""
        done = [r for r in self.runs(experiment=experiment) if r["status"] == "complete"]
        if not done:
            where = f" of experiment {experiment!r}" if experiment else ""
            raise ZooError(f"no complete run{where} in {self.root}")
        return done[-1]

    # -- gc ----------------------------------------------------------------------------------------
    def gc(self, *, dry_run: bool = False, checkpoints: bool = False, cache: bool = False) -> GcReport:
        """Remove what no run will read: temporary folders, zoo folders the index does not list
        that fail their checks (an intact one is indexed again instead: it is a finished member
        whose row a crash or a lost index took), index rows whose folder is gone, checkpoints of
        members already stored (and, with ``checkpoints``, of interrupted training), lock
        files of finished runs, and, with ``cache``, the decoded-image cache (made again when
        a run next trains a member).

        Anything a live process holds the lock of is left alone.
        """
        report = GcReport(dry_run=dry_run)
        indexed = {e.key for e in self.entries()}

        def drop(path: Path, what: str, key: str | None) -> None:
            try:
                with (self.lock(key, wait=False) if key else _nothing()):
                    size = tree_bytes(path)
                    if not dry_run:
                        if path.is_dir() and not path.is_symlink():
                            shutil.rmtree(path)
                        else:
                            path.unlink()
                    report.removed.append({"path": str(path.relative_to(self.root)), "what": what, "bytes": size})
            except Busy:
                report.kept_in_use.append(str(path.relative_to(self.root)))

        for path in sorted(_children(self.tmp_dir)):
            key = path.name.split(".", 1)[0]
            drop(path, "temporary", key if KEY_RE.match(key) else None)
        for path in sorted(_children(self.zoo_dir)):
            if not KEY_RE.match(path.name) or path.is_symlink():
                drop(path, "not a zoo member", None)
            elif path.name not in indexed:
                try:
                    with self.lock(path.name, wait=False):
                        row = self._orphan_entry(path.name)
                        if not dry_run:
                            self._insert(row)
                        report.recovered.append(path.name)
                        continue
                except Busy:
                    report.kept_in_use.append(str(path.relative_to(self.root)))
                    continue
                except (ZooError, OSError):
                    pass
                drop(path, "unindexed member that fails its checks", path.name)
        for path in sorted(_children(self.checkpoints_dir)):
            if not KEY_RE.match(path.name) or path.is_symlink():
                drop(path, "not a checkpoint", None)
            elif path.name in indexed:
                drop(path, "checkpoint of a stored member", path.name)
            elif checkpoints:
                drop(path, "checkpoint of interrupted training", path.name)
        for entry in self.entries():
            if not (self.zoo_dir / entry.key).exists():
                with _ignore(Busy), self.lock(entry.key, wait=False):
                    if not dry_run:
                        with self._tx() as con:
                            con.execute("DELETE FROM members WHERE key = ?", (entry.key,))
                    report.index_rows_removed += 1
        for run in self.runs():
            if run["status"] == "interrupted":
                if not dry_run:
                    with self._tx() as con:
                        con.execute("UPDATE runs SET status = 'interrupted' WHERE run_id = ? AND status = 'running'",
                                    (run["run_id"],))
                report.runs_marked_interrupted += 1
        for path in sorted(_children(self.locks_dir / "runs")):
            if not self._held(path):
                drop(path, "lock of a finished run", None)
        if cache:
            for path in sorted(_children(self.image_cache_dir)):
                drop(path, "decoded-image cache", None)
        return report


def describe_candidates(entries: list[ZooEntry]) -> str:
    return "; ".join(f"{e.key[:16]} ({e.name}, {e.backbone}, experiment {e.experiment}, {e.created[:19]})"
                     for e in entries)


# -- checkpoints -----------------------------------------------------------------------------------

class Checkpoint:
    """The training state of one member after its last finished epoch, for resuming it.

    ``checkpoints/<key>/state.json`` (JSON: epoch, history, RNG states as lists, ...) names the
    tensors file ``epoch-NNNNN.safetensors`` (model, best weights and optimizer state) and its
    sha256. The tensors are written and renamed first, then ``state.json`` is replaced: it is
    the commit point, so a kill leaves the previous epoch's checkpoint whole.
    """

    def __init__(self, folder: Path, key: str):
        self.folder = Path(folder)
        self.key = key

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def peek(self) -> dict | None:
        """``state.json`` (the last finished epoch and history), without the tensors."""
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and state.get("key") == self.key else None

    def load(self) -> tuple[dict, dict] | None:
        """``(tensors, state)`` of the last finished epoch, or ``None`` (none, or damaged: warned)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        if not self.state_path.exists():
            return None
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            if state.get("format") != CHECKPOINT_FORMAT or state.get("key") != self.key:
                raise ValueError("written by another version or for another member")
            name = state["tensors"]
            if not re.fullmatch(r"epoch-\d{5}\.safetensors", name):
                raise ValueError(f"names an unexpected file {name!r}")
            data = (self.folder / name).read_bytes()
            if len(data) != state["bytes"] or hashlib.sha256(data).hexdigest() != state["sha256"]:
                raise ValueError(f"{name} does not match its checksum")
            tensors = load(data)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            log.warning("ignoring the damaged checkpoint in %s (%s); training from the start", self.folder, exc)
            self.clear()
            return None
        return tensors, state

    def save(self, tensors: dict, state: dict) -> None:
        """Write one epoch's state; the previous epoch's files go once this one is whole."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        epoch = int(state["epoch"])
        name = f"epoch-{epoch:05d}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file(tensors, str(tmp))
        record = _seal(tmp)
        os.replace(tmp, self.folder / name)
        _write_bytes(self.state_path, json.dumps({"format": CHECKPOINT_FORMAT, "key": self.key, "tensors": name,
                                                  **record, **state}, allow_nan=False).encode())
        _fsync_dir(self.folder)
        for old in self.folder.iterdir():
            if old.name not in (name, "state.json"):
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# -- files -----------------------------------------------------------------------------------------

def tree_bytes(path: Path) -> int:
    """The bytes of the regular files under ``path`` (not following links)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def _file_record(path: Path) -> dict:
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        size = os.fstat(handle.fileno()).st_size
    return {"sha256": digest, "bytes": size}


def _seal(path: Path) -> dict:
    """fsync a file just written and return its checksum record."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return _file_record(path)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write whole or not at all: a synced temporary file renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot sync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _lstat_regular(key: str, path: Path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CorruptArtifact(key, path.name, "missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise PlantedFile(key, path, "is not a regular file (a link or a device)")
    return st


def _verdict(key: str, path: Path, record: dict, size: int, head: bytes) -> None:
    """Why a file fails its checksum: a pickle or an archive is refused, anything else is damage."""
    if head.startswith(_PICKLE_MAGIC):
        raise PlantedFile(key, path, "holds a pickle")
    if head.startswith(_ZIP_MAGIC):
        raise PlantedFile(key, path, "holds a zip archive (torch.save's pickle format)")
    if size != record["bytes"]:
        raise CorruptArtifact(key, path.name, f"{size} bytes where {record['bytes']} were written (truncated or overwritten)")
    raise CorruptArtifact(key, path.name, "its sha256 differs from the one recorded when it was written")


def _check_file(key: str, path: Path, record: dict) -> None:
    st = _lstat_regular(key, path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        handle.seek(0)
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if st.st_size != record["bytes"] or digest != record["sha256"]:
        _verdict(key, path, record, st.st_size, head)


def _read_checked(key: str, path: Path, record: dict) -> bytes:
    """A file's bytes, read once and checked against its record (no window to swap it)."""
    _lstat_regular(key, path)
    data = path.read_bytes()
    if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
        _verdict(key, path, record, len(data), data[:8])
    return data


def _read_json(path: Path, key: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorruptArtifact(key, path.name, "missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptArtifact(key, path.name, f"not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CorruptArtifact(key, path.name, "not a JSON object")
    return value


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _ignore(*kinds: type[BaseException]) -> Iterator[None]:
    try:
        yield
    except kinds:
        pass
