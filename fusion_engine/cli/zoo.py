"""The ``zoo`` commands: list, show, remove, clean up, export and import stored members."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import FusionEngineError
from .output import format_size, print_json, print_table
from .parsing import CommandParser
from .registry import open_registry, registry_option


def add_zoo_parser(sub) -> None:
    zoo = sub.add_parser("zoo", help="list, show, remove and clean up stored members",
                         description="The model zoo: every trained member, stored once under its key.")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True, parser_class=CommandParser)
    zoo_list = zoo_sub.add_parser("list", help="every stored member")
    registry_option(zoo_list, json_option=True)
    zoo_show = zoo_sub.add_parser("show", help="one member's card, files and checks",
                                  description="Show a member: its index entry, card and files, verified against their checksums.")
    zoo_show.add_argument("ref", metavar="KEY", help="a key, a key prefix (8+ hex characters) or a member name")
    registry_option(zoo_show, json_option=True)
    zoo_rm = zoo_sub.add_parser("rm", help="remove a member", description="Remove a member from the zoo (index entry, files, checkpoint).")
    zoo_rm.add_argument("ref", metavar="KEY", help="a key or a key prefix (8+ hex characters)")
    registry_option(zoo_rm, json_option=True)
    zoo_gc = zoo_sub.add_parser("gc", help="remove what no run will read and report the bytes freed",
                                description="Remove temporary folders, unindexed zoo folders, index rows without files, "
                                            "checkpoints of stored members and lock files of finished runs. "
                                            "Anything a running run holds is left alone.")
    zoo_gc.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    zoo_gc.add_argument("--checkpoints", action="store_true",
                        help="also remove checkpoints of interrupted training (a re-run would resume from them)")
    zoo_gc.add_argument("--cache", action="store_true",
                        help="also remove the decoded-image cache (the next run that trains a member decodes again)")
    registry_option(zoo_gc, json_option=True)
    zoo_export = zoo_sub.add_parser("export", help="write a member as plain files another registry can import",
                                    description="Write a stored member (weights, outputs, ids and card, each checked) "
                                                "into DIR/<key>/, for `fusion-engine zoo import` elsewhere.")
    zoo_export.add_argument("ref", metavar="KEY", help="a key, a key prefix (8+ hex characters) or a member name")
    zoo_export.add_argument("out", metavar="DIR", help="the folder to write into")
    registry_option(zoo_export, json_option=True)
    zoo_import = zoo_sub.add_parser(
        "import", help="store members from exported folders, or a spec's weights and predictions members",
        description="Store members in the zoo without a run: from folders `zoo export` wrote (every file checked, "
                    "the same key), or a spec's members that come from weights: or predictions: files (checked, "
                    "run or read as a run would; --member picks them).")
    zoo_import.add_argument("sources", nargs="+", metavar="FOLDER|SPEC",
                            help="folders written by zoo export, or one spec (.yaml, .yml, .toml)")
    zoo_import.add_argument("--member", action="append", default=[], metavar="NAME",
                            help="with a spec: import only this member (repeatable)")
    registry_option(zoo_import, json_option=True)


def cmd_zoo(args) -> int:
    from ..zoo import ZooError, resolve_registry

    changes = args.zoo_command in ("rm", "gc")  # a registry that is not there has nothing to remove
    if changes and not resolve_registry(args.registry).is_dir():
        raise ZooError(f"no registry at {resolve_registry(args.registry)}")
    if args.zoo_command == "import":
        return zoo_import(args)  # checks everything before it creates a registry
    reg = open_registry(args, create=changes)
    with reg:
        return _ZOO_COMMANDS[args.zoo_command](args, reg)


def zoo_list(args, reg) -> int:
    usage = reg.usage()
    entries = [{**e.summary(), "runs": usage.get(e.key, 0), "path": str(reg.member_dir(e.key))} for e in reg.entries()]
    if args.json:
        print_json(entries)
        return 0
    if not entries:
        print(f"the zoo in {reg.root} is empty", file=sys.stderr)
        return 0
    print_table(["key", "name", "backbone", "experiment", "dataset", "val_accuracy", "params", "size", "runs", "created"],
                [[e["key"][:16], e["name"], e["backbone"], e["experiment"], e["dataset"],
                  "" if e["val_accuracy"] is None else f"{e['val_accuracy']:.4f}",
                  "" if e["n_params"] is None else f"{e['n_params']:,}", format_size(e["bytes"]), e["runs"],
                  e["created"][:19].replace("T", " ")]
                 for e in entries], title=f"zoo in {reg.root}: {len(entries)} members")
    return 0


def zoo_show(args, reg) -> int:
    from ..zoo import ZooError

    entry = reg.resolve(args.ref)
    try:
        card = reg.verify(entry)
        check = "ok"
    except ZooError as exc:
        card, check = None, str(exc)
    runs = reg.runs_using(entry.key)
    data = {**entry.summary(), "path": str(reg.member_dir(entry.key)), "files": entry.files, "check": check,
            "runs": runs, "card": None if card is None else card.to_json()}
    if args.json:
        print_json(data)
        return 0 if check == "ok" else 1
    for field in ("key", "name", "experiment", "run_id", "backbone", "dataset", "val_accuracy", "n_params", "created", "path"):
        print(f"{field:>13}: {data[field]}")
    print(f"{'size':>13}: {format_size(entry.bytes)} in {len(entry.files)} files")
    if card is not None:
        print(f"{'source':>13}: {card.source}")
        if card.origin is not None:
            origin = card.origin
            print(f"{'from file':>13}: {origin.file} (sha256 {str(origin.sha256)[:16]}...)"
                  + (f", classes {', '.join(origin.class_names)}" if origin.class_names else ""))
        if card.source != "predictions":
            print(f"{'params':>13}: {json.dumps(card.spec.params)}")
        if card.source == "trained":
            print(f"{'train':>13}: {json.dumps(card.spec.train)}")
            print(f"{'seed':>13}: {card.spec.seed}")
            print(f"{'best epoch':>13}: {card.best_epoch} of {len(card.history)}")
            print(f"{'trained in':>13}: {card.timings.train_seconds} s on {card.device}")
        elif card.source == "weights":
            print(f"{'predicted in':>13}: {card.timings.predict_seconds} s on {card.device}")
    print(f"{'used by runs':>13}: {', '.join(runs) or 'none'}")
    print(f"{'check':>13}: {check}")
    return 0 if check == "ok" else 1


def zoo_rm(args, reg) -> int:
    entry = reg.resolve(args.ref, names=False)
    freed = reg.remove(entry.key)
    if args.json:
        print_json({"removed": entry.key, "name": entry.name, "bytes_freed": freed})
    else:
        print(f"removed {entry.key} ({entry.name}); freed {format_size(freed)}")
    return 0


def zoo_gc(args, reg) -> int:
    from ..zoo.gc import collect

    report = collect(reg, dry_run=args.dry_run, checkpoints=args.checkpoints, cache=args.cache)
    if args.json:
        print_json(report.as_dict())
        return 0
    verb = "would remove" if report.dry_run else "removed"
    for item in report.removed:
        print(f"{verb} {item['path']} ({item['what']}, {format_size(item['bytes'])})")
    for path in report.kept_in_use:
        print(f"kept {path} (in use by a running run)")
    for path in report.unreadable:
        print(f"kept {path} (its card is of a version this fusion-engine does not read)")
    for key in report.recovered:
        print(f"{'would index' if report.dry_run else 'indexed'} zoo/{key} again (intact, but missing from the index)")
    if report.index_rows_removed:
        print(f"{verb} {report.index_rows_removed} index entries whose files are gone")
    if report.runs_marked_interrupted:
        print(f"marked {report.runs_marked_interrupted} runs whose process died as interrupted")
    print(f"{'would free' if report.dry_run else 'freed'} {report.bytes_freed} bytes ({format_size(report.bytes_freed)})")
    return 0


def zoo_export(args, reg) -> int:
    from ..zoo.exchange import export_member

    entry, folder = export_member(reg, args.ref, Path(args.out))
    if args.json:
        print_json({"key": entry.key, "name": entry.name, "folder": str(folder)})
    else:
        print(f"exported {entry.name} ({entry.key}) to {folder}")
    return 0


def zoo_import(args) -> int:
    """``zoo import``: a spec's weights/predictions members, or exported folders. Everything is
    checked before the registry is created or written."""
    from ..zoo import resolve_registry
    from ..zoo.exchange import import_member, read_export

    specs = [s for s in args.sources if Path(s).suffix.lower() in (".yaml", ".yml", ".toml")]
    if specs and len(args.sources) > 1:
        raise FusionEngineError("zoo import: give one spec, or folders written by zoo export, not both")
    if args.member and not specs:
        raise FusionEngineError("zoo import: --member picks members of a spec; the sources are exported folders")
    done = []
    if specs:
        from ..members import import_members, importable
        from ..preflight import preflight
        from ..resolve import prepare

        resolved, _ = prepare(specs[0])
        importable(resolved, args.member)
        checked = preflight(resolved, registry=resolve_registry(args.registry))
        with open_registry(args, create=True) as reg:
            for name, member in import_members(resolved, reg, args.member, checked=checked).items():
                done.append({"key": member.key, "name": name, "source": member.source,
                             "new": member.action != "reused"})
    else:
        for folder in args.sources:
            read_export(Path(folder))
        with open_registry(args, create=True) as reg:
            for folder in args.sources:
                entry, new = import_member(reg, Path(folder))
                done.append({"key": entry.key, "name": entry.name, "source": "export", "new": new})
    if args.json:
        print_json(done)
    else:
        for item in done:
            print(f"{'imported' if item['new'] else 'already in the zoo:'} {item['name']} ({item['key']})")
    return 0


_ZOO_COMMANDS = {"list": zoo_list, "show": zoo_show, "rm": zoo_rm, "gc": zoo_gc, "export": zoo_export}
