"""Each first-party fuser's ONNX graph (``onnx_proba``) against its own ``predict_proba``, on
member logits alone: every fuser, with and without temperature, with classes missing from val,
two classes, one class, and exact ties for the vote."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from fusion_engine import Fuser, FusionEngineError  # noqa: E402
from fusion_engine.calibration import TemperatureScaled  # noqa: E402
from fusion_engine.deploy.graph import head_model, session  # noqa: E402
from fusion_engine_fusers import register_fusers  # noqa: E402
from simulate import simulate_members  # noqa: E402

RECORDS = {record.name: record for record in register_fusers()}
#: every first-party fuser as the quickstart configures them, and a few variants
FUSERS = {
    "mean": ("mean", {}),
    "geometric-mean": ("mean", {"space": "logprob"}),
    "mean-weights": ("mean", {"weights": [1, 2, 0.5]}),
    "vote": ("vote", {}),
    "vote-learned": ("vote", {"weights": "learned"}),
    "weighted": ("weighted", {}),
    "caruana": ("caruana", {}),
    "stack-lr": ("logistic-stacking", {}),
    "stack-lr-logits": ("logistic-stacking", {"append_logits": True}),
    "stack-xgb": ("xgboost-stacking", {"n_estimators": 30}),
    "cascade": ("cascade", {"max_accuracy_drop": 0.05}),
    "cascade-calibrated": ("cascade", {"max_accuracy_drop": 0.05, "confidence": "calibrated"}),
    "cascade-spec-order": ("cascade", {"order": "spec", "budget": 2.5}),
}
#: each member's inference cost (ms per image), for the fusers that need them (the cascade)
COSTS = [3.0, 1.0, 2.0]
OPSET, IR_VERSION = 20, 10


@pytest.fixture(autouse=True)
def one_thread():
    with threadpool_limits(1):
        yield


def fitted(name: str, logits: np.ndarray, y: np.ndarray, temperature: bool = False) -> Fuser:
    fuser_name, params = FUSERS[name]
    record = RECORDS[fuser_name]
    fuser = record.cls(**record.params(**params).model_dump())
    fuser = TemperatureScaled(fuser, seed=0) if temperature else fuser
    return fuser.fit(logits, y, costs=COSTS[:len(logits)]) if fuser.needs_costs else fuser.fit(logits, y)


def onnx_proba(fuser: Fuser, logits: np.ndarray, temperatures=None) -> np.ndarray:
    m, _, c = logits.shape
    model = head_model(fuser, n_members=m, n_classes=c, temperatures=temperatures or [None] * m, opset=OPSET,
                       ir_version=IR_VERSION)
    return session(model.SerializeToString()).run(["proba"], {"logits": logits.astype(np.float32)})[0]


@pytest.mark.parametrize("temperature", [False, True], ids=["plain", "temperature"])
@pytest.mark.parametrize("name", list(FUSERS))
def test_each_fusers_graph_computes_its_predict_proba(name, temperature):
    logits, y = simulate_members([0.8, 0.6, 0.5], n_samples=240, n_classes=6, seed=1)
    logits = logits.astype(np.float32)
    y[y == 4] = 5  # class 4 missing from val: stackers learn K=5 of C=6 columns
    fuser = fitted(name, logits[:, :160], y[:160], temperature)
    test = logits[:, 160:]
    expected = fuser.predict_proba(test)
    got = onnx_proba(fuser, test)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-6  # float64 inside; the float32 output is the only rounding
    assert np.array_equal(got.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("name", ["stack-lr", "stack-xgb"])
def test_two_class_and_one_class_stackers(name):
    logits, y = simulate_members([0.8, 0.7], n_samples=200, n_classes=4, seed=2)
    logits = logits.astype(np.float32)
    two = np.where(y % 2 == 0, 0, 2)  # a binary fit (one row of coefficients) put back among 4 columns
    for labels in (two, np.full_like(y, 3)):
        fuser = fitted(name, logits[:, :120], labels[:120])
        expected = fuser.predict_proba(logits[:, 120:])
        assert np.abs(onnx_proba(fuser, logits[:, 120:]) - expected).max() < 1e-6


def test_vote_ties_break_as_the_engine_breaks_them():
    """Ties in a member's top logits (the first class wins) and vote shares that tie only within
    1e-9 in float64 (weights 0.3/0.6/0.9): the exporter's optimiser would turn the tie tolerance
    and the 1 - 1e-6 factor into no-ops; the graph built here keeps both. (Mean probabilities
    equal to the last bit are broken by rounding, which numpy and ONNX Runtime may do differently;
    real logits do not tie so.)"""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 600, 4)).astype(np.float32)
    rows = np.arange(0, 600, 3)
    top = logits[0, rows].argmax(1)
    logits[0, rows, (top + 1) % 4] = logits[0, rows, top]  # exact ties inside member 0
    fuser = fitted("vote", logits, rng.integers(0, 4, 600))
    for weights in (None, [0.3, 0.6, 0.9]):
        fuser.weights = weights
        expected = fuser.predict_proba(logits)
        got = onnx_proba(fuser, logits)
        assert np.array_equal(got.argmax(1), expected.argmax(1))
        assert np.abs(got - expected).max() < 1e-6


def test_member_temperatures_divide_float32_logits_as_calibration_does():
    logits, y = simulate_members([0.8, 0.6], n_samples=100, n_classes=3, seed=3)
    logits = logits.astype(np.float32)
    temperatures = [1.7, None]
    calibrated = np.stack([(logits[0] / 1.7).astype(np.float32), logits[1]])
    fuser = fitted("stack-lr", calibrated, y)
    got = onnx_proba(fuser, logits, temperatures)
    assert np.abs(got - fuser.predict_proba(calibrated)).max() < 1e-6


def test_a_member_row_is_its_softmax():
    logits = np.random.default_rng(4).normal(size=(1, 50, 7)).astype(np.float32)
    got = onnx_proba(None, logits)
    e = np.exp(logits[0].astype(np.float64) - logits[0].max(1, keepdims=True))
    assert np.abs(got - e / e.sum(1, keepdims=True)).max() < 1e-7


def test_a_fuser_without_a_graph_is_refused_in_one_line():
    class Median(Fuser):
        requires_fit = False

        def predict_proba(self, logits):
            return np.median(logits, axis=0)

    with pytest.raises(FusionEngineError, match=r"^fuser Median has no ONNX graph \(it does not implement onnx_proba\); "
                                                 r"export without --onnx$"):
        head_model(Median(), n_members=2, n_classes=3, temperatures=[None, None], opset=OPSET, ir_version=IR_VERSION)


@pytest.mark.parametrize("name", ["cascade", "cascade-calibrated", "cascade-spec-order"])
def test_a_cascade_stops_samples_at_every_stage_and_its_graph_picks_the_same_stage(name):
    """The graph has no early exit, but it must pick each sample's stage as predict_proba does:
    the fitted cascades here answer samples at more than one stage."""
    logits, y = simulate_members([0.8, 0.6, 0.5], n_samples=400, n_classes=5, seed=5)
    logits = logits.astype(np.float32)
    fuser = fitted(name, logits[:, :200], y[:200])
    test = logits[:, 200:]
    stages = fuser.consulted(test).sum(axis=1)  # members run = the stage it stopped at + 1
    assert len(np.unique(stages)) >= 2, np.bincount(stages)
    expected = fuser.predict_proba(test)
    assert np.abs(onnx_proba(fuser, test) - expected).max() < 1e-6
    order = fuser.consult_order()
    assert sorted(order) == [0, 1, 2] and (order == [1, 2, 0] if "spec" not in name else order == [0, 1, 2])
