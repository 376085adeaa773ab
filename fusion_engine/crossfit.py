"""Out-of-fold predictions on validation, so that no fuser is scored on data it was fitted on.

Fusers are fitted on the validation split. To give a fitted fuser a validation score at all, the
engine cross-fits it: the validation samples are split into stratified folds, a fresh clone of the
fuser is fitted on all folds but one and predicts the one left out. Each sample's probabilities
then come from a fuser that never saw it.
"""

from __future__ import annotations

import warnings

import numpy as np

from .fuser import Fuser, check_logits

__all__ = ["cross_val_proba", "n_folds"]

DEFAULT_CV = 5


def n_folds(y: np.ndarray, cv: int = DEFAULT_CV) -> int:
    """How many stratified folds ``y`` allows: ``cv``, lowered to the smallest class count, never below 2.

    A class with a single sample still leaves two folds: it is then missing from one fold's
    training part, which every fuser must cope with (it may be missing from val altogether).
    """
    y = np.asarray(y)
    if len(y) < 2:
        raise ValueError(f"cross-fitting needs at least 2 samples, got {len(y)}")
    if cv < 2:
        raise ValueError(f"cv must be at least 2, got {cv}")
    smallest = int(np.bincount(y)[np.unique(y)].min())
    return max(2, min(cv, smallest))


def cross_val_proba(fuser: Fuser, logits: np.ndarray, y: np.ndarray, cv: int | None = None,
                    seed: int | None = None) -> np.ndarray:
    """Out-of-fold class probabilities ``(N, C)`` of ``fuser`` on ``(logits, y)``.

    Every fold fits ``fuser.clone()``, so ``fuser`` itself is left untouched. Folds are
    :class:`~sklearn.model_selection.StratifiedKFold`, shuffled with ``seed``, with
    :func:`n_folds` splits. ``cv`` and ``seed`` default to the fuser's own ``cv`` and ``seed``
    parameters where it has them (and they are not ``None``), else 5 and 0. A fuser with ``requires_fit`` false learns
    nothing, so its in-sample probabilities are already out-of-fold and are returned as they are.
    """
    logits = check_logits(logits, y)
    y = np.asarray(y)
    if not fuser.requires_fit:
        return fuser.clone().fit(logits, y).predict_proba(logits)

    from sklearn.model_selection import StratifiedKFold

    params = fuser.get_params()
    cv = next(c for c in (cv, params.get("cv"), DEFAULT_CV) if c is not None)
    seed = next(s for s in (seed, params.get("seed"), 0) if s is not None)
    folds = StratifiedKFold(n_splits=n_folds(y, cv), shuffle=True, random_state=seed)
    proba = np.empty(logits.shape[1:], dtype=np.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(folds.split(np.zeros((len(y), 1)), y))
    for train, test in splits:
        proba[test] = fuser.clone().fit(logits[:, train], y[train]).predict_proba(logits[:, test])
    return proba
