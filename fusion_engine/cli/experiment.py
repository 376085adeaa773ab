"""The commands that take experiment specs: ``run``, ``validate`` and ``split``."""

from __future__ import annotations

from pathlib import Path

from ..errors import FusionEngineError
from .output import format_count


def add_run_parser(sub) -> None:
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


def cmd_run(args) -> int:
    from ..runner import run_experiment

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


def add_validate_parser(sub) -> None:
    validate = sub.add_parser("validate", help="check specs without running them",
                              description="Check specs as a run would before training: fields, plugin names and "
                                          "params, the dataset's files and split, each member's backbone and weight "
                                          "files, zoo references. Nothing is trained, decoded or written.")
    validate.add_argument("specs", nargs="+", metavar="SPEC")
    validate.add_argument("--registry", metavar="DIR", help="where zoo: members are looked up (default: "
                                                            "$FUSION_ENGINE_REGISTRY or ./registry)")


def cmd_validate(args) -> int:
    from ..preflight import preflight
    from ..resolve import prepare

    for path in args.specs:
        resolved, _ = prepare(path)
        preflight(resolved, registry=args.registry)
        spec = resolved.spec
        students = f", {format_count(len(spec.students), 'student')}" if spec.students else ""
        tracked = f", tracked by {', '.join(resolved.trackers)}" if resolved.trackers else ""
        print(f"{path}: ok ({format_count(len(spec.members), 'member')}, {format_count(len(spec.fusers), 'fuser')}"
              f"{students}, dataset {spec.data.dataset}{tracked})")
    return 0


def add_split_parser(sub) -> None:
    split = sub.add_parser("split", help="write the sample ids of train, val and test",
                           description="Write the sample ids of a spec's split (what a predictions: file must hold for "
                                       "val and test), with each sample's split, label and, for image files, path.")
    split.add_argument("spec", metavar="SPEC")
    split.add_argument("--out", metavar="FILE", required=True, help="a .csv, .parquet or .json file to write")


def cmd_split(args) -> int:
    from ..data import check_split_path, load_dataset, write_split_ids
    from ..resolve import prepare

    check_split_path(Path(args.out))
    resolved, _ = prepare(args.spec)
    dataset, indices = load_dataset(resolved)
    path = write_split_ids(dataset, indices, Path(args.out))
    sizes = ", ".join(f"{len(idx)} {s}" for s, idx in indices.items())
    print(f"{path}: {sizes}")
    return 0
