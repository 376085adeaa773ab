"""The statistics: bootstrap intervals, McNemar, calibration, Pareto, and how the leaderboard uses them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusion_engine import evaluation
from fusion_engine.leaderboard import Row, build_leaderboard
from fusion_engine.runfolder import RunFolder
from fusion_engine.plugins import get_plugins


@pytest.fixture(scope="module")
def metrics():
    return [p.record for p in get_plugins().catalog().records["metric"].values()]


# -- bootstrap ------------------------------------------------------------------------------------

def test_bootstrap_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    true_accuracy, n_test, n_sims = 0.8, 200, 200
    rng = np.random.default_rng(12345)
    covered = 0
    for sim in range(n_sims):
        correct = rng.random(n_test) < true_accuracy  # a model of accuracy 0.8 on a fresh test set
        lo, hi = evaluation.bootstrap_accuracy(correct[None], n_bootstrap=200, seed=sim)
        covered += lo[0] <= true_accuracy <= hi[0]
    assert 0.88 <= covered / n_sims <= 0.99, covered / n_sims


def test_bootstrap_is_seeded_and_paired():
    rng = np.random.default_rng(0)
    correct = rng.random((3, 150)) < [[0.6], [0.7], [0.8]]
    a = evaluation.bootstrap_accuracy(correct, n_bootstrap=300, seed=4)
    b = evaluation.bootstrap_accuracy(correct, n_bootstrap=300, seed=4)
    np.testing.assert_array_equal(a, b)
    # the resamples do not depend on which rows are scored: a row's interval is its own
    alone = evaluation.bootstrap_accuracy(correct[1:2], n_bootstrap=300, seed=4)
    assert (alone[0][0], alone[1][0]) == (a[0][1], a[1][1])
    c = evaluation.bootstrap_accuracy(correct, n_bootstrap=300, seed=5)
    assert not np.array_equal(a, c)


def test_chunked_resampling_gives_the_same_indices_as_one_draw(monkeypatch):
    whole = np.concatenate(list(evaluation.bootstrap_indices(50, 40, seed=1)))
    monkeypatch.setattr(evaluation, "_CHUNK_INDICES", 50 * 7)  # chunks of 7 resamples
    chunks = list(evaluation.bootstrap_indices(50, 40, seed=1))
    assert [len(c) for c in chunks] == [7] * 5 + [5]
    np.testing.assert_array_equal(np.concatenate(chunks), whole)


def test_delta_interval_is_above_zero_for_a_clear_gain_and_below_for_a_clear_loss():
    rng = np.random.default_rng(1)
    member = rng.random(400) < 0.7
    fixes = ~member & (rng.random(400) < 0.5)  # the fuser fixes half of the member's mistakes
    gain = member | fixes
    breaks = member & (rng.random(400) < 0.2)  # another row loses a fifth of its right answers
    loss = member & ~breaks
    delta, lo, hi = evaluation.bootstrap_delta(np.stack([member, gain, loss]), reference=0, n_bootstrap=500, seed=0)
    assert (delta[0], lo[0], hi[0]) == (0.0, 0.0, 0.0)
    assert delta[1] == pytest.approx(gain.mean() - member.mean())
    assert 0 < lo[1] < delta[1] < hi[1]
    assert lo[2] < delta[2] < hi[2] < 0


def test_paired_delta_interval_is_narrower_than_the_accuracy_intervals():
    """Two rows that disagree on a few samples: the difference is far surer than either accuracy."""
    rng = np.random.default_rng(2)
    a = rng.random(500) < 0.75
    b = a.copy()
    flip = np.flatnonzero(~a)[:12]
    b[flip] = True  # b is right on 12 more samples, and agrees with a everywhere else
    correct = np.stack([a, b])
    lo, hi = evaluation.bootstrap_accuracy(correct, n_bootstrap=500, seed=0)
    _, dlo, dhi = evaluation.bootstrap_delta(correct, reference=0, n_bootstrap=500, seed=0)
    assert dlo[1] > 0, "12 wins and no loss is a real gain"
    assert (dhi[1] - dlo[1]) < 0.5 * (hi[0] - lo[0])
    assert hi[0] > lo[1], "while the two accuracy intervals overlap"


# -- McNemar --------------------------------------------------------------------------------------

def test_mcnemar_worked_example():
    """b = 1, c = 7 discordant pairs: p = 2 * P(X <= 1) for X ~ Binomial(8, 1/2) = 2 * 9/256 = 0.0703125."""
    assert evaluation.mcnemar_p_value(1, 7) == pytest.approx(0.0703125, abs=1e-12)
    assert evaluation.mcnemar_p_value(7, 1) == pytest.approx(0.0703125, abs=1e-12)
    # from prediction vectors: 30 samples both right, 1 only A right, 7 only B right, 2 both wrong
    a = np.array([1] * 30 + [1] + [0] * 7 + [0] * 2, dtype=bool)
    b = np.array([1] * 30 + [0] + [1] * 7 + [0] * 2, dtype=bool)
    result = evaluation.mcnemar_exact(a, b)
    assert (result.b, result.c) == (1, 7)
    assert result.p_value == pytest.approx(0.0703125, abs=1e-12)


def test_mcnemar_edge_cases_and_scipy_agreement():
    from scipy.stats import binomtest

    assert evaluation.mcnemar_p_value(0, 0) == 1.0  # no discordant sample: no evidence
    assert evaluation.mcnemar_p_value(5, 5) == 1.0
    assert evaluation.mcnemar_p_value(0, 6) == pytest.approx(2 / 64)
    for b, c in [(3, 10), (0, 1), (12, 30), (120, 80)]:
        assert evaluation.mcnemar_p_value(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


# -- calibration ----------------------------------------------------------------------------------

def _simulated(n: int, n_classes: int, rng, overconfidence: float = 0.0):
    """Top-class confidence ``c``; the top class is the label with probability ``c - overconfidence``."""
    y = rng.integers(0, n_classes, n)
    conf = rng.uniform(1 / n_classes + 0.25, 1.0, n)
    right = rng.random(n) < conf - overconfidence
    top = np.where(right, y, (y + rng.integers(1, n_classes, n)) % n_classes)
    proba = np.tile(((1 - conf) / (n_classes - 1))[:, None], (1, n_classes))
    proba[np.arange(n), top] = conf
    return y, proba


def test_ece_of_a_calibrated_model_is_near_zero_and_of_an_overconfident_one_is_not():
    rng = np.random.default_rng(3)
    y, proba = _simulated(20000, 10, rng)
    assert evaluation.expected_calibration_error(y, proba) < 0.015
    y, proba = _simulated(20000, 10, rng, overconfidence=0.2)
    assert evaluation.expected_calibration_error(y, proba) == pytest.approx(0.2, abs=0.03)


def test_reliability_bins_are_right_closed_and_count_every_sample():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4]])
    bins = evaluation.reliability_bins(y, proba, n_bins=10)
    assert bins.count.sum() == 4
    assert bins.count[-1] == 1 and bins.accuracy[-1] == 1.0  # confidence 1 is in the last bin
    assert bins.count[4] == 1  # 0.5 is in (0.4, 0.5]
    assert np.isnan(bins.accuracy[0])  # empty bins are NaN, and ECE skips them


# -- Pareto ---------------------------------------------------------------------------------------

def test_pareto_front_on_a_hand_example():
    #            A     B     C     D     E     F (= D)  G (no cost)
    accuracy = [0.90, 0.92, 0.91, 0.95, 0.89, 0.95, 0.99]
    cost = [1.0, 2.0, 3.0, 5.0, 1.0, 5.0, np.nan]
    # C: B is more accurate and cheaper; E: A is as cheap and more accurate; D and F tie, both on it
    expected = [True, True, False, True, False, True, False]
    assert evaluation.pareto_front(accuracy, cost).tolist() == expected


# -- the leaderboard ------------------------------------------------------------------------------

def _rows(rng, n_val=300, n_test=300, n_classes=6, extras=True):
    """Members a (best on val, 0.75), b (0.65), a fuser that fixes half of a's test mistakes."""
    y = {"val": rng.integers(0, n_classes, n_val), "test": rng.integers(0, n_classes, n_test)}

    def proba(labels, accuracy, right=None):
        right = rng.random(len(labels)) < accuracy if right is None else right
        top = np.where(right, labels, (labels + 1) % n_classes)
        p = np.full((len(labels), n_classes), 0.2 / (n_classes - 1))
        p[np.arange(len(labels)), top] = 0.8
        return p, right

    a_val, _ = proba(y["val"], 0.75)
    a_test, a_right = proba(y["test"], 0.75)
    b_val, _ = proba(y["val"], 0.65)
    b_test, _ = proba(y["test"], 0.65)
    f_val, _ = proba(y["val"], 0.8)
    f_test, _ = proba(y["test"], 0, right=a_right | (rng.random(n_test) < 0.5))
    ex = extras
    rows = [
        Row("a", "member", ["a"], {"val": a_val, "test": a_test},
            extra={"n_params": 1000, "infer_ms_per_image": 2.0, "train_seconds": 10.0} if ex else {}),
        Row("b", "member", ["b"], {"val": b_val, "test": b_test},
            extra={"n_params": 300, "infer_ms_per_image": 0.5, "train_seconds": 4.0} if ex else {}),
        Row("fused", "fuser", ["a", "b"], {"val": f_val, "test": f_test}, weights=[0.6, 0.4],
            extra={"fit_seconds": 0.25, "predict_ms_per_image": 0.01} if ex else {}),
    ]
    return rows, y


def test_leaderboard_columns_costs_and_statistics(metrics):
    rows, y = _rows(np.random.default_rng(4))
    df = build_leaderboard(rows, y, metrics, n_bootstrap=300, seed=0)
    assert list(df.columns) == [
        "rank", "name", "kind", "source", "members", "accuracy", "precision_macro", "recall_macro", "f1_macro", "nll",
        "precision_weighted", "recall_weighted", "f1_weighted", "top5_accuracy", "brier", "ece",
        "accuracy_lo", "accuracy_hi", "delta_vs_best_member", "delta_vs_best_member_lo", "delta_vs_best_member_hi",
        "mcnemar_p", "val_accuracy", "val_nll", "n_params", "infer_ms_per_image", "train_seconds", "fit_seconds", "pareto"]
    board = df.set_index("name")
    assert df.attrs["best_member"] == "a"
    assert board.loc["fused", "n_params"] == 1300
    assert board.loc["fused", "infer_ms_per_image"] == pytest.approx(2.51)
    assert board.loc["fused", "train_seconds"] == pytest.approx(14.0)
    assert board.loc["fused", "fit_seconds"] == pytest.approx(0.25) and np.isnan(board.loc["a", "fit_seconds"])
    assert board.loc["fused", "delta_vs_best_member_lo"] > 0
    assert board.loc["fused", "mcnemar_p"] < 0.001 and np.isnan(board.loc["a", "mcnemar_p"])
    for name in ("a", "b", "fused"):
        assert board.loc[name, "accuracy_lo"] <= board.loc[name, "accuracy"] <= board.loc[name, "accuracy_hi"]
    # b is cheapest, fused most accurate, a is dominated by neither... but fused is more accurate and a is cheaper
    assert board["pareto"].to_dict() == {"fused": True, "a": True, "b": True}
    assert list(df["name"]) == ["fused", "a", "b"]


def test_mcnemar_column_tests_on_test_against_the_member_best_on_val(metrics):
    rng = np.random.default_rng(5)
    rows, y = _rows(rng)
    # b is the better member on test, but a is better on val: a stays the reference
    rows[1].proba["test"] = rows[2].proba["test"].copy()
    df = build_leaderboard(rows, y, metrics, n_bootstrap=100).set_index("name")
    assert df.attrs["best_member"] == "a"
    assert df.loc["b", "accuracy"] > df.loc["a", "accuracy"]
    correct = {r.name: r.proba["test"].argmax(1) == y["test"] for r in rows}
    assert df.loc["fused", "mcnemar_p"] == pytest.approx(evaluation.mcnemar_exact(correct["fused"], correct["a"]).p_value)
    assert df.loc["b", "delta_vs_best_member"] == pytest.approx(correct["b"].mean() - correct["a"].mean())


def test_the_old_call_still_works_without_costs(metrics):
    rows, y = _rows(np.random.default_rng(6), extras=False)
    df = build_leaderboard(rows, y, metrics)
    assert df.attrs["n_bootstrap"] == 1000
    assert df["n_params"].isna().all() and df["infer_ms_per_image"].isna().all()
    assert df["pareto"].isna().all(), "without a cost, being on the front is unknown"


@pytest.mark.parametrize("rank_by, column, ascending", [
    ("nll", "nll", True), ("ece", "ece", True), ("f1-macro", "f1_macro", False), ("brier", "brier", True),
    ("accuracy", "accuracy", False),
])
def test_rank_by_follows_the_metric_s_direction(metrics, rank_by, column, ascending):
    rows, y = _rows(np.random.default_rng(7))
    df = build_leaderboard(rows, y, metrics, rank_by=rank_by, n_bootstrap=50)
    values = df[column].to_numpy()
    assert (np.diff(values) >= 0).all() if ascending else (np.diff(values) <= 0).all()
    assert df.attrs["ranked_by"] == column and list(df["rank"]) == [1, 2, 3]


def test_rank_by_an_unknown_metric_names_the_choices(metrics):
    rows, y = _rows(np.random.default_rng(8))
    with pytest.raises(ValueError, match=r"cannot rank by 'speed': choose one of: accuracy, brier, "):
        build_leaderboard(rows, y, metrics, rank_by="speed")


def test_top5_is_left_off_with_five_classes_or_fewer(metrics):
    rows, y = _rows(np.random.default_rng(9), n_classes=5)
    assert "top5_accuracy" not in build_leaderboard(rows, y, metrics, n_bootstrap=20).columns


def test_leaderboard_json_records_how_it_was_built(metrics, tmp_path):
    rows, y = _rows(np.random.default_rng(10))
    df = build_leaderboard(rows, y, metrics, n_bootstrap=200, seed=3)
    RunFolder(tmp_path).write_leaderboard(df, meta={"run_id": "r", "ranked_by": "accuracy"})
    data = json.loads((tmp_path / "leaderboard.json").read_text())
    assert {k: data[k] for k in ("best_member", "n_bootstrap", "bootstrap_seed", "confidence", "ranked_by")} == \
        {"best_member": "a", "n_bootstrap": 200, "bootstrap_seed": 3, "confidence": 0.95, "ranked_by": "accuracy"}
    assert [r["name"] for r in data["rows"]] == list(df["name"])
    assert data["rows"][0]["pareto"] is True
    md = (tmp_path / "leaderboard.md").read_text()
    assert "| 1 | fused | fuser |  | a:0.60, b:0.40 |" in md and "1,300" in md


def test_printed_leaderboard_joins_intervals_to_their_estimates(metrics):
    from rich.console import Console

    from fusion_engine.leaderboard import print_leaderboard

    rows, y = _rows(np.random.default_rng(11))
    df = build_leaderboard(rows, y, metrics, n_bootstrap=100)
    console = Console(record=True, width=250)
    print_leaderboard(df, title="toy", console=console)
    text = console.export_text()
    row = df.set_index("name").loc["fused"]
    assert f"{row['accuracy']:.4f} [{row['accuracy_lo']:.4f}, {row['accuracy_hi']:.4f}]" in text
    assert "Δ accuracy vs a [95% CI]" in text and "best member (val)" in text
    assert "precision_weighted" not in text  # the files hold every column; the terminal the main ones
