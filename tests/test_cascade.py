"""Paying less for an ensemble: the cascade fuser (members from the cheapest, each sample stopping
at the first confident stage) and the choice of the best row within an inference budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax

from conftest import cli, summary, toy_spec_data, write_spec
from fusion_engine.crossfit import cross_fit
from fusion_engine.leaderboard import best_within_budget
from fusion_engine.runner import run_experiment
from fusion_engine_fusers import Cascade, Mean


def committee(n: int = 600, n_classes: int = 5, seed: int = 0):
    """Three members of rising skill; ``y``. The cheap one is right and sure on the easy half."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    easy = rng.random(n) < 0.5
    logits = []
    for skill in (1.0, 2.0, 3.0):
        z = rng.normal(0, 1, (n, n_classes))
        z[np.arange(n), y] += skill + 4.0 * easy
        logits.append(z)
    return np.stack(logits), y


COSTS = np.array([1.0, 4.0, 9.0])


def test_a_cascade_keeps_the_accuracy_of_the_full_mean_within_its_drop_for_less():
    logits, y = committee()
    cascade = Cascade(max_accuracy_drop=0.01).fit(logits, y, costs=COSTS)
    full = Mean().fit(logits, y).predict_proba(logits)
    accuracy = np.mean(cascade.predict(logits) == y)
    assert accuracy >= np.mean(full.argmax(1) == y) - 0.01
    used = cascade.consulted(logits)
    cost = (used * COSTS).sum(axis=1).mean()
    assert cost < COSTS.sum() * 0.8 and cost == pytest.approx(cascade.expected_cost_)
    assert used[:, 0].all() and cascade.order_ == [0, 1, 2]
    # consulted is prefix-shaped, and each sample gets the mean of exactly the members it ran
    stage = used.sum(axis=1) - 1
    assert np.array_equal(used, np.arange(3)[None, :] <= stage[:, None])
    p = softmax(logits, axis=2)
    by_hand = np.stack([p[: k + 1, i].mean(axis=0) for i, k in enumerate(stage)])
    np.testing.assert_allclose(cascade.predict_proba(logits), by_hand, atol=1e-12)


def test_members_are_consulted_from_the_cheapest_whatever_their_order():
    logits, y = committee()
    shuffled = logits[[2, 0, 1]]
    cascade = Cascade(max_accuracy_drop=0.01).fit(shuffled, y, costs=COSTS[[2, 0, 1]])
    assert cascade.order_ == [1, 2, 0]
    used = cascade.consulted(shuffled)
    assert used[:, 1].all() and used[:, 0].mean() <= used[:, 2].mean() < 1.0
    spec_order = Cascade(order="spec").fit(shuffled, y, costs=COSTS[[2, 0, 1]])
    assert spec_order.order_ == [0, 1, 2]


def test_a_budget_gets_the_most_accurate_cascade_that_fits():
    logits, y = committee()
    for budget in (2.0, 5.0):
        cascade = Cascade(budget=budget).fit(logits, y, costs=COSTS)
        assert cascade.expected_cost_ <= budget and cascade.target_met_
    tight, loose = (Cascade(budget=b).fit(logits, y, costs=COSTS) for b in (2.0, 8.0))
    assert tight.accuracy_ <= loose.accuracy_
    impossible = Cascade(budget=0.5).fit(logits, y, costs=COSTS)  # less than the cheapest member alone
    assert not impossible.target_met_ and impossible.consulted(logits).sum(axis=1).max() == 1


def test_the_calibrated_variant_and_the_state_round_trip():
    logits, y = committee(seed=3)
    cascade = Cascade(confidence="calibrated").fit(logits, y, costs=COSTS)
    assert len(cascade.temperatures_) == 2 and all(t > 0 for t in cascade.temperatures_)
    restored = Cascade(confidence="calibrated").set_state(json.loads(json.dumps(cascade.get_state())))
    np.testing.assert_array_equal(restored.predict_proba(logits), cascade.predict_proba(logits))
    np.testing.assert_array_equal(restored.consulted(logits), cascade.consulted(logits))


def test_a_cascade_without_costs_is_refused_and_is_cross_fitted_with_them():
    logits, y = committee()
    with pytest.raises(ValueError, match="needs each member's inference cost"):
        Cascade().fit(logits, y)
    model, oof, _ = cross_fit(Cascade(), logits, y, fit_params={"costs": COSTS}, seed=0)
    assert oof.shape == (len(y), 5) and np.mean(oof.argmax(1) == y) > 0.8 and model.costs_.tolist() == COSTS.tolist()


# -- in a run ----------------------------------------------------------------------------------------

def test_a_cascade_row_costs_what_its_members_cost_on_the_test_samples_that_ran_them(toy_registry, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(budget_ms=1000.0, fusers=[
        {"name": "mean", "fuser": "mean"},
        {"name": "cascade", "fuser": "cascade", "params": {"max_accuracy_drop": 0.2}}]))
    result = run_experiment(spec, registry=toy_registry, quiet=True)
    html = (result.run_dir / "report.html").read_text()
    assert "Best within 1000 ms per image: " in html  # the spec's budget, named in the report
    assert summary(result.run_dir)["reused"] == ["net-a", "net-b"]
    board = result.leaderboard.set_index("name")
    info = json.loads((result.run_dir / "fusers" / "cascade.json").read_text())
    n_test = summary(result.run_dir)["data"]["split_sizes"]["test"]
    usage = info["test_usage"]  # written because some test samples stopped at the first stage
    assert sum(usage["stopped_after"]) == n_test and usage["stopped_after"][0] > 0
    members = {m: board.loc[m, "infer_ms_per_image"] for m in ("net-a", "net-b")}
    expected = sum(usage["consulted"][m] * members[m] for m in members)
    own = board.loc["cascade", "infer_ms_per_image"] - expected
    assert 0 <= own < 1.0  # the cascade's own arithmetic, per image
    assert board.loc["cascade", "n_params"] == board.loc["net-a", "n_params"] + board.loc["net-b", "n_params"]
    cheaper = min(members, key=members.get)
    assert info["state"]["order_"][0] == info["members"].index(cheaper)
    assert "answered here" in html  # the report says how many samples each stage answered
    out = cli("report", result.run_id, "--budget", "0.0001", "--registry", toy_registry)
    assert out.returncode == 0, out.stderr
    assert "No row&#x27;s inference cost fits 0.0001 ms per image" in (result.run_dir / "report.html").read_text()


def test_a_cascade_prices_a_predictions_member_by_the_cost_the_spec_gives(toy_registry, tmp_path):
    import pandas as pd

    ids = [f"toy-{i}" for i in range(60)]
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(softmax(rng.normal(size=(60, 3)), axis=1), columns=["top", "bottom", "dark"])
    frame.insert(0, "id", ids)
    frame.to_csv(tmp_path / "p.csv", index=False)
    spec = write_spec(tmp_path / "spec.yaml", toy_spec_data(
        members=[toy_spec_data()["members"][0],
                 {"name": "p", "predictions": "p.csv", "kind": "probabilities", "infer_ms_per_image": 0.25}],
        fusers=[{"name": "cascade", "fuser": "cascade"}]))
    result = run_experiment(spec, registry=toy_registry, quiet=True)
    board = result.leaderboard.set_index("name")
    assert board.loc["p", "infer_ms_per_image"] == 0.25  # given, where nothing could be measured
    assert json.loads((result.run_dir / "fusers" / "cascade.json").read_text())["state"]["costs_"]["__ndarray__"][1] \
        == 0.25


# -- the best row within a budget ------------------------------------------------------------------------

ROWS = [  # chosen on val: "steady" has the best val accuracy within 5 ms, though "lucky" scores higher on test
    {"name": "big", "kind": "fuser", "val_accuracy": 0.99, "val_nll": 0.1, "accuracy": 0.99, "accuracy_lo": 0.98,
     "accuracy_hi": 1.0, "infer_ms_per_image": 9.0},
    {"name": "steady", "kind": "member", "val_accuracy": 0.95, "val_nll": 0.2, "accuracy": 0.93, "accuracy_lo": 0.9,
     "accuracy_hi": 0.96, "infer_ms_per_image": 4.0},
    {"name": "lucky", "kind": "member", "val_accuracy": 0.90, "val_nll": 0.3, "accuracy": 0.97, "accuracy_lo": 0.95,
     "accuracy_hi": 0.99, "infer_ms_per_image": 1.0},
    {"name": "elsewhere", "kind": "member", "val_accuracy": 0.999, "val_nll": 0.01, "accuracy": 0.99,
     "accuracy_lo": 0.98, "accuracy_hi": 1.0, "infer_ms_per_image": None},
]


def test_the_best_row_within_a_budget_is_chosen_on_val_never_on_test():
    choice = best_within_budget(ROWS, 5.0)
    assert choice.row["name"] == "steady" and (choice.n_fit, choice.n_unknown) == (2, 1)
    assert choice.sentence() == ("best within 5 ms per image: steady (member), chosen on val_accuracy 0.9500 among 2 "
                                 "rows that fit (1 rows of unknown cost left out): test accuracy 0.9300 [0.9000, "
                                 "0.9600] (95% CI) at 4 ms per image")
    assert best_within_budget(ROWS, 0.5).row is None
    assert best_within_budget(ROWS, 0.5).sentence() == "no row's inference cost fits 0.5 ms per image (1 rows of " \
                                                       "unknown cost left out)"
    assert best_within_budget(ROWS, 5.0, ranked_by="nll").chosen_by == "val_nll"
    # a board whose costs are all unknown (members from predictions made elsewhere) says so
    none_known = best_within_budget(ROWS[-1:], 5.0)
    assert none_known.row is None and none_known.sentence() == (
        "no row of this leaderboard has a known inference cost, so none can be chosen within 5 ms per image")


def test_leaderboard_names_the_best_row_within_a_budget(toy_run):
    reg = toy_run.registry
    run_id = toy_run.summary["run_id"]
    rows = json.loads((toy_run.run_dir / "leaderboard.json").read_text())["rows"]
    budget = max(r["infer_ms_per_image"] for r in rows) * 2  # every row fits
    best_val = max(rows, key=lambda r: (r["val_accuracy"], -r["val_nll"], -r["infer_ms_per_image"]))
    out = cli("leaderboard", run_id, "--budget", budget, "--registry", reg)
    assert out.returncode == 0 and out.stdout.splitlines()[-1].startswith(f"best within {budget:g} ms per image: "
                                                                         f"{best_val['name']} (")
    out = cli("leaderboard", run_id, "--budget", budget, "--format", "json", "--registry", reg)
    chosen = json.loads(out.stdout)
    assert chosen["row"]["name"] == best_val["name"] and chosen["chosen_by"] == "val_accuracy"
    bad = cli("leaderboard", run_id, "--budget", "-3", "--registry", reg)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "give a positive number of milliseconds" in bad.stderr
    md = cli("leaderboard", run_id, "--budget", "3", "--format", "md", "--registry", reg)
    assert (md.returncode, md.stderr) == (2, "leaderboard: --budget prints with --format table or json, not md\n")
