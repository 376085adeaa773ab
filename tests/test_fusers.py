"""The first-party fusers on synthetic member outputs whose right answer is known."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Annotated, Literal

import numpy as np
import pytest
from pydantic import Field, ValidationError, create_model
from scipy.special import softmax
from threadpoolctl import threadpool_limits

from fusion_engine import Fuser, FuserRecord, Params, PluginError
from fusion_engine.calibration import TemperatureScaled
from fusion_engine.plugins import get_plugins
from fusion_engine_fusers import Caruana, Mean, Vote, Weighted, register_fusers
from fusion_engine_fusers.voting import TIE_BREAK
from simulate import accuracy, simulate_members

NAMES = ["mean", "vote", "weighted", "caruana", "logistic-stacking", "xgboost-stacking"]
RECORDS = {record.name: record for record in register_fusers()}


@pytest.fixture(autouse=True)
def one_thread():
    """Threaded BLAS spins on a shared machine; one thread is fastest at these sizes."""
    with threadpool_limits(1):
        yield


def make_fuser(name, **params):
    record = RECORDS[name]
    return record.cls(**record.params(**params).model_dump())


# -- registration and parameters ----------------------------------------------------------

def test_every_fuser_is_registered_through_the_entry_point():
    catalog = get_plugins().catalog()
    for name in NAMES:
        assert catalog.get("fuser", name).plugin == "fusion_engine_fusers"


class Shrink(Fuser):
    def __init__(self, alpha: Annotated[float, Field(gt=0, le=1, description="how far to shrink")] = 0.5,
                 mode: Literal["prob", "logprob"] = "prob", weights: list[float] | None = None):
        self.alpha, self.mode, self.weights = alpha, mode, weights


def test_a_fusers_params_are_read_off_its_init():
    """A fuser's parameters are written once, in ``__init__``: the record's Params model has its
    defaults, its constraints and its descriptions, and rejects unknown keys."""
    params = FuserRecord("shrink", Shrink).params
    assert params().model_dump() == Shrink().get_params() == {"alpha": 0.5, "mode": "prob", "weights": None}
    assert params.model_json_schema()["properties"]["alpha"]["description"] == "how far to shrink"
    for bad in ({"alpha": 0}, {"alpha": 1.5}, {"mode": "linear"}, {"alhpa": 0.3}):
        with pytest.raises(ValidationError):
            params(**bad)
    assert Shrink(**params(alpha=0.25).model_dump()).alpha == 0.25


class ShrinkParams(Params):
    """Shrink's parameters as a plugin written against 0.1 gave them: a model beside ``__init__``."""

    alpha: float = Field(0.5, gt=0, le=1, description="how far to shrink")
    mode: Literal["prob", "logprob"] = "prob"
    weights: list[float] | None = None


def test_a_params_model_that_matches_init_is_accepted():
    assert FuserRecord("shrink", Shrink, ShrinkParams).params is ShrinkParams


def test_a_params_model_that_says_the_same_in_other_words_is_accepted():
    """Typing's spellings (Optional, List), an int default for a float, and a typed model over an
    ``__init__`` without annotations (as 0.1's plugin guide wrote them) are the same parameters."""
    from typing import List, Optional

    other_words = create_model("ShrinkParams", __base__=ShrinkParams, weights=(Optional[List[float]], None))
    assert FuserRecord("shrink", Shrink, other_words).params is other_words

    class Untyped(Shrink):
        def __init__(self, alpha=0.5, mode="prob", weights=None):
            super().__init__(alpha=alpha, mode=mode, weights=weights)

    assert FuserRecord("untyped", Untyped, ShrinkParams).params is ShrinkParams
    whole = create_model("ShrinkParams", __base__=ShrinkParams, alpha=(float, Field(1, gt=0, le=1)))

    class One(Shrink):
        def __init__(self, alpha: Annotated[float, Field(gt=0, le=1)] = 1.0,
                     mode: Literal["prob", "logprob"] = "prob", weights: list[float] | None = None):
            super().__init__(alpha=alpha, mode=mode, weights=weights)

    assert FuserRecord("one", One, whole).params is whole


@pytest.mark.parametrize("fields, message", [
    ({"alpha": (float, Field(0.25, gt=0, le=1))},
     "ShrinkParams.alpha has default 0.25 (float), Shrink.__init__ has 0.5 (float)"),
    ({"alpha": (float, 0.5)}, "ShrinkParams.alpha has type float, Shrink.__init__ has float (Gt(gt=0), Le(le=1))"),
    ({"mode": (Literal["prob"], "prob")},
     "ShrinkParams.mode has type Literal['prob'], Shrink.__init__ has Literal['prob', 'logprob']"),
    ({"weights": (list[int] | None, None)},
     "ShrinkParams.weights has type list[int] | None, Shrink.__init__ has list[float] | None"),
    ({"weights": (list[float] | None, ...)},
     "ShrinkParams.weights has default none (required), Shrink.__init__ has None (NoneType)"),
    ({"shift": (float, 0.0)}, "ShrinkParams has shift, which Shrink.__init__ does not take"),
])
def test_a_params_model_that_differs_from_init_is_refused_naming_the_field_and_both_values(fields, message):
    drifted = create_model("ShrinkParams", __base__=ShrinkParams, **fields)
    with pytest.raises(PluginError) as info:
        FuserRecord("shrink", Shrink, drifted)
    assert str(info.value) == (f"fuser shrink: {message}; leave params out and the model is read off "
                               "Shrink.__init__")


def test_a_params_model_missing_a_parameter_of_init_is_refused():
    fewer = create_model("ShrinkParams", __base__=Params, alpha=(float, Field(0.5, gt=0, le=1)),
                         mode=(Literal["prob", "logprob"], "prob"))
    with pytest.raises(PluginError, match=r"^fuser shrink: Shrink.__init__ takes weights, which ShrinkParams lacks; "):
        FuserRecord("shrink", Shrink, fewer)


@pytest.mark.parametrize("name, params", [
    ("mean", {"space": "linear"}),
    ("mean", {"weights": [1, -1]}),
    ("mean", {"weights": [0, 0]}),
    ("vote", {"weights": "learnt"}),
    ("caruana", {"metric": "auc"}),
    ("caruana", {"bag_fraction": 0}),
    ("logistic-stacking", {"C": 0}),
    ("logistic-stacking", {"cv": 1}),
    ("xgboost-stacking", {"max_depht": 3}),
])
def test_invalid_params_are_rejected(name, params):
    with pytest.raises(ValidationError):
        RECORDS[name].params(**params)


def test_plugin_import_loads_no_heavy_library():
    code = ("import sys, fusion_engine_fusers; "
            "print(sorted(m for m in ('torch', 'xgboost', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- every fuser: shapes, probabilities, state ---------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("accuracies, n_classes", [([0.8], 3), ([0.8, 0.6], 2), ([0.7, 0.5, 0.3], 100)],
                         ids=["1-member", "2-classes", "100-classes"])
def test_outputs_are_probabilities(name, accuracies, n_classes):
    params = {"n_estimators": 10} if name == "xgboost-stacking" else {}
    logits, y = simulate_members(accuracies, n_samples=400, n_classes=n_classes)
    proba = make_fuser(name, **params).fit(logits[:, :300], y[:300]).predict_proba(logits[:, 300:])
    assert proba.shape == (100, n_classes)
    assert np.all(np.isfinite(proba)) and np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_one_member_keeps_its_skill(name):
    logits, y = simulate_members([0.8], n_samples=600, n_classes=4)
    fuser = make_fuser(name).fit(logits[:, :300], y[:300])
    member, fused = np.argmax(logits[0, 300:], axis=1), fuser.predict(logits[:, 300:])
    if name.endswith("stacking"):
        assert abs(np.mean(fused == y[300:]) - np.mean(member == y[300:])) < 0.05
    else:
        np.testing.assert_array_equal(fused, member)


@pytest.mark.parametrize("name", NAMES)
def test_class_missing_from_val_still_gets_a_column(name):
    logits, y = simulate_members([0.8, 0.6], n_samples=300, n_classes=4)
    seen = y != 2
    proba = make_fuser(name).fit(logits[:, seen], y[seen]).predict_proba(logits)
    assert proba.shape == (300, 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    assert accuracy(proba[seen], y[seen]) > 0.65
    if name.endswith("stacking"):
        assert np.all(proba[:, 2] == 0)


@pytest.mark.parametrize("name", ["logistic-stacking", "xgboost-stacking"])
def test_stacking_with_a_single_class_in_val_predicts_it(name):
    logits, _ = simulate_members([0.8, 0.6], n_samples=20, n_classes=3)
    proba = make_fuser(name).fit(logits, np.full(20, 1)).predict_proba(logits)
    np.testing.assert_array_equal(proba, np.tile([0.0, 1.0, 0.0], (20, 1)))


ROUND_TRIP = [(name, {}) for name in NAMES] + [
    ("mean", {"space": "logprob", "weights": [1, 2, 3]}),
    ("vote", {"weights": "learned"}),
    ("caruana", {"bagging": 5, "init_best": 1, "metric": "accuracy"}),
    ("logistic-stacking", {"append_logits": True}),
    ("xgboost-stacking", {"append_logits": True, "max_depth": 3}),
]


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("name, params", ROUND_TRIP)
def test_state_round_trips_through_json(name, params, n_classes):
    logits, y = simulate_members([0.8, 0.6, 0.3], n_samples=300, n_classes=n_classes)
    fuser = make_fuser(name, **params).fit(logits[:, :200], y[:200])
    state = json.loads(json.dumps(fuser.get_state()))
    restored = make_fuser(name, **params).set_state(state)
    np.testing.assert_array_equal(restored.predict_proba(logits[:, 200:]), fuser.predict_proba(logits[:, 200:]))


def test_temperature_scaled_state_round_trips_through_json():
    logits, y = simulate_members([0.8, 0.6, 0.3], n_samples=300, n_classes=4)
    fuser = TemperatureScaled(make_fuser("logistic-stacking")).fit(logits[:, :200], y[:200])
    state = json.loads(json.dumps(fuser.get_state()))
    restored = TemperatureScaled(make_fuser("logistic-stacking")).set_state(state)
    np.testing.assert_array_equal(restored.predict_proba(logits[:, 200:]), fuser.predict_proba(logits[:, 200:]))


@pytest.mark.parametrize("name", NAMES)
def test_fitting_is_deterministic(name):
    logits, y = simulate_members([0.8, 0.6, 0.3], n_samples=300, n_classes=4)
    first = make_fuser(name).fit(logits, y).predict_proba(logits)
    np.testing.assert_array_equal(make_fuser(name).fit(logits, y).predict_proba(logits), first)


# -- mean ----------------------------------------------------------------------------------

def hand_logits(*member_probas):
    return np.log(np.array(member_probas, dtype=np.float64))


def test_mean_prob_is_arithmetic_and_logprob_geometric():
    a, b = [0.89, 0.10, 0.01], [0.001, 0.5, 0.499]
    logits = hand_logits([a], [b])
    arithmetic = Mean(space="prob").predict_proba(logits)
    geometric = Mean(space="logprob").predict_proba(logits)
    np.testing.assert_allclose(arithmetic, [(np.array(a) + b) / 2])
    root = np.sqrt(np.array(a) * b)
    np.testing.assert_allclose(geometric, [root / root.sum()])
    assert np.argmax(arithmetic) == 0 and np.argmax(geometric) == 1


def test_mean_respects_fixed_weights():
    logits, _ = simulate_members([0.8, 0.4], n_samples=50)
    p = softmax(logits, axis=2)
    np.testing.assert_allclose(Mean(weights=[3, 1]).predict_proba(logits), 0.75 * p[0] + 0.25 * p[1])
    np.testing.assert_allclose(Mean(weights=[0, 1]).predict_proba(logits), p[1])
    np.testing.assert_allclose(Mean(space="logprob", weights=[1, 0]).predict_proba(logits), p[0])
    np.testing.assert_allclose(Mean(weights=[3, 1]).fit(logits, np.zeros(50, int)).weights_, [0.75, 0.25])


def test_mean_rejects_weights_for_another_number_of_members():
    logits, _ = simulate_members([0.8, 0.4], n_samples=10)
    with pytest.raises(ValueError, match="weights: 3 given for 2 members"):
        Mean(weights=[1, 1, 1]).predict_proba(logits)


# -- vote ----------------------------------------------------------------------------------

def test_vote_ties_go_to_highest_mean_probability_then_lowest_class():
    logits = hand_logits(
        [[0.1, 0.8, 0.1], [0.90, 0.05, 0.05], [0.1, 0.5, 0.4], [0.5, 0.3, 0.2]],
        [[0.2, 0.7, 0.1], [0.30, 0.10, 0.60], [0.05, 0.15, 0.8], [0.3, 0.5, 0.2]],
    )
    # agreement -> 1; tie 0 vs 2, mean p 0.60 vs 0.325 -> 0; tie 1 vs 2, 0.325 vs 0.6 -> 2;
    # tie 0 vs 1 with equal mean p 0.4 -> lowest index 0
    proba = Vote().predict_proba(logits)
    np.testing.assert_array_equal(np.argmax(proba, axis=1), [1, 0, 2, 0])
    np.testing.assert_array_equal(Vote().predict(logits), [1, 0, 2, 0])
    np.testing.assert_allclose(proba, [[0, 1, 0], [0.5, 0, 0.5], [0, 0.5, 0.5], [0.5, 0.5, 0]], atol=2 * TIE_BREAK)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_vote_majority_beats_confidence():
    logits = hand_logits([[0.4, 0.6]], [[0.45, 0.55]], [[0.99, 0.01]])
    assert Vote().predict(logits).tolist() == [1]
    assert Vote(weights=[1, 1, 3]).predict(logits).tolist() == [0]


def test_vote_with_learned_weights_needs_fit_and_fixed_does_not():
    assert Vote().requires_fit is False and Vote(weights=[1, 2]).requires_fit is False
    assert Vote(weights="learned").requires_fit is True
    logits, y = simulate_members([0.9, 0.3, 0.2], n_samples=500)
    fuser = Vote(weights="learned").fit(logits, y)
    assert np.argmax(fuser.weights_) == 0
    assert accuracy(fuser.predict_proba(logits), y) > accuracy(Vote().predict_proba(logits), y)


# -- learned weights -----------------------------------------------------------------------

@pytest.mark.parametrize("fuser", [Weighted(), Caruana()], ids=["weighted", "caruana"])
def test_learned_weights_drop_noise_and_favour_the_strong_member(fuser):
    logits, y = simulate_members([0.6, 0.85, 0.2], n_samples=1000, n_classes=5)
    weights = fuser.fit(logits, y).weights_
    assert weights.shape == (3,) and np.isclose(weights.sum(), 1.0) and np.all(weights >= 0)
    assert weights[2] < 0.1
    assert np.argmax(weights) == 1


def test_weighted_beats_the_plain_mean_with_a_noise_member():
    logits, y = simulate_members([0.6, 0.85, 0.2, 0.2], n_samples=1000, n_classes=5)
    val, test = slice(0, 500), slice(500, None)
    weighted = Weighted().fit(logits[:, val], y[val]).predict_proba(logits[:, test])
    mean = Mean().predict_proba(logits[:, test])
    assert accuracy(weighted, y[test]) > accuracy(mean, y[test])


def test_caruana_ties_go_to_the_lowest_member_index():
    logits, y = simulate_members([0.8, 0.5], n_samples=200)
    twins = np.concatenate([logits[:1], logits[:1], logits[1:]])
    weights = Caruana(metric="accuracy").fit(twins, y).weights_
    assert weights[1] == 0.0
    assert weights[0] > 0


def test_caruana_reports_unselected_members_with_zero_weight():
    logits, y = simulate_members([0.9, 0.2, 0.2, 0.2], n_samples=500)
    weights = Caruana(ensemble_size=10).fit(logits, y).weights_
    assert len(weights) == 4
    np.testing.assert_array_equal(weights, [1.0, 0.0, 0.0, 0.0])


def test_caruana_init_best_starts_from_the_best_members():
    logits, y = simulate_members([0.5, 0.9, 0.7], n_samples=500)
    weights = Caruana(ensemble_size=1, init_best=2).fit(logits, y).weights_
    assert weights[1] > 0 and weights[2] > 0


def test_caruana_bagging_depends_on_seed_only():
    logits, y = simulate_members([0.7, 0.7, 0.6, 0.6, 0.5, 0.5], n_samples=300)
    first = Caruana(bagging=5, seed=1).fit(logits, y).weights_
    np.testing.assert_array_equal(Caruana(bagging=5, seed=1).fit(logits, y).weights_, first)
    assert not np.array_equal(Caruana(bagging=5, seed=2).fit(logits, y).weights_, first)



def test_a_stacker_as_the_0_1_plugin_guide_wrote_it_is_accepted():
    """The guide of 0.1 subclassed StackingParams with constrained fields over an ``__init__``
    without annotations; that record still loads, with the model's constraints."""
    from fusion_engine import StackingFuser, StackingParams

    class LightGBMStackingParams(StackingParams):
        n_estimators: int = Field(200, gt=0)
        num_leaves: int = Field(7, gt=1)
        learning_rate: float = Field(0.05, gt=0)
        min_child_samples: int = Field(10, gt=0)

    class LightGBMStacking(StackingFuser):
        def __init__(self, n_estimators=200, num_leaves=7, learning_rate=0.05, min_child_samples=10,
                     append_logits=False, cv=5, seed=0):
            super().__init__(append_logits=append_logits, cv=cv, seed=seed)
            self.n_estimators, self.num_leaves = n_estimators, num_leaves
            self.learning_rate, self.min_child_samples = learning_rate, min_child_samples

    params = FuserRecord("lightgbm-stacking", LightGBMStacking, LightGBMStackingParams).params
    assert params is LightGBMStackingParams
    with pytest.raises(ValidationError):
        params(num_leaves=1)
