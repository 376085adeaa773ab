"""Temperature scaling: it recovers a known temperature, never changes accuracy and never
makes the validation NLL worse."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import log_loss
from threadpoolctl import threadpool_limits

from fusion_engine.calibration import TemperatureScaled, apply_temperature, fit_temperature, log_proba
from fusion_engine.crossfit import cross_val_proba
from fusion_engine_fusers import LogisticStacking, Mean, Vote, Weighted
from simulate import accuracy, simulate_members


@pytest.fixture(autouse=True)
def one_thread():
    """Threaded BLAS spins on a shared machine; one thread is fastest at these sizes."""
    with threadpool_limits(1):
        yield


def calibrated_scores(n_samples=4000, n_classes=5, seed=0):
    """Logits whose softmax is the true class distribution: labels are drawn from it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n_samples, n_classes))
    cumulative = np.cumsum(softmax(logits, axis=1), axis=1)
    y = np.minimum((cumulative < rng.random((n_samples, 1))).sum(axis=1), n_classes - 1)
    return logits, y


def nll(y, proba):
    return log_loss(y, proba, labels=np.arange(proba.shape[1]))


@pytest.mark.parametrize("true_temperature", [3.0, 0.5])
def test_recovers_a_known_temperature(true_temperature):
    logits, y = calibrated_scores()
    assert fit_temperature(logits * true_temperature, y) == pytest.approx(true_temperature, rel=0.1)


def test_calibrated_scores_keep_a_temperature_near_one():
    logits, y = calibrated_scores()
    assert fit_temperature(logits, y) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_accuracy_unchanged_and_nll_not_worse(scale):
    logits, y = calibrated_scores(n_samples=500, seed=1)
    scores = logits * scale
    temperature = fit_temperature(scores, y)
    scaled = apply_temperature(scores, temperature)
    np.testing.assert_array_equal(np.argmax(scaled, axis=1), np.argmax(scores, axis=1))
    assert nll(y, scaled) <= nll(y, softmax(scores, axis=1))


def test_falls_back_to_one_when_nothing_improves():
    y = np.array([0, 1, 2, 0])
    assert fit_temperature(np.zeros((4, 3)), y) == 1.0


def test_hard_votes_are_softened():
    logits, y = simulate_members([0.7, 0.6, 0.5], n_samples=600)
    votes = Vote().predict_proba(logits)
    temperature = fit_temperature(log_proba(votes), y)
    scaled = apply_temperature(log_proba(votes), temperature)
    assert temperature > 1.0
    np.testing.assert_array_equal(np.argmax(scaled, axis=1), np.argmax(votes, axis=1))
    assert nll(y, scaled) < nll(y, votes) / 2


def test_apply_temperature_works_per_member_and_rejects_non_positive_temperatures():
    logits, _ = simulate_members([0.7, 0.6], n_samples=20)
    np.testing.assert_allclose(apply_temperature(logits, 2.0), softmax(logits / 2.0, axis=2))
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(logits, 0.0)
    with pytest.raises(ValueError, match="contain 1"):
        fit_temperature(logits[0], np.zeros(20, int), bounds=(2.0, 3.0))


# -- wrapping a fuser ----------------------------------------------------------------------

def overconfident_members(n_samples=800):
    logits, y = simulate_members([0.75, 0.6, 0.5], n_samples=n_samples, margin=3.0)
    return logits * 3.0, y


def test_wrapped_fuser_keeps_its_accuracy_and_gains_nll_on_test():
    logits, y = overconfident_members()
    val, test = slice(0, 400), slice(400, None)
    plain = Weighted().fit(logits[:, val], y[val]).predict_proba(logits[:, test])
    wrapped = TemperatureScaled(Weighted()).fit(logits[:, val], y[val])
    scaled = wrapped.predict_proba(logits[:, test])
    assert wrapped.temperature_ > 1.2
    np.testing.assert_array_equal(np.argmax(scaled, axis=1), np.argmax(plain, axis=1))
    assert nll(y[test], scaled) < nll(y[test], plain)
    np.testing.assert_array_equal(wrapped.weights_, wrapped.fuser_.weights_)


def test_temperature_of_a_learning_fuser_is_fitted_out_of_fold():
    logits, y = overconfident_members(400)
    fuser = LogisticStacking(cv=4, seed=2)
    oof = cross_val_proba(fuser, logits, y)
    wrapped = TemperatureScaled(fuser).fit(logits, y)
    assert wrapped.temperature_ == fit_temperature(log_proba(oof), y)
    assert nll(y, apply_temperature(log_proba(oof), wrapped.temperature_)) <= nll(y, oof)
    assert not hasattr(fuser, "final_estimator_")


def test_temperature_of_a_fuser_that_learns_nothing_is_fitted_in_sample():
    logits, y = overconfident_members(300)
    wrapped = TemperatureScaled(Mean(space="logprob")).fit(logits, y)
    assert wrapped.temperature_ == fit_temperature(log_proba(Mean(space="logprob").predict_proba(logits)), y)


def test_wrapper_is_a_fuser_that_clones_and_cross_fits():
    logits, y = overconfident_members(300)
    wrapped = TemperatureScaled(Vote(), cv=3)
    assert wrapped.requires_fit
    clone = wrapped.clone()
    assert clone.fuser is not wrapped.fuser and clone.cv == 3
    proba = cross_val_proba(wrapped, logits, y)
    assert proba.shape == (300, 5)
    np.testing.assert_array_equal(np.argmax(proba, axis=1), Vote().predict(logits))
    assert accuracy(proba, y) == accuracy(Vote().predict_proba(logits), y)


def test_wrapper_state_round_trips_through_json():
    logits, y = overconfident_members(300)
    wrapped = TemperatureScaled(Vote(weights="learned")).fit(logits, y)
    restored = TemperatureScaled(Vote(weights="learned")).set_state(json.loads(json.dumps(wrapped.get_state())))
    np.testing.assert_array_equal(restored.predict_proba(logits), wrapped.predict_proba(logits))


def test_the_calibrate_stage_alone_gives_back_a_scaled_member_and_leaves_the_one_it_got():
    from types import SimpleNamespace

    from fusion_engine.members import MemberResult, calibrate_member

    logits, y = calibrated_scores(n_samples=600, seed=3)
    hot = {"val": logits[:300] * 3.0, "test": logits[300:] * 3.0}  # overconfident by a factor 3
    member = MemberResult("m", card=None, logits=dict(hot))
    scaled = calibrate_member(member, SimpleNamespace(calibrate="temperature"), y[:300])
    assert scaled is not member and member.temperature is None and member.logits["val"] is hot["val"]
    assert scaled.temperature == pytest.approx(3.0, rel=0.2)
    for split in ("val", "test"):
        assert scaled.logits[split].dtype == np.float32
        np.testing.assert_allclose(scaled.logits[split], hot[split] / scaled.temperature, rtol=1e-6)
    assert calibrate_member(member, SimpleNamespace(calibrate=None), y[:300]) is member


def test_a_run_fuses_and_writes_the_calibrated_member_the_calibrate_stage_gave_back(toy_registry, tmp_path):
    """The member stage keeps what the calibrate stage gives back: the run's members, the logits
    its fusers saw and its run folder all hold the zoo's logits divided by the fitted temperature."""
    from safetensors.numpy import load_file

    from conftest import toy_spec_data, write_spec
    from fusion_engine import RunFolder
    from fusion_engine.runner import run_experiment

    data = toy_spec_data()
    data["members"][0]["calibrate"] = "temperature"
    result = run_experiment(write_spec(tmp_path / "spec.yaml", data), registry=toy_registry, quiet=True)
    member = result.members["net-a"]
    assert member.temperature is not None and member.temperature != 1.0
    stored = load_file(str(toy_registry / "zoo" / member.key / "outputs.safetensors"))
    folder = RunFolder(result.run_dir)
    written = load_file(str(result.run_dir / "members" / "net-a" / "outputs.safetensors"))
    for split in ("val", "test"):
        expected = (stored[f"{split}_logits"] / member.temperature).astype(np.float32)
        np.testing.assert_array_equal(member.logits[split], expected)
        np.testing.assert_array_equal(written[f"{split}_logits"], expected)
    assert folder.cards["net-a"].temperature == member.temperature
    avg_a = folder.probabilities("test")["avg-a"]  # a fuser of net-a alone sees its calibrated logits
    np.testing.assert_allclose(avg_a, softmax(stored["test_logits"].astype(np.float64) / member.temperature, axis=1),
                               atol=1e-6)
