"""Soft averaging of member probabilities: with fixed weights (``mean``) or learned ones (``weighted``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, Sequence

import numpy as np
from pydantic import AfterValidator, Field, NonNegativeFloat
from scipy.special import log_softmax, softmax

from fusion_engine import Fuser, check_logits

if TYPE_CHECKING:  # pragma: no cover
    from fusion_engine import FuserGraph


def member_weights(weights: Sequence[float] | None, n_members: int) -> np.ndarray:
    """``weights`` normalised to sum to 1; ``None`` means equal weights."""
    if weights is None:
        return np.full(n_members, 1.0 / n_members)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n_members,):
        raise ValueError(f"weights: {len(w)} given for {n_members} members; give one per member, in the fuser's "
                         f"members' order")
    if np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    return w / w.sum()


def _positive_sum(weights: list[float]) -> list[float]:
    if not weights or sum(weights) <= 0:
        raise ValueError("weights must not be empty or all zero")
    return weights


MemberWeights = Annotated[list[NonNegativeFloat], AfterValidator(_positive_sum)]
"""One non-negative weight per member, in the members' order; normalised to sum to 1 when used."""


def learn_weights(proba: np.ndarray, y: np.ndarray, l2: float = 0.0) -> np.ndarray:
    """Member weights on the simplex minimising the NLL of ``sum_m w_m proba[m]`` on ``y``.

    ``w = softmax(theta)`` keeps the weights non-negative and summing to 1 without constraints,
    so L-BFGS-B applies; ``theta`` starts at 0 (equal weights), so the result is deterministic.
    Only each member's probability of the true class enters the loss, which makes the exact
    gradient cheap. ``l2`` penalises ``theta`` and so pulls towards equal weights.
    """
    from scipy.optimize import minimize

    true_class = proba[:, np.arange(proba.shape[1]), y]

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = softmax(theta)
        p = np.maximum(w @ true_class, 1e-300)
        grad_w = -(true_class / p).mean(axis=1)
        loss = -np.log(p).mean() + l2 * theta @ theta
        return loss, w * (grad_w - w @ grad_w) + 2 * l2 * theta

    result = minimize(loss_and_grad, np.zeros(proba.shape[0]), jac=True, method="L-BFGS-B")
    return softmax(result.x)


class Mean(Fuser):
    """The (weighted) mean of the members' probabilities: the classic late fusion.

    ``space="prob"`` averages probabilities (arithmetic mean); ``space="logprob"`` averages
    log-probabilities and renormalises (a geometric mean, a product of experts), which lets one
    confident member veto a class the others favour. ``weights`` are fixed, one per member.
    """

    requires_fit = False

    def __init__(self, space: Literal["prob", "logprob"] = "prob", weights: MemberWeights | None = None):
        self.space = space
        self.weights = weights

    def check_members(self, n_members: int) -> None:
        member_weights(self.weights, n_members)

    def fit(self, logits: np.ndarray, y: np.ndarray) -> "Mean":
        super().fit(logits, y)
        self.weights_ = member_weights(self.weights, self.n_members_)
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        logits = check_logits(logits)
        w = member_weights(self.weights, logits.shape[0])
        if self.space == "logprob":
            return softmax(np.tensordot(w, log_softmax(logits, axis=2), axes=1), axis=1)
        return np.tensordot(w, softmax(logits, axis=2), axes=1)

    def onnx_proba(self, graph: FuserGraph, logits: str) -> str:
        w = member_weights(self.weights, graph.n_members)
        if self.space == "logprob":
            return graph.op("Softmax", graph.weighted_sum(w, graph.op("LogSoftmax", logits, axis=2)), axis=1)
        return graph.weighted_sum(w, graph.op("Softmax", logits, axis=2))


class Weighted(Fuser):
    """The mean of the members' probabilities with one weight per member, learned on validation
    by minimising the NLL (:func:`learn_weights`). Weights are non-negative and sum to 1, so a
    useless member can drop out (weight near 0) while the output stays a proper average."""

    requires_fit = True

    def __init__(self, l2: Annotated[NonNegativeFloat, Field(description="penalty pulling the weights towards equal")] = 0.0):
        self.l2 = l2

    def fit(self, logits: np.ndarray, y: np.ndarray) -> "Weighted":
        super().fit(logits, y)
        self.weights_ = learn_weights(softmax(check_logits(logits), axis=2), np.asarray(y), self.l2)
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        logits = check_logits(logits)
        return np.tensordot(member_weights(self.weights_, logits.shape[0]), softmax(logits, axis=2), axes=1)

    def onnx_proba(self, graph: FuserGraph, logits: str) -> str:
        return graph.weighted_sum(member_weights(self.weights_, graph.n_members), graph.op("Softmax", logits, axis=2))
