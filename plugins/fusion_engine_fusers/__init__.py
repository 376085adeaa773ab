"""fusion-engine first-party plugin: fusers.

Written exactly as a third-party fuser plugin would be, on the public API only:
the names ``fusion_engine`` exports. Each fuser's parameters are its ``__init__``'s keyword
arguments, annotated with their constraints: the engine reads its ``Params`` model off them, so
a parameter is written once. Heavy libraries (scikit-learn's models,
XGBoost) load inside ``fit``, so listing plugins stays fast; nothing here imports torch.
"""

from __future__ import annotations

from fusion_engine import FuserRecord, hookimpl

from .averaging import Mean, Weighted
from .cascade import Cascade
from .selection import Caruana
from .stackers import LogisticStacking, XGBoostStacking
from .voting import Vote

__all__ = ["Caruana", "Cascade", "LogisticStacking", "Mean", "Vote", "Weighted", "XGBoostStacking"]


@hookimpl
def register_fusers():
    return [
        FuserRecord("mean", Mean, description="mean of member probabilities (space: prob or logprob), fixed weights"),
        FuserRecord("vote", Vote, description="hard majority vote; ties go to the highest mean probability"),
        FuserRecord("weighted", Weighted, description="weighted mean of probabilities, weights fitted for NLL"),
        FuserRecord("caruana", Caruana, description="greedy ensemble selection with replacement (Caruana 2004)"),
        FuserRecord("logistic-stacking", LogisticStacking, description="logistic regression on member log-probabilities"),
        FuserRecord("xgboost-stacking", XGBoostStacking,
                    description="gradient-boosted trees (XGBoost) on member log-probabilities"),
        FuserRecord("cascade", Cascade, description="members from the cheapest; a sample stops at the first "
                    "confident stage (thresholds for an accuracy drop or a budget, chosen on val)"),
    ]
