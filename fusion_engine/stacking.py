"""Stacking: a learned classifier (the final estimator) on the members' outputs.

:class:`StackingFuser` does what every stacker shares: it builds the features (each member's
log-probabilities, optionally its raw logits), encodes the classes seen in validation as
``0..K-1`` (some learners, XGBoost among them, need contiguous labels), puts the final estimator's
probabilities back into all ``C`` class columns, and keeps the estimator in a JSON state. A
subclass says only which estimator to fit and how to save and load it.

Unlike scikit-learn's ``StackingClassifier``, no cross-validation is needed to build the
features: the members were trained on the train split, so their validation outputs are already
out-of-sample. ``cv`` is how many folds the engine uses to score the fuser out-of-fold on
validation (see :func:`fusion_engine.crossfit.cross_val_proba`).
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field
from scipy.special import log_softmax

from .fuser import Fuser, check_logits
from .records import params_from_signature

__all__ = ["StackingFuser", "StackingParams", "member_totals", "stack_features"]

def stack_features(logits: np.ndarray, append_logits: bool = False) -> np.ndarray:
    """The ``(N, M*C)`` design matrix: member by member, its ``C`` log-probabilities, then, with
    ``append_logits``, its ``C`` raw logits (another ``M*C`` columns).

    Log-probabilities rather than probabilities keep a confident member's evidence on a linear
    scale, which is what a linear final estimator can use.
    """
    logits = check_logits(logits)
    n_members, n_samples, n_classes = logits.shape
    parts = [log_softmax(logits, axis=2)]
    if append_logits:
        parts.append(logits)
    return np.concatenate([p.transpose(1, 0, 2).reshape(n_samples, n_members * n_classes) for p in parts], axis=1)


def member_totals(per_feature: np.ndarray, n_members: int, n_classes: int) -> np.ndarray:
    """Per-feature values of :func:`stack_features`' columns summed by member: the columns are
    member-major blocks of ``n_classes``, once for log-probabilities and once more for logits
    when they were appended."""
    per_member = n_members * n_classes
    out = np.zeros(n_members)
    for f, v in enumerate(np.asarray(per_feature, dtype=np.float64)):
        out[(f % per_member) // n_classes] += v
    return out


class StackingFuser(Fuser):
    """Base class for stackers: subclasses implement :meth:`make_estimator`,
    :meth:`save_estimator` and :meth:`load_estimator`, and take ``append_logits``, ``cv`` and
    ``seed`` as keyword arguments of their ``__init__`` (passed on to this one).

    The fitted estimator is ``final_estimator_`` (scikit-learn's name), trained on labels
    ``0..K-1`` that index ``classes_``, the classes present in the training labels.
    ``importance_`` is each member's share of the estimator's feature importance
    (:meth:`feature_importances`, summed over that member's features), shown in the report as
    ``weights_`` are for averaging fusers. A class
    absent from them gets probability 0; when only one class is present no estimator is fitted
    and that class gets probability 1. Right after fitting, the estimator is replaced by
    ``load_estimator(save_estimator(estimator))``: a fitted fuser then predicts through the same
    code as one restored from JSON, and the two agree bit for bit. Rows are renormalised to sum
    to 1 in float64 (XGBoost answers in float32).
    """

    requires_fit = True

    def __init__(self, append_logits: bool = False, cv: Annotated[int, Field(ge=2)] = 5, seed: int = 0):
        self.append_logits = append_logits
        self.cv = cv
        self.seed = seed

    # -- what a subclass provides ----------------------------------------------------------
    def make_estimator(self) -> Any:
        """A fresh, unfitted classifier with ``fit(X, y)`` and ``predict_proba(X)``."""
        raise NotImplementedError

    def save_estimator(self, estimator: Any) -> dict[str, Any]:
        """The fitted estimator as a JSON-able dict (no pickle). It receives either what
        :meth:`make_estimator` made, fitted, or what :meth:`load_estimator` returned."""
        raise NotImplementedError

    def load_estimator(self, state: dict[str, Any]) -> Any:
        """The fitted estimator back from :meth:`save_estimator`'s dict: anything with
        ``predict_proba(X) -> (N, K)``, not necessarily the class :meth:`make_estimator` made."""
        raise NotImplementedError

    def feature_importances(self, estimator: Any) -> np.ndarray | None:
        """One non-negative importance per feature of the fitted ``estimator``: scikit-learn's
        ``feature_importances_`` where it has one, else the absolute coefficients summed over
        classes (linear models); ``None`` when neither exists. Override for other estimators."""
        found = getattr(estimator, "feature_importances_", None)
        if found is not None:
            return np.asarray(found, dtype=np.float64)
        coef = getattr(estimator, "coef_", None)
        return None if coef is None else np.abs(np.atleast_2d(np.asarray(coef, dtype=np.float64))).sum(axis=0)

    # -- the fuser contract ----------------------------------------------------------------
    def features(self, logits: np.ndarray) -> np.ndarray:
        return stack_features(logits, self.append_logits)

    def fit(self, logits: np.ndarray, y: np.ndarray) -> "StackingFuser":
        super().fit(logits, y)
        y = np.asarray(y)
        self.classes_ = np.unique(y).astype(np.int64)
        if len(self.classes_) < 2:
            self.final_estimator_ = None
            return self
        estimator = self.make_estimator()
        estimator.fit(self.features(logits), np.searchsorted(self.classes_, y))
        self.final_estimator_ = self.load_estimator(self.save_estimator(estimator))
        importance = self.member_importance()
        if importance is not None:
            self.importance_ = importance
        return self

    def member_importance(self) -> np.ndarray | None:
        """Each member's share of the fitted estimator's feature importance (summing to 1), or
        None when there is no estimator or it reports no importance."""
        if getattr(self, "final_estimator_", None) is None:
            return None
        per_feature = self.feature_importances(self.final_estimator_)
        if per_feature is None:
            return None
        per_member = member_totals(per_feature, self.n_members_, self.n_classes_)
        return per_member / max(per_member.sum(), 1e-300)

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        logits = check_logits(logits)
        if logits.shape[0] != self.n_members_ or logits.shape[2] != self.n_classes_:
            raise ValueError(f"fitted on {self.n_members_} members and {self.n_classes_} classes, "
                             f"got logits of shape {logits.shape}")
        proba = np.zeros((logits.shape[1], self.n_classes_))
        if self.final_estimator_ is None:
            proba[:, self.classes_[0]] = 1.0
        else:
            proba[:, self.classes_] = self.final_estimator_.predict_proba(self.features(logits))
        return proba / proba.sum(axis=1, keepdims=True)

    def onnx_estimator(self, graph: Any, features: str) -> str:
        """Optional, for ONNX export: add to ``graph`` the nodes computing the final estimator's
        ``predict_proba`` from ``features`` (the float64 ``(batch, F)`` design matrix of
        :meth:`features`); return the name of its float64 ``(batch, K)`` probabilities."""
        raise NotImplementedError(f"fuser {type(self).__name__} has no ONNX graph for its final estimator "
                                  f"(it does not implement onnx_estimator)")

    def onnx_proba(self, graph: Any, logits: str) -> str:
        """The features (log-softmax, member-major, then the logits with ``append_logits``), the
        final estimator (:meth:`onnx_estimator`), its K columns put back among the C classes and
        renormalised: :meth:`predict_proba` as a graph."""
        n_members, n_classes = graph.n_members, graph.n_classes
        if self.final_estimator_ is None:
            return graph.rows(logits, np.eye(n_classes)[self.classes_[0]])
        shape = graph.const([-1, n_members * n_classes], "int64")
        parts = [graph.op("LogSoftmax", logits, axis=2)] + ([logits] if self.append_logits else [])
        flat = [graph.op("Reshape", graph.op("Transpose", p, perm=[1, 0, 2]), shape) for p in parts]
        features = flat[0] if len(flat) == 1 else graph.op("Concat", *flat, axis=1)
        proba_k = self.onnx_estimator(graph, features)
        scatter = np.zeros((len(self.classes_), n_classes))
        scatter[np.arange(len(self.classes_)), self.classes_] = 1.0
        proba = graph.op("MatMul", proba_k, graph.const(scatter))
        return graph.op("Div", proba, graph.op("ReduceSum", proba, graph.const([1], "int64"), keepdims=1))

    def get_state(self, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        state = super().get_state(skip=(*skip, "final_estimator_"))
        if hasattr(self, "final_estimator_"):
            estimator = self.final_estimator_
            state["final_estimator_"] = None if estimator is None else self.save_estimator(estimator)
        return state

    def set_state(self, state: dict[str, Any]) -> "StackingFuser":
        state = dict(state)
        estimator = state.pop("final_estimator_", None)
        super().set_state(state)
        self.final_estimator_ = None if estimator is None else self.load_estimator(estimator)
        return self


#: The parameters every stacker shares, as a ``Params`` model: kept for stacking plugins written
#: against fusion-engine 0.1, whose ``Params`` subclass it. New stackers need no ``Params`` model:
#: ``FuserRecord`` reads one off ``__init__``.
StackingParams = params_from_signature(StackingFuser)
