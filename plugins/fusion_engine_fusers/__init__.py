"""fusion-engine first-party plugin: fusers.

Written exactly as a third-party fuser plugin would be, on the public API only:
``fusion_engine`` plus :mod:`fusion_engine.stacking`. Heavy libraries (scikit-learn's models,
XGBoost) load inside ``fit``, so listing plugins stays fast; nothing here imports torch.
"""

from __future__ import annotations

from fusion_engine import FuserRecord, hookimpl

from .averaging import Mean, MeanParams, Weighted, WeightedParams
from .selection import Caruana, CaruanaParams
from .stackers import LogisticStacking, LogisticStackingParams, XGBoostStacking, XGBoostStackingParams
from .voting import Vote, VoteParams

__all__ = ["Caruana", "LogisticStacking", "Mean", "Vote", "Weighted", "XGBoostStacking"]


@hookimpl
def register_fusers():
    return [
        FuserRecord("mean", Mean, MeanParams, "mean of member probabilities (space: prob or logprob), fixed weights"),
        FuserRecord("vote", Vote, VoteParams, "hard majority vote; ties go to the highest mean probability"),
        FuserRecord("weighted", Weighted, WeightedParams, "weighted mean of probabilities, weights fitted for NLL"),
        FuserRecord("caruana", Caruana, CaruanaParams, "greedy ensemble selection with replacement (Caruana 2004)"),
        FuserRecord("logistic-stacking", LogisticStacking, LogisticStackingParams,
                    "logistic regression on member log-probabilities"),
        FuserRecord("xgboost-stacking", XGBoostStacking, XGBoostStackingParams,
                    "gradient-boosted trees (XGBoost) on member log-probabilities"),
    ]
