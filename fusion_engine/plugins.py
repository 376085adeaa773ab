"""Finding plugins and collecting what they register.

:func:`get_plugins` builds a fresh plugin manager (never a module global, so tests and runs get
their own). Plugins come from the entry-point group ``fusion_engine`` (first-party ones too) and
from plugin files a spec lists. A plugin that fails to import or to validate is skipped with a
warning; the rest keep working.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pluggy

from . import hookspecs
from .errors import PluginError, SpecError
from .records import RECORD_KINDS, Provided, normalize_name

log = logging.getLogger("fusion_engine")

ENTRY_POINT_GROUP = "fusion_engine"
FIRST_PARTY_DIST = "fusion-engine"
#: the module names plugin files loaded from a spec's ``plugins:`` get: this prefix, the file's stem, a hash
FILE_PLUGIN_PREFIX = "fusion_engine_local_"
DISABLE_ENV = "FUSION_ENGINE_DISABLE_PLUGINS"
_DISABLE_ALL = {"1", "true", "yes", "all", "*"}


@dataclass
class PluginInfo:
    """One loaded plugin: where it came from and which hooks it implements."""

    name: str
    source: str  # "entry-point" or "file"
    version: str | None = None
    distribution: str | None = None
    path: str | None = None
    first_party: bool = False
    hooks: list[str] = field(default_factory=list)
    sha256: str | None = None  # of a plugin file's source
    module_file: str | None = None  # an installed plugin's module, whose source identifies it outside a release

    @property
    def code(self) -> dict:
        """What identifies this plugin's code: its distribution and version (and its source's
        sha256 when it does not run from a release: an editable install), or its file's sha256."""
        if self.source == "file":
            return {"file": Path(self.path).name if self.path else self.name, "sha256": self.sha256}
        from .provenance import source_identity

        return {"distribution": self.distribution, "version": self.version,
                **source_identity(self.distribution, self.module_file)}


class Plugins:
    """A plugin manager with the record catalog built from it."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.skipped: dict[str, str] = {}
        self._catalog: Catalog | None = None

    # -- loading ---------------------------------------------------------------------------
    def register(self, module: object, info: PluginInfo) -> bool:
        """Register one plugin module; a plugin pluggy rejects is skipped with a warning."""
        try:
            self.pm.register(module, name=info.name)
            self.pm.check_pending()
        except Exception as exc:  # pluggy.PluginValidationError and friends
            if self.pm.is_registered(module):
                self.pm.unregister(module)
            self._skip(info.name, f"invalid hook implementation: {exc}")
            return False
        info.hooks = sorted(impl_name for impl_name in _hook_names(self.pm, module))
        self.info[info.name] = info
        self._catalog = None
        return True

    def _skip(self, name: str, why: str) -> None:
        self.skipped[name] = why
        log.warning("plugin %s skipped: %s", name, why)

    def load_entry_points(self) -> None:
        blocked = _blocked_from_env()
        for ep in sorted(_entry_points(), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            dist_name = dist.name if dist is not None else None
            first_party = normalize_name(dist_name or "") == FIRST_PARTY_DIST
            if ep.name in blocked or (not first_party and "*" in blocked):
                continue
            if ep.name in self.info:
                continue
            try:
                module = ep.load()
            except Exception as exc:
                self._skip(ep.name, f"failed to import {ep.value}: {type(exc).__name__}: {exc}")
                continue
            self.register(
                module,
                PluginInfo(
                    name=ep.name,
                    source="entry-point",
                    version=dist.version if dist is not None else None,
                    distribution=dist_name,
                    first_party=first_party,
                    module_file=getattr(module, "__file__", None),
                ),
            )

    def load_file(self, path: str | os.PathLike) -> None:
        """Import a plugin from a ``.py`` file. Unlike an installed plugin, a broken file named
        explicitly is an error: the user asked for it."""
        path = Path(path).resolve()
        if not path.is_file():
            raise SpecError(f"plugin file not found: {path}")
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
        mod_name = f"{FILE_PLUGIN_PREFIX}{path.stem}_{digest}"
        if mod_name in self.info:
            return
        source = path.read_bytes()
        sha256 = hashlib.sha256(source).hexdigest()  # what is imported next, for the zoo key
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise SpecError(f"not a Python module: {path}")
        module = importlib.util.module_from_spec(spec)
        # kept for loaded_plugin_files: the file may be gone by the time a worker needs it (an
        # export loads the plugin from its folder before renaming the folder into place)
        module.__fusion_engine_source__ = source.decode("utf-8", errors="replace")
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise SpecError(f"plugin file {path} failed to import: {type(exc).__name__}: {exc}") from None
        info = PluginInfo(name=mod_name, source="file", path=str(path), sha256=sha256)
        if not self.register(module, info):
            raise SpecError(f"plugin file {path}: {self.skipped[mod_name]}")

    # -- using -----------------------------------------------------------------------------
    @property
    def hook(self):
        return self.pm.hook

    def catalog(self) -> "Catalog":
        if self._catalog is None:
            self._catalog = Catalog.collect(self.pm, first_party={n for n, i in self.info.items() if i.first_party},
                                            code={n: i.code for n, i in self.info.items()})
        return self._catalog

    def describe(self) -> list[dict]:
        """What ``fusion-engine plugins --json`` prints."""
        cat = self.catalog()
        rows = []
        for name, info in sorted(self.info.items()):
            provides = {
                f"{kind}s": sorted(p.record.name for p in cat.records[kind].values() if p.plugin == name)
                for kind in RECORD_KINDS
            }
            rows.append(
                {
                    "name": name,
                    "version": info.version,
                    "distribution": info.distribution,
                    "source": info.source,
                    "path": info.path,
                    "first_party": info.first_party,
                    "hooks": info.hooks,
                    **{k: v for k, v in provides.items() if v},
                    "records": [{"kind": kind, "name": p.record.name, "description": p.record.description}
                                for kind in RECORD_KINDS for p in cat.records[kind].values() if p.plugin == name],
                }
            )
        return rows


class Catalog:
    """Every registered backbone, fuser, dataset and metric, by normalised name, in the order
    plugins registered them (which orders the leaderboard's metric columns)."""

    def __init__(self, records: dict[str, dict[str, Provided]]):
        self.records = records

    @classmethod
    def collect(cls, pm: pluggy.PluginManager, first_party: frozenset[str] | set[str] = frozenset(),
                code: dict[str, dict] | None = None) -> "Catalog":
        records: dict[str, dict[str, Provided]] = {}
        for kind, record_type in RECORD_KINDS.items():
            found: dict[str, Provided] = {}
            hook = getattr(pm.hook, f"register_{kind}s")
            for impl in hook.get_hookimpls():
                plugin = impl.plugin_name
                try:
                    result = impl.function()
                except PluginError as exc:  # a record that refused what it was given says why
                    raise PluginError(f"plugin {plugin}: {exc}") from None
                except Exception as exc:
                    raise PluginError(f"plugin {plugin}: register_{kind}s() failed: {type(exc).__name__}: {exc}") from None
                for record in result or ():
                    if not isinstance(record, record_type):
                        raise PluginError(
                            f"plugin {plugin}: register_{kind}s() returned {type(record).__name__}, "
                            f"expected {record_type.__name__}"
                        )
                    key = normalize_name(record.name)
                    if key in found:
                        a, b = sorted([found[key].plugin, plugin], key=lambda n: (n not in first_party, n))
                        raise PluginError(
                            f"{kind} '{key}' is registered by both {a} and {b}; "
                            f"uninstall one or block it with {DISABLE_ENV}={b}"
                        )
                    found[key] = Provided(record=record, plugin=plugin, code=(code or {}).get(plugin, {}))
            records[kind] = found
        return cls(records)

    def named(self, name: str) -> list[tuple[str, Provided]]:
        """``(kind, provided)`` for every record called ``name``, of any kind."""
        key = normalize_name(str(name))
        return [(kind, found[key]) for kind, found in self.records.items() if key in found]

    def names(self, kind: str) -> list[str]:
        return sorted(p.record.name for p in self.records[kind].values())

    def get(self, kind: str, name: str) -> Provided:
        """The record for ``name``, or a :class:`SpecError` listing the installed names."""
        found = self.records[kind].get(normalize_name(str(name)))
        if found is not None:
            return found
        installed = self.names(kind)
        close = difflib.get_close_matches(normalize_name(str(name)), list(self.records[kind]), n=1, cutoff=0.5)
        hint = f" (did you mean '{self.records[kind][close[0]].record.name}'?)" if close else ""
        listing = ", ".join(installed) if installed else "none"
        raise SpecError(f"unknown {kind} '{name}'{hint}; installed: {listing}")


def get_plugins(plugin_files: Iterable[str | os.PathLike] = (), *, entry_points: bool = True) -> Plugins:
    """A fresh plugin manager with the installed plugins and the given plugin files loaded."""
    plugins = Plugins()
    if entry_points:
        plugins.load_entry_points()
    for path in plugin_files:
        plugins.load_file(path)
    return plugins


def loaded_plugin_files() -> dict[str, tuple[str, str]]:
    """The plugin files this process has loaded from specs: module name -> (path, source text).

    For executors that run members in other processes or on other machines, where the files'
    paths may not exist: the worker calls :func:`import_plugin_source` with each, so a job that
    refers to a backbone defined in one can be unpickled there.
    """
    sources = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.startswith(FILE_PLUGIN_PREFIX) and path:
            text = getattr(module, "__fusion_engine_source__", None)
            sources[name] = (path, text if text is not None else Path(path).read_text(encoding="utf-8"))
    return sources


def import_plugin_source(name: str, path: str, source: str) -> None:
    """Make the plugin file ``path`` (its text ``source``) importable as module ``name`` in this
    process, unless it already is: the worker side of :func:`loaded_plugin_files`."""
    import types

    if name in sys.modules:
        return
    module = types.ModuleType(name)
    module.__file__ = path
    sys.modules[name] = module
    try:
        exec(compile(source, path, "exec"), module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def _entry_points():
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _blocked_from_env() -> set[str]:
    """``FUSION_ENGINE_DISABLE_PLUGINS=1`` blocks every plugin not shipped with fusion-engine;
    a comma-separated list blocks those plugins by name (first-party ones included)."""
    value = os.environ.get(DISABLE_ENV, "").strip()
    if not value:
        return set()
    if value.lower() in _DISABLE_ALL:
        return {"*"}
    return {v.strip() for v in value.split(",") if v.strip()}


def _hook_names(pm: pluggy.PluginManager, module: object) -> list[str]:
    return [caller.name for caller in pm.get_hookcallers(module) or ()]


def describe_params(model: type) -> list[dict]:
    """One entry per field of a ``Params`` model: name, type, default (``required`` when it has
    none), its constraints and description; what ``fusion-engine plugins --params`` prints."""
    from pydantic_core import PydanticUndefined

    out = []
    for name, info in model.model_fields.items():
        if info.default_factory is not None:
            default = info.default_factory()
        else:
            default = "required" if info.default is PydanticUndefined else info.default
        constraints = [c for c in map(_constraint, info.metadata) if c]
        out.append({"name": name, "type": _type_name(info.annotation), "default": default,
                    "constraints": constraints, "description": info.description or ""})
    return out


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "length >=", "max_length": "length <=",
           "multiple_of": "multiple of", "pattern": "matches"}


def _constraint(meta) -> str:
    """``Gt(gt=0)`` -> ``> 0``, a pattern -> ``matches ^...$``; empty for anything else."""
    return ", ".join(f"{word} {getattr(meta, attr)}" for attr, word in _BOUNDS.items()
                     if getattr(meta, attr, None) is not None)


def _type_name(annotation) -> str:
    """A type as a person reads it: ``float``, ``Path | None``, ``list[float]``, ``'prob' | 'logprob'``."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))
