"""The registry: a folder holding the zoo of members, the runs, and the index over both.

::

    index.sqlite          the index (SQLite, WAL): members, runs, which run used which member
    zoo/<key>/            one member: model.safetensors, outputs.safetensors, ids.json, card.json
    checkpoints/<key>/    the per-epoch training state of a member not finished yet
    runs/<run_id>/        one folder per run
    cache/images/         decoded images of datasets of files, one file per data and size
    tmp/                  artifacts being written, moved into zoo/ whole
    locks/                one lock file per member key (and per running run)

The guarantees, and how they are kept:

- *Whole or absent.* An artifact is written into ``tmp/``, fsynced, and renamed into ``zoo/``
  in one step; the index row is inserted after the rename. A process killed at any moment leaves
  a temporary folder (``gc`` removes it) or an unindexed but complete folder (adopted after its
  checksums are verified), never a half-written member the index points at.
- *Checked before use.* The index and the card record every file's size and sha256; a member
  is verified before its outputs are used (:mod:`fusion_engine.zoo.artifacts`). Nothing here
  unpickles: arrays are safetensors, the rest JSON.
- *Trained once.* ``lock(key)`` is an exclusive ``flock`` on ``locks/<key>.lock``, held while a
  member is looked up, trained and published; a second run needing it waits, then finds it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from pydantic import ValidationError

from ..checkpoint import Checkpoint
from ..files import checksum, fsync_dir, seal, write_atomic
from ..records import SCORED_SPLITS
from .artifacts import (CARD_FILE, IDS_FILE, OUTPUTS_FILE, PAYLOAD_FILES, WEIGHTS_FILE, check_file, read_checked,
                        read_json_object, required_files, tree_bytes, write_outputs)
from .card import CARD_VERSION, MemberCard
from .errors import Busy, CorruptArtifact, PlantedFile, UnreadableCard, ZooError, short
from .index import Index, ZooEntry, now
from .keys import MIN_PREFIX, PREFIX_RE, check_key, check_run_id, member_key
from .locks import file_lock, is_held

log = logging.getLogger("fusion_engine")

INDEX_FILE = "index.sqlite"
#: the environment variable naming the registry when ``--registry`` does not
REGISTRY_ENV = "FUSION_ENGINE_REGISTRY"


def resolve_registry(registry: str | os.PathLike | None = None) -> Path:
    """``--registry`` first, then ``$FUSION_ENGINE_REGISTRY``, then ``./registry``."""
    return Path(registry or os.environ.get(REGISTRY_ENV) or "registry")


@dataclass
class MemberOutputs:
    """A stored member's raw (uncalibrated) logits, labels and sample ids on val and test, and on
    train when it was predicted there (a teacher's member, for distillation)."""

    logits: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    ids: dict[str, list[str]]


@dataclass
class StoredMember:
    """A member read from the zoo: its index row, its card and its outputs, all verified."""

    entry: ZooEntry
    card: MemberCard
    outputs: MemberOutputs


class Registry:
    """A registry folder (see the module docstring).

    ``create=False`` opens an existing registry for reading and creates nothing; a registry that
    does not exist then reads as empty.
    """

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = Path(root)
        self.create = create
        self.zoo_dir = self.root / "zoo"
        self.runs_dir = self.root / "runs"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        self.checkpoints_dir = self.root / "checkpoints"
        self.image_cache_dir = self.root / "cache" / "images"  # made when first written
        self.index = Index(self.root / INDEX_FILE, lock_path=self.locks_dir / "index.lock", create=create)
        if create:
            try:
                for folder in (self.root, self.zoo_dir, self.runs_dir, self.tmp_dir, self.locks_dir, self.checkpoints_dir):
                    folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ZooError(f"cannot create the registry at {self.root}: {exc.strerror or exc}") from None

    def close(self) -> None:
        self.index.close()

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

    def checkpoint(self, key: str) -> Checkpoint:
        return Checkpoint(self.checkpoint_dir(key), key)

    # -- locks -------------------------------------------------------------------------------------
    def lock(self, key: str, *, wait: bool = True, on_wait: Callable[[], None] | None = None):
        """Hold the member lock of ``key``: whoever holds it may train, publish or remove it."""
        return file_lock(self.locks_dir / f"{check_key(key)}.lock", wait=wait, on_wait=on_wait)

    def _run_lock_path(self, run_id: str) -> Path:
        return self.locks_dir / "runs" / f"{check_run_id(run_id)}.lock"

    @contextmanager
    def run_lock(self, run_id: str) -> Iterator[None]:
        """Held for as long as a run is alive, so a run that died reads as interrupted."""
        path = self._run_lock_path(run_id)
        try:
            with file_lock(path):
                yield
        finally:
            path.unlink(missing_ok=True)

    # -- members: reading --------------------------------------------------------------------------
    def get(self, key: str) -> ZooEntry | None:
        return self.index.get(key)

    def entries(self) -> list[ZooEntry]:
        return self.index.entries()

    def usage(self) -> dict[str, int]:
        return self.index.usage()

    def runs_using(self, key: str) -> list[str]:
        return self.index.runs_using(key)

    def find(self, ref: str, *, names: bool = True) -> list[ZooEntry]:
        return self.index.find(ref, names=names)

    def resolve(self, ref: str, *, names: bool = True) -> ZooEntry:
        """The one member ``ref`` names; an error listing the candidates when it is not one."""
        if not names and not PREFIX_RE.match(ref.strip()):
            raise ZooError(f"{ref!r} is not a zoo key or key prefix (at least {MIN_PREFIX} hex characters)")
        found = self.find(ref, names=names)
        if not found:
            raise _no_match(ref, self.root, names=names)
        if len(found) > 1:
            raise _ambiguous(ref, found)
        return found[0]

    def verify(self, entry: ZooEntry) -> MemberCard:
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
        for name, expected in entry.files.items():
            check_file(entry.key, folder / name, expected)
        card = read_card(folder, entry.key)
        if card.key != entry.key or member_key(card.key_material) != entry.key:
            raise CorruptArtifact(entry.key, CARD_FILE, "it does not describe this key")
        return card

    def load_outputs(self, entry: ZooEntry) -> MemberOutputs:
        """A verified member's logits, labels and ids, read once and checked as read."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        folder = self.member_dir(entry.key)
        data = read_checked(entry.key, folder / OUTPUTS_FILE, entry.files[OUTPUTS_FILE])
        try:
            arrays = load(data)
        except SafetensorError as exc:
            raise CorruptArtifact(entry.key, OUTPUTS_FILE, f"not a safetensors file ({exc})") from None
        ids = json.loads(read_checked(entry.key, folder / IDS_FILE, entry.files[IDS_FILE]))
        splits = [*SCORED_SPLITS, *(["train"] if "train_logits" in arrays else [])]
        try:
            logits = {s: arrays[f"{s}_logits"].astype(np.float32, copy=False) for s in splits}
            labels = {s: arrays[f"{s}_labels"].astype(np.int64, copy=False) for s in splits}
            ids = {s: [str(i) for i in ids[s]] for s in splits}
        except (KeyError, TypeError) as exc:
            raise CorruptArtifact(entry.key, OUTPUTS_FILE, f"missing {exc}") from None
        for s in splits:
            if logits[s].ndim != 2 or len(logits[s]) != len(labels[s]) or len(ids[s]) != len(labels[s]):
                raise CorruptArtifact(entry.key, OUTPUTS_FILE, f"{s} logits, labels and ids disagree in shape")
        return MemberOutputs(logits, labels, ids)

    def open_member(self, key: str) -> StoredMember | None:
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
        return StoredMember(entry, card, self.load_outputs(entry))

    # -- members: writing (hold the member's lock) -------------------------------------------------
    def publish(self, key: str, card: MemberCard, write: Callable[[Path], None]) -> tuple[ZooEntry, MemberCard]:
        """Store a member: ``write(folder)`` writes the payload files, the card (with checksums
        of those files) is added, and the folder is moved into ``zoo/<key>`` whole, then indexed.
        Returns the index row and the card as stored."""
        dest = self.member_dir(key)
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", suffix=".new", dir=self.tmp_dir))
        try:
            write(tmp)
            written = sorted(os.listdir(tmp))
            if not set(required_files(card.source)) <= set(written) <= set(PAYLOAD_FILES):
                raise RuntimeError(f"a {card.source} member's zoo artifact holds {', '.join(required_files(card.source))}; "
                                   f"got {', '.join(written)}")
            files = {name: seal(tmp / name) for name in written}
            card = MemberCard.model_validate({**card.to_json(), "version": CARD_VERSION, "key": key, "created": now(),
                                              "files": files})
            # the index row again, as fusion-engine 0.1 rebuilds its index from cards
            card = card.model_copy(update={"index": card.index_fields()})
            write_atomic(tmp / CARD_FILE, json.dumps(card.to_json(), indent=2, allow_nan=False) + "\n", fsync=True)
            files = {**files, CARD_FILE: seal(tmp / CARD_FILE)}
            fsync_dir(tmp)
            if dest.exists():
                # a leftover nobody indexes, or the member --retrain replaces: we hold the lock
                self._discard_folder(dest, key)
            os.rename(tmp, dest)
            fsync_dir(self.zoo_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        row = ZooEntry(key=key, bytes=sum(f["bytes"] for f in files.values()), files=files, created=card.created,
                       **card.index_fields())
        self.index.insert(row)
        return row, card

    def orphan_entry(self, key: str) -> ZooEntry:
        """The index row of a ``zoo/<key>`` folder the index lacks, from its card, once every file
        checks out against the card; :class:`ZooError` (or worse) when one does not."""
        folder = self.member_dir(key)
        card = read_card(folder, key)
        missing = [name for name in required_files(card.source) if name not in card.files]
        if missing:
            raise CorruptArtifact(key, CARD_FILE, f"incomplete (no checksum of {', '.join(missing)})")
        files = {name: card.files[name].model_dump(include={"sha256", "bytes"}) for name in PAYLOAD_FILES
                 if name in card.files}
        files[CARD_FILE] = checksum(folder / CARD_FILE)
        row = ZooEntry(key=key, bytes=sum(f["bytes"] for f in files.values()), files=files,
                       created=str(card.created or now()), **card.index_fields())
        self.verify(row)
        return row

    def _adopt(self, key: str) -> ZooEntry | None:
        """Index a complete ``zoo/<key>`` folder that has no row (a run was killed between moving
        it into place and indexing it); remove it if it does not check out. Hold the lock."""
        folder = self.member_dir(key)
        if not folder.is_dir():
            return None
        try:
            row = self.orphan_entry(key)
        except (PlantedFile, UnreadableCard):
            raise
        except (ZooError, OSError) as exc:
            log.warning("removing an unindexed zoo folder that fails its checks, %s (%s)", folder, exc)
            self._discard_folder(folder, key)
            return None
        self.index.insert(row)
        log.warning("recovered zoo member %s, stored by a run that stopped before indexing it", short(key))
        return row

    def add_outputs(self, stored: StoredMember, split: str, logits: np.ndarray, labels: np.ndarray,
                    ids: list[str]) -> StoredMember:
        """Store ``stored`` again with its outputs on one more ``split`` (hold its lock): a member
        predicted on train after it was stored, because a student's teacher needs it. Its key is
        unchanged (the same weights give the same outputs); its other files are copied and checked."""
        key, folder, outputs = stored.entry.key, self.member_dir(stored.entry.key), stored.outputs
        all_logits = {**outputs.logits, split: logits}
        all_labels = {**outputs.labels, split: labels}
        all_ids = {**outputs.ids, split: list(ids)}

        def write(tmp: Path) -> None:
            if WEIGHTS_FILE in stored.entry.files:
                shutil.copyfile(folder / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
                check_file(key, tmp / WEIGHTS_FILE, stored.entry.files[WEIGHTS_FILE])
            write_outputs(tmp, all_logits, all_labels, all_ids)

        entry, card = self.publish(key, stored.card.model_copy(update={"files": {}}), write)
        return StoredMember(entry, card, MemberOutputs(all_logits, all_labels, all_ids))

    def discard(self, key: str) -> None:
        """Drop a damaged member (hold its lock): its folder first, then its row."""
        folder = self.member_dir(key)
        if folder.exists():
            self._discard_folder(folder, key)
        self.index.delete(key)

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
                self.index.delete(key)
                ckpt = self.checkpoint_dir(key)
                if ckpt.exists():
                    freed += self._discard_folder(ckpt, key)
                return freed
        except Busy:
            raise ZooError(f"zoo member {short(key)} is in use by a running run; try again when it has finished") from None

    # -- runs --------------------------------------------------------------------------------------
    def run_started(self, run_id: str, **fields) -> None:
        self.index.run_started(run_id, **fields)

    def run_member(self, run_id: str, name: str, key: str, action: str) -> None:
        self.index.run_member(run_id, name, key, action)

    def run_finished(self, run_id: str, *, status: str, seconds: float, error: str | None = None) -> None:
        self.index.run_finished(run_id, status=status, seconds=seconds, error=error)

    def run_alive(self, run_id: str) -> bool:
        """Whether the process of a run still holds its lock."""
        return is_held(self._run_lock_path(run_id))

    def runs(self, *, experiment: str | None = None) -> list[dict]:
        """Recorded runs, oldest first; a run whose process died reads ``interrupted``."""
        out = []
        for rec in self.index.run_rows(experiment=experiment):
            if rec["status"] == "running" and not self.run_alive(rec["run_id"]):
                again = self.index.run_status(rec["run_id"])  # it may have just finished
                rec["status"] = again if again and again != "running" else "interrupted"
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


def read_card(folder: Path, key: str) -> MemberCard:
    """``card.json`` of a member folder, typed. Unreadable JSON is damage (:class:`CorruptArtifact`);
    a card of a newer version, or one that does not fit this version's model, is
    :class:`UnreadableCard`."""
    data = read_json_object(folder / CARD_FILE, key)
    version = data.get("version", 1)
    if not isinstance(version, int) or version > CARD_VERSION:
        raise UnreadableCard(key, f"is version {version!r}, newer than this fusion-engine reads ({CARD_VERSION}); "
                                  f"upgrade fusion-engine")
    try:
        return MemberCard.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UnreadableCard(key, f"does not read as a member card ({where}: {err['msg']})") from None


def choose_reference(reg: Registry, ref: str, *, fingerprint: Callable[[], str], split: str) -> ZooEntry:
    """The stored member a spec's ``zoo: REF`` names (a key, a key prefix or a member name). It must
    have been trained on this data (``fingerprint()``, computed only when needed) and ``split``;
    when several match, the one trained on this data is taken, and more than one is an error
    listing them."""
    found = reg.find(ref)
    if not found:
        raise _no_match(ref, reg.root)
    if len(found) == 1:
        chosen = found[0]
    else:
        fitting = [e for e in found if e.fingerprint == fingerprint() and e.split == split]
        if len(fitting) != 1:
            raise _ambiguous(ref, fitting or found, " and were trained on this data" if fitting else "")
        chosen = fitting[0]
    if chosen.split != split or chosen.fingerprint != fingerprint():
        this = fingerprint()
        what = [f"data fingerprint {chosen.fingerprint[:16]} (this run: {this[:16]})" if chosen.fingerprint != this else "",
                f"split {chosen.split[:16]} (this run: {split[:16]})" if chosen.split != split else ""]
        raise ZooError(f"zoo member {short(chosen.key)} ({chosen.name}, experiment {chosen.experiment}) was trained on "
                       f"other data: {' and '.join(w for w in what if w)}; fusers may only combine members scored on "
                       f"the same samples")
    return chosen


def _no_match(ref: str, root: Path, *, names: bool = True) -> ZooError:
    what = "key, key prefix or member name" if names else "key or key prefix"
    return ZooError(f"no zoo member matches '{ref}' (a {what}) in registry {root}; "
                    f"`fusion-engine zoo list --registry {root}` shows them")


def _ambiguous(ref: str, candidates: list[ZooEntry], why: str = "") -> ZooError:
    return ZooError(f"'{ref}' is ambiguous: {len(candidates)} zoo members match{why}; give a longer key prefix. "
                    f"Candidates: {describe_candidates(candidates)}")


def describe_candidates(entries: list[ZooEntry]) -> str:
    return "; ".join(f"{e.key[:16]} ({e.name}, {e.backbone}, experiment {e.experiment}, {e.created[:19]})"
                     for e in entries)
