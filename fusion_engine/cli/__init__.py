"""``fusion-engine``: run, validate, list plugins, and look after the registry (zoo, runs, leaderboards).

Imports stay light until a command needs more: ``--help``, ``validate`` and ``plugins`` never
import torch. This module holds :func:`main` (its error handling and warnings) and the parser
assembled from the commands' modules.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from .. import __version__
from ..errors import RUN_LOG_ONLY, RUN_STARTED, FusionEngineError
from . import deploy, experiment, plugins, runs, zoo
from .output import one_line
from .parsing import CommandParser, UsageError

__all__ = ["UsageError", "main"]

# every command: its parser (added in this order, the order of --help) and what runs it
_COMMANDS = {
    "run": (experiment.add_run_parser, experiment.cmd_run),
    "validate": (experiment.add_validate_parser, experiment.cmd_validate),
    "plugins": (plugins.add_plugins_parser, plugins.cmd_plugins),
    "zoo": (zoo.add_zoo_parser, zoo.cmd_zoo),
    "split": (experiment.add_split_parser, experiment.cmd_split),
    "runs": (runs.add_runs_parser, runs.cmd_runs),
    "leaderboard": (runs.add_leaderboard_parser, runs.cmd_leaderboard),
    "report": (runs.add_report_parser, runs.cmd_report),
    "export": (deploy.add_export_parser, deploy.cmd_export),
    "predict": (deploy.add_predict_parser, deploy.cmd_predict),
}


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="fusion-engine",
        description="Train a zoo of image classifiers, fuse them, and score every fusion honestly on one untouched test split.",
    )
    parser.add_argument("--version", action="version", version=f"fusion-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    for add_parser, _ in _COMMANDS.values():
        add_parser(sub)
    return parser


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
                code = _COMMANDS[args.command][1](args)
            except FusionEngineError as exc:
                print(one_line(str(exc)), file=sys.stderr)
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
