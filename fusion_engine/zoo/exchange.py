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

from .artifacts import CARD_FILE, PAYLOAD_FILES, check_file, read_json_object, required_files
from .card import MemberCard
from .errors import ZooError
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


def read_export(folder: Path) -> MemberCard:
    """The card of a folder ``zoo export`` wrote, with the folder's shape checked (its files,
    no links, the key the hash of the card's key material); nothing is written."""
    folder = Path(folder)
    if folder.is_symlink() or (folder / CARD_FILE).is_symlink():
        raise ZooError(f"{folder}: links are not imported; copy the exported folder itself")
    if not (folder / CARD_FILE).is_file():
        raise ZooError(f"{folder}: no {CARD_FILE}; `fusion-engine zoo export KEY DIR` writes what zoo import reads")
    key = read_json_object(folder / CARD_FILE, "0" * 64).get("key")
    if not isinstance(key, str):
        raise ZooError(f"{folder / CARD_FILE}: no key; it is not a card written by zoo export")
    card = read_card(folder, check_key(key))
    if member_key(card.key_material) != key:
        raise ZooError(f"{folder / CARD_FILE}: its key is not the hash of its key material; not imported")
    names = sorted(p.name for p in folder.iterdir())
    unknown = [n for n in names if n not in (*PAYLOAD_FILES, CARD_FILE)]
    if unknown:
        raise ZooError(f"{folder / unknown[0]} is not a file a zoo member holds; not imported")
    linked = [n for n in names if (folder / n).is_symlink()]
    if linked:
        raise ZooError(f"{folder / linked[0]} is a link; links are not imported")
    missing = [n for n in required_files(card.source) if n not in card.files or not (folder / n).is_file()]
    if missing:
        raise ZooError(f"{folder}: {missing[0]} is missing (a {card.source} member has "
                       f"{', '.join(required_files(card.source))}); not imported")
    return card


def import_member(reg: Registry, folder: Path) -> tuple[ZooEntry, bool]:
    """Store the member exported into ``folder`` (:func:`read_export`): every file checked
    against the card, the key against its material. Returns its entry and whether it was new
    (False: already stored).

    The files are copied into the registry first and the copies are checked, so what is stored
    is what was checked. The checks find damage, not forgery: whoever writes a card can write
    checksums that match, so import only from registries you trust.
    """
    folder = Path(folder)
    card = read_export(folder)
    key = card.key
    with reg.lock(key):
        stored = reg.get(key)
        if stored is not None:
            reg.verify(stored)
            return stored, False

        def write(tmp: Path) -> None:
            for name, expected in card.files.items():
                shutil.copyfile(folder / name, tmp / name, follow_symlinks=False)
                try:  # the copy is what is stored: check it, not the source
                    check_file(key, tmp / name, expected.model_dump(include={"sha256", "bytes"}))
                except ZooError as exc:
                    raise ZooError(f"{folder / name}: {getattr(exc, 'reason', exc)}; not imported") from None

        entry, _ = reg.publish(key, _as_exported(card), write)
    return entry, True


def _as_exported(card: MemberCard) -> MemberCard:
    """The card to store again: publishing re-seals the files and sets key, date and checksums."""
    return card.model_copy(update={"files": {}})

