"""The registry index: one SQLite database (WAL) of stored members, recorded runs, and which run
used which member.

Every write is one short ``BEGIN IMMEDIATE`` transaction; readers never block (WAL) and writers
wait up to ``BUSY_TIMEOUT_S`` for each other. The schema version lives in ``PRAGMA
user_version``; an index newer than this code is refused rather than misread.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from .errors import ZooError
from .keys import PREFIX_RE, check_key, check_run_id
from .locks import file_lock

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0

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


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@dataclass
class ZooEntry:
    """One indexed member: the index's row for it."""

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


_MEMBER_COLUMNS = tuple(ZooEntry.__dataclass_fields__)
_SELECT_MEMBERS = f"SELECT {', '.join(_MEMBER_COLUMNS)} FROM members"


class Index:
    """The SQLite index at ``path``. With ``create=False`` a missing or never-initialised index
    reads as empty and nothing is created."""

    def __init__(self, path: Path, *, lock_path: Path, create: bool = True):
        self.path = path
        self.lock_path = lock_path
        self.create = create
        self._con: sqlite3.Connection | None = None

    # -- the connection ----------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._con is not None:
            return self._con
        if not self.create and not self.path.is_file():
            return self._empty()
        try:
            con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            con.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version == 0 and not self.create:  # created, then killed before its schema: empty
                con.close()
                return self._empty()
            if version > SCHEMA_VERSION:
                con.close()
                raise ZooError(f"the registry index {self.path} has schema version {version}, newer than this "
                               f"fusion-engine reads ({SCHEMA_VERSION}); upgrade fusion-engine")
            if version < SCHEMA_VERSION:
                with file_lock(self.lock_path):
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
            raise ZooError(f"cannot open the registry index {self.path}: {exc}") from None
        self._con = con
        return con

    def _empty(self) -> sqlite3.Connection:
        """An index with nothing in it, for reading a registry that has none."""
        self._con = sqlite3.connect(":memory:", isolation_level=None)
        self._con.executescript(_SCHEMA)
        return self._con

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction; taken immediately so writers queue on the busy timeout."""
        con = self._db()
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise ZooError(f"the registry index {self.path} is unavailable: {exc}") from None
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        else:
            con.execute("COMMIT")

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        con = self._db()
        con.row_factory = sqlite3.Row
        try:
            return con.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise ZooError(f"cannot read the registry index {self.path}: {exc}") from None
        finally:
            con.row_factory = None

    def integrity_check(self) -> str:
        """SQLite's own check of the database file: ``"ok"`` when sound."""
        return self._db().execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    # -- members -------------------------------------------------------------------------------------
    @staticmethod
    def _entry(row) -> ZooEntry:
        data = dict(zip(_MEMBER_COLUMNS, tuple(row)))
        data["files"] = json.loads(data["files"])
        return ZooEntry(**data)

    def get(self, key: str) -> ZooEntry | None:
        rows = self.query(f"{_SELECT_MEMBERS} WHERE key = ?", (check_key(key),))
        return self._entry(rows[0]) if rows else None

    def entries(self) -> list[ZooEntry]:
        return [self._entry(r) for r in self.query(f"{_SELECT_MEMBERS} ORDER BY created, key")]

    def find(self, ref: str, *, names: bool = True) -> list[ZooEntry]:
        """Every member ``ref`` may mean: a key, a key prefix (8+ hex characters) or a member name."""
        ref = ref.strip()
        found: dict[str, ZooEntry] = {}
        if PREFIX_RE.match(ref):
            rows = self.query(f"{_SELECT_MEMBERS} WHERE substr(key, 1, ?) = ?", (len(ref), ref))
            found.update((r["key"], self._entry(r)) for r in rows)
        if names:
            rows = self.query(f"{_SELECT_MEMBERS} WHERE name = ? ORDER BY created", (ref,))
            found.update((r["key"], self._entry(r)) for r in rows)
        return list(found.values())

    def insert(self, row: ZooEntry) -> None:
        values = asdict(row)
        values["files"] = json.dumps(values["files"], sort_keys=True)
        with self.transaction() as con:
            con.execute(f"INSERT OR REPLACE INTO members ({', '.join(_MEMBER_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(_MEMBER_COLUMNS))})", tuple(values[c] for c in _MEMBER_COLUMNS))

    def delete(self, key: str) -> None:
        with self.transaction() as con:
            con.execute("DELETE FROM members WHERE key = ?", (key,))

    def usage(self) -> dict[str, int]:
        """How many recorded runs used each key."""
        return {r["key"]: r["n"] for r in self.query("SELECT key, count(DISTINCT run_id) AS n FROM run_members GROUP BY key")}

    def runs_using(self, key: str) -> list[str]:
        """The recorded runs that used a member, oldest first."""
        return [r["run_id"] for r in self.query(
            "SELECT m.run_id FROM run_members m JOIN runs r USING (run_id) WHERE m.key = ? ORDER BY r.created, r.rowid",
            (key,))]

    # -- runs ----------------------------------------------------------------------------------------
    def run_started(self, run_id: str, *, experiment: str, spec_file: str, n_members: int, n_fusers: int) -> None:
        with self.transaction() as con:
            con.execute("INSERT INTO runs (run_id, experiment, status, created, spec_file, n_members, n_fusers, "
                        "n_trained, n_reused) VALUES (?, ?, 'running', ?, ?, ?, ?, 0, 0)",
                        (check_run_id(run_id), experiment, now(), spec_file, n_members, n_fusers))

    def run_member(self, run_id: str, name: str, key: str, action: str) -> None:
        column = "n_trained" if action == "trained" else "n_reused"
        with self.transaction() as con:
            con.execute("INSERT OR REPLACE INTO run_members (run_id, name, key, action) VALUES (?, ?, ?, ?)",
                        (run_id, name, key, action))
            con.execute(f"UPDATE runs SET {column} = {column} + 1 WHERE run_id = ?", (run_id,))

    def run_finished(self, run_id: str, *, status: str, seconds: float, error: str | None = None) -> None:
        with self.transaction() as con:
            con.execute("UPDATE runs SET status = ?, finished = ?, seconds = ?, error = ? WHERE run_id = ?",
                        (status, now(), seconds, error, run_id))

    def mark_interrupted(self, run_id: str) -> None:
        with self.transaction() as con:
            con.execute("UPDATE runs SET status = 'interrupted' WHERE run_id = ? AND status = 'running'", (run_id,))

    def run_rows(self, *, experiment: str | None = None) -> list[dict]:
        sql = "SELECT * FROM runs" + (" WHERE experiment = ?" if experiment else "") + " ORDER BY created, rowid"
        return [dict(r) for r in self.query(sql, (experiment,) if experiment else ())]

    def run_status(self, run_id: str) -> str | None:
        rows = self.query("SELECT status FROM runs WHERE run_id = ?", (run_id,))
        return rows[0]["status"] if rows else None
