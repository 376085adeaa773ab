"""Spec files: loading, validation, and errors a user can act on."""

from __future__ import annotations

import textwrap

import pytest

from conftest import TOY_PLUGIN
from fusion_engine import SpecError, load_spec, resolve_spec
from fusion_engine.plugins import get_plugins


GOOD = """
name: tiny
data:
  dataset: toy-data
members:
  - name: a
    backbone: toy-net
fusers:
  - {name: avg, fuser: toy-mean}
"""


def write(tmp_path, text: str, name: str = "spec.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_for(path) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def test_yaml_and_toml_give_the_same_spec(tmp_path):
    yaml_spec = load_spec(write(tmp_path, GOOD))
    toml_spec = load_spec(write(tmp_path, """
        name = "tiny"
        [data]
        dataset = "toy-data"
        [[members]]
        name = "a"
        backbone = "toy-net"
        [[fusers]]
        name = "avg"
        fuser = "toy-mean"
    """, "spec.toml"))
    assert yaml_spec == toml_spec
    assert yaml_spec.data.split.val == 0.2 and yaml_spec.members[0].train.epochs == 10


def test_unknown_field_names_the_path_and_suggests(tmp_path):
    path = write(tmp_path, GOOD.replace("backbone: toy-net", "backbone: toy-net\n    trian: {epochs: 1}"))
    msg = error_for(path)
    assert msg.startswith(f"{path}: members.0.trian: unknown field (did you mean 'train'?)")
    assert "allowed: name, backbone, params, train, weights, predictions, kind, class_names, seed" in msg


def test_nested_unknown_field(tmp_path):
    path = write(tmp_path, GOOD.replace("backbone: toy-net", "backbone: toy-net\n    train: {epochs: 1, optimiser: sgd}"))
    assert error_for(path).startswith(f"{path}: members.0.train.optimiser: unknown field (did you mean 'optimizer'?)")


def test_bad_value_shows_what_is_allowed(tmp_path):
    path = write(tmp_path, GOOD.replace("backbone: toy-net", "backbone: toy-net\n    train: {optimizer: adam}"))
    msg = error_for(path)
    assert msg.startswith(f"{path}: members.0.train.optimizer: ")
    assert "'adamw' or 'sgd'" in msg and "'adam'" in msg


def test_missing_field(tmp_path):
    path = write(tmp_path, "name: x\nmembers: [{name: a, backbone: b}]\n")
    assert error_for(path) == f"{path}: data: required field is missing"


def test_duplicate_row_names_are_rejected(tmp_path):
    path = write(tmp_path, GOOD.replace("name: avg", "name: a"))
    assert error_for(path) == f"{path}: fusers.0.name: 'a' is already the name of members.0"


def test_fuser_members_must_exist(tmp_path):
    path = write(tmp_path, GOOD.replace("fuser: toy-mean}", "fuser: toy-mean, members: [a, b]}"))
    assert error_for(path) == f"{path}: fusers.0.members.1: no member named 'b'; members: a"


def test_split_must_leave_training_data(tmp_path):
    path = write(tmp_path, GOOD.replace("dataset: toy-data", "dataset: toy-data\n  split: {val: 0.5, test: 0.45}"))
    assert "data.split: val + test = 0.95 leaves too little to train on" in error_for(path)


def test_names_cannot_escape_the_run_folder(tmp_path):
    path = write(tmp_path, GOOD.replace("name: a", "name: ../../etc"))
    assert error_for(path).startswith(f"{path}: members.0.name: String should match pattern")


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("spec.yaml", "name: [unclosed\n", "invalid YAML: line 2, column 1"),
        ("spec.toml", "name = \n", "invalid TOML"),
        ("spec.yaml", "", "the spec is empty"),
        ("spec.yaml", "- a\n- b\n", "the spec must be a mapping of fields, got a list"),
        ("spec.json", "{}", "unknown spec format '.json'; use .yaml, .yml or .toml"),
    ],
)
def test_unreadable_files(tmp_path, name, text, expected):
    path = write(tmp_path, text, name)
    msg = error_for(path)
    assert msg.startswith(f"{path}: ") and expected in msg


def test_missing_file(tmp_path):
    assert error_for(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: no such file"


# -- resolution against plugins ---------------------------------------------------------------

def resolve(tmp_path, text):
    path = write(tmp_path, text)
    catalog = get_plugins([TOY_PLUGIN], entry_points=False).catalog()
    return resolve_spec(load_spec(path), catalog, file=str(path)), path


def test_plugin_params_are_validated_in_place(tmp_path):
    text = GOOD.replace("backbone: toy-net", "backbone: toy-net\n    params: {width: -3}")
    with pytest.raises(SpecError) as info:
        resolve(tmp_path, text)
    assert str(info.value).startswith(f"{tmp_path / 'spec.yaml'}: members.0.params.width: Input should be greater than 0")


def test_plugin_params_reject_unknown_keys(tmp_path):
    text = GOOD.replace("backbone: toy-net", "backbone: toy-net\n    params: {widht: 3}")
    with pytest.raises(SpecError) as info:
        resolve(tmp_path, text)
    assert "members.0.params.widht: unknown field (did you mean 'width'?); allowed: width" in str(info.value)


def test_unknown_plugin_name_lists_installed_and_suggests(tmp_path):
    with pytest.raises(SpecError) as info:
        resolve(tmp_path, GOOD.replace("backbone: toy-net", "backbone: toy_nte"))
    assert str(info.value) == (
        f"{tmp_path / 'spec.yaml'}: members.0.backbone: unknown backbone 'toy_nte' "
        "(did you mean 'toy-net'?); installed: file-net, flaky-net, toy-net"
    )


def test_names_match_case_and_separator_insensitively(tmp_path):
    resolved, _ = resolve(tmp_path, GOOD.replace("fuser: toy-mean", "fuser: Toy_Mean"))
    assert resolved.fusers[0].record.name == "toy-mean"


def test_resolved_spec_fills_plugin_defaults(tmp_path):
    resolved, _ = resolve(tmp_path, GOOD)
    data = resolved.resolved_dict()
    assert data["members"][0]["params"] == {"width": 4}
    assert data["members"][0]["train"]["optimizer"] == "adamw"


def test_rank_by_must_be_a_registered_metric(tmp_path):
    path = write(tmp_path, GOOD + "rank_by: f2\n")
    with pytest.raises(SpecError) as info:
        resolve_spec(load_spec(path), get_plugins([TOY_PLUGIN]).catalog(), file=str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: rank_by: cannot rank by 'f2'; choose one of: accuracy, ")
    assert "delta_vs_best_member" in message and "nll" in message


def test_rank_by_accepts_metric_names_loosely(tmp_path):
    plugin = tmp_path / "metric.py"
    plugin.write_text("from fusion_engine import hookimpl, MetricRecord\n"
                      "@hookimpl\ndef register_metrics():\n    return [MetricRecord('f1_macro', lambda y, p: 0.0)]\n")
    path = write(tmp_path, GOOD + "rank_by: F1-Macro\n")
    catalog = get_plugins([TOY_PLUGIN, plugin], entry_points=False).catalog()
    assert resolve_spec(load_spec(path), catalog, file=str(path)).spec.rank_by == "F1-Macro"
