"""The commands that read recorded runs: ``runs list``, ``leaderboard`` and ``report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import FusionEngineError
from .output import print_json, print_table
from .parsing import CommandParser
from .registry import open_registry, registry_option


def add_runs_parser(sub) -> None:
    runs = sub.add_parser("runs", help="list recorded runs", description="Runs recorded in the registry index.")
    runs_sub = runs.add_subparsers(dest="runs_command", metavar="RUNS_COMMAND", required=True, parser_class=CommandParser)
    runs_list = runs_sub.add_parser("list", help="every recorded run, oldest first")
    runs_list.add_argument("--experiment", metavar="NAME", help="only the runs of this experiment")
    registry_option(runs_list, json_option=True)


def add_leaderboard_parser(sub) -> None:
    board = sub.add_parser("leaderboard", help="print a run's leaderboard from the registry",
                           description="Print the leaderboard of a run: RUN_ID (or a unique prefix), or the latest "
                                       "complete run of --experiment, or the latest complete run.")
    _run_selector(board)
    board.add_argument("--format", choices=["table", "md", "csv", "json"], default="table", help="output format (default: table)")
    board.add_argument("--budget", type=_milliseconds, metavar="MS",
                       help="also name the best row (chosen on val) whose inference cost fits MS milliseconds per "
                            "image, with its test accuracy and interval (--format table or json)")
    registry_option(board)


def add_report_parser(sub) -> None:
    report = sub.add_parser("report", help="draw a run's plots and report.html again from the registry",
                            description="Re-render plots/ and report.html of a run from its run folder; prints the "
                                        "report's path.")
    _run_selector(report)
    report.add_argument("--budget", type=_milliseconds, metavar="MS",
                        help="name the best row within MS milliseconds per image in the report (default: the spec's "
                             "budget_ms)")
    registry_option(report)


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


def cmd_runs(args) -> int:
    with open_registry(args) as reg:
        runs = reg.runs(experiment=args.experiment)
    if args.json:
        print_json(runs)
        return 0
    if not runs:
        print(f"no runs recorded in {reg.root}", file=sys.stderr)
        return 0
    print_table(["run_id", "experiment", "status", "created", "members", "trained", "reused", "fusers", "seconds"],
                [[r["run_id"], r["experiment"], r["status"], r["created"][:19].replace("T", " "), r["n_members"],
                  r["n_trained"], r["n_reused"], r["n_fusers"], "" if r["seconds"] is None else f"{r['seconds']:.1f}"]
                 for r in runs])
    return 0


def _complete_run(args) -> tuple[dict, Path]:
    """The run RUN_ID (or a unique prefix) names, or the latest complete one of --experiment."""
    from ..zoo import ZooError

    with open_registry(args) as reg:
        if args.run:
            try:
                run = reg.find_run(args.run)
            except ZooError:
                from ..runfolder import unindexed_run

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
    from ..plots import write_plots
    from ..report import write_report

    _, run_dir = _complete_run(args)
    print(write_report(run_dir, write_plots(run_dir), budget_ms=args.budget))
    return 0


def cmd_leaderboard(args) -> int:
    from ..runfolder import RunFolder

    if args.budget is not None and args.format not in ("table", "json"):
        raise FusionEngineError(f"leaderboard: --budget prints with --format table or json, not {args.format}")
    run, run_dir = _complete_run(args)
    if args.budget is not None:
        from ..leaderboard import best_within_budget

        folder = RunFolder.complete(run_dir)
        choice = best_within_budget(folder.rows, args.budget, ranked_by=folder.leaderboard.get("ranked_by", "accuracy"))
        if args.format == "json":
            print_json(choice.as_dict())
            return 0
    if args.format != "table":
        folder = RunFolder(run_dir)
        try:
            sys.stdout.write(folder.leaderboard_text(args.format))
        except OSError as exc:
            raise FusionEngineError(f"cannot read {folder.leaderboard_path(args.format)}: {exc.strerror or exc}") from None
        return 0
    from ..leaderboard import print_leaderboard

    folder = RunFolder.complete(run_dir)
    board = folder.leaderboard_frame()
    sizes = board.attrs.get("split_sizes") or {}
    print_leaderboard(board, title=f"{board.attrs.get('experiment', run['experiment'])} ({run['run_id']}): "
                                   f"scored on {sizes.get('test', '?')} test samples")
    if args.budget is not None:
        print(choice.sentence(int(round(100 * board.attrs.get("confidence", 0.95)))))
    return 0
