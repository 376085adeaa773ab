"""``fusion-engine``: run, validate and list plugins.

Imports stay light until a command needs more: ``--help``, ``validate`` and ``plugins`` never
import torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import FusionEngineError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusion-engine",
        description="Train a zoo of image classifiers, fuse them, and score every fusion honestly on one untouched test split.",
    )
    parser.add_argument("--version", action="version", version=f"fusion-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="train the members, fit the fusers, write the leaderboard",
                         description="Run an experiment spec: train what is missing, fit every fuser, write a leaderboard.")
    run.add_argument("spec", metavar="SPEC", help="experiment spec (.yaml, .yml or .toml)")
    run.add_argument("--registry", metavar="DIR", help="registry folder (default: $FUSION_ENGINE_REGISTRY or ./registry)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train and predict (default: the spec's, else auto)")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress or table; print only the run folder")

    validate = sub.add_parser("validate", help="check specs without running them",
                              description="Check specs: fields, plugin names and plugin parameters. Imports no torch.")
    validate.add_argument("specs", nargs="+", metavar="SPEC")

    plugins = sub.add_parser("plugins", help="list installed plugins and what they register")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.add_argument("--spec", metavar="SPEC", help="also load the plugin files this spec lists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _log_warnings_to_stderr()
    try:
        return _COMMANDS[args.command](args)
    except FusionEngineError as exc:
        print(_one_line(str(exc)), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _log_warnings_to_stderr() -> None:
    """Warnings (a skipped plugin, an ignored field) on stderr; the run's INFO log goes to its run.log."""
    logger = logging.getLogger("fusion_engine")
    if not any(getattr(h, "_fusion_engine_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        handler._fusion_engine_cli = True
        logger.addHandler(handler)
        logger.propagate = False


def _one_line(message: str) -> str:
    return " ".join(message.split())


def cmd_run(args) -> int:
    from .runner import run_experiment

    result = run_experiment(args.spec, registry=args.registry, device=args.device, quiet=args.quiet)
    print(result.run_dir)
    return 0


def cmd_validate(args) -> int:
    from .runner import prepare

    for path in args.specs:
        resolved, _ = prepare(path)
        spec = resolved.spec
        print(f"{path}: ok ({len(spec.members)} members, {len(spec.fusers)} fusers, dataset {spec.data.dataset})")
    return 0


def cmd_plugins(args) -> int:
    from .plugins import get_plugins

    if args.spec:
        from .runner import prepare

        _, plugins = prepare(args.spec)
    else:
        plugins = get_plugins()
    rows = plugins.describe()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("plugin", "version", "hooks", "registers")
    for row in rows:
        provides = "; ".join(f"{k}: {', '.join(row[k])}" for k in ("backbones", "fusers", "datasets", "metrics") if k in row)
        version = row["version"] or (Path(row["path"]).name if row["path"] else "")
        table.add_row(row["name"], version, ", ".join(row["hooks"]), provides)
    Console().print(table)
    for name, why in plugins.skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    return 0


_COMMANDS = {"run": cmd_run, "validate": cmd_validate, "plugins": cmd_plugins}
