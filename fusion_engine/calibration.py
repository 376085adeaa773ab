"""Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks").

One scalar ``T > 0`` divides the scores before the softmax. It is fitted on validation by
minimising the negative log-likelihood. Dividing by a positive number keeps every row's order, so
accuracy never changes; only confidence does. ``T = 1`` is in the search space and is kept unless
another value lowers the validation NLL, so calibration never makes the validation NLL worse.

What the engine calls:

- a member (``calibrate: temperature``): ``T = fit_temperature(val_logits, y_val)``, then the
  member's logits on every split become ``logits / T``;
- a fuser (``temperature: true``): wrap it, ``TemperatureScaled(fuser)``, a fuser like any other;
- any probabilities: ``apply_temperature(log_proba(proba), T)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import log_softmax, softmax

from .fuser import Fuser, check_logits

__all__ = ["TemperatureScaled", "apply_temperature", "fit_temperature", "log_proba"]

BOUNDS = (0.05, 20.0)
PROBA_FLOOR = 1e-12


def log_proba(proba: np.ndarray, floor: float = PROBA_FLOOR) -> np.ndarray:
    """``log(proba)`` with zeros raised to ``floor`` first, so hard (0/1) outputs can be scaled too."""
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), floor, None))


def _nll(scores: np.ndarray, y: np.ndarray, temperature: float) -> float:
    return float(-np.mean(log_softmax(scores / temperature, axis=1)[np.arange(len(y)), y]))


def fit_temperature(scores: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = BOUNDS) -> float:
    """The temperature in ``bounds`` that minimises the NLL of ``softmax(scores / T)`` on ``y``.

    ``scores`` are ``(N, C)`` logits or log-probabilities (:func:`log_proba` of a fuser's
    output): both give the same probabilities under the softmax. The search is over ``log T``
    (bounded Brent, :func:`scipy.optimize.minimize_scalar`); 1.0 is returned unless the optimum
    is strictly better than ``T = 1``.
    """
    from scipy.optimize import minimize_scalar

    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y)
    if scores.ndim != 2 or y.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (N, C) and y (N,), got {scores.shape} and {y.shape}")
    if not 0 < bounds[0] <= 1.0 <= bounds[1]:
        raise ValueError(f"bounds must contain 1 and be positive, got {bounds}")
    result = minimize_scalar(lambda log_t: _nll(scores, y, np.exp(log_t)), bounds=np.log(bounds),
                             method="bounded", options={"xatol": 1e-5})
    temperature = float(np.exp(result.x))
    return temperature if _nll(scores, y, temperature) < _nll(scores, y, 1.0) else 1.0


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities ``softmax(scores / T)`` over the last axis (works for ``(N, C)`` and ``(M, N, C)``)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return softmax(np.asarray(scores, dtype=np.float64) / temperature, axis=-1)


class TemperatureScaled(Fuser):
    """Any fuser, with its probabilities temperature scaled.

    ``fit`` fits the wrapped fuser (a clone: ``fuser`` is left unfitted) on all of ``(logits,
    y)``; the temperature is fitted on that fuser's out-of-fold probabilities
    (:func:`~fusion_engine.crossfit.cross_val_proba` with ``cv`` and ``seed``), because a fuser
    that learns looks more confident in-sample than it will be on test. A fuser that learns
    nothing is scored in-sample, which is then the same thing.

    ``weights_`` of the wrapped fuser, when it has them, are shown as this one's.
    """

    requires_fit = True

    def __init__(self, fuser: Fuser, cv: int | None = None, seed: int | None = None):
        self.fuser = fuser
        self.cv = cv
        self.seed = seed


    @property
    def needs_costs(self) -> bool:
        return self.fuser.needs_costs

    def check_members(self, n_members: int) -> None:
        self.fuser.check_members(n_members)

    def fit(self, logits: np.ndarray, y: np.ndarray, **fit_params) -> "TemperatureScaled":
        from .crossfit import cross_val_proba

        super().fit(logits, y)
        oof = cross_val_proba(self.fuser, logits, y, cv=self.cv, seed=self.seed, fit_params=fit_params)
        self.temperature_ = fit_temperature(log_proba(oof), y)
        self.fuser_ = self.fuser.clone().fit(logits, y, **fit_params)
        if hasattr(self.fuser_, "weights_"):
            self.weights_ = self.fuser_.weights_
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        return apply_temperature(log_proba(self.fuser_.predict_proba(check_logits(logits))), self.temperature_)

    def onnx_proba(self, graph: Any, logits: str) -> str:
        """The wrapped fuser's graph, then ``softmax(log(max(p, 1e-12)) / T)``."""
        proba = self.fuser_.onnx_proba(graph, logits)
        log_p = graph.op("Log", graph.op("Max", proba, graph.const(PROBA_FLOOR)))
        return graph.op("Softmax", graph.op("Div", log_p, graph.const(self.temperature_)), axis=1)

    def consulted(self, logits: np.ndarray) -> np.ndarray:
        return self.fuser_.consulted(logits)

    def consult_order(self) -> list[int] | None:
        return self.fuser_.consult_order()

    def get_state(self, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        state = super().get_state(skip=(*skip, "fuser_"))
        if hasattr(self, "fuser_"):
            state["fuser_"] = self.fuser_.get_state()
        return state

    def set_state(self, state: dict[str, Any]) -> "TemperatureScaled":
        state = dict(state)
        if "fuser_" in state:
            self.fuser_ = self.fuser.clone().set_state(state.pop("fuser_"))
        return super().set_state(state)
