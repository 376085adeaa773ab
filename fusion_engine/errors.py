"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator


# A log record's flag: the error is the CLI's to report (once, on one line); the record is for run.log.
RUN_LOG_ONLY = "fusion_engine_run_log_only"
# A log record's flag: the run's input passed every check and its folder exists; warnings held until
# then (a skipped file, a small feature map) are shown now, and later ones as they come.
RUN_STARTED = "fusion_engine_run_started"


class FusionEngineError(Exception):
    """Bad input: a spec, a path, a plugin name. Printed without a traceback."""

    exit_code = 2


class SpecError(FusionEngineError):
    """A problem at a place in a spec file, printed as ``FILE: path.to.field: message``."""

    def __init__(self, message: str, *, file: str | None = None, loc: tuple | str | None = None):
        self.message = message
        self.file = file
        self.loc = format_loc(loc) if not isinstance(loc, str) else loc
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.loc) if p]
        return ": ".join([*parts, self.message])

    def at(self, file: str | None = None, prefix: tuple = ()) -> "SpecError":
        """The same error, placed in a file and under a prefix of the spec."""
        loc = ".".join(x for x in (format_loc(prefix), self.loc) if x)
        return SpecError(self.message, file=file or self.file, loc=loc or None)


class UnreadableImage(FusionEngineError):
    """An image that cannot be decoded: bad data, which stops the run (it would fail every member
    that reads it), exit status 2, wherever in the run it is met."""


class PluginError(FusionEngineError):
    """A plugin that cannot be used as asked: a duplicate name, a broken record."""


def format_loc(loc: tuple | None) -> str:
    """``("members", 0, "params", "lr")`` -> ``members.0.params.lr``."""
    if not loc:
        return ""
    return ".".join(str(p) for p in loc)


def first_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


def first_few(items, n: int = 3) -> str:
    """``a, b, c, ...``: the first ``n`` items of a list an error names."""
    items = list(items)
    return ", ".join(map(str, items[:n])) + (", ..." if len(items) > n else "")


@contextmanager
def located(file: str | None, loc: tuple | str, *, plugin: str | None = None) -> Iterator[None]:
    """A problem found inside the block, reported at ``loc`` of the spec ``file``.

    ``plugin`` names the plugin code the block runs (a backbone's ``input_config``, ``check`` or
    ``build``, a dataset's ``load``, a fuser's ``__init__``): anything else it raises (a bug, a
    library's error) is reported as that plugin's failure, on one line, instead of a traceback.
    """
    try:
        yield
    except SpecError:
        raise
    except FusionEngineError as exc:
        raise SpecError(str(exc), file=file, loc=loc) from None
    except Exception as exc:
        if plugin is None:
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__  # all of it (torch's first line names no key), on one line
        text = text if len(text) <= 400 else text[:400] + " ..."
        raise SpecError(f"{plugin} failed: {type(exc).__name__}: {text}", file=file, loc=loc) from None


def plugin_code(bound, kind: str, name: str = "") -> str:
    """How an error names the plugin code a spec item runs (``bound``: a :class:`fusion_engine.resolve.Bound`), e.g.
    ``backbone 'timm' (plugin fusion_engine_timm) of member r``, ``dataset 'mine' (plugin file
    my_plugin.py)``."""
    what = {"member": "backbone", "student": "backbone"}.get(kind, kind)
    owner = f" of {kind} {name}" if name else ""
    file = bound.provided.code.get("file")
    plugin = f"plugin file {file}" if file else f"plugin {bound.provided.plugin}"
    return f"{what} '{bound.record.name}' ({plugin}){owner}"


class KeptWarnings(logging.Handler):
    """The warnings logged while it is attached to a logger: their records, and their messages
    (a list that grows as they come, which ``run.json`` holds)."""

    def __init__(self, *, keep_records: bool = True):
        super().__init__(logging.WARNING)
        self.keep_records = keep_records  # a run keeps the messages alone (a record holds its args)
        self.records: list[logging.LogRecord] = []
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.keep_records:
            self.records.append(record)
        self.messages.append(record.getMessage())


@contextmanager
def kept_warnings(logger: logging.Logger) -> Iterator[list[logging.LogRecord]]:
    """The warnings ``logger`` logs inside the block, kept (they are still logged as usual)."""
    handler = KeptWarnings()
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
