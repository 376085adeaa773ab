"""Members between registries: ``zoo export`` writes one member as plain files, ``zoo import``
stores such a folder in another registry, under the same key.

The folder is the member's zoo folder as it is (``card.json``, ``outputs.safetensors``,
``ids.json`` and, unless it was read from predictions, ``model.safetensors``): the card holds
each file's size and sha256 and the key material, so the importing side checks every byte and
that the key is what the material hashes to before it stores anything. A member imported this
way is the same member on both machines: a run on the other side reuses it when its key comes
up, or takes it by ``zoo: NAME``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .artifacts import CARD_FILE, PAYLOAD_FILES, REQUIRED_FILES, check_file, read_json_object
from .card import MemberCard
from .errors import CorruptArtifact, PlantedFile, ZooError
from .index import ZooEntry
from .keys import check_key, member_key
from .store import Registry, read_card


def export_member(reg: Registry, ref: str, out: Path) -> tuple[ZooEntry, Path]:
    """Write the member ``ref`` names (a key, key prefix or name) into ``out/<key>/``, checked
    first; return its entry and the folder."""
    entry = reg.resolve(ref)
    with reg.lock(entry.key):
        reg.verify(entry)
        folder = Path(out) / entry.key
        if folder.exists():
            raise ZooError(f"{folder} already exists; export into another folder or remove it")
        tmp = folder.with_name(f".{entry.key}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for name in entry.files:
                shutil.copy2(reg.member_dir(entry.key) / name, tmp / name)
                check_file(entry.key, tmp / name, entry.files[name])  # what left is what was verified
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return entry, folder


def import_member(reg: Registry, folder: Path) -> tuple[ZooEntry, bool]:
    """Store the member exported into ``folder``: every file checked against the card, the key
    against its material. Returns its entry and whether it was new (False: already stored)."""
    folder = Path(folder)
    if not (folder / CARD_FILE).is_file():
        raise ZooError(f"{folder}: no {CARD_FILE}; `fusion-engine zoo export KEY DIR` writes what zoo import reads")
    key = read_json_object(folder / CARD_FILE, "0" * 64).get("key")
    if not isinstance(key, str):
        raise ZooError(f"{folder / CARD_FILE}: no key; it is not a card written by zoo export")
    card = read_card(folder, check_key(key))
    if member_key(card.key_material) != key:
        raise CorruptArtifact(key, CARD_FILE, "its key is not the hash of its key material")
    names = sorted(p.name for p in folder.iterdir())
    unknown = [n for n in names if n not in (*PAYLOAD_FILES, CARD_FILE)]
    if unknown:
        raise PlantedFile(key, folder / unknown[0], "is not a file a zoo member holds")
    missing = [n for n in REQUIRED_FILES if n not in card.files or not (folder / n).is_file()]
    if missing:
        raise CorruptArtifact(key, missing[0], "missing from the exported folder")
    for name, expected in card.files.items():
        check_file(key, folder / name, expected.model_dump(include={"sha256", "bytes"}))
    with reg.lock(key):
        stored = reg.get(key)
        if stored is not None:
            reg.verify(stored)
            return stored, False

        def write(tmp: Path) -> None:
            for name in card.files:
                shutil.copy2(folder / name, tmp / name)

        entry, _ = reg.publish(key, _as_exported(card), write)
    return entry, True


def _as_exported(card: MemberCard) -> MemberCard:
    """The card to store again: publishing re-seals the files and sets key, date and checksums."""
    return card.model_copy(update={"files": {}})

