"""The plugin system: entry points, plugin files, blocking, broken and duplicate plugins."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import TOY_PLUGIN, cli
from fusion_engine import PluginError, SpecError
from fusion_engine.plugins import DISABLE_ENV, get_plugins

FIRST_PARTY = {"fusion_engine_datasets", "fusion_engine_executors", "fusion_engine_fusers", "fusion_engine_metrics",
               "fusion_engine_mlflow", "fusion_engine_timm"}


def install_fake_distribution(site: Path, dist: str, module: str, source: str, *, ep_name: str | None = None) -> None:
    """An installed distribution as pip leaves it: the module plus a dist-info with entry points."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[fusion_engine]\n{ep_name or dist} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    yield path
    for name in [m for m in sys.modules if m.startswith("fe_test_")]:
        del sys.modules[name]


EXTRA_FUSER = """
    from fusion_engine import hookimpl, FuserRecord, Fuser

    class Median(Fuser):
        requires_fit = False

    @hookimpl
    def register_fusers():
        return [FuserRecord("median", Median)]
"""


def test_first_party_plugins_load_through_entry_points():
    plugins = get_plugins()
    assert FIRST_PARTY <= set(plugins.info)
    assert all(plugins.info[name].first_party for name in FIRST_PARTY)
    assert {"accuracy", "f1_macro", "nll", "precision_macro", "recall_macro"} <= set(plugins.catalog().names("metric"))


def test_third_party_distribution_is_found(site):
    install_fake_distribution(site, "fe-median", "fe_test_median", EXTRA_FUSER)
    plugins = get_plugins()
    info = plugins.info["fe-median"]
    assert (info.version, info.distribution, info.first_party) == ("1.2.3", "fe-median", False)
    assert plugins.catalog().get("fuser", "median").plugin == "fe-median"


def test_env_var_disables_external_plugins_only(site, monkeypatch):
    install_fake_distribution(site, "fe-median", "fe_test_median", EXTRA_FUSER)
    monkeypatch.setenv(DISABLE_ENV, "1")
    plugins = get_plugins()
    assert "fe-median" not in plugins.info
    assert FIRST_PARTY <= set(plugins.info)


def test_env_var_blocks_named_plugins(monkeypatch):
    monkeypatch.setenv(DISABLE_ENV, "fusion_engine_metrics, nothing")
    plugins = get_plugins()
    assert "fusion_engine_metrics" not in plugins.info
    assert plugins.catalog().names("metric") == []


def test_broken_plugin_warns_and_is_skipped(site, caplog):
    install_fake_distribution(site, "fe-broken", "fe_test_broken", "import not_a_module_anywhere\n")
    with caplog.at_level(logging.WARNING, logger="fusion_engine"):
        plugins = get_plugins()
    assert "fe-broken" not in plugins.info
    assert "No module named 'not_a_module_anywhere'" in plugins.skipped["fe-broken"]
    assert "plugin fe-broken skipped: failed to import fe_test_broken" in caplog.text
    assert FIRST_PARTY <= set(plugins.info)


def test_misspelt_hook_is_skipped(site):
    install_fake_distribution(site, "fe-typo", "fe_test_typo", """
        from fusion_engine import hookimpl

        @hookimpl
        def register_fuser():
            return []
    """)
    plugins = get_plugins()
    assert "fe-typo" not in plugins.info
    assert "register_fuser" in plugins.skipped["fe-typo"]


def test_duplicate_name_names_both_providers(site):
    install_fake_distribution(site, "fe-dup", "fe_test_dup", """
        from fusion_engine import hookimpl, MetricRecord

        @hookimpl
        def register_metrics():
            return [MetricRecord("Accuracy", lambda y, p: 0.0)]
    """)
    with pytest.raises(PluginError) as info:
        get_plugins().catalog()
    assert str(info.value) == (
        f"metric 'accuracy' is registered by both fusion_engine_metrics and fe-dup; "
        f"uninstall one or block it with {DISABLE_ENV}=fe-dup"
    )


def test_wrong_record_type_is_an_error(site):
    install_fake_distribution(site, "fe-wrong", "fe_test_wrong", """
        from fusion_engine import hookimpl

        @hookimpl
        def register_backbones():
            return [{"name": "x"}]
    """)
    with pytest.raises(PluginError, match="fe-wrong: register_backbones\\(\\) returned dict, expected BackboneRecord"):
        get_plugins().catalog()


OLD_STYLE_FUSER = """
    from typing import Annotated
    from pydantic import Field
    from fusion_engine import hookimpl, FuserRecord, Fuser, Params

    class MedianParams(Params):
        trim: int = Field(WRITTEN, ge=0)

    class Median(Fuser):
        requires_fit = False

        def __init__(self, trim: Annotated[int, Field(ge=0)] = 0):
            self.trim = trim

    @hookimpl
    def register_fusers():
        return [FuserRecord("median", Median, MedianParams)]
"""


def test_a_fusers_params_model_is_accepted_only_as_its_init_says(site):
    """A plugin written against 0.1 gives its fuser a Params model: one that matches ``__init__``
    is used; one that has drifted from it stops the catalog with one line naming the plugin, the
    fuser, the field and both values."""
    install_fake_distribution(site, "fe-median", "fe_test_median", OLD_STYLE_FUSER.replace("WRITTEN", "0"))
    record = get_plugins().catalog().get("fuser", "median").record
    assert record.params.__name__ == "MedianParams" and record.params().model_dump() == {"trim": 0}

    del sys.modules["fe_test_median"]
    (site / "fe_test_median.py").write_text(textwrap.dedent(OLD_STYLE_FUSER.replace("WRITTEN", "1")))
    with pytest.raises(PluginError) as info:
        get_plugins().catalog()
    assert str(info.value) == ("plugin fe-median: fuser median: MedianParams.trim has default 1 (int), Median.__init__ "
                               "has 0 (int); leave params out and the model is read off Median.__init__")


def test_plugin_file_registers_everything():
    plugins = get_plugins([TOY_PLUGIN], entry_points=False)
    catalog = plugins.catalog()
    assert catalog.names("backbone") == ["file-net", "flaky-net", "toy-net"]
    assert catalog.names("dataset") == ["toy-data"]
    assert catalog.names("fuser") == ["toy-mean"]
    (row,) = plugins.describe()
    assert row["source"] == "file" and row["path"] == str(TOY_PLUGIN)
    assert row["hooks"] == ["register_backbones", "register_datasets", "register_fusers"]


def test_broken_plugin_file_is_an_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(SpecError, match=f"plugin file {bad} failed to import: RuntimeError: boom"):
        get_plugins([bad], entry_points=False)
    with pytest.raises(SpecError, match="plugin file not found"):
        get_plugins([tmp_path / "missing.py"], entry_points=False)


def test_managers_are_independent():
    a = get_plugins([TOY_PLUGIN], entry_points=False)
    b = get_plugins(entry_points=False)
    assert a.catalog().names("backbone") == ["file-net", "flaky-net", "toy-net"]
    assert b.catalog().names("backbone") == []


def test_plugins_command_json_lists_versions_hooks_and_records():
    out = cli("plugins", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert FIRST_PARTY <= set(rows)
    assert rows["fusion_engine_metrics"]["hooks"] == ["register_metrics"]
    assert "nll" in rows["fusion_engine_metrics"]["metrics"]
    assert rows["fusion_engine_metrics"]["version"]
    assert rows["fusion_engine_executors"]["executors"] == ["local", "ray"]
    assert (rows["fusion_engine_mlflow"]["trackers"], rows["fusion_engine_mlflow"]["hooks"]) == (["mlflow"],
                                                                                              ["register_trackers"])


def test_plugins_in_a_pipe_cut_nothing_and_list_every_record_with_its_description():
    out = cli("plugins", env={"COLUMNS": "60"})
    assert out.returncode == 0, out.stderr
    assert "…" not in out.stdout
    for name in sorted(FIRST_PARTY):
        assert name in out.stdout
    assert "greedy ensemble selection with replacement (Caruana 2004)" in out.stdout
    assert "any timm architecture by name (model: resnet50, convnext_tiny, ...)" in out.stdout


def test_plugins_params_shows_a_records_parameters_with_defaults_and_constraints(capsys):
    from fusion_engine.cli import main

    assert main(["plugins", "--params", "caruana", "--json"]) == 0
    [caruana] = json.loads(capsys.readouterr().out)
    fields = {f["name"]: f for f in caruana["params"]}
    assert caruana["kind"] == "fuser" and caruana["plugin"] == "fusion_engine_fusers"
    assert fields["ensemble_size"] == {"name": "ensemble_size", "type": "int", "default": 25, "constraints": ["> 0"],
                                       "description": ""}
    assert fields["bag_fraction"]["constraints"] == ["> 0", "<= 1"] and fields["metric"]["type"] == "'nll' | 'accuracy'"
    assert main(["plugins", "--params", "resnet18"]) == 0
    table = capsys.readouterr().out
    assert "pretrained_file" in table and "CIFAR-style stem for small images" in table
    assert main(["plugins", "--params", "carauna"]) == 2
    assert capsys.readouterr().err == ("no plugin registers 'carauna' (did you mean 'caruana'?); "
                                       "`fusion-engine plugins` lists them\n")
