"""fusion-engine first-party plugin: the leaderboard's metrics, from scikit-learn.

Each metric scores one leaderboard row on one split from the true labels and the row's
class probabilities ``(N, C)``.
"""

from __future__ import annotations

import numpy as np

from fusion_engine import MetricRecord, hookimpl


def accuracy(y_true: np.ndarray, proba: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(y_true, np.argmax(proba, axis=1)))


def _averaged(score_name: str):
    def score(y_true: np.ndarray, proba: np.ndarray) -> float:
        import sklearn.metrics

        fn = getattr(sklearn.metrics, f"{score_name}_score")
        labels = np.arange(proba.shape[1])
        return float(fn(y_true, np.argmax(proba, axis=1), labels=labels, average="macro", zero_division=0))

    score.__name__ = f"{score_name}_macro"
    score.__doc__ = f"Macro-averaged {score_name} over every class (a class never predicted scores 0)."
    return score


def nll(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (log loss), in nats."""
    from sklearn.metrics import log_loss

    return float(log_loss(y_true, proba, labels=np.arange(proba.shape[1])))


@hookimpl
def register_metrics():
    return [
        MetricRecord("accuracy", accuracy, higher_is_better=True, description="fraction of samples whose top class is right"),
        MetricRecord("precision_macro", _averaged("precision"), description="precision averaged over classes"),
        MetricRecord("recall_macro", _averaged("recall"), description="recall averaged over classes"),
        MetricRecord("f1_macro", _averaged("f1"), description="F1 averaged over classes"),
        MetricRecord("nll", nll, higher_is_better=False, description="negative log-likelihood (log loss)"),
    ]
