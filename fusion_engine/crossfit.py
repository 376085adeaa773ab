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

__all__ = ["cross_fit", "cross_val_proba", "n_folds"]

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
                    seed: int | None = None, n_jobs: int | None = None, fit_params: dict | None = None) -> np.ndarray:
    """Out-of-fold class probabilities ``(N, C)`` of ``fuser`` on ``(logits, y)``.

    Every fold fits ``fuser.clone()``, so ``fuser`` itself is left untouched. Folds are
    :class:`~sklearn.model_selection.StratifiedKFold`, shuffled with ``seed``, with
    :func:`n_folds` splits. ``cv`` and ``seed`` default to the fuser's own ``cv`` and ``seed``
    parameters where it has them (and they are not ``None``), else 5 and 0. A fuser with ``requires_fit`` false learns
    nothing, so its in-sample probabilities are already out-of-fold and are returned as they are.
    ``fit_params`` go to every ``fit`` as keyword arguments (per member, never per sample: e.g.
    ``costs``).
    """
    return cross_fit(fuser, logits, y, cv=cv, seed=seed, n_jobs=n_jobs, refit=False, fit_params=fit_params)[1]


def cross_fit(fuser: Fuser, logits: np.ndarray, y: np.ndarray, cv: int | None = None, seed: int | None = None,
              n_jobs: int | None = None, refit: bool = True,
              fit_params: dict | None = None) -> tuple[Fuser | None, np.ndarray, float]:
    """A clone of ``fuser`` fitted on all of ``(logits, y)``, its out-of-fold probabilities
    (:func:`cross_val_proba`), and the seconds the full fit took.

    The full fit and the fold fits are independent, so they run side by side on ``n_jobs``
    threads (joblib's ``n_jobs``: ``None`` is 1, ``-1`` every core). Every fit is seeded and sees
    only its own data, so the result does not depend on ``n_jobs``. Run it under
    ``threadpoolctl.threadpool_limits(1)`` so that the threads do not each start a BLAS pool.
    With ``refit=False`` no full fit is made and the first item is ``None``. ``fit_params`` go
    to every fit (see :func:`cross_val_proba`).
    """
    import time

    from joblib import Parallel, delayed

    logits = check_logits(logits, y)
    y = np.asarray(y)
    fit_params = fit_params or {}

    def fit(train: np.ndarray | None) -> tuple[Fuser, float]:
        t0 = time.perf_counter()
        fitted = fuser.clone().fit(logits if train is None else logits[:, train], y if train is None else y[train],
                                   **fit_params)
        return fitted, time.perf_counter() - t0

    if not fuser.requires_fit:
        fitted, seconds = fit(None)
        return (fitted if refit else None), fitted.predict_proba(logits), seconds

    from sklearn.model_selection import StratifiedKFold

    params = fuser.get_params()
    cv = next(c for c in (cv, params.get("cv"), DEFAULT_CV) if c is not None)
    seed = next(s for s in (seed, params.get("seed"), 0) if s is not None)
    folds = StratifiedKFold(n_splits=n_folds(y, cv), shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        splits = list(folds.split(np.zeros((len(y), 1)), y))
    trains = ([None] if refit else []) + [train for train, _ in splits]
    # the full fit first: it is the longest, so it never runs alone at the end
    fitted = Parallel(n_jobs=n_jobs, prefer="threads")(delayed(fit)(train) for train in trains)
    full, seconds = fitted.pop(0) if refit else (None, 0.0)
    proba = np.empty(logits.shape[1:], dtype=np.float64)
    for (_, test), (fold_fuser, _) in zip(splits, fitted):
        proba[test] = fold_fuser.predict_proba(logits[:, test])
    return full, proba, seconds
