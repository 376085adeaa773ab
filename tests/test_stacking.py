"""Stacking (fusion_engine.stacking and the two first-party stackers) and out-of-fold scoring
(fusion_engine.crossfit)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy.special import log_softmax
from threadpoolctl import threadpool_limits

from fusion_engine import Fuser
from fusion_engine.crossfit import cross_val_proba, n_folds
from fusion_engine.stacking import StackingFuser, stack_features
from fusion_engine_fusers import LogisticStacking, Mean, XGBoostStacking
from simulate import accuracy, simulate_members

STACKERS = [LogisticStacking, XGBoostStacking]


@pytest.fixture(autouse=True)
def one_thread():
    """Threaded BLAS spins on a shared machine; one thread is fastest at these sizes."""
    with threadpool_limits(1):
        yield


def test_features_are_member_log_probabilities_then_logits():
    logits, _ = simulate_members([0.8, 0.5], n_samples=10, n_classes=3)
    plain, extended = stack_features(logits), stack_features(logits, append_logits=True)
    assert plain.shape == (10, 6) and extended.shape == (10, 12)
    np.testing.assert_allclose(plain[:, 3:6], log_softmax(logits[1], axis=1))
    np.testing.assert_array_equal(extended[:, :6], plain)
    np.testing.assert_array_equal(extended[:, 6:9], logits[0])


@pytest.mark.parametrize("cls", STACKERS)
def test_stacking_undoes_a_member_whose_labels_are_permuted(cls):
    permutation = np.array([2, 0, 4, 1, 3])
    logits, y = simulate_members([0.85, 0.4], n_samples=2000, n_classes=5, permutations=[permutation, None])
    val, test = slice(0, 1000), slice(1000, None)
    skill = np.mean(permutation[y[test]] == np.argmax(logits[0, test], axis=1))
    stacked = cls().fit(logits[:, val], y[val]).predict_proba(logits[:, test])
    assert accuracy(stacked, y[test]) > skill - 0.04
    assert accuracy(Mean().predict_proba(logits[:, test]), y[test]) < 0.5


@pytest.mark.parametrize("cls", STACKERS)
def test_out_of_fold_score_exposes_overfitting_that_in_sample_hides(cls):
    logits, y = simulate_members([1 / 3] * 20, n_samples=60, n_classes=3, seed=1)
    in_sample = accuracy(cls().fit(logits, y).predict_proba(logits), y)
    out_of_fold = accuracy(cross_val_proba(cls(), logits, y), y)
    assert in_sample > 0.9
    assert out_of_fold < 0.55
    assert in_sample - out_of_fold > 0.4


def test_logistic_stacking_matches_scikit_learn_on_the_same_features():
    from sklearn.linear_model import LogisticRegression

    logits, y = simulate_members([0.8, 0.6, 0.4], n_samples=400, n_classes=4)
    features = np.hstack([log_softmax(member, axis=1) for member in logits])
    reference = LogisticRegression(C=0.5, max_iter=1000).fit(features[:300], y[:300])
    ours = LogisticStacking(C=0.5).fit(logits[:, :300], y[:300])
    np.testing.assert_allclose(ours.predict_proba(logits[:, 300:]), reference.predict_proba(features[300:]), atol=1e-8)
    np.testing.assert_allclose(ours.final_estimator_.coef_, reference.coef_, atol=1e-8)


def test_xgboost_stacking_state_is_the_booster_json():
    logits, y = simulate_members([0.8, 0.6], n_samples=200, n_classes=3)
    state = XGBoostStacking(n_estimators=5).fit(logits, y).get_state()
    booster = state["final_estimator_"]["booster"]
    assert booster["learner"]["learner_model_param"]["num_class"] == "3"
    assert len(booster["learner"]["gradient_booster"]["model"]["trees"]) == 15


@pytest.mark.parametrize("cls", STACKERS)
def test_stacker_refuses_logits_of_another_shape(cls):
    logits, y = simulate_members([0.8, 0.6], n_samples=100, n_classes=3)
    fuser = cls(n_estimators=5) if cls is XGBoostStacking else cls()
    fuser.fit(logits, y)
    with pytest.raises(ValueError, match="fitted on 2 members and 3 classes"):
        fuser.predict_proba(logits[:1])


class NaiveBayesStacking(StackingFuser):
    """A plugin author's stacker: the estimator, and its state, and nothing else."""

    def __init__(self, var_smoothing: float = 1e-9, append_logits: bool = False, cv: int = 5, seed: int = 0):
        super().__init__(append_logits=append_logits, cv=cv, seed=seed)
        self.var_smoothing = var_smoothing

    def make_estimator(self):
        from sklearn.naive_bayes import GaussianNB

        return GaussianNB(var_smoothing=self.var_smoothing)

    FITTED = ("theta_", "var_", "class_prior_", "class_count_", "classes_", "epsilon_")

    def save_estimator(self, estimator):
        return {name: np.asarray(getattr(estimator, name)).tolist() for name in self.FITTED}

    def load_estimator(self, state):
        estimator = self.make_estimator()
        for name, value in state.items():
            setattr(estimator, name, np.asarray(value))
        return estimator


def test_a_new_stacker_needs_only_its_estimator_and_state():
    logits, y = simulate_members([0.8, 0.6], n_samples=300, n_classes=4)
    seen = y != 1
    fuser = NaiveBayesStacking().fit(logits[:, seen], y[seen])
    proba = fuser.predict_proba(logits)
    assert proba.shape == (300, 4) and np.all(proba[:, 1] == 0)
    restored = NaiveBayesStacking().set_state(json.loads(json.dumps(fuser.get_state())))
    np.testing.assert_array_equal(restored.predict_proba(logits), proba)
    assert accuracy(cross_val_proba(fuser, logits, y), y) > 0.6


# -- cross-fitting -------------------------------------------------------------------------

class Memorise(Fuser):
    """Knows the label of every sample it was fitted on, and nothing else."""

    def fit(self, logits, y):
        super().fit(logits, y)
        self.seen_ = {tuple(row): label for row, label in zip(logits[0], y)}
        return self

    def predict_proba(self, logits):
        proba = np.full((logits.shape[1], logits.shape[2]), 1.0 / logits.shape[2])
        for i, row in enumerate(logits[0]):
            if tuple(row) in self.seen_:
                proba[i] = np.eye(logits.shape[2])[self.seen_[tuple(row)]]
        return proba


def test_out_of_fold_predictions_never_come_from_a_fuser_fitted_on_the_sample():
    logits, y = simulate_members([0.5], n_samples=50, n_classes=3)
    assert accuracy(Memorise().fit(logits, y).predict_proba(logits), y) == 1.0
    np.testing.assert_array_equal(cross_val_proba(Memorise(), logits, y), np.full((50, 3), 1 / 3))


def test_cross_val_proba_leaves_the_fuser_unfitted():
    logits, y = simulate_members([0.8, 0.6], n_samples=100, n_classes=3)
    fuser = LogisticStacking()
    cross_val_proba(fuser, logits, y)
    assert not hasattr(fuser, "final_estimator_")


def test_cross_val_proba_of_a_fuser_that_learns_nothing_is_its_in_sample_output():
    logits, y = simulate_members([0.8, 0.6], n_samples=100, n_classes=3)
    np.testing.assert_array_equal(cross_val_proba(Mean(), logits, y), Mean().predict_proba(logits))


def test_cross_val_proba_is_seeded():
    logits, y = simulate_members([0.7, 0.6], n_samples=100, n_classes=3)
    first = cross_val_proba(LogisticStacking(seed=3), logits, y)
    np.testing.assert_array_equal(cross_val_proba(LogisticStacking(), logits, y, seed=3), first)
    assert not np.array_equal(cross_val_proba(LogisticStacking(seed=4), logits, y), first)


@pytest.mark.parametrize("counts, cv, expected", [
    ([30, 30, 30], 5, 5),
    ([30, 3, 30], 5, 3),
    ([30, 1, 30], 5, 2),
    ([30, 0, 30], 5, 5),
    ([30, 30], 10, 10),
])
def test_number_of_folds_is_cv_lowered_to_the_smallest_class_but_at_least_two(counts, cv, expected):
    y = np.repeat(np.arange(len(counts)), counts)
    assert n_folds(y, cv) == expected


def test_cross_val_proba_copes_with_a_class_seen_once():
    logits, y = simulate_members([0.8, 0.6], n_samples=60, n_classes=3)
    y[y == 2] = 0
    y[0] = 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proba = cross_val_proba(LogisticStacking(), logits, y)
    assert proba.shape == (60, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert proba[0, 2] == 0.0
