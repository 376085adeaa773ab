"""The metrics plugin: every metric agrees with scikit-learn (or with its definition) on fixed inputs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from fusion_engine.plugins import get_plugins

# 8 samples, 3 classes; class 2 is never predicted, and sample 7 is a near-certain mistake
Y = np.array([0, 1, 2, 2, 1, 0, 1, 2])
P = np.array([
    [0.7, 0.2, 0.1],
    [0.1, 0.8, 0.1],
    [0.3, 0.4, 0.3],
    [0.5, 0.1, 0.4],
    [0.2, 0.5, 0.3],
    [0.6, 0.3, 0.1],
    [0.4, 0.35, 0.25],
    [0.01, 0.98, 0.01],
])
PRED = P.argmax(axis=1)


@pytest.fixture(scope="module")
def metrics():
    return {p.record.name: p.record for p in get_plugins().catalog().records["metric"].values()}


def test_the_issue_s_metrics_are_registered_in_leaderboard_order(metrics):
    assert list(metrics) == ["accuracy", "precision_macro", "recall_macro", "f1_macro", "nll",
                             "precision_weighted", "recall_weighted", "f1_weighted", "top5_accuracy", "brier", "ece"]
    assert [m for m, r in metrics.items() if not r.higher_is_better] == ["nll", "brier", "ece"]


@pytest.mark.parametrize("name, expected", [
    ("accuracy", lambda: skm.accuracy_score(Y, PRED)),
    ("precision_macro", lambda: skm.precision_score(Y, PRED, average="macro", zero_division=0)),
    ("recall_macro", lambda: skm.recall_score(Y, PRED, average="macro", zero_division=0)),
    ("f1_macro", lambda: skm.f1_score(Y, PRED, average="macro", zero_division=0)),
    ("precision_weighted", lambda: skm.precision_score(Y, PRED, average="weighted", zero_division=0)),
    ("recall_weighted", lambda: skm.recall_score(Y, PRED, average="weighted", zero_division=0)),
    ("f1_weighted", lambda: skm.f1_score(Y, PRED, average="weighted", zero_division=0)),
    ("nll", lambda: skm.log_loss(Y, P)),
])
def test_metric_matches_scikit_learn(metrics, name, expected):
    assert metrics[name].fn(Y, P) == pytest.approx(expected(), abs=1e-12)


def test_fixed_values_by_hand(metrics):
    assert metrics["accuracy"].fn(Y, P) == pytest.approx(4 / 8)  # right: samples 0, 1, 4, 5
    # class 2 is never predicted: its precision counts as 0 in both averages
    assert metrics["precision_macro"].fn(Y, P) == pytest.approx((2 / 4 + 2 / 4 + 0) / 3)
    assert metrics["recall_weighted"].fn(Y, P) == pytest.approx(metrics["accuracy"].fn(Y, P))


def test_brier_is_the_mean_summed_squared_error_and_matches_scikit_learn(metrics):
    onehot = np.eye(3)[Y]
    by_definition = np.mean(np.sum((P - onehot) ** 2, axis=1))
    assert metrics["brier"].fn(Y, P) == pytest.approx(by_definition)
    assert metrics["brier"].fn(Y, P) == pytest.approx(skm.brier_score_loss(Y, P, labels=[0, 1, 2], scale_by_half=False))
    # two classes: not halved, unlike scikit-learn's binary default, so it means the same everywhere
    y2, p2 = np.array([0, 1, 1]), np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert metrics["brier"].fn(y2, p2) == pytest.approx(np.mean(np.sum((p2 - np.eye(2)[y2]) ** 2, axis=1)))
    assert metrics["brier"].fn(y2, p2) == pytest.approx(2 * skm.brier_score_loss(y2, p2[:, 1]))


def test_top5_accuracy_matches_scikit_learn_and_needs_more_than_5_classes(metrics):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 200)
    p = rng.dirichlet(np.ones(10), 200)
    top5 = metrics["top5_accuracy"].fn
    assert top5(y, p) == pytest.approx(skm.top_k_accuracy_score(y, p, k=5, labels=np.arange(10)))
    assert np.isnan(top5(Y, P)), "with 3 classes every model's top-5 accuracy is 1: not a score"
    assert np.isnan(top5(y % 5, p[:, :5] / p[:, :5].sum(1, keepdims=True)))


def test_metrics_count_classes_absent_from_the_split(metrics):
    # the labels hold classes 0 and 1 only; the probabilities have 4 columns
    y = np.array([0, 1, 1, 0])
    p = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.4, 0.1], [0.4, 0.3, 0.2, 0.1]])
    for name in ("precision_macro", "nll", "brier", "ece", "f1_weighted"):
        assert np.isfinite(metrics[name].fn(y, p)), name
    assert metrics["recall_macro"].fn(y, p) == pytest.approx((1.0 + 0.5 + 0 + 0) / 4)


def test_ece_by_hand(metrics):
    # confidences 0.9 (right) and 0.9 (wrong) share the bin (13/15, 14/15];
    # 0.58 (right) and 0.55 (wrong) share (8/15, 9/15]:
    # ECE = 2/4 * |0.5 - 0.9| + 2/4 * |0.5 - 0.565|
    y = np.array([0, 1, 0, 0])
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.58, 0.42], [0.45, 0.55]])
    assert metrics["ece"].fn(y, p) == pytest.approx(0.5 * 0.4 + 0.5 * 0.065)
