"""Reading a spec file: YAML (a key given twice refused) or TOML, no infinities or NaNs, validated
by the models of :mod:`fusion_engine.spec`. Every error reaches the user as
``FILE: path.to.field: message`` (a :class:`SpecError`), with the allowed range or the closest
field name where there is one.
"""

from __future__ import annotations

import difflib
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import SpecError, format_loc
from .spec import ExperimentSpec, LocatedError


def read_spec_file(path: str | Path) -> dict:
    """Parse a YAML or TOML file into a mapping, with errors naming the file."""
    path = Path(path)
    if not path.exists():
        raise SpecError("no such file", file=str(path))
    if path.is_dir():
        raise SpecError("is a directory, expected a .yaml, .yml or .toml spec", file=str(path))
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read: {exc}", file=str(path)) from None
    if suffix in (".yaml", ".yml"):
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except _DuplicateKey as exc:
            raise SpecError(str(exc), file=str(path)) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise SpecError(f"invalid YAML: {where}{problem}", file=str(path)) from None
    elif suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"invalid TOML: {exc}", file=str(path)) from None
    else:
        raise SpecError(f"unknown spec format '{suffix}'; use .yaml, .yml or .toml", file=str(path))
    if data is None:
        raise SpecError("the spec is empty", file=str(path))
    if not isinstance(data, dict):
        raise SpecError(f"the spec must be a mapping of fields, got a {type(data).__name__}", file=str(path))
    return data


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor``: its keys are defaults the mapping's own override
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base loader reports it
                break
            if first is not None:
                raise _DuplicateKey(f"line {key_node.start_mark.line + 1}: key '{key}' is given twice "
                                    f"(first on line {first}); give it once")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def parse_spec(data: dict, *, file: str | None = None) -> ExperimentSpec:
    check_finite(data, file=file)
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, ExperimentSpec, file=file) from None


def check_finite(data: Any, *, file: str | None = None, loc: tuple = ()) -> None:
    """Refuse an infinity or NaN anywhere in a spec (YAML's ``.inf`` and ``.nan``, TOML's ``inf``
    and ``nan``), plugin parameters included: no setting means them, and a zoo key cannot hold them."""
    if isinstance(data, float) and not math.isfinite(data):
        raise SpecError(f"{data} is not a finite number; give a finite one", file=file, loc=format_loc(loc) or None)
    if isinstance(data, dict):
        for key, value in data.items():
            check_finite(value, file=file, loc=loc + (key,))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            check_finite(value, file=file, loc=loc + (i,))


def spec_label(path: str | Path, executor: dict | None = None) -> str:
    """How errors name a spec: its file, marked when the command line changed its executor."""
    return str(path) if executor is None else f"{path} (with --executor)"


def load_spec(path: str | Path, *, executor: dict | None = None) -> ExperimentSpec:
    """Read and validate a spec file (plugin parameters are checked by :func:`fusion_engine.resolve.resolve_spec`).

    ``executor`` (``{"name": ..., "params": {...}}``, from the command line) replaces the spec's:
    another executor's name drops the spec's executor params, the same name merges them.
    """
    data = read_spec_file(path)
    if executor is None:
        return parse_spec(data, file=str(path))
    given = data.get("executor")
    given = {"name": given} if isinstance(given, str) else dict(given) if isinstance(given, dict) else given
    if given is not None and not (isinstance(given, dict) and isinstance(given.get("params", {}), dict)):
        parse_spec(data, file=str(path))  # malformed in the file: the error says so, as without --executor
    given = given or {}
    if executor.get("name") and executor["name"] != given.get("name", "local"):
        given = {"name": executor["name"]}  # another executor: the spec's params are not its params
    given["params"] = {**(given.get("params") or {}), **executor.get("params", {})}
    return parse_spec({**data, "executor": given}, file=spec_label(path, executor))


def validation_error(exc: ValidationError, model: type[BaseModel] | None, *, file: str | None, prefix: tuple = ()) -> SpecError:
    """The first pydantic error as a :class:`SpecError`, with a friendlier unknown-field message."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = tuple(err["loc"])
    msg = err["msg"]
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, LocatedError):  # its loc is within the model that raised it
        loc, msg = loc + tuple(ctx_error.loc), str(ctx_error)
    elif err["type"].startswith("value_error"):
        msg = msg.removeprefix("Value error, ")
    if err["type"] == "extra_forbidden" and model is not None:
        allowed = _fields_at(model, loc[:-1])
        if allowed:
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            msg = f"unknown field{hint}; allowed: {', '.join(allowed)}"
    elif err["type"] == "missing":
        msg = "required field is missing"
    else:
        value = err.get("input")
        if not isinstance(value, (dict, list)) and err["type"] != "missing" and value is not None:
            msg = f"{msg} (got {value!r})"
        allowed = _allowed_range(model, loc) if err["type"] in _NUMBER_ERRORS and model is not None else None
        if allowed:
            msg = f"{msg}; allowed: {allowed}"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return SpecError(msg, file=file, loc=format_loc(prefix + loc) or None)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the model found by walking ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


#: pydantic's errors for a number that is not one or out of its field's range
_NUMBER_ERRORS = {"int_parsing", "int_parsing_size", "int_from_float", "int_type", "float_parsing", "float_type",
                  "greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


def _allowed_range(model: type[BaseModel], loc: tuple) -> str | None:
    """The range the field at ``loc`` allows, from its ``Field(ge=..., le=...)`` bounds:
    ``an integer from 0 to 4294967295``; None for a field without bounds."""
    current: Any = model
    info = None
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current, info = (args[0] if args else None), None
        elif isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            info = current.model_fields[part]
            current = info.annotation
        else:
            return None
    if info is None:
        return None
    import annotated_types  # pydantic's own dependency: Field(ge=...) is kept as annotated_types.Ge(...)

    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in info.metadata
              if isinstance(m, (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt))}
    if not bounds:
        return None
    kind = "an integer" if _unwrap(current) is int else "a number"
    if "Ge" in bounds and "Le" in bounds:
        return f"{kind} from {bounds['Ge']} to {bounds['Le']}"
    signs = {"Ge": ">=", "Gt": ">", "Le": "<=", "Lt": "<"}
    return f"{kind} " + " and ".join(f"{signs[k]} {v}" for k, v in bounds.items())


def _unwrap(tp: Any) -> Any:
    """``Optional[X]`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp
