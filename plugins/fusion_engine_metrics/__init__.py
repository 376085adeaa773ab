"""fusion-engine first-party plugin: the leaderboard's metrics, from scikit-learn.

``accuracy`` and ``nll`` are the core's own (:mod:`fusion_engine.evaluation`), which the
leaderboard computes whether or not this plugin is installed; registering them here places their
columns among the others.

Each metric scores one leaderboard row on one split from the true labels and the row's
class probabilities ``(N, C)``. Every class ``0..C-1`` counts, whether or not it occurs in the
split. A metric that does not apply to a dataset returns NaN, and a column that is NaN for every
row is left off the leaderboard (``top5_accuracy`` with five classes or fewer).
docs/evaluation.md says what each one answers.
"""

from __future__ import annotations

import numpy as np

from fusion_engine import MetricRecord, accuracy, expected_calibration_error, hookimpl, nll

TOP_K = 5
ECE_BINS = 15


def _averaged(score_name: str, average: str):
    def score(y_true: np.ndarray, proba: np.ndarray) -> float:
        import sklearn.metrics

        fn = getattr(sklearn.metrics, f"{score_name}_score")
        labels = np.arange(proba.shape[1])
        return float(fn(y_true, np.argmax(proba, axis=1), labels=labels, average=average, zero_division=0))

    score.__name__ = f"{score_name}_{average}"
    weighting = "equally" if average == "macro" else "by its number of true samples"
    score.__doc__ = f"{score_name.title()} per class, each class weighted {weighting} (a class never predicted scores 0)."
    return score


def top_k_accuracy(y_true: np.ndarray, proba: np.ndarray, k: int = TOP_K) -> float:
    """Fraction of samples whose label is among the ``k`` most probable classes; NaN unless
    there are more than ``k`` classes (with ``C <= k`` it is 1 for every model)."""
    from sklearn.metrics import top_k_accuracy_score

    if proba.shape[1] <= k:
        return float("nan")
    return float(top_k_accuracy_score(y_true, proba, k=k, labels=np.arange(proba.shape[1])))


def brier(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Multiclass Brier score: the mean over samples of ``sum_c (p_c - [y = c])^2``, in [0, 2].

    Not halved, for two classes either, so that it means the same for every dataset
    (scikit-learn's ``scale_by_half=False``).
    """
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(y_true, proba, labels=np.arange(proba.shape[1]), scale_by_half=False))


def ece(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Top-label expected calibration error in 15 equal-width confidence bins."""
    return expected_calibration_error(y_true, proba, n_bins=ECE_BINS)


@hookimpl
def register_metrics():
    # the order here is the order of the leaderboard's columns
    return [
        MetricRecord("accuracy", accuracy, higher_is_better=True, description="fraction of samples whose top class is right"),
        MetricRecord("precision_macro", _averaged("precision", "macro"), description="precision averaged over classes"),
        MetricRecord("recall_macro", _averaged("recall", "macro"), description="recall averaged over classes"),
        MetricRecord("f1_macro", _averaged("f1", "macro"), description="F1 averaged over classes"),
        MetricRecord("nll", nll, higher_is_better=False, description="negative log-likelihood (log loss)"),
        MetricRecord("precision_weighted", _averaged("precision", "weighted"),
                     description="precision averaged over classes, weighted by class frequency"),
        MetricRecord("recall_weighted", _averaged("recall", "weighted"),
                     description="recall averaged over classes, weighted by class frequency"),
        MetricRecord("f1_weighted", _averaged("f1", "weighted"),
                     description="F1 averaged over classes, weighted by class frequency"),
        MetricRecord(f"top{TOP_K}_accuracy", top_k_accuracy,
                     description=f"label among the {TOP_K} most probable classes (only with more than {TOP_K} classes)"),
        MetricRecord("brier", brier, higher_is_better=False,
                     description="multiclass Brier score: mean sum of squared probability errors"),
        MetricRecord("ece", ece, higher_is_better=False,
                     description=f"expected calibration error, top label, {ECE_BINS} equal-width bins"),
    ]
