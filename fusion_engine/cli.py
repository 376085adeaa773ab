"""``fusion-engine``: run, validate, list plugins, and look after the registry (zoo, runs, leaderboards).

Imports stay light until a command needs more: ``--help``, ``validate`` and ``plugins`` never
import torch.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import RUN_LOG_ONLY, RUN_STARTED, FusionEngineError


class UsageError(FusionEngineError):
    """A command line argparse refused: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (what is wrong, then where ``--help`` is) instead of
    the usage block and the error on two."""

    def error(self, message: str):
        import re

        bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if bad:
            choices = re.findall(r"'([^']*)'", bad.group(2))
            close = difflib.get_close_matches(bad.group(1), choices, n=1)
            if close:
                message += f"; did you mean '{close[0]}'?"
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fusion-engine",
        description="Train a zoo of image classifiers, fuse them, and score every fusion honestly on one untouched test split.",
    )
    parser.add_argument("--version", action="version", version=f"fusion-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="train the members, fit the fusers, write the leaderboard",
                         description="Run an experiment spec: train what is missing, fit every fuser, write a leaderboard.")
    run.add_argument("spec", metavar="SPEC", help="experiment spec (.yaml, .yml or .toml)")
    run.add_argument("--registry", metavar="DIR", help="registry folder (default: $FUSION_ENGINE_REGISTRY or ./registry)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train and predict (default: the spec's, else auto)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress or table; print only the run folder")
    run.add_argument("--executor", metavar="NAME", help="what trains the members: local or ray (default: the spec's, else local)")
    run.add_argument("--executor-param", "-E", metavar="KEY=VALUE", action="append", default=[], dest="executor_params",
                     help="an executor parameter, e.g. -E address=auto or -E num_cpus=8 (repeatable)")
    run.add_argument("--retrain", metavar="NAME", action="append", default=[],
                     help="train this member again though the zoo has it, replacing the stored one; 'all' for every "
                          "member (repeatable, or NAME,NAME)")

    validate = sub.add_parser("validate", help="check specs without running them",
                              description="Check specs as a run would before training: fields, plugin names and "
                                          "params, the dataset's files and split, each member's backbone and weight "
                                          "files, zoo references. Nothing is trained, decoded or written.")
    validate.add_argument("specs", nargs="+", metavar="SPEC")
    validate.add_argument("--registry", metavar="DIR", help="where zoo: members are looked up (default: "
                                                            "$FUSION_ENGINE_REGISTRY or ./registry)")

    plugins = sub.add_parser("plugins", help="list installed plugins and what they register")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.add_argument("--spec", metavar="SPEC", help="also load the plugin files this spec lists")
    plugins.add_argument("--params", metavar="NAME",
                         help="the parameters of the backbone, fuser, dataset or executor NAME, with defaults")

    zoo = sub.add_parser("zoo", help="list, show, remove and clean up stored members",
                         description="The model zoo: every trained member, stored once under its key.")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True, parser_class=_Parser)
    zoo_list = zoo_sub.add_parser("list", help="every stored member")
    _registry_option(zoo_list, json_option=True)
    zoo_show = zoo_sub.add_parser("show", help="one member's card, files and checks",
                                  description="Show a member: its index entry, card and files, verified against their checksums.")
    zoo_show.add_argument("ref", metavar="KEY", help="a key, a key prefix (8+ hex characters) or a member name")
    _registry_option(zoo_show, json_option=True)
    zoo_rm = zoo_sub.add_parser("rm", help="remove a member", description="Remove a member from the zoo (index entry, files, checkpoint).")
    zoo_rm.add_argument("ref", metavar="KEY", help="a key or a key prefix (8+ hex characters)")
    _registry_option(zoo_rm, json_option=True)
    zoo_gc = zoo_sub.add_parser("gc", help="remove what no run will read and report the bytes freed",
                                description="Remove temporary folders, unindexed zoo folders, index rows without files, "
                                            "checkpoints of stored members and lock files of finished runs. "
                                            "Anything a running run holds is left alone.")
    zoo_gc.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    zoo_gc.add_argument("--checkpoints", action="store_true",
                        help="also remove checkpoints of interrupted training (a re-run would resume from them)")
    zoo_gc.add_argument("--cache", action="store_true",
                        help="also remove the decoded-image cache (the next run that trains a member decodes again)")
    _registry_option(zoo_gc, json_option=True)
    zoo_export = zoo_sub.add_parser("export", help="write a member as plain files another registry can import",
                                    description="Write a stored member (weights, outputs, ids and card, each checked) "
                                                "into DIR/<key>/, for `fusion-engine zoo import` elsewhere.")
    zoo_export.add_argument("ref", metavar="KEY", help="a key, a key prefix (8+ hex characters) or a member name")
    zoo_export.add_argument("out", metavar="DIR", help="the folder to write into")
    _registry_option(zoo_export, json_option=True)
    zoo_import = zoo_sub.add_parser(
        "import", help="store members from exported folders, or a spec's weights and predictions members",
        description="Store members in the zoo without a run: from folders `zoo export` wrote (every file checked, "
                    "the same key), or a spec's members that come from weights: or predictions: files (checked, "
                    "run or read as a run would; --member picks them).")
    zoo_import.add_argument("sources", nargs="+", metavar="FOLDER|SPEC",
                            help="folders written by zoo export, or one spec (.yaml, .yml, .toml)")
    zoo_import.add_argument("--member", action="append", default=[], metavar="NAME",
                            help="with a spec: import only this member (repeatable)")
    _registry_option(zoo_import, json_option=True)

    split = sub.add_parser("split", help="write the sample ids of train, val and test",
                           description="Write the sample ids of a spec's split (what a predictions: file must hold for "
                                       "val and test), with each sample's split, label and, for image files, path.")
    split.add_argument("spec", metavar="SPEC")
    split.add_argument("--out", metavar="FILE", required=True, help="a .csv, .parquet or .json file to write")

    runs = sub.add_parser("runs", help="list recorded runs", description="Runs recorded in the registry index.")
    runs_sub = runs.add_subparsers(dest="runs_command", metavar="RUNS_COMMAND", required=True, parser_class=_Parser)
    runs_list = runs_sub.add_parser("list", help="every recorded run, oldest first")
    runs_list.add_argument("--experiment", metavar="NAME", help="only the runs of this experiment")
    _registry_option(runs_list, json_option=True)

    board = sub.add_parser("leaderboard", help="print a run's leaderboard from the registry",
                           description="Print the leaderboard of a run: RUN_ID (or a unique prefix), or the latest "
                                       "complete run of --experiment, or the latest complete run.")
    _run_selector(board)
    board.add_argument("--format", choices=["table", "md", "csv", "json"], default="table", help="output format (default: table)")
    board.add_argument("--budget", type=_milliseconds, metavar="MS",
                       help="also name the best row (chosen on val) whose inference cost fits MS milliseconds per "
                            "image, with its test accuracy and interval (--format table or json)")
    _registry_option(board)

    report = sub.add_parser("report", help="draw a run's plots and report.html again from the registry",
                            description="Re-render plots/ and report.html of a run from its run folder; prints the "
                                        "report's path.")
    _run_selector(report)
    report.add_argument("--budget", type=_milliseconds, metavar="MS",
                        help="name the best row within MS milliseconds per image in the report (default: the spec's "
                             "budget_ms)")
    _registry_option(report)
    _deploy_parsers(sub)
    return parser


def _milliseconds(text: str) -> float:
    """An argparse type: a positive, finite number of milliseconds."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of milliseconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"'{text}': give a positive number of milliseconds")
    return value


def _run_selector(parser: argparse.ArgumentParser) -> None:
    """RUN_ID or --experiment NAME: the run a command reads (see :func:`_complete_run`)."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("run", metavar="RUN_ID", nargs="?", help="a run id or a unique prefix of one")
    which.add_argument("--experiment", metavar="NAME", help="the latest complete run of this experiment")


def _registry_option(parser: argparse.ArgumentParser, *, json_option: bool = False) -> None:
    parser.add_argument("--registry", metavar="DIR", help="registry folder (default: $FUSION_ENGINE_REGISTRY or ./registry)")
    if json_option:
        parser.add_argument("--json", action="store_true", help="print JSON")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input is one line on stderr and exit status 2; library warnings
    raised while a command fails are dropped (the one line says what is wrong), and those of a
    command that succeeds are shown after it, once each."""
    logger = logging.getLogger("fusion_engine")
    stderr = _StderrWarnings()
    logger.addHandler(stderr)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            try:
                args = _parser().parse_args(argv)
                code = _COMMANDS[args.command](args)
            except FusionEngineError as exc:
                print(_one_line(str(exc)), file=sys.stderr)
                return exc.exit_code
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                return 130
            except BrokenPipeError:  # stdout's reader went away (``| head``): stop quietly, as CLI tools do
                _silence_stdout()
                return 141  # 128 + SIGPIPE: what a shell reports for a tool stopped by a closed pipe
        stderr.show_held()
        for warning in caught:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        return code
    finally:
        logger.removeHandler(stderr)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is still buffered for
    a closed pipe does not print a second BrokenPipeError on the way out (Python's own advice:
    docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (captured in-process): nothing to flush there
        pass


class _StderrWarnings(logging.Handler):
    """The engine's warnings on stderr (a skipped plugin or file, an ignored field); its INFO log
    goes to run.log. Warnings are held until the input is known good (a run's folder exists, or
    the command succeeded) and then shown; a command that fails on bad input shows only its one
    line of error."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.held: list[logging.LogRecord] = []
        self.live = False

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, RUN_LOG_ONLY, False):
            return
        if record.levelno < logging.WARNING:
            if getattr(record, RUN_STARTED, False):
                self.show_held()
            return
        if self.live:
            self._show(record)
        else:
            self.held.append(record)

    def show_held(self) -> None:
        """Show the warnings held so far, and later ones as they come. (Not ``release``: that is
        :class:`logging.Handler`'s lock, which ``handle`` releases after every record.)"""
        self.live = True
        held, self.held = self.held, []
        for record in held:
            self._show(record)

    @staticmethod
    def _show(record: logging.LogRecord) -> None:
        print(f"{record.levelname}: {record.getMessage()}", file=sys.stderr, flush=True)


def _one_line(message: str) -> str:
    return " ".join(message.split())


def cmd_run(args) -> int:
    from .runner import run_experiment

    executor = None
    if args.executor or args.executor_params:
        executor = {"name": args.executor, "params": dict(_key_value(item) for item in args.executor_params)}
    retrain = tuple(name.strip() for item in args.retrain for name in item.split(",") if name.strip())
    if args.retrain and not retrain:
        raise FusionEngineError(f"--retrain {' '.join(args.retrain)!r} names no member; give NAME[,NAME...] or all")
    result = run_experiment(args.spec, registry=args.registry, device=args.device, quiet=args.quiet, executor=executor,
                            retrain=retrain)
    print(result.run_dir)
    return 0


def _key_value(item: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as YAML (``8`` is a number, ``auto`` a string)."""
    import yaml

    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise FusionEngineError(f"--executor-param: expected KEY=VALUE, got '{item}'")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return key.strip(), value


def cmd_validate(args) -> int:
    from .preflight import preflight
    from .spec import prepare

    for path in args.specs:
        resolved, _ = prepare(path)
        preflight(resolved, registry=args.registry)
        spec = resolved.spec
        students = f", {_count(len(spec.students), 'student')}" if spec.students else ""
        tracked = f", tracked by {', '.join(resolved.trackers)}" if resolved.trackers else ""
        print(f"{path}: ok ({_count(len(spec.members), 'member')}, {_count(len(spec.fusers), 'fuser')}{students}, "
              f"dataset {spec.data.dataset}{tracked})")
    return 0


def cmd_plugins(args) -> int:
    from .plugins import get_plugins

    if args.spec:
        from .spec import prepare

        _, plugins = prepare(args.spec)
    else:
        plugins = get_plugins()
    if args.params:
        return _plugin_params(plugins, args.params, as_json=args.json)
    rows = plugins.describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _table(["plugin", "version", "source", "hooks"],
           [[row["name"], row["version"] or "", row["distribution"] or row["path"] or "", ", ".join(row["hooks"])]
            for row in rows], title="plugins")
    _table(["kind", "name", "plugin", "description"],
           [[r["kind"], r["name"], row["name"], r["description"]] for row in rows for r in row["records"]],
           title="what they register (fusion-engine plugins --params NAME: a record's parameters)")
    for name, why in plugins.skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    return 0


def _plugin_params(plugins, name: str, *, as_json: bool) -> int:
    from .jsoncodec import encode_json
    from .plugins import describe_params

    catalog = plugins.catalog()
    found = catalog.named(name)
    if not found:
        every = sorted({r.record.name for kind in catalog.records.values() for r in kind.values()})
        close = difflib.get_close_matches(name, every, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise FusionEngineError(f"no plugin registers '{name}'{hint}; `fusion-engine plugins` lists them")
    described = [{"kind": kind, "name": p.record.name, "plugin": p.plugin, "description": p.record.description,
                  "params": describe_params(p.record.params) if getattr(p.record, "params", None) else []}
                 for kind, p in found]
    if as_json:
        print(encode_json(described, indent=2, fallback=str))
        return 0
    for item in described:
        title = f"{item['kind']} {item['name']} ({item['plugin']}): {item['description']}"
        if not item["params"]:
            print(f"{title}\n  no parameters")
            continue
        _table(["param", "type", "default", "constraints", "description"],
               [[f["name"], f["type"], encode_json(f["default"], fallback=str), ", ".join(f["constraints"]),
                 f["description"]] for f in item["params"]], title=title)
    return 0


def _open_registry(args, *, create: bool = False):
    from .zoo import resolve_registry
    from .zoo import Registry

    return Registry(resolve_registry(args.registry), create=create)


def _print_json(data) -> None:
    """``data`` as indented JSON, for reading: numpy values as numbers, anything else the codec
    cannot encode as its ``str``."""
    from .jsoncodec import encode_json

    print(encode_json(data, indent=2, fallback=str))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(columns: list[str], rows: list[list], *, title: str | None = None) -> None:
    """A table on stdout. On a terminal long cells wrap; in a pipe or a file nothing is cut or
    wrapped, whatever the width."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=100_000)
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)


def cmd_zoo(args) -> int:
    from .zoo import ZooError, resolve_registry

    changes = args.zoo_command in ("rm", "gc")  # a registry that is not there has nothing to remove
    if changes and not resolve_registry(args.registry).is_dir():
        raise ZooError(f"no registry at {resolve_registry(args.registry)}")
    if args.zoo_command == "import":
        return zoo_import(args)  # checks everything before it creates a registry
    reg = _open_registry(args, create=changes)
    with reg:
        return _ZOO_COMMANDS[args.zoo_command](args, reg)


def zoo_list(args, reg) -> int:
    usage = reg.usage()
    entries = [{**e.summary(), "runs": usage.get(e.key, 0), "path": str(reg.member_dir(e.key))} for e in reg.entries()]
    if args.json:
        _print_json(entries)
        return 0
    if not entries:
        print(f"the zoo in {reg.root} is empty", file=sys.stderr)
        return 0
    _table(["key", "name", "backbone", "experiment", "dataset", "val_accuracy", "params", "size", "runs", "created"],
           [[e["key"][:16], e["name"], e["backbone"], e["experiment"], e["dataset"],
             "" if e["val_accuracy"] is None else f"{e['val_accuracy']:.4f}",
             "" if e["n_params"] is None else f"{e['n_params']:,}", _size(e["bytes"]), e["runs"],
             e["created"][:19].replace("T", " ")]
            for e in entries], title=f"zoo in {reg.root}: {len(entries)} members")
    return 0


def zoo_show(args, reg) -> int:
    from .zoo import ZooError

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
        _print_json(data)
        return 0 if check == "ok" else 1
    for field in ("key", "name", "experiment", "run_id", "backbone", "dataset", "val_accuracy", "n_params", "created", "path"):
        print(f"{field:>13}: {data[field]}")
    print(f"{'size':>13}: {_size(entry.bytes)} in {len(entry.files)} files")
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


def zoo_export(args, reg) -> int:
    from .zoo.exchange import export_member

    entry, folder = export_member(reg, args.ref, Path(args.out))
    if args.json:
        _print_json({"key": entry.key, "name": entry.name, "folder": str(folder)})
    else:
        print(f"exported {entry.name} ({entry.key}) to {folder}")
    return 0


def zoo_import(args) -> int:
    """``zoo import``: a spec's weights/predictions members, or exported folders. Everything is
    checked before the registry is created or written."""
    from .zoo import resolve_registry
    from .zoo.exchange import import_member, read_export

    specs = [s for s in args.sources if Path(s).suffix.lower() in (".yaml", ".yml", ".toml")]
    if specs and len(args.sources) > 1:
        raise FusionEngineError("zoo import: give one spec, or folders written by zoo export, not both")
    if args.member and not specs:
        raise FusionEngineError("zoo import: --member picks members of a spec; the sources are exported folders")
    done = []
    if specs:
        from .members import import_members, importable
        from .preflight import preflight
        from .spec import prepare

        resolved, _ = prepare(specs[0])
        importable(resolved, args.member)
        checked = preflight(resolved, registry=resolve_registry(args.registry))
        with _open_registry(args, create=True) as reg:
            for name, member in import_members(resolved, reg, args.member, checked=checked).items():
                done.append({"key": member.key, "name": name, "source": member.source,
                             "new": member.action != "reused"})
    else:
        for folder in args.sources:
            read_export(Path(folder))
        with _open_registry(args, create=True) as reg:
            for folder in args.sources:
                entry, new = import_member(reg, Path(folder))
                done.append({"key": entry.key, "name": entry.name, "source": "export", "new": new})
    if args.json:
        _print_json(done)
    else:
        for item in done:
            print(f"{'imported' if item['new'] else 'already in the zoo:'} {item['name']} ({item['key']})")
    return 0


def cmd_split(args) -> int:
    from .data import check_split_path, load_dataset, write_split_ids
    from .spec import prepare

    check_split_path(Path(args.out))
    resolved, _ = prepare(args.spec)
    dataset, indices = load_dataset(resolved)
    path = write_split_ids(dataset, indices, Path(args.out))
    sizes = ", ".join(f"{len(idx)} {s}" for s, idx in indices.items())
    print(f"{path}: {sizes}")
    return 0


def zoo_rm(args, reg) -> int:
    entry = reg.resolve(args.ref, names=False)
    freed = reg.remove(entry.key)
    if args.json:
        _print_json({"removed": entry.key, "name": entry.name, "bytes_freed": freed})
    else:
        print(f"removed {entry.key} ({entry.name}); freed {_size(freed)}")
    return 0


def zoo_gc(args, reg) -> int:
    from .zoo.gc import collect

    report = collect(reg, dry_run=args.dry_run, checkpoints=args.checkpoints, cache=args.cache)
    if args.json:
        _print_json(report.as_dict())
        return 0
    verb = "would remove" if report.dry_run else "removed"
    for item in report.removed:
        print(f"{verb} {item['path']} ({item['what']}, {_size(item['bytes'])})")
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
    print(f"{'would free' if report.dry_run else 'freed'} {report.bytes_freed} bytes ({_size(report.bytes_freed)})")
    return 0


def cmd_runs(args) -> int:
    with _open_registry(args) as reg:
        runs = reg.runs(experiment=args.experiment)
    if args.json:
        _print_json(runs)
        return 0
    if not runs:
        print(f"no runs recorded in {reg.root}", file=sys.stderr)
        return 0
    _table(["run_id", "experiment", "status", "created", "members", "trained", "reused", "fusers", "seconds"],
           [[r["run_id"], r["experiment"], r["status"], r["created"][:19].replace("T", " "), r["n_members"], r["n_trained"],
             r["n_reused"], r["n_fusers"], "" if r["seconds"] is None else f"{r['seconds']:.1f}"] for r in runs])
    return 0


def _complete_run(args) -> tuple[dict, Path]:
    """The run RUN_ID (or a unique prefix) names, or the latest complete one of --experiment."""
    from .zoo import ZooError

    with _open_registry(args) as reg:
        if args.run:
            try:
                run = reg.find_run(args.run)
            except ZooError:
                from .runfolder import unindexed_run

                run = unindexed_run(reg, args.run)
                if run is None:
                    raise
        else:
            run = reg.latest_run(args.experiment)
        run_dir = reg.run_dir(run["run_id"])
    if run["status"] != "complete":
        raise FusionEngineError(f"run {run['run_id']} is {run['status']}: it has no leaderboard")
    return run, run_dir


def cmd_report(args) -> int:
    from .plots import write_plots
    from .report import write_report

    _, run_dir = _complete_run(args)
    print(write_report(run_dir, write_plots(run_dir), budget_ms=args.budget))
    return 0


def cmd_leaderboard(args) -> int:
    from .runfolder import RunFolder

    if args.budget is not None and args.format not in ("table", "json"):
        raise FusionEngineError(f"leaderboard: --budget prints with --format table or json, not {args.format}")
    run, run_dir = _complete_run(args)
    if args.budget is not None:
        from .leaderboard import best_within_budget

        folder = RunFolder.complete(run_dir)
        choice = best_within_budget(folder.rows, args.budget, ranked_by=folder.leaderboard.get("ranked_by", "accuracy"))
        if args.format == "json":
            _print_json(choice.as_dict())
            return 0
    if args.format != "table":
        folder = RunFolder(run_dir)
        try:
            sys.stdout.write(folder.leaderboard_text(args.format))
        except OSError as exc:
            raise FusionEngineError(f"cannot read {folder.leaderboard_path(args.format)}: {exc.strerror or exc}") from None
        return 0
    from .leaderboard import print_leaderboard

    folder = RunFolder.complete(run_dir)
    board = folder.leaderboard_frame()
    sizes = board.attrs.get("split_sizes") or {}
    print_leaderboard(board, title=f"{board.attrs.get('experiment', run['experiment'])} ({run['run_id']}): "
                                   f"scored on {sizes.get('test', '?')} test samples")
    if args.budget is not None:
        print(choice.sentence(int(round(100 * board.attrs.get("confidence", 0.95)))))
    return 0


# -- export and predict: shipping a row (fusion_engine.deploy) ----------------------------------------

def _deploy_parsers(sub) -> None:
    export = sub.add_parser(
        "export", help="write a leaderboard row as a folder that predicts new images",
        description="Export a row of a complete run (default: its best fuser) as a self-contained, versioned folder: "
                    "member weights, the fuser's state, the card, checksums; with --onnx one ONNX graph of it all. "
                    "The export predicts some of the run's test images to check itself.")
    export.add_argument("run", metavar="RUN_ID", help="a run id or a unique prefix of one")
    export.add_argument("row", metavar="ROW", nargs="?", help="the row to export (default: the best fuser)")
    export.add_argument("--out", "-o", metavar="DIR", required=True, help="the folder to write (new, or empty)")
    export.add_argument("--onnx", action="store_true", help="also write model.onnx: members and fuser as one graph")
    export.add_argument("--onnx-input", choices=["uint8", "float32"], default="uint8",
                        help="the graph's image type: uint8 0..255 (default) or float32 0..1")
    export.add_argument("--force", action="store_true", help="replace DIR if it exists")
    export.add_argument("--check", metavar="N", type=int, default=64,
                        help="predict N of the run's test images to check the export (default 64; 0: no check)")
    export.add_argument("--quiet", "-q", action="store_true", help="print only the folder")
    export.add_argument("--mlflow", action="store_true",
                        help="also log the export as an MLflow pyfunc model and print its model URI (docs/deploying.md)")
    export.add_argument("--mlflow-uri", metavar="URI", help="the MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                                            "the registry's mlflow/mlflow.db)")
    export.add_argument("--mlflow-experiment", metavar="NAME", help="the MLflow experiment (default: the run's experiment)")
    export.add_argument("--mlflow-register", metavar="NAME", help="also register the model under NAME")
    _registry_option(export)

    predict = sub.add_parser(
        "predict", help="predict images with an exported ensemble",
        description="Predict image files, folders (recursive) or CSV manifests (a 'path' column) with a folder written "
                    "by fusion-engine export. One row per image; an unreadable image gets a row saying why (exit "
                    "status 1) and the others go on.")
    predict.add_argument("dir", metavar="DIR", help="an exported ensemble")
    predict.add_argument("inputs", metavar="INPUT", nargs="+", help="image files, folders or CSV manifests")
    predict.add_argument("--out", "-o", metavar="FILE", help="a .csv, .parquet or .json file (default: CSV on stdout)")
    predict.add_argument("--top-k", metavar="K", type=int, default=3, help="the K most probable classes per image (default 3)")
    predict.add_argument("--probs", action="store_true", help="also every class's probability")
    predict.add_argument("--batch-size", "-b", metavar="B", type=int, default=64, help="images per batch (default 64)")
    predict.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to predict (default auto)")
    predict.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                         help="torch (the members' plugins) or onnx (the folder's model.onnx in ONNX Runtime)")
    predict.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary line")


def cmd_export(args) -> int:
    from rich.console import Console

    from .deploy.export import export_ensemble

    if args.check < 0:
        raise FusionEngineError(f"--check must be 0 or more, got {args.check}")
    target = _mlflow_target(args)  # before the folder is written: a bad URI leaves nothing behind
    console = Console(stderr=True, quiet=args.quiet, log_path=False)
    result = export_ensemble(args.run, args.row, out=args.out, registry=args.registry, onnx=args.onnx,
                             onnx_input=args.onnx_input, force=args.force, check_images=args.check, console=console)
    print(result.path)
    if target is not None:
        from .zoo import resolve_registry

        try:
            logged = target.log(result.path, run_dir=resolve_registry(args.registry) / "runs" / result.card.run_id)
        except Exception as exc:
            raise FusionEngineError(f"the export {result.path} is complete, but logging it to MLflow failed: "
                                    f"{_one_line(str(exc)) or type(exc).__name__}") from None
        print(logged.model_uri)
        if logged.registered_uri:
            print(logged.registered_uri)
        console.print(f"logged to MLflow at {logged.tracking_uri} (experiment {logged.experiment_id}, run "
                      f"{logged.run_id}); load it with MLFLOW_TRACKING_URI={logged.tracking_uri} and "
                      f"mlflow.pyfunc.load_model('{logged.model_uri}'), or from {logged.artifact_uri}",
                      highlight=False, soft_wrap=True)
    return 0


def _mlflow_target(args):
    """``export --mlflow``: where the model goes, checked (the first-party mlflow plugin's
    :func:`fusion_engine_mlflow.models.model_target`); None without ``--mlflow``."""
    given = [f"--{name.replace('_', '-')}" for name in ("mlflow_uri", "mlflow_experiment", "mlflow_register")
             if getattr(args, name) is not None]
    if not args.mlflow:
        if given:
            raise FusionEngineError(f"{given[0]} needs --mlflow")
        return None
    from fusion_engine_mlflow.models import model_target

    from .zoo import resolve_registry

    return model_target(args.mlflow_uri, args.mlflow_experiment, args.mlflow_register,
                        registry=resolve_registry(args.registry))


def cmd_predict(args) -> int:
    from .deploy.predict import predict_command

    return predict_command(args)


_ZOO_COMMANDS = {"list": zoo_list, "show": zoo_show, "rm": zoo_rm, "gc": zoo_gc, "export": zoo_export}
_COMMANDS = {"run": cmd_run, "split": cmd_split, "validate": cmd_validate, "plugins": cmd_plugins, "zoo": cmd_zoo, "runs": cmd_runs,
             "leaderboard": cmd_leaderboard, "report": cmd_report, "export": cmd_export, "predict": cmd_predict}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
