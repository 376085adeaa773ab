"""Trackers: what records a run somewhere else (an MLflow server), and the rule they live by,
kept here: **tracking never fails a run and never changes its results**.

A tracker is made by a :class:`~fusion_engine.TrackerRecord` that the spec (``tracking:``) or
the environment switched on, and hears the run's lifecycle through the methods named after the
lifecycle hooks. :class:`RunTrackers` is registered on the run's plugin manager for the run's
length and calls each tracker in turn, containing whatever one raises: the error becomes one
warning (in ``run.log`` and ``run.json``), ``run.json`` records it under ``notes.<tracker>``
(``status: failed``, the hook it failed in, the error), that tracker is called no more, and the
run goes on. A tracker is called after each stage has made its outputs and only reads them
(the MLflow tracker's tests check that a tracked run's leaderboard is an untracked run's).

Its hook implementations are ``tryfirst``: trackers hear an event before other plugins do, so
that a plugin whose hook raises (which aborts a run, as documented) still leaves every tracker
told how the run ended, through ``on_run_finished``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from .errors import FusionEngineError
from .hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from .resolve import Bound

log = logging.getLogger("fusion_engine")

#: the lifecycle methods a tracker may have, in the order a run calls them
EVENTS = ("on_run_start", "on_member_ready", "on_run_end", "on_run_finished")


class Tracker:
    """Base class for what :attr:`TrackerRecord.create <fusion_engine.TrackerRecord>` returns:
    one run's tracker. Override the lifecycle methods you need; each is called as the hook of the
    same name is (see :mod:`fusion_engine.hookspecs`), with keyword arguments."""

    def on_run_start(self, run) -> None:
        """The run's folder exists and its spec is resolved; nothing trained yet."""

    def on_member_ready(self, run, member) -> None:
        """A member's val and test outputs are ready (trained in this run or reused)."""

    def on_run_end(self, run, leaderboard) -> None:
        """The leaderboard is written."""

    def on_run_finished(self, run, status: str) -> None:
        """Last, whatever the outcome (``complete``, ``failed``, ``interrupted``); plots and
        ``report.html`` exist for a complete run."""


class RunTrackers:
    """The trackers of one run, registered on its plugin manager as one plugin."""

    def __init__(self, trackers: dict[str, "Bound"]):
        self.bound = dict(trackers)
        self.live: dict[str, Any] = {}

    def __bool__(self) -> bool:
        return bool(self.bound)

    @hookimpl(tryfirst=True)
    def on_run_start(self, run) -> None:
        for name, bound in self.bound.items():
            run.note(name, status="started")
            tracker = self._guarded(run, name, "create", bound.record.create, bound.params)
            if tracker is not None:
                self.live[name] = tracker
        self._each(run, "on_run_start")

    @hookimpl(tryfirst=True)
    def on_member_ready(self, run, member) -> None:
        self._each(run, "on_member_ready", member=member)

    @hookimpl(tryfirst=True)
    def on_run_end(self, run, leaderboard) -> None:
        self._each(run, "on_run_end", leaderboard=leaderboard)

    @hookimpl(tryfirst=True)
    def on_run_finished(self, run, status) -> None:
        self._each(run, "on_run_finished", status=status)
        for name in self.live:
            run.note(name, status="ok")
        self.live.clear()

    def _each(self, run, event: str, **kwargs) -> None:
        for name, tracker in list(self.live.items()):
            method = getattr(tracker, event, None)
            if method is not None:
                self._guarded(run, name, event, method, run=run, **kwargs)

    def _guarded(self, run, name: str, event: str, call: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)``, or ``None`` when it raised: then the tracker is off."""
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # any error at all: a tracker never fails a run
            self.live.pop(name, None)
            # the engine's errors are written for people; anything else says what it is
            error = str(exc) if isinstance(exc, FusionEngineError) else f"{type(exc).__name__}: {exc}"
            error = " ".join(error.split())
            if len(error) > 500:  # an HTTP client's error can quote a whole response
                error = error[:497] + "..."
            run.note(name, status="failed", failed_in=event, error=error)
            log.warning("tracking: %s failed in %s, so this run goes on untracked by it: %s", name, event, error)
            return None
