"""Stacking with a logistic regression or gradient-boosted trees as the final estimator.

Both build on :class:`fusion_engine.stacking.StackingFuser`, which makes the features (member
log-probabilities), handles classes missing from validation and keeps the JSON state; each class
here only picks its estimator and saves it without pickle. Their defaults are chosen for small
validation sets: a regularised model with few degrees of freedom.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt

from fusion_engine import StackingFuser

if TYPE_CHECKING:  # pragma: no cover
    from fusion_engine import FuserGraph

#: the parameters every stacker shares (see :class:`fusion_engine.StackingFuser`)
Folds = Annotated[int, Field(ge=2, description="folds for scoring the stacker out-of-fold on val")]
AppendLogits = Annotated[bool, Field(description="also feed each member's raw logits to the meta-learner")]


class LogisticStacking(StackingFuser):
    """Multinomial logistic regression (scikit-learn, lbfgs, L2 with strength ``1/C``) on the
    members' log-probabilities: it learns per-member, per-class trust and can undo a member's
    systematic class confusions, with few parameters. State: ``coef_``, ``intercept_``, ``classes_``."""

    def __init__(self, C: Annotated[PositiveFloat, Field(description="inverse L2 regularisation strength, as in "
                                                                      "scikit-learn")] = 1.0,
                 max_iter: PositiveInt = 1000, append_logits: AppendLogits = False, cv: Folds = 5, seed: int = 0):
        super().__init__(append_logits=append_logits, cv=cv, seed=seed)
        self.C = C
        self.max_iter = max_iter

    def make_estimator(self) -> Any:
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)

    def save_estimator(self, estimator: Any) -> dict[str, Any]:
        return {name: getattr(estimator, name).tolist() for name in ("coef_", "intercept_", "classes_")}

    def load_estimator(self, state: dict[str, Any]) -> Any:
        estimator = self.make_estimator()
        for name, value in state.items():
            setattr(estimator, name, np.asarray(value, dtype=np.int64 if name == "classes_" else np.float64))
        estimator.n_features_in_ = estimator.coef_.shape[1]
        return estimator

    def onnx_estimator(self, graph: FuserGraph, features: str) -> str:
        """scikit-learn's ``predict_proba``: ``softmax(X W^T + b)``, or for two classes (one row of
        coefficients) ``[1 - sigmoid(d), sigmoid(d)]``."""
        estimator = self.final_estimator_
        coef = np.atleast_2d(np.asarray(estimator.coef_, dtype=np.float64))
        decision = graph.op("Add", graph.op("MatMul", features, graph.const(coef.T)),
                            graph.const(np.asarray(estimator.intercept_, dtype=np.float64).reshape(-1)))
        if coef.shape[0] == 1:
            positive = graph.op("Sigmoid", decision)
            return graph.op("Concat", graph.op("Sub", graph.const([[1.0]]), positive), positive, axis=1)
        return graph.op("Softmax", decision, axis=1)


Fraction = Annotated[float, Field(gt=0, le=1)]
NonNegative = Annotated[float, Field(ge=0)]


class XGBoostStacking(StackingFuser):
    """Gradient-boosted trees (XGBoost, ``hist``) on the members' log-probabilities: can model
    interactions between members (trust B only when A is unsure). Shallow trees, shrinkage,
    row and column subsampling and ``min_child_weight`` keep it from memorising a small
    validation set. Deterministic for a given ``seed``. State: the booster's own JSON model."""

    def __init__(self, n_estimators: PositiveInt = 150, max_depth: PositiveInt = 2, learning_rate: PositiveFloat = 0.1,
                 subsample: Fraction = 0.8, colsample_bytree: Fraction = 0.8, min_child_weight: NonNegative = 2.0,
                 reg_lambda: NonNegative = 1.0,
                 n_jobs: Annotated[PositiveInt, Field(description="threads per fit; the engine already runs the fold "
                                                                  "fits side by side")] = 1,
                 append_logits: AppendLogits = False, cv: Folds = 5, seed: int = 0):
        super().__init__(append_logits=append_logits, cv=cv, seed=seed)
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.min_child_weight = min_child_weight
        self.reg_lambda = reg_lambda
        self.n_jobs = n_jobs

    def make_estimator(self) -> Any:
        from xgboost import XGBClassifier

        return XGBClassifier(n_estimators=self.n_estimators, max_depth=self.max_depth,
                             learning_rate=self.learning_rate, subsample=self.subsample,
                             colsample_bytree=self.colsample_bytree, min_child_weight=self.min_child_weight,
                             reg_lambda=self.reg_lambda, n_jobs=self.n_jobs, tree_method="hist",
                             random_state=self.seed, verbosity=0)

    def save_estimator(self, estimator: Any) -> dict[str, Any]:
        return {"booster": json.loads(estimator.get_booster().save_raw(raw_format="json"))}

    def load_estimator(self, state: dict[str, Any]) -> Any:
        estimator = self.make_estimator()
        estimator.load_model(bytearray(json.dumps(state["booster"]).encode()))
        return estimator

    def onnx_estimator(self, graph: FuserGraph, features: str) -> str:
        """The booster as onnxmltools converts it (a ``TreeEnsembleClassifier``), fed float32
        features as XGBoost's DMatrix rounds them. Trees jump at their thresholds: members whose
        logits move by float32 noise can move a sample across one, so the graph matches
        :meth:`predict_proba` on its own members' logits, not always to 1e-4 on the engine's."""
        try:
            from onnxmltools import convert_xgboost
            from onnxmltools.convert.common.data_types import FloatTensorType
        except ImportError:
            raise NotImplementedError("fuser xgboost-stacking needs onnxmltools for its ONNX graph "
                                      "(pip install 'fusion-engine[onnx]')") from None
        n_features = self.final_estimator_.get_booster().num_features()
        try:
            trees = convert_xgboost(self.final_estimator_, initial_types=[("features", FloatTensorType([None, n_features]))])
        except Exception as exc:  # the converter refuses what it cannot express
            raise NotImplementedError(f"onnxmltools cannot convert this XGBoost model: {type(exc).__name__}: "
                                      f"{' '.join(str(exc).split())}") from None
        _, proba = graph.include(trees, {"features": graph.cast(features, "float32")}, ["label", "probabilities"])
        return graph.cast(proba, "float64")

    def feature_importances(self, estimator: Any) -> np.ndarray:
        """How many tree splits use each feature (XGBoost's ``weight`` importance)."""
        n_features = estimator.get_booster().num_features()
        counts = estimator.get_booster().get_score(importance_type="weight")
        return np.array([counts.get(f"f{i}", 0.0) for i in range(n_features)], dtype=np.float64)
