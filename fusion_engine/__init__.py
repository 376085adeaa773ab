"""fusion-engine: a plugin-based model-zoo ensembling engine for image classification.

The public API is what this module exports: the one list below, name -> module. Plugins
(first-party ones too) import only these names. Names load lazily, so importing
``fusion_engine`` (and running ``fusion-engine --help``, ``validate`` or ``plugins``) never
imports torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # writing plugins: the hook marker and the records register_* hooks return
    "hookimpl": "hookspecs",
    "BackboneRecord": "records",
    "BuiltBackbone": "records",
    "DatasetRecord": "records",
    "ExecutorRecord": "records",
    "FuserRecord": "records",
    "ImageDataset": "records",
    "InputConfig": "records",
    "MetricRecord": "records",
    "TrackerRecord": "records",
    "NoParams": "records",
    "Params": "records",
    "params_from_signature": "records",
    "SPLITS": "records",
    "SCORED_SPLITS": "records",
    # fusers
    "Fuser": "fuser",
    "check_logits": "fuser",
    "StackingFuser": "stacking",
    "StackingParams": "stacking",  # kept for stackers written against 0.1; new ones need no Params model
    "cross_val_proba": "crossfit",
    "TemperatureScaled": "calibration",
    "fit_temperature": "calibration",
    "apply_temperature": "calibration",
    # metrics the core computes
    "accuracy": "evaluation",
    "nll": "evaluation",
    "expected_calibration_error": "evaluation",
    # members trained elsewhere: the images as the engine feeds them, weights files
    "load_images": "preprocess",
    "image_files": "preprocess",
    "decode_images": "preprocess",
    "IMAGE_EXTENSIONS": "preprocess",
    "read_state_dict": "weights",
    "read_weight_shapes": "weights",
    "weights_mismatch": "weights",
    "WEIGHT_SUFFIXES": "weights",
    # errors
    "FusionEngineError": "errors",
    "PluginError": "errors",
    "SpecError": "errors",
    "UnreadableImage": "errors",
    # plugins and specs
    "get_plugins": "plugins",
    "loaded_plugin_files": "plugins",
    "import_plugin_source": "plugins",
    "ExperimentSpec": "spec",
    "load_spec": "specfile",
    "resolve_spec": "resolve",
    # running, and executors that train members
    "run_experiment": "runner",
    "RunContext": "runner",
    "Tracker": "tracking",
    "MemberResult": "members",
    "Executor": "executors",
    "LocalExecutor": "executors",
    "MemberJob": "executors",
    "FittedMember": "executors",
    "JobOutcome": "executors",
    "fit_member": "executors",
    "ImageSet": "imagesets",
    "share_memory_budget": "imagesets",
    # what a run leaves: the zoo and the run folder
    "Registry": "zoo",
    "MemberCard": "zoo",
    "RunFolder": "runfolder",
    "RunMemberCard": "runfolder",
    "write_plots": "plots",
    "write_report": "report",
    # values as JSON: numpy scalars and arrays, paths, as the engine writes them
    "encode_json": "jsoncodec",
    # shipping a row: export it, load it, predict with it; what a fuser writes its ONNX graph with
    "export_ensemble": "deploy.export",
    "load": "deploy.ensemble",
    "Ensemble": "deploy.ensemble",
    "ExportCard": "deploy.card",
    "FuserGraph": "deploy.graph",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fusion_engine' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
