"""The statistics behind the leaderboard: is a difference real, is a model calibrated, what does
it cost.

Every function here works on plain arrays, so the leaderboard, the plots and a user's notebook
share one implementation:

- :func:`accuracy` and :func:`nll`: the two core metrics, which choose the best member, break
  ties and fill the ``val_*`` columns whatever metric plugins are installed;
- :func:`bootstrap_indices`: one seeded set of test resamples, shared by every row, so that
  intervals of differences are *paired*;
- :func:`bootstrap_accuracy` and :func:`bootstrap_delta`: percentile intervals of a row's
  accuracy and of its accuracy minus a reference row's;
- :func:`mcnemar_exact`: the exact McNemar test of two classifiers on the same samples;
- :func:`reliability_bins` and :func:`expected_calibration_error`: top-label calibration in
  equal-width confidence bins;
- :func:`pareto_front`: which rows no other row beats on both accuracy and cost.

docs/evaluation.md says what each answers and why it is computed the way it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

DEFAULT_BINS = 15
_CHUNK_INDICES = 2_000_000


# -- core metrics ---------------------------------------------------------------------------------

def accuracy(y_true: np.ndarray, proba: np.ndarray) -> float:
    """The fraction of samples whose most probable class is the label."""
    return float(np.mean(np.argmax(proba, axis=1) == np.asarray(y_true))) if len(y_true) else float("nan")


def nll(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (log loss), in nats; every class
    ``0..C-1`` counts, whether or not it occurs in ``y_true``."""
    from sklearn.metrics import log_loss

    return float(log_loss(y_true, proba, labels=np.arange(np.shape(proba)[1]))) if len(y_true) else float("nan")


# -- bootstrap ------------------------------------------------------------------------------------

def bootstrap_indices(n_samples: int, n_bootstrap: int = 1000, seed: int = 0) -> Iterator[np.ndarray]:
    """Resample indices ``(b, n_samples)``, in chunks that hold about two million indices.

    The same ``(n_samples, n_bootstrap, seed)`` always gives the same resamples, whatever is
    scored with them: that is what makes every interval on one leaderboard paired.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_INDICES // max(n_samples, 1))
    done = 0
    while done < n_bootstrap:
        b = min(chunk, n_bootstrap - done)
        yield rng.integers(0, n_samples, size=(b, n_samples))
        done += b


def bootstrap_means(values: np.ndarray, n_bootstrap: int = 1000, seed: int = 0) -> np.ndarray:
    """Bootstrap distribution ``(R, n_bootstrap)`` of the mean of each row of ``values (R, N)``.

    Every row is resampled with the same indices (paired resampling).
    """
    values = np.atleast_2d(np.asarray(values))
    n_rows, n = values.shape
    out = np.full((n_rows, n_bootstrap), np.nan)
    if n == 0:
        return out
    start = 0
    for idx in bootstrap_indices(n, n_bootstrap, seed):
        for r in range(n_rows):
            out[r, start:start + len(idx)] = values[r][idx].mean(axis=1)
        start += len(idx)
    return out


def percentile_interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval along the last axis: ``(lo, hi)``."""
    alpha = (1.0 - confidence) / 2.0
    if samples.shape[-1] == 0:
        nan = np.full(samples.shape[:-1], np.nan)
        return nan, nan
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha], axis=-1)
    return lo, hi


def correct_matrix(y_true: np.ndarray, probas: list[np.ndarray]) -> np.ndarray:
    """``(R, N)`` booleans: whether each row's top class is the label."""
    y_true = np.asarray(y_true)
    return np.stack([np.argmax(p, axis=1) == y_true for p in probas]) if probas else np.zeros((0, len(y_true)), bool)


def bootstrap_accuracy(correct: np.ndarray, *, n_bootstrap: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of accuracy for each row of ``correct (R, N)``, paired across rows."""
    return percentile_interval(bootstrap_means(correct, n_bootstrap, seed), confidence)


def bootstrap_delta(correct: np.ndarray, reference: int, *, n_bootstrap: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy of each row minus that of row ``reference``, with its paired percentile interval.

    Each resample draws the same samples for both rows, so the interval reflects only the
    samples on which the two disagree, and is much narrower than the two accuracy intervals
    would suggest. Returns ``(delta, lo, hi)``, one value per row.
    """
    correct = np.asarray(correct, dtype=np.int8)
    diff = correct - correct[reference]
    delta = diff.mean(axis=1) if diff.shape[1] else np.full(diff.shape[0], np.nan)
    lo, hi = percentile_interval(bootstrap_means(diff, n_bootstrap, seed), confidence)
    return delta, lo, hi


# -- McNemar --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class McNemar:
    """``b``: samples only ``a`` gets right; ``c``: samples only ``b`` gets right."""

    b: int
    c: int
    p_value: float


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """Exact (binomial) two-sided McNemar test that two classifiers are equally accurate.

    Only discordant samples carry information: under the null each is equally likely to favour
    either classifier, so ``b ~ Binomial(b + c, 1/2)``; the two-sided p-value is
    ``min(1, 2 * P(X <= min(b, c)))``. With no discordant sample, ``p = 1``.
    """
    a = np.asarray(correct_a, dtype=bool)
    b_ = np.asarray(correct_b, dtype=bool)
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    return McNemar(b, c, mcnemar_p_value(b, c))


def mcnemar_p_value(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts ``b`` and ``c``."""
    if b + c == 0:
        return 1.0
    from scipy.special import bdtr  # the binomial CDF; scipy.stats would cost a second to import

    return float(min(1.0, 2.0 * bdtr(min(b, c), b + c, 0.5)))


# -- calibration ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReliabilityBins:
    """Top-label reliability in equal-width confidence bins ``edges[i] < conf <= edges[i+1]``.

    ``confidence`` and ``accuracy`` are NaN in empty bins.
    """

    edges: np.ndarray  # (B + 1,)
    count: np.ndarray  # (B,)
    confidence: np.ndarray  # (B,) mean top-class probability in the bin
    accuracy: np.ndarray  # (B,) fraction right in the bin

    @property
    def ece(self) -> float:
        n = self.count.sum()
        if n == 0:
            return float("nan")
        filled = self.count > 0
        gap = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float(np.sum(self.count[filled] * gap) / n)


def reliability_bins(y_true: np.ndarray, proba: np.ndarray, n_bins: int = DEFAULT_BINS) -> ReliabilityBins:
    """Bin samples by their top-class probability into ``n_bins`` equal-width bins of (0, 1]."""
    proba = np.asarray(proba, dtype=np.float64)
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == np.asarray(y_true)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed bins (Guo et al. 2017): a confidence of exactly 1 falls in the last bin
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, weights=confidence, minlength=n_bins) / count
        acc = np.bincount(which, weights=correct, minlength=n_bins) / count
    return ReliabilityBins(edges, count, conf, acc)


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE: the sample-weighted mean gap between accuracy and confidence per bin."""
    return reliability_bins(y_true, proba, n_bins).ece


# -- cost -----------------------------------------------------------------------------------------

def pareto_front(accuracy: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Whether each point is on the front of high accuracy and low cost.

    A point is dominated when another is at least as accurate and at most as costly, and
    strictly better on one of the two. Points with a NaN accuracy or cost are never on it;
    identical points are both on it.
    """
    acc = np.asarray(accuracy, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    valid = np.isfinite(acc) & np.isfinite(cost)
    on = np.zeros(len(acc), dtype=bool)
    for i in np.flatnonzero(valid):
        others = valid.copy()
        others[i] = False
        dominated = others & (acc >= acc[i]) & (cost <= cost[i]) & ((acc > acc[i]) | (cost < cost[i]))
        on[i] = not dominated.any()
    return on


__all__ = [
    "McNemar",
    "accuracy",
    "nll",
    "ReliabilityBins",
    "bootstrap_accuracy",
    "bootstrap_delta",
    "bootstrap_indices",
    "bootstrap_means",
    "correct_matrix",
    "expected_calibration_error",
    "mcnemar_exact",
    "mcnemar_p_value",
    "pareto_front",
    "percentile_interval",
    "reliability_bins",
]
