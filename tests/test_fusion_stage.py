"""The fuser stage alone: :func:`fusion_engine.fusion.fit_fusers` on simulated member logits,
with no run, no run folder and no images."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from fusion_engine.fusion import fit_fusers
from fusion_engine.records import Provided
from fusion_engine.resolve import Bound
from fusion_engine.spec import FuserSpec
from fusion_engine_fusers import register_fusers
from simulate import simulate_members

RECORDS = {record.name: record for record in register_fusers()}
MEMBERS = ["a", "b", "c"]
N_VAL, N_TEST, N_CLASSES = 120, 90, 4


def entry(name: str, fuser: str, members: list[str] | None = None, **params) -> tuple[FuserSpec, Bound]:
    """A spec's fuser entry bound to its first-party record, as the spec resolver binds it."""
    record = RECORDS[fuser]
    spec = FuserSpec(name=name, fuser=fuser, params=params, members=members)
    return spec, Bound(Provided(record, "fusion_engine_fusers"), record.params(**params))


ENTRIES = [entry("avg", "mean"), entry("avg-bc", "mean", members=["b", "c"]), entry("weighted", "weighted"),
           entry("stack", "logistic-stacking")]


@pytest.fixture(scope="module")
def data():
    """Member logits per split (``train`` has none: members are never fused on it) and labels for
    all three splits, as the runner hands them over."""
    logits, y = simulate_members([0.8, 0.6, 0.25], n_samples=N_VAL + N_TEST, n_classes=N_CLASSES, seed=5)
    member_logits = {name: {"val": logits[m, :N_VAL], "test": logits[m, N_VAL:]} for m, name in enumerate(MEMBERS)}
    labels = {"train": np.arange(30) % N_CLASSES, "val": y[:N_VAL], "test": y[N_VAL:]}
    return member_logits, labels


def fit(data_logits, labels, entries=ENTRIES):
    return {fitted.name: fitted for fitted in fit_fusers(entries, data_logits, labels, seed=3)}


@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory):
    """Every entry fitted, from an empty working folder, with every way to open a file for writing
    raising (the folder is returned to be checked too)."""
    import builtins
    import io
    import os

    import fusion_engine.files as files

    cwd = tmp_path_factory.mktemp("cwd")
    real_open, real_os_open = builtins.open, os.open

    def refused(*args, **kwargs):
        raise AssertionError(f"fit_fusers wrote a file: {args[:1]}")

    def read_only_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            refused(file)
        return real_open(file, mode, *args, **kwargs)

    def read_only_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refused(path)
        return real_os_open(path, flags, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        for module, name, fake in ((builtins, "open", read_only_open), (io, "open", read_only_open),
                                   (os, "open", read_only_os_open), (files, "atomic_path", refused)):
            mp.setattr(module, name, fake)
        result = fit(*data)
    return result, cwd


def test_fit_fusers_writes_no_files(fitted):
    _, cwd = fitted
    assert list(cwd.iterdir()) == []


def test_each_fuser_gives_val_and_test_probabilities_over_its_members(fitted):
    result, _ = fitted
    assert list(result) == ["avg", "avg-bc", "weighted", "stack"]
    for name, fuser in result.items():
        assert fuser.members == (["b", "c"] if name == "avg-bc" else MEMBERS)
        assert set(fuser.proba) == {"val", "test"}
        for split, n in (("val", N_VAL), ("test", N_TEST)):
            proba = fuser.proba[split]
            assert proba.shape == (n, N_CLASSES), (name, split)
            assert np.all(proba >= 0), (name, split)
            np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9, err_msg=f"{name} {split}")
        # a fuser that stops no sample early runs every member on every test sample
        assert fuser.consulted == [1.0] * len(fuser.members)
        assert fuser.stopped_after == [0] * (len(fuser.members) - 1) + [N_TEST]
        assert fuser.fit_seconds >= 0 and fuser.predict_ms_per_image >= 0


def test_the_mean_fuser_is_the_mean_of_its_members_probabilities(fitted, data):
    result, _ = fitted
    logits, _ = data
    for name, members in (("avg", MEMBERS), ("avg-bc", ["b", "c"])):
        for split in ("val", "test"):
            expected = np.mean([softmax(logits[m][split], axis=1) for m in members], axis=0)
            np.testing.assert_allclose(result[name].proba[split], expected, rtol=0, atol=1e-12,
                                       err_msg=f"{name} {split}")


def test_fit_fusers_sees_val_labels_only(fitted, data):
    """Train and test labels may be anything (of the same length): what each fuser learns, its
    out-of-fold val probabilities and its test probabilities stay the same. Val labels are what it
    learns from: shuffling them changes what the learning fusers give."""
    result, _ = fitted
    logits, labels = data
    rng = np.random.default_rng(0)
    other = {**labels, "train": rng.integers(0, N_CLASSES, len(labels["train"])),
             "test": (labels["test"] + 1) % N_CLASSES}
    again = fit(logits, other)
    for name, fuser in result.items():
        for split in ("val", "test"):
            np.testing.assert_array_equal(again[name].proba[split], fuser.proba[split], err_msg=f"{name} {split}")
        np.testing.assert_equal(again[name].model.get_state(), fuser.model.get_state())

    shuffled = fit(logits, {**labels, "val": rng.permutation(labels["val"])}, entries=ENTRIES[2:])
    for name in ("weighted", "stack"):
        assert not np.allclose(shuffled[name].proba["val"], result[name].proba["val"]), name
