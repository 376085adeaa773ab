"""``export`` and ``predict``: shipping a leaderboard row (:mod:`fusion_engine.deploy`)."""

from __future__ import annotations

from ..errors import FusionEngineError
from .output import one_line
from .registry import registry_option


def add_export_parser(sub) -> None:
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
    registry_option(export)


def cmd_export(args) -> int:
    from rich.console import Console

    from ..deploy.export import export_ensemble

    if args.check < 0:
        raise FusionEngineError(f"--check must be 0 or more, got {args.check}")
    target = _mlflow_target(args)  # before the folder is written: a bad URI leaves nothing behind
    console = Console(stderr=True, quiet=args.quiet, log_path=False)
    result = export_ensemble(args.run, args.row, out=args.out, registry=args.registry, onnx=args.onnx,
                             onnx_input=args.onnx_input, force=args.force, check_images=args.check, console=console)
    print(result.path)
    if target is not None:
        from ..zoo import resolve_registry

        try:
            logged = target.log(result.path, run_dir=resolve_registry(args.registry) / "runs" / result.card.run_id)
        except Exception as exc:
            raise FusionEngineError(f"the export {result.path} is complete, but logging it to MLflow failed: "
                                    f"{one_line(str(exc)) or type(exc).__name__}") from None
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

    from ..zoo import resolve_registry

    return model_target(args.mlflow_uri, args.mlflow_experiment, args.mlflow_register,
                        registry=resolve_registry(args.registry))


def add_predict_parser(sub) -> None:
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


def cmd_predict(args) -> int:
    from ..deploy.predict import predict_command

    return predict_command(args)
