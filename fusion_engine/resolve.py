"""A spec bound to plugins: each dataset, backbone, fuser, executor and tracker name bound to the
record that provides it, and its ``params`` validated by that record's own ``Params`` model, in
place, so their errors carry the spec's path (``members.0.params.model``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from .errors import FusionEngineError, SpecError
from .records import Params, Provided, normalize_name
from .spec import ExperimentSpec, FuserSpec
from .specfile import load_spec, spec_label, validation_error


@dataclass
class Bound:
    """A spec item (a dataset, member, fuser or executor) bound to the plugin record that provides
    its name, with its ``params`` validated by that record's model."""

    provided: Provided
    params: Params

    @property
    def record(self):
        return self.provided.record


@dataclass
class ResolvedSpec:
    """A spec with every plugin name bound. ``members[i]`` is ``None`` for a member taken from the
    zoo (``zoo:``), which has no backbone to bind."""

    spec: ExperimentSpec
    file: str | None
    base_dir: Path
    dataset: Bound
    members: list[Bound | None]
    fusers: list[Bound]
    executor: Bound | None = None
    students: list[Bound] = field(default_factory=list)
    trackers: dict[str, Bound] = field(default_factory=dict)  # by record name: those switched on

    @property
    def bound_fusers(self) -> list[tuple["FuserSpec", Bound]]:
        return list(zip(self.spec.fusers, self.fusers))

    def resolved_dict(self) -> dict:
        """The spec with every default filled in, plugin parameters included."""
        data = self.spec.model_dump(mode="json")
        data["data"]["params"] = self.dataset.params.model_dump(mode="json")
        for item, r in zip(data["members"], self.members):
            if r is not None:
                item["params"] = r.params.model_dump(mode="json")
        for item, r in zip(data["fusers"], self.fusers):
            item["params"] = r.params.model_dump(mode="json")
        for item, r in zip(data["students"], self.students):
            item["params"] = r.params.model_dump(mode="json")
        if self.executor is not None:
            data["executor"]["params"] = self.executor.params.model_dump(mode="json")
        data["tracking"] = {**{k: v for k, v in data["tracking"].items() if v is False},
                            **{name: r.params.model_dump(mode="json") for name, r in self.trackers.items()}}
        return data


def prepare(spec_path: str | Path, *, executor: dict | None = None):
    """The spec stage of a run: load a spec file, load the plugins it lists, and bind every name
    (:func:`resolve_spec`). Returns ``(ResolvedSpec, Plugins)``; imports no torch.

    ``executor`` (``{"name": ..., "params": {...}}``, from the command line) replaces the spec's.
    """
    from .plugins import get_plugins

    spec_path = Path(spec_path)
    spec = load_spec(spec_path, executor=executor)
    base_dir = spec_path.resolve().parent
    try:
        plugins = get_plugins([base_dir / p for p in spec.plugins])
    except FusionEngineError as exc:
        raise type(exc)(f"{spec_path}: plugins: {exc}") from None
    return resolve_spec(spec, plugins.catalog(), file=spec_label(spec_path, executor), base_dir=base_dir), plugins


def resolve_spec(spec: ExperimentSpec, catalog, *, file: str | None = None, base_dir: Path | None = None) -> ResolvedSpec:
    """Bind each dataset, backbone, fuser, executor and tracker name to a plugin and validate its
    ``params``."""
    base_dir = Path(base_dir) if base_dir is not None else (Path(file).resolve().parent if file else Path.cwd())

    def bind(kind: str, name: str, params: dict, loc: tuple, field: str | None = None,
             params_loc: tuple | None = None) -> Bound:
        """An unknown name is reported at ``loc.<field or kind>``, a bad param under ``params_loc``
        (default ``loc.params``)."""
        params_loc = loc + ("params",) if params_loc is None else params_loc
        try:
            provided = catalog.get(kind, name)
        except SpecError as exc:
            raise SpecError(exc.message, file=file, loc=loc + (field or kind,)) from None
        model = provided.record.params
        try:
            value = model.model_validate(params, context={"base_dir": base_dir})
        except ValidationError as exc:
            raise validation_error(exc, model, file=file, prefix=params_loc) from None
        return Bound(provided, value)

    dataset = bind("dataset", spec.data.dataset, spec.data.params, ("data",))
    members = [None if m.backbone is None else bind("backbone", m.backbone, m.params, ("members", i))
               for i, m in enumerate(spec.members)]
    fusers = [bind("fuser", f.fuser, f.params, ("fusers", i)) for i, f in enumerate(spec.fusers)]
    students = [bind("backbone", s.backbone, s.params, ("students", i)) for i, s in enumerate(spec.students)]
    # bound when the spec names one; else the run uses the built-in local executor
    executor = (bind("executor", spec.executor.name, spec.executor.params, ("executor",), field="name")
                if "executor" in spec.model_fields_set else None)
    trackers = resolve_trackers(spec, catalog, bind, file=file)
    from .leaderboard import CORE_RANKABLE  # the core computes these whatever plugins are installed

    names = sorted({*catalog.names("metric"), *CORE_RANKABLE})
    if "rank_by" in spec.model_fields_set and normalize_name(spec.rank_by) not in {normalize_name(n) for n in names}:
        choices = ", ".join(names)
        raise SpecError(f"cannot rank by '{spec.rank_by}'; choose one of: {choices}", file=file, loc="rank_by")
    return ResolvedSpec(spec, file, base_dir, dataset, members, fusers, executor, students, trackers)


def resolve_trackers(spec: ExperimentSpec, catalog, bind, *, file: str | None) -> dict[str, Bound]:
    """The trackers a run switches on: those the spec's ``tracking:`` names (``NAME: false``
    keeps one off), then any other whose record's ``env`` variable is set, with default params."""
    trackers: dict[str, Bound] = {}
    named: dict[str, str] = {}  # normalised name -> as the spec wrote it
    for name, params in spec.tracking.items():
        key = normalize_name(name)
        if key in named:
            raise SpecError(f"names the tracker '{named[key]}' again; give it once", file=file, loc=("tracking", name))
        named[key] = name
        bound = bind("tracker", name, {} if isinstance(params, bool) else params, ("tracking",), field=name,
                     params_loc=("tracking", name))  # a false one is checked too: a typo would hide
        if params is not False:
            trackers[bound.record.name] = bound
    for key, provided in catalog.records["tracker"].items():
        name, env = provided.record.name, provided.record.env
        if key not in named and env and os.environ.get(env, "").strip():
            trackers[name] = bind("tracker", name, {}, ("tracking",), field=name, params_loc=("tracking", name))
    return trackers
