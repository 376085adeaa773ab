"""Simulated member outputs whose right answers are known, for fuser tests."""

from __future__ import annotations

import numpy as np


def simulate_members(accuracies, n_samples=600, n_classes=5, seed=0, permutations=None, margin=3.0):
    """Logits ``(M, N, C)`` and labels of members whose top class is right with the given
    probabilities (``1 / n_classes`` makes a confident member that ignores the label).

    ``permutations[m]``, when given, relabels member ``m``'s classes: it puts its score for
    class ``c`` in column ``permutations[m][c]``, a systematic confusion that keeps its skill.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n_samples)
    logits = rng.normal(size=(len(accuracies), n_samples, n_classes))
    for m, accuracy in enumerate(accuracies):
        if accuracy <= 1 / n_classes:
            top = rng.integers(0, n_classes, n_samples)
        else:
            wrong = (y + rng.integers(1, n_classes, n_samples)) % n_classes
            top = np.where(rng.random(n_samples) < accuracy, y, wrong)
        logits[m, np.arange(n_samples), top] += margin
        if permutations is not None and permutations[m] is not None:
            logits[m][:, permutations[m]] = logits[m].copy()
    return logits, y


def accuracy(proba, y):
    return float(np.mean(np.argmax(proba, axis=1) == y))
