"""Typed records that plugins return from the ``register_*`` hooks.

A record says what a plugin provides (a name, its ``Params`` model, the thing itself); the core
adds which plugin provided it, so duplicates and listings can name the provider.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationInfo, create_model, field_validator

from .errors import PluginError

#: the three splits of every run: members train on train, choose their epoch on val, are scored on test
SPLITS = ("train", "val", "test")
#: the splits every member predicts and every row is scored on
SCORED_SPLITS = ("val", "test")


class StrictModel(BaseModel):
    """Base for every model a spec is validated with: unknown keys are errors, ``true`` or
    ``false`` is never read as a number (pydantic would take ``lr: true`` as 1.0, and
    ``in_chans: true`` as ``Literal[1, 3]``'s 1), a number is never read as a boolean
    (``small_input: 1``), and infinities and NaN are not numbers a spec can give (``lr: .inf``).
    Numbers written as strings (YAML reads ``1e-3`` as one) are still read as numbers."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and bool_as_number(field.annotation, value):
            raise ValueError("expected a number, not true or false")
        if field is not None and number_as_bool(field.annotation, value):
            raise ValueError("expected true or false, not a number")
        return value


def bool_as_number(annotation: Any, value: Any) -> bool:
    """Whether ``value`` puts a boolean where ``annotation`` expects a number (and no boolean)."""
    annotation = _bare(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(annotation)
        if isinstance(value, bool):
            return any(_numeric(a) for a in arms) and not any(_admits_bool(a) for a in arms)
        return any(bool_as_number(a, value) for a in arms if _container_for(a, value))
    if isinstance(value, bool):
        return _numeric(annotation)
    if origin in (list, tuple, set, frozenset, Sequence) and isinstance(value, (list, tuple)):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return any(bool_as_number(args[min(i, len(args) - 1)], v) for i, v in enumerate(value)) if args else False
    if origin is dict and isinstance(value, dict):
        args = typing.get_args(annotation)
        return bool(args) and any(bool_as_number(args[1], v) for v in value.values())
    return False


def number_as_bool(annotation: Any, value: Any) -> bool:
    """Whether ``value`` is a number (not a boolean) where ``annotation`` takes a boolean and no
    number (pydantic reads 1 and 0 as true and false)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    annotation = _bare(annotation)
    arms = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    arms = tuple(_bare(a) for a in arms)
    return bool in arms and not any(_numeric(a) or a is Any for a in arms)


def _bare(annotation: Any) -> Any:
    """``Annotated[X, ...]`` -> ``X``."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _numeric(annotation: Any) -> bool:
    """A number type, or a ``Literal`` of numbers only (``Literal[1, 3]``, which pydantic matches
    ``True`` against as 1)."""
    annotation = _bare(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        values = typing.get_args(annotation)
        return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return isinstance(annotation, type) and issubclass(annotation, (int, float)) and not issubclass(annotation, bool)


def _admits_bool(annotation: Any) -> bool:
    annotation = _bare(annotation)
    return annotation is Any or annotation is bool


def _container_for(annotation: Any, value: Any) -> bool:
    origin = typing.get_origin(_bare(annotation))
    return (origin in (list, tuple, set, frozenset, Sequence) and isinstance(value, (list, tuple))) or \
        (origin is dict and isinstance(value, dict))


class Params(StrictModel):
    """Base for plugin parameter models: unknown keys are errors, as everywhere in a spec, and
    booleans are not numbers."""


class NoParams(Params):
    """For plugins that take no parameters."""


def params_from_signature(cls: type) -> type[Params]:
    """The :class:`Params` model of ``cls(**params)``, read off ``cls.__init__``: one field per
    keyword parameter, with its annotation (constraints and descriptions in
    ``Annotated[..., Field(...)]``) and its default. ``__init__`` is then the one place a
    parameter, its type and its default are written, as in scikit-learn."""
    init = cls.__init__
    if init is object.__init__:
        return NoParams
    try:
        hints = typing.get_type_hints(init, include_extras=True)
    except NameError as exc:  # a string annotation naming something the module does not import
        raise PluginError(f"cannot read the parameters of {cls.__name__}.__init__: {exc} (import it at the top of "
                          f"{cls.__module__})") from None
    fields: dict[str, Any] = {}
    for p in inspect.signature(init).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        fields[p.name] = (hints.get(p.name, Any), ... if p.default is p.empty else p.default)
    model = create_model(f"{cls.__name__}Params", __base__=Params, __module__=cls.__module__, **fields)
    model.__doc__ = f"The parameters of ``{cls.__name__}.__init__``."
    return model


def normalize_name(name: str) -> str:
    """Names compare case-insensitively, with ``_`` and ``-`` the same: ``Logistic_Stacking``."""
    return re.sub(r"[_\s]+", "-", name.strip().lower())


@dataclass(frozen=True)
class InputConfig:
    """What a backbone expects: square input size, channels, normalisation, and how an image is
    prepared for evaluation (:mod:`fusion_engine.preprocess`).

    ``interpolation``, ``crop_pct`` and ``crop_mode`` are timm's data-config names. Their
    defaults (bilinear, 1.0, squash) resize the whole image to a square: the small-image path.
    A backbone's own values (a timm model's data config: bicubic, 0.875, center, say) apply on
    the photo path: the shorter side resized to ``size / crop_pct``, then a centre crop.
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int = 3
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "squash"


@dataclass
class BuiltBackbone:
    """A freshly built network (a ``torch.nn.Module``) and the input it expects."""

    module: Any
    input: InputConfig


@dataclass(frozen=True)
class BackboneRecord:
    """``build(params, num_classes=..., image_size=...)`` returns a :class:`BuiltBackbone`.

    ``image_size`` is the spec's ``data.image_size`` or ``None``; a factory uses it where the
    architecture adapts to the input (``small_input``), and reports the size it expects.

    ``input_config(params, image_size=...)``, optional, returns the :class:`InputConfig` that
    ``build`` would report, without building the network (timm reads it from the model's
    pretrained config). Without it, the engine builds the network once to ask.

    ``check(params, num_classes=..., image_size=...)``, optional, checks what can be checked
    without training (weight files against the architecture, say) before a run starts and in
    ``validate``: it raises :class:`~fusion_engine.FusionEngineError` naming the problem, and
    logs warnings on the ``fusion_engine`` logger.

    ``weights(params) -> dict | None``, optional, identifies the pretrained weights ``params``
    select from somewhere other than a file the params name (a model hub's cache): a JSON
    mapping that says which weights exactly (``{"source": "hf-hub", "repo": ..., "revision":
    <commit>, "file": ..., "sha256": ...}``), ``None`` for none. It enters the member's zoo
    key, and a worker that trains the member checks it finds the same weights. Raise
    :class:`~fusion_engine.FusionEngineError` (one line) when they cannot be found.
    """

    name: str
    build: Callable[..., BuiltBackbone]
    params: type[Params] = NoParams
    description: str = ""
    input_config: Callable[..., InputConfig] | None = None
    check: Callable[..., None] | None = None
    weights: Callable[..., dict | None] | None = None


@dataclass(frozen=True)
class FuserRecord:
    """``cls(**params)`` is a fresh, unfitted fuser (see :class:`fusion_engine.Fuser`).

    A fuser's parameters are ``cls.__init__``'s keyword parameters, and ``params`` is the model
    read off them (:func:`params_from_signature`). A model given as ``params`` (plugins written
    against 0.1 give one) is accepted only when its fields match the signature's: the same names,
    defaults, types and constraints; any difference is a :class:`PluginError` naming the field and
    both values, so the two cannot drift apart.
    """

    name: str
    cls: type
    params: type[Params] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.params is None:
            object.__setattr__(self, "params", params_from_signature(self.cls))
            return
        if not (isinstance(self.params, type) and issubclass(self.params, Params)):
            raise PluginError(f"fuser {self.name}: params must be a fusion_engine.Params model, not {self.params!r} "
                              f"(or leave it out: it is read off {self.cls.__name__}.__init__)")
        try:
            derived = params_from_signature(self.cls)
        except PluginError:  # annotations this process cannot evaluate (names imported for type checkers only)
            return
        mismatch = _params_mismatch(self.params, derived, f"{self.cls.__name__}.__init__")
        if mismatch:
            raise PluginError(f"fuser {self.name}: {mismatch}; leave params out and the model is read off "
                              f"{self.cls.__name__}.__init__")


def _params_mismatch(given: type[Params], derived: type[Params], init: str) -> str | None:
    """The first field on which ``given`` and ``derived`` (read off ``init``) differ, in words, or
    None when they agree: the same names and defaults (``1`` and ``1.0`` are one default), and the
    same type and constraints as JSON Schema says them (``Optional[int]`` is ``int | None``). An
    ``__init__`` parameter without an annotation takes the model's type and constraints."""
    model = given.__name__
    ours_schema, theirs_schema = _field_schemas(given), _field_schemas(derived)
    for name in [*derived.model_fields, *(n for n in given.model_fields if n not in derived.model_fields)]:
        if name not in given.model_fields:
            return f"{init} takes {name}, which {model} lacks"
        if name not in derived.model_fields:
            return f"{model} has {name}, which {init} does not take"
        ours, theirs = given.model_fields[name], derived.model_fields[name]
        if _default_of(ours) != _default_of(theirs):
            return f"{model}.{name} has default {_default_text(ours)}, {init} has {_default_text(theirs)}"
        if theirs.annotation is Any:
            continue
        if ours_schema.get(name) != theirs_schema.get(name):
            return f"{model}.{name} has type {_type_text(ours)}, {init} has {_type_text(theirs)}"
    return None


def _field_schemas(model: type[Params]) -> dict[str, Any]:
    """Each field's JSON Schema without its title, description and default (compared apart)."""
    try:
        properties = model.model_json_schema().get("properties", {})
    except Exception:  # a type JSON Schema cannot say: compared by its text
        return {name: _type_text(field) for name, field in model.model_fields.items()}
    return {name: {k: v for k, v in schema.items() if k not in ("title", "description", "default")}
            for name, schema in properties.items()}


def _default_of(field: Any) -> Any:
    return ("required",) if field.is_required() else field.get_default(call_default_factory=True)


def _default_text(field: Any) -> str:
    if field.is_required():
        return "none (required)"
    value = field.get_default(call_default_factory=True)
    return f"{value!r} ({type(value).__name__})"


def _type_text(field: Any) -> str:
    annotation = field.annotation
    text = annotation.__name__ if isinstance(annotation, type) and not typing.get_args(annotation) else repr(annotation)
    text = text.replace("typing.", "")
    constraints = sorted(repr(m) for m in field.metadata)
    return f"{text} ({', '.join(constraints)})" if constraints else text


@dataclass
class ImageDataset:
    """What a dataset loader returns.

    ``images`` holds one item per sample: a file path, a PIL image, or a ``uint8`` array
    (``H x W`` or ``H x W x C``); or one array ``N x H x W[ x C]``. ``split``, where the dataset
    defines its own, holds ``"train"``, ``"val"`` or ``"test"`` per sample.
    """

    images: Sequence[Any] | np.ndarray
    labels: np.ndarray
    class_names: list[str]
    ids: list[str]
    split: np.ndarray | None = None
    description: str = ""

    def __post_init__(self) -> None:
        self.class_names = [str(name) for name in self.class_names]
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.labels)
        if len(self.images) != n or len(self.ids) != n:
            raise PluginError(f"dataset: images ({len(self.images)}), labels ({n}) and ids ({len(self.ids)}) differ in length")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise PluginError(f"dataset: labels must lie in [0, {len(self.class_names)}), one per class name")
        if len(set(self.ids)) != n:
            raise PluginError("dataset: sample ids are not unique")
        if self.split is not None:
            self.split = np.asarray(self.split, dtype=object)
            if len(self.split) != n:
                raise PluginError(f"dataset: split has {len(self.split)} entries for {n} samples")


@dataclass(frozen=True)
class DatasetRecord:
    """``load(params, base_dir=Path)`` returns an :class:`ImageDataset`.

    Relative paths in ``params`` are relative to ``base_dir``, the spec file's folder.
    """

    name: str
    load: Callable[..., ImageDataset]
    params: type[Params] = NoParams
    description: str = ""


@dataclass(frozen=True)
class MetricRecord:
    """``fn(y_true (N,), proba (N, C)) -> float``; ``higher_is_better`` orders a leaderboard."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool = True
    description: str = ""


@dataclass(frozen=True)
class ExecutorRecord:
    """``create(params)`` returns an :class:`fusion_engine.executors.Executor`: what runs the
    members a run must train (``executor:`` in a spec, ``--executor`` on the command line)."""

    name: str
    create: Callable[..., Any]
    params: type[Params] = NoParams
    description: str = ""


@dataclass(frozen=True)
class TrackerRecord:
    """A tracker (MLflow, say): something that records runs elsewhere, switched on by a spec's
    ``tracking: {NAME: {params}}``, or by the environment variable ``env`` when the spec does
    not name it (with the default ``params``, which must then all be valid).

    ``create(params)`` returns the tracker of one run (a :class:`fusion_engine.Tracker`): an
    object with any of the lifecycle methods ``on_run_start(run)``, ``on_member_ready(run,
    member)``, ``on_run_end(run, leaderboard)`` and ``on_run_finished(run, status)``, called as
    the hooks of those names are. Whatever ``create`` or a method raises is contained: one
    warning, the tracker is off for the rest of the run, ``run.json`` records it under
    ``notes.<name>``, and the run goes on, its results unchanged.
    """

    name: str
    create: Callable[..., Any]
    params: type[Params] = NoParams
    description: str = ""
    env: str | None = None


@dataclass(frozen=True)
class Provided:
    """A record and the plugin it came from. ``code`` identifies that plugin's code: its
    distribution and version for an installed plugin, the sha256 of the file for a plugin file a
    spec lists (what a member's zoo key records of the code that made it)."""

    record: Any
    plugin: str
    code: dict = field(default_factory=dict)


RECORD_KINDS: dict[str, type] = {
    "backbone": BackboneRecord,
    "fuser": FuserRecord,
    "dataset": DatasetRecord,
    "metric": MetricRecord,
    "executor": ExecutorRecord,
    "tracker": TrackerRecord,
}

__all__ = [
    "BackboneRecord",
    "BuiltBackbone",
    "DatasetRecord",
    "ExecutorRecord",
    "FuserRecord",
    "ImageDataset",
    "InputConfig",
    "MetricRecord",
    "NoParams",
    "Params",
    "TrackerRecord",
    "normalize_name",
    "params_from_signature",
]
