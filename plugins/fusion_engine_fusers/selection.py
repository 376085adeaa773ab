"""Ensemble selection (Caruana et al., 2004, "Ensemble Selection from Libraries of Models"), as
AutoGluon's ``EnsembleSelection`` does it.

Greedy forward selection with replacement: start from an empty ensemble (or the ``init_best``
best single members), then ``ensemble_size`` times add the member whose addition gives the best
validation ``metric`` of the averaged probabilities. Adding a member again raises its weight. The
selection is then cut back to the step with the best score (the first such step), and the
weights are the selection counts over their total; a member never selected has weight 0.

Ties in a greedy step (exactly equal scores, common with ``metric="accuracy"``) go to the lowest
member index, so the result is deterministic.

With ``bagging > 0``, the selection runs on that many random subsets of ``bag_fraction`` of the
members (drawn with ``seed``) and the weights are averaged over the bags, which makes the choice
less greedy when there are many members and few validation samples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from pydantic import Field, NonNegativeInt, PositiveInt
from scipy.special import softmax

from fusion_engine import Fuser, check_logits

if TYPE_CHECKING:  # pragma: no cover
    from fusion_engine import FuserGraph

from .averaging import member_weights


def _losses(proba: np.ndarray, y: np.ndarray, metric: str) -> np.ndarray:
    """Loss (lower is better) of each candidate ``proba[k]`` (``(K, N, C)``) on ``y``."""
    if metric == "accuracy":
        return 1.0 - (np.argmax(proba, axis=2) == y).mean(axis=1)
    return -np.log(np.clip(proba[:, np.arange(len(y)), y], 1e-15, None)).mean(axis=1)


def select(proba: np.ndarray, y: np.ndarray, ensemble_size: int = 25, metric: str = "nll",
           init_best: int = 0) -> np.ndarray:
    """Selection counts per member ``(M,)`` from greedy forward selection with replacement."""
    n_members = proba.shape[0]
    chosen = list(np.argsort(_losses(proba, y, metric), kind="stable")[:init_best])
    total = proba[chosen].sum(axis=0) if chosen else np.zeros(proba.shape[1:])
    trajectory = []
    for _ in range(ensemble_size):
        losses = _losses((total + proba) / (len(chosen) + 1), y, metric)
        best = int(np.argmin(losses))
        chosen.append(best)
        total += proba[best]
        trajectory.append(losses[best])
    chosen = chosen[:init_best + int(np.argmin(trajectory)) + 1]
    return np.bincount(chosen, minlength=n_members).astype(np.float64)


class Caruana(Fuser):
    """Greedy ensemble selection with replacement (see the module docstring); ``weights_`` are
    the selection frequencies, applied to the members' probabilities."""

    requires_fit = True

    def __init__(self, ensemble_size: PositiveInt = 25, metric: Literal["nll", "accuracy"] = "nll",
                 init_best: NonNegativeInt = 0, bagging: NonNegativeInt = 0,
                 bag_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5, seed: int = 0):
        self.ensemble_size = ensemble_size
        self.metric = metric
        self.init_best = init_best
        self.bagging = bagging
        self.bag_fraction = bag_fraction
        self.seed = seed

    def fit(self, logits: np.ndarray, y: np.ndarray) -> "Caruana":
        super().fit(logits, y)
        proba = softmax(check_logits(logits), axis=2)
        y = np.asarray(y)
        options = dict(ensemble_size=self.ensemble_size, metric=self.metric, init_best=self.init_best)
        if not self.bagging:
            counts = select(proba, y, **options)
            self.weights_ = counts / counts.sum()
            return self
        rng = np.random.default_rng(self.seed)
        bag_size = max(1, round(self.bag_fraction * self.n_members_))
        weights = np.zeros(self.n_members_)
        for _ in range(self.bagging):
            bag = np.sort(rng.choice(self.n_members_, size=bag_size, replace=False))
            counts = select(proba[bag], y, **options)
            weights[bag] += counts / counts.sum()
        self.weights_ = weights / self.bagging
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        logits = check_logits(logits)
        return np.tensordot(member_weights(self.weights_, logits.shape[0]), softmax(logits, axis=2), axes=1)

    def onnx_proba(self, graph: FuserGraph, logits: str) -> str:
        return graph.weighted_sum(member_weights(self.weights_, graph.n_members), graph.op("Softmax", logits, axis=2))
