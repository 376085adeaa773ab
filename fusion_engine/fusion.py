"""The fuser stage of a run: every fuser fitted on val, scored on val out-of-fold, applied to test.

:func:`fit_fusers` sees member logits and labels only (never images, never the run folder) and
returns :class:`FittedFuser` records; the run writes and scores them. Each fuser's full fit and
its fold fits run side by side, one per core, each with one BLAS thread (many small fits on one
shared BLAS pool oversubscribe the cores).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .records import SCORED_SPLITS

if TYPE_CHECKING:  # pragma: no cover
    from .fuser import Fuser
    from .resolve import Bound
    from .spec import FuserSpec

log = logging.getLogger("fusion_engine")


@dataclass
class FittedFuser:
    """A fuser fitted on val: its out-of-fold val and its test probabilities, and what it cost."""

    spec: "FuserSpec"
    bound: "Bound"
    members: list[str]
    model: "Fuser"
    proba: dict[str, np.ndarray]  # "val" (out-of-fold) and "test", each (N, C)
    fit_seconds: float
    predict_ms_per_image: float
    #: per member, the share of test samples the fitted fuser ran it on (1.0 unless it stops early)
    consulted: list[float] | None = None
    #: how many test samples ran exactly 1, 2, ... members (a cascade: how many each stage answered)
    stopped_after: list[int] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def weights(self) -> list[float] | None:
        weights = getattr(self.model, "weights_", None)
        return None if weights is None else [float(w) for w in weights]

    def description(self) -> dict[str, Any]:
        """What ``fusers/<name>.json`` holds: enough to rebuild the fitted fuser from its plugin."""
        out = {"name": self.spec.name, "fuser": self.spec.fuser, "plugin": self.bound.provided.plugin,
               "members": self.members, "params": self.bound.params.model_dump(mode="json"),
               "temperature": self.spec.temperature, "state": self.model.get_state()}
        if self.consulted is not None and min(self.consulted) < 1.0:
            out["test_usage"] = {"consulted": dict(zip(self.members, self.consulted)),
                                 "stopped_after": self.stopped_after}
        return out


def make_fuser(spec: "FuserSpec", bound: "Bound", *, seed: int) -> "Fuser":
    """A fresh, unfitted fuser for a spec entry (temperature-scaled when the entry asks)."""
    from .calibration import TemperatureScaled

    fuser = bound.record.cls(**bound.params.model_dump())
    return TemperatureScaled(fuser, seed=seed) if spec.temperature else fuser


def fit_fusers(fusers: list[tuple["FuserSpec", "Bound"]], logits: dict[str, dict[str, np.ndarray]],
               y: dict[str, np.ndarray], seed: int, costs: dict[str, float | None] | None = None) -> Iterator[FittedFuser]:
    """Fit each ``(spec, bound plugin)`` fuser on val; score it there out-of-fold; apply it to test.
    Yields each fitted fuser as it is done.

    ``logits`` maps each member's name to its ``"val"`` and ``"test"`` logits ``(N, C)``; a fuser
    combines the members its spec names (default: every member, in ``logits``' order).
    ``costs`` maps member names to inference milliseconds per image, for fusers that need them
    (``needs_costs``); which members each fuser runs on test is recorded in ``consulted``.
    """
    from threadpoolctl import threadpool_limits

    from .crossfit import cross_fit

    with threadpool_limits(1):
        for spec, bound in fusers:
            names = spec.members or list(logits)
            stacked = {s: np.stack([logits[n][s] for n in names]) for s in SCORED_SPLITS}
            log.info("fitting fuser %s (%s) on %d members", spec.name, spec.fuser, len(names))
            fuser = make_fuser(spec, bound, seed=seed)
            fit_params = {"costs": _member_costs(spec.name, names, costs)} if fuser.needs_costs else None
            model, val_proba, fit_seconds = cross_fit(fuser, stacked["val"], y["val"], seed=seed, n_jobs=-1,
                                                      fit_params=fit_params)
            t0 = time.perf_counter()
            test_proba = model.predict_proba(stacked["test"])
            predict_ms = 1000.0 * (time.perf_counter() - t0) / max(1, len(y["test"]))
            used = np.asarray(model.consulted(stacked["test"]), dtype=bool)
            yield FittedFuser(spec, bound, names, model, {"val": val_proba, "test": test_proba}, fit_seconds, predict_ms,
                              consulted=[float(f) for f in used.mean(axis=0)],
                              stopped_after=np.bincount(used.sum(axis=1), minlength=len(names) + 1)[1:].tolist())


def _member_costs(fuser: str, names: list[str], costs: dict[str, float | None] | None) -> np.ndarray:
    """The inference costs of a fuser's members, in its order; an error naming any that is unknown."""
    from .errors import FusionEngineError

    costs = costs or {}
    unknown = [n for n in names if costs.get(n) is None]
    if unknown:
        raise FusionEngineError(f"fuser {fuser} needs each member's inference cost, and {', '.join(unknown)} has none "
                                f"(its predictions were made elsewhere): give it infer_ms_per_image in the spec")
    return np.array([costs[n] for n in names], dtype=np.float64)
