"""A confidence cascade: members consulted from the cheapest to the dearest, each sample stopping
at the first stage sure enough of its answer (Wang et al., 2022, "Wisdom of Committees: An
Overlooked Approach to Faster and More Accurate Models").

Stage ``k`` holds the mean of the probabilities of the first ``k + 1`` members in the cascade's
order; its confidence is that mean's largest probability (``confidence="max_prob"``) or the same
after a temperature fitted for that stage (``"calibrated"``). A sample stops at the first stage
whose confidence reaches the stage's threshold and gets that stage's mean; the last stage, the
mean of every member, answers whatever is left. The cost of a sample is the sum of the costs of
the members it ran.

The thresholds are the fuser's fit: chosen on the samples it is given (val, and each fold of val
when the engine cross-fits it) for a target the user states:

- ``max_accuracy_drop`` (default 0.002): the cheapest thresholds whose accuracy is at most that
  much below the mean of every member, on the same samples;
- ``budget`` (milliseconds per image): the most accurate thresholds whose expected cost fits.

The search is over ``n_thresholds`` quantiles of each stage's confidence (plus "stop every
sample" and "stop none"): every combination when there are few, else coordinate descent from
"stop none" (which meets any accuracy target).
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from pydantic import Field, PositiveFloat
from scipy.special import softmax

from fusion_engine import Fuser, apply_temperature, check_logits, fit_temperature

if TYPE_CHECKING:  # pragma: no cover
    from fusion_engine import FuserGraph

log = logging.getLogger("fusion_engine")

#: a threshold above any confidence: no sample stops at that stage (JSON has no infinity)
NEVER = 2.0
#: combinations of thresholds searched exhaustively; beyond, coordinate descent
EXHAUSTIVE = 20_000


class Cascade(Fuser):
    """Members from the cheapest to the dearest; a sample stops where the running mean is
    confident enough (see the module docstring). Needs each member's inference cost."""

    requires_fit = True
    needs_costs = True

    def __init__(
        self,
        max_accuracy_drop: Annotated[float, Field(ge=0, le=1, description=(
            "accuracy the cascade may lose against the mean of every member, on the samples it is fitted on"))] = 0.002,
        budget: Annotated[PositiveFloat | None, Field(description=(
            "milliseconds per image: the most accurate cascade that costs no more (replaces max_accuracy_drop)"))] = None,
        order: Annotated[Literal["cost", "spec"], Field(description=(
            "cost: cheapest member first; spec: the order the fuser's members are listed in"))] = "cost",
        confidence: Annotated[Literal["max_prob", "calibrated"], Field(description=(
            "a stage's confidence: the running mean's top probability, or the same after a temperature fitted "
            "for the stage"))] = "max_prob",
        n_thresholds: Annotated[int, Field(ge=2, le=1000, description="candidate thresholds per stage")] = 64,
    ):
        self.max_accuracy_drop = max_accuracy_drop
        self.budget = budget
        self.order = order
        self.confidence = confidence
        self.n_thresholds = n_thresholds

    # -- fitting ----------------------------------------------------------------------------------
    def fit(self, logits: np.ndarray, y: np.ndarray, costs=None) -> "Cascade":
        super().fit(logits, y)
        arr = check_logits(logits, y)
        y = np.asarray(y)
        self.costs_ = _check_costs(costs, arr.shape[0])
        self.order_ = (np.argsort(self.costs_, kind="stable") if self.order == "cost"
                       else np.arange(arr.shape[0])).tolist()
        means = self._running_means(arr)
        if self.confidence == "calibrated":
            self.temperatures_ = [fit_temperature(np.log(np.clip(m, 1e-12, None)), y) for m in means[:-1]]
        conf = self._confidences(means)
        correct = np.argmax(means, axis=2) == y  # (K, N): each stage's answer right or wrong
        stage_cost = np.cumsum(self.costs_[self.order_])
        candidates = [np.unique(np.concatenate([[0.0, NEVER], np.quantile(c, np.linspace(0, 1, self.n_thresholds))]))
                      for c in conf[:-1]]

        def outcome(thresholds) -> tuple[float, float]:
            stage = _exit_stage(conf, np.asarray(thresholds))
            n = np.arange(len(y))
            return float(correct[stage, n].mean()), float(stage_cost[stage].mean())

        full_accuracy = float(correct[-1].mean())
        if self.budget is None:
            floor = full_accuracy - self.max_accuracy_drop - 1e-12

            def score(acc: float, cost: float, thresholds) -> tuple:  # cheapest within the drop; then accuracy
                return (acc >= floor, -cost if acc >= floor else acc, acc, sum(thresholds))
        else:
            cap = self.budget + 1e-12

            def score(acc: float, cost: float, thresholds) -> tuple:  # most accurate within the budget
                return (cost <= cap, acc if cost <= cap else -cost, -cost, sum(thresholds))

        best = _search(candidates, lambda t: score(*outcome(t), t))
        self.thresholds_ = [float(t) for t in best]
        self.full_accuracy_, (self.accuracy_, self.expected_cost_) = full_accuracy, outcome(best)
        self.target_met_ = bool(score(self.accuracy_, self.expected_cost_, best)[0])
        if not self.target_met_:
            log.warning("cascade: no thresholds meet a budget of %.4g ms per image (the cheapest member alone costs "
                        "%.4g); every sample stops at the first stage", self.budget, stage_cost[0])
        return self

    # -- predicting ---------------------------------------------------------------------------------
    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        means = self._running_means(check_logits(logits))
        stage = _exit_stage(self._confidences(means), np.asarray(self.thresholds_))
        return means[stage, np.arange(means.shape[1])]

    def consulted(self, logits: np.ndarray) -> np.ndarray:
        means = self._running_means(check_logits(logits))
        stage = _exit_stage(self._confidences(means), np.asarray(self.thresholds_))
        used = np.zeros((means.shape[1], means.shape[0]), dtype=bool)
        for k, member in enumerate(self.order_):
            used[:, member] = stage >= k
        return used

    def consult_order(self) -> list[int]:
        """Stage k needs member ``order_[k]`` only when stages 0..k-1 (the members before it)
        were not confident enough: an exported cascade runs each member on the images that reach it."""
        return [int(m) for m in self.order_]

    def onnx_proba(self, graph: FuserGraph, logits: str) -> str:
        """:meth:`predict_proba` as a graph: the running means, each stage's confidence, the first
        stage that reaches its threshold (the last stage's threshold is -inf), that stage's mean.
        A graph has no early exit: it runs every member on every image, so it gives the cascade's
        probabilities at the cost of all its members."""
        k = len(self.order_)
        proba = graph.op("Gather", graph.op("Softmax", logits, axis=2), graph.const(self.order_, "int64"), axis=0)
        means = graph.op("Div", graph.op("CumSum", proba, graph.const(0, "int64")),
                         graph.const(np.arange(1, k + 1, dtype=np.float64).reshape(-1, 1, 1)))
        scores = means
        if self.confidence == "calibrated":  # as apply_temperature(log(clip(m, 1e-12)), t) per stage
            temperatures = np.asarray([*self.temperatures_, 1.0], dtype=np.float64).reshape(-1, 1, 1)
            log_means = graph.op("Log", graph.op("Max", means, graph.const(1e-12)))
            scores = graph.op("Softmax", graph.op("Div", log_means, graph.const(temperatures)), axis=2)
        conf = graph.op("ReduceMax", scores, graph.const([2], "int64"), keepdims=0)  # (K, N)
        thresholds = np.asarray([*self.thresholds_, -np.inf], dtype=np.float64).reshape(-1, 1)
        passes = graph.cast(graph.op("GreaterOrEqual", conf, graph.const(thresholds)), "float64")
        stage = graph.op("ArgMax", passes, axis=0, keepdims=1, select_last_index=0)  # (1, N): the first stage that passes
        chosen = graph.cast(graph.op("Equal", stage, graph.const(np.arange(k).reshape(-1, 1), "int64")), "float64")
        picked = graph.op("Mul", means, graph.op("Unsqueeze", chosen, graph.const([2], "int64")))
        return graph.op("ReduceSum", picked, graph.const([0], "int64"), keepdims=0)  # exact: one term is not zero

    def _running_means(self, logits: np.ndarray) -> np.ndarray:
        """``(K, N, C)``: stage k's mean of the probabilities of the first k + 1 members in order."""
        proba = softmax(logits[list(self.order_)], axis=2)
        return np.cumsum(proba, axis=0) / np.arange(1, len(proba) + 1)[:, None, None]

    def _confidences(self, means: np.ndarray) -> np.ndarray:
        if self.confidence == "calibrated":
            scaled = [apply_temperature(np.log(np.clip(m, 1e-12, None)), t) for m, t in zip(means, self.temperatures_)]
            return np.stack([s.max(axis=1) for s in scaled] + [means[-1].max(axis=1)])
        return means.max(axis=2)


def _check_costs(costs, n_members: int) -> np.ndarray:
    if costs is None:
        raise ValueError("the cascade needs each member's inference cost (costs=, milliseconds per image)")
    costs = np.asarray(costs, dtype=np.float64)
    if costs.shape != (n_members,) or not np.all(np.isfinite(costs)) or np.any(costs < 0):
        raise ValueError(f"costs must be {n_members} non-negative numbers, one per member; got {costs.tolist()}")
    return costs


def _exit_stage(conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Each sample's stage: the first whose confidence reaches its threshold, else the last."""
    passes = conf[:-1] >= thresholds[:, None]
    return np.where(passes.any(axis=0), passes.argmax(axis=0), len(conf) - 1)


def _search(candidates: list[np.ndarray], score) -> tuple[float, ...]:
    """The thresholds with the highest ``score``: every combination of ``candidates`` when there
    are at most :data:`EXHAUSTIVE`, else coordinate descent from "stop none"."""
    if not candidates:
        return ()
    if np.prod([len(c) for c in candidates], dtype=np.float64) <= EXHAUSTIVE:
        return max(itertools.product(*candidates), key=score)
    current = [NEVER] * len(candidates)
    best = score(tuple(current))
    for _ in range(20):
        improved = False
        for k, values in enumerate(candidates):
            for value in values:
                trial = tuple(current[:k] + [value] + current[k + 1:])
                s = score(trial)
                if s > best:
                    best, current, improved = s, list(trial), True
        if not improved:
            break
    return tuple(current)

