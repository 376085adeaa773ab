"""fusion-engine: a plugin-based model-zoo ensembling engine for image classification.

The public API is what this module exports. Names load lazily, so importing ``fusion_engine``
(and running ``fusion-engine --help``, ``validate`` or ``plugins``) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    # hooks and records
    "hookimpl": "hookspecs",
    "hookspec": "hookspecs",
    "BackboneRecord": "records",
    "BuiltBackbone": "records",
    "DatasetRecord": "records",
    "ExecutorRecord": "records",
    "FuserRecord": "records",
    "ImageDataset": "records",
    "InputConfig": "records",
    "MetricRecord": "records",
    "NoParams": "records",
    "Params": "records",
    # fusers
    "Fuser": "fuser",
    "check_logits": "fuser",
    "StackingFuser": "stacking",
    "StackingParams": "stacking",
    "cross_val_proba": "crossfit",
    "TemperatureScaled": "calibration",
    "fit_temperature": "calibration",
    "apply_temperature": "calibration",
    # errors
    "FusionEngineError": "errors",
    "PluginError": "errors",
    "SpecError": "errors",
    # plugins and specs
    "get_plugins": "plugins",
    "ExperimentSpec": "spec",
    "load_spec": "spec",
    "resolve_spec": "spec",
    # evaluation
    "write_plots": "plots",
    "write_report": "report",
    # running
    "run_experiment": "runner",
    "RunContext": "runner",
    "MemberResult": "runner",
    "Executor": "executors",
    "MemberJob": "executors",
    "JobOutcome": "executors",
    "fit_member": "executors",
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


if TYPE_CHECKING:  # pragma: no cover
    from .errors import FusionEngineError, PluginError, SpecError
    from .calibration import TemperatureScaled, apply_temperature, fit_temperature
    from .crossfit import cross_val_proba
    from .fuser import Fuser, check_logits
    from .plots import write_plots
    from .report import write_report
    from .stacking import StackingFuser, StackingParams
    from .hookspecs import hookimpl, hookspec
    from .plugins import get_plugins
    from .records import (BackboneRecord, BuiltBackbone, DatasetRecord, ExecutorRecord, FuserRecord, ImageDataset,
                          InputConfig, MetricRecord, NoParams, Params)
    from .executors import Executor, JobOutcome, MemberJob, fit_member
    from .runner import MemberResult, RunContext, run_experiment
    from .spec import ExperimentSpec, load_spec, resolve_spec
