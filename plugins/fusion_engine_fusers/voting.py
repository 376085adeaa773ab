"""Hard majority vote, with a deterministic tie-break.

Each member votes for its top class (its highest logit; the lowest class index among equal
logits). A class's vote share is the summed weight of the members voting for it.

Tie-break rule: among the classes tied for the largest vote share (equal within 1e-9), the winner
is the one with the highest mean probability over the members (weighted like the votes); if
that ties exactly too, the lowest class index. With two members every disagreement is a tie, so
the more confident member decides.

``predict_proba`` returns the vote shares, nudged by ``TIE_BREAK`` towards the winner
(``(1 - TIE_BREAK) * shares + TIE_BREAK * onehot(winner)``): rows still sum to 1, and their
argmax is exactly the tie-broken vote, which is how the engine scores accuracy. Hard votes put
(almost) no probability on the classes nobody voted for, so their NLL is poor, as it should be.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy.special import softmax

from fusion_engine import Fuser, check_logits

if TYPE_CHECKING:  # pragma: no cover
    from fusion_engine import FuserGraph

from .averaging import MemberWeights, learn_weights, member_weights

TIE_BREAK = 1e-6
TIE_TOLERANCE = 1e-9


def vote(logits: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(shares (N, C), winner (N,))``: each class's share of the weighted votes and the
    tie-broken winning class."""
    logits = check_logits(logits)
    n_members, n_samples, n_classes = logits.shape
    shares = np.zeros((n_samples, n_classes))
    for member, top in enumerate(np.argmax(logits, axis=2)):
        shares[np.arange(n_samples), top] += weights[member]
    mean_proba = np.tensordot(weights, softmax(logits, axis=2), axes=1)
    tied = shares >= shares.max(axis=1, keepdims=True) - TIE_TOLERANCE
    winner = np.argmax(np.where(tied, mean_proba, -np.inf), axis=1)
    return shares, winner


class Vote(Fuser):
    """Majority vote of the members' top classes (see the module docstring for the tie-break).

    ``weights``: ``None`` (one member, one vote), a fixed list (one per member), or
    ``"learned"``: the weights of ``weighted`` (NLL-optimal soft-averaging weights on
    validation), which makes this fuser one that must be fitted.
    """

    def __init__(self, weights: MemberWeights | Literal["learned"] | None = None):
        self.weights = weights

    @property
    def requires_fit(self) -> bool:
        return self.weights == "learned"

    def check_members(self, n_members: int) -> None:
        if not self.requires_fit:
            member_weights(self.weights, n_members)

    def fit(self, logits: np.ndarray, y: np.ndarray) -> "Vote":
        super().fit(logits, y)
        if self.requires_fit:
            self.weights_ = learn_weights(softmax(check_logits(logits), axis=2), np.asarray(y))
        else:
            self.weights_ = member_weights(self.weights, self.n_members_)
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        logits = check_logits(logits)
        weights = self.weights_ if self.requires_fit else self.weights
        shares, winner = vote(logits, member_weights(weights, logits.shape[0]))
        return (1 - TIE_BREAK) * shares + TIE_BREAK * np.eye(logits.shape[2])[winner]

    def onnx_proba(self, graph: FuserGraph, logits: str) -> str:
        """:func:`vote` and :meth:`predict_proba` node for node: the first highest logit of each
        member, the weighted shares, the tie-break on the weighted mean probability."""
        w = member_weights(self.weights_ if self.requires_fit else self.weights, graph.n_members)
        classes = graph.const(np.arange(graph.n_classes), "int64")

        def one_hot(index: str) -> str:
            return graph.cast(graph.op("Equal", index, classes), "float64")

        top = graph.op("ArgMax", logits, axis=2, keepdims=1, select_last_index=0)  # (M, N, 1): the first maximum
        shares = graph.weighted_sum(w, one_hot(top))
        mean_proba = graph.weighted_sum(w, graph.op("Softmax", logits, axis=2))
        best = graph.op("ReduceMax", shares, graph.const([1], "int64"), keepdims=1)
        tied = graph.op("GreaterOrEqual", shares, graph.op("Sub", best, graph.const(TIE_TOLERANCE)))
        masked = graph.op("Where", tied, mean_proba, graph.const(-np.inf))
        winner = graph.op("ArgMax", masked, axis=1, keepdims=1, select_last_index=0)
        return graph.op("Add", graph.op("Mul", shares, graph.const(1 - TIE_BREAK)),
                        graph.op("Mul", one_hot(winner), graph.const(TIE_BREAK)))
